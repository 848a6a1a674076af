"""Time to quality: how long each training path takes to reach GuppyLM's held-out loss, on this device, in one run.

    python -m bench train [--runs reference,reference+compile,reference+sdpa,guppy-fast] [--smoke]

Every run trains on the same prepared data and is scored on the same held-out conversations (the first
`eval_batches` pad batches of eval, fixed order). The target is the final eval loss of `reference`, GuppyLM's recipe
and loop (pad batches, eager, masked-softmax attention, AMP, a host sync every step). Each run records the wall-clock
seconds until its eval loss first reaches the target (evals included), steps/s, real tokens/s, MFU on real tokens
against the GPU's peak (bench/common.py), peak GPU memory, and its final eval loss.

Writes bench/results/<gpu>-<date>.json and a PNG of eval loss against wall-clock time.
--smoke: a tiny model and a few steps, on the CPU, in a couple of minutes (CI runs it).
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile

import torch

from guppy.config import ModelConfig, TrainConfig, preset
from guppy.data import prepare
from guppy.train import train, uses_cuda_graphs

from .common import default_result_path, environment, model_flops_per_token, peak_tflops, slug, write_result

RUNS = ("reference", "reference+compile", "reference+sdpa", "guppy-fast")
SCHEMA_RUN_KEYS = ("name", "seconds_to_target", "target_eval_loss", "final_eval_loss", "tokens_per_s", "mfu",
                   "peak_mem_mb")


def run_configs(name: str, smoke: bool) -> tuple[ModelConfig, TrainConfig]:
    model_cfg, cfg = preset("guppy-9m-fast" if name == "guppy-fast" else "guppy-9m")
    if name.startswith("reference"):
        cfg.log_every = 1  # GuppyLM reads the loss back every step
        model_cfg.ops = "sdpa" if name == "reference+sdpa" else "reference"
        cfg.compile = name == "reference+compile"
    cfg.eval_batches = 50
    cfg.save_every = 10 ** 9  # checkpoints only at the end: no run pays for saves mid-way
    if smoke:
        model_cfg = ModelConfig(**{**model_cfg.to_dict(), "d_model": 64, "n_layers": 2, "n_heads": 2,
                                   "ffn_hidden": 128, "max_seq_len": 64})
        ratio = cfg.max_steps / 10_000
        cfg.max_steps = max(10, int(40 * ratio) // 5 * 5)
        cfg.warmup_steps, cfg.eval_every, cfg.eval_batches = 4, 10, 4
        cfg.batch_size = 8
        cfg.log_every = min(cfg.log_every, 5)
        cfg.lr, cfg.min_lr = 3e-3, 3e-4
    return model_cfg, cfg


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def summarise(name, records, summary, model_cfg, cfg, mean_conv_tokens, device_name):
    evals = [(r["elapsed"], r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    windows = [r for r in records if "tokens_per_s" in r][1:] or [r for r in records if "tokens_per_s" in r]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in windows)
    flops = model_flops_per_token(model_cfg, mean_conv_tokens / 2)
    peak = peak_tflops(device_name)
    return {
        "name": name, "ops": model_cfg.ops, "batch_mode": cfg.batch_mode, "batch_size": cfg.batch_size,
        "steps": summary["step"], "seconds": round(summary["seconds"], 2),
        "steps_per_s": round(summary["step"] / summary["seconds"], 2),
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(tokens_per_s * flops / (peak * 1e12), 4) if peak else None,
        "peak_mem_mb": round(summary["peak_mem_mb"], 1) if "peak_mem_mb" in summary else None,
        "final_eval_loss": evals[-1][2] if evals else None,
        "eval_curve": [{"seconds": t, "step": s, "eval_loss": e} for t, s, e in evals],
    }


def plot(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install guppy[bench]): no plot")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in result["runs"]:
        if run.get("eval_curve"):
            ax.plot([p["seconds"] for p in run["eval_curve"]], [p["eval_loss"] for p in run["eval_curve"]],
                    marker="o", ms=3, label=run["name"])
    if result["runs"] and result["runs"][0].get("target_eval_loss") is not None:
        ax.axhline(result["runs"][0]["target_eval_loss"], color="gray", ls="--", lw=1, label="target")
    ax.set_xlabel("wall-clock seconds (evals included)")
    ax.set_ylabel("held-out loss")
    ax.set_yscale("log")
    ax.set_title(f"{result['device']} | torch {result['torch']} | triton {result['triton']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(args):
    from guppy.train import resolve_device
    dev = resolve_device(args.device if not args.smoke else "cpu")
    env = environment(dev)
    names = [n.strip() for n in args.runs.split(",")]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; choose from {', '.join(RUNS)}")
    if "reference" not in names:
        names.insert(0, "reference")  # it defines the target
    names.sort(key=lambda n: n != "reference")

    work = tempfile.mkdtemp(prefix="guppy-bench-train-")
    data = args.data or os.path.join(work, "data")
    if not args.data:
        prepare(data, samples=2000 if args.smoke else 60_000, seed=1337, log=print)
    with open(os.path.join(data, "meta.json")) as f:
        mean_conv_tokens = json.load(f)["tokens_per_conversation"]["mean"]

    result = {**env, "benchmark": "time to GuppyLM's held-out loss", "smoke": bool(args.smoke), "runs": []}
    target = None
    for name in names:
        if args.smoke and name == "reference+compile" and not args.compile_on_cpu:
            result["runs"].append({**{k: None for k in SCHEMA_RUN_KEYS}, "name": name,
                                   "skipped": "torch.compile on the CPU is slow to build; --compile-on-cpu runs it"})
            continue
        model_cfg, cfg = run_configs(name, args.smoke)
        if args.max_steps:
            cfg.max_steps = args.max_steps
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print(f"--- {name}: {cfg.batch_mode} batches of {cfg.batch_size}, {cfg.max_steps} steps, ops {model_cfg.ops}"
              + (", torch.compile" if cfg.compile else "") + (", CUDA graphs" if uses_cuda_graphs(cfg, dev) else ""))
        run_dir = os.path.join(work, slug(name))
        summary = train(data, run_dir, model_cfg, cfg, device=str(dev), progress=not args.no_progress)
        row = summarise(name, read_metrics(run_dir), summary, model_cfg, cfg, mean_conv_tokens, env["device"])
        if name == "reference":
            target = row["final_eval_loss"]
        reached = [p["seconds"] for p in row["eval_curve"] if p["eval_loss"] <= target]
        row["target_eval_loss"] = target
        row["seconds_to_target"] = round(reached[0], 2) if reached else None
        result["runs"].append(row)

    ref = result["runs"][0]["seconds_to_target"]
    print(f"\n{'run':20s} {'s to target':>12s} {'speed-up':>9s} {'final eval':>11s} {'tok/s':>10s} {'MFU':>7s} "
          f"{'peak MB':>8s}")
    for r in result["runs"]:
        if r.get("skipped"):
            print(f"{r['name']:20s} skipped: {r['skipped']}")
            continue
        s, mfu, mem = r["seconds_to_target"], r["mfu"], r["peak_mem_mb"]
        speedup = f"{ref / s:.1f}x" if s and ref else "-"
        print(f"{r['name']:20s} {s if s is not None else 'not reached':>12} {speedup:>9s} "
              f"{r['final_eval_loss']:11.4f} {r['tokens_per_s']:10,.0f} {f'{mfu:.1%}' if mfu is not None else '-':>7s} "
              f"{mem if mem is not None else '-':>8}")

    # a smoke run is a check, not a result: it stays out of bench/results/ proper (smoke/ is git-ignored)
    write_result(result, args.out or default_result_path(result, subdir="smoke" if args.smoke else ""), plot)
    return result
