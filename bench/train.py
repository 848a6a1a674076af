"""Time to quality: how long each training path takes to reach GuppyLM's held-out loss, on this device.

    python -m bench train [--runs reference,reference+compile,reference+sdpa,guppy-fast] [--target-from FILE]
                          [--out DIR | FILE.json] [--smoke]

Every run trains on the same prepared data and is scored on the same held-out conversations (the first
`eval_batches` pad batches of eval, fixed order). The target is the final eval loss of `reference`, GuppyLM's recipe
and loop (pad batches, eager, masked-softmax attention, AMP, a host sync every step), or the `target_eval_loss` of
`--target-from FILE`: a reference curve (`python -m bench reference-curve`) or an earlier `bench train` result. With
a target file `--runs` may leave out `reference`, so a run can be split across two calls (a GPU lent for minutes):

    python -m bench train --runs reference,reference+sdpa --out A.json
    python -m bench train --runs reference+compile,guppy-fast --target-from A.json --out B.json

The file's eval setting (`eval_batches`; 0 = the whole held-out split) is used too, so every run is scored as its
target was, and its data fingerprint is checked against this data. The JSON says which runs it holds (`run_names`,
`partial`) and where its target came from (`target_from`).

A run reaches the target at its first eval within `--target-rtol` (default 0.5 %) of it: eval <= target * 1.005.
Runs of one recipe whose numerics differ (SDPA, torch.compile, fp16 rounding) do not end at exactly the reference's
loss, and a strict <= called one of them "not reached" at random (the CPU smoke: reference+compile 4.9753 against
4.97524). 0.5 % is about one standard error of the 50-batch eval: the reference curve's is 0.00155 over 3,000
held-out conversations at 0.4698, so about 0.0021 (0.45 %) over these 1,600.
Each run records the seconds until its eval loss first reaches the target (`seconds_to_target`: from train() start,
evals included, checkpoint writes left out by train() itself), and beside it `setup_s`, the one-time part of that:
train() start to the end of the first optimizer step (Triton JIT, the nvcc build and self-check, CUDA-graph capture,
torch.compile). Also conversations to target, steps/s, real tokens/s, MFU on real tokens against the GPU's datasheet
peak (bench/common.py; exact device names, "unknown peak" otherwise), peak GPU memory, and the final eval loss.

Writes bench/results/<gpu>-<date>.json (`--out DIR`: DIR/<gpu>-<date>.json; `--out FILE.json`: that file) after
every run, so a call cut short keeps the runs it finished, and a PNG of eval loss against wall-clock time at the end.
--smoke: a tiny model and a few steps, on the CPU, in a couple of minutes (CI runs it).
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile

import torch

from guppy.config import ModelConfig, TrainConfig, preset
from guppy.train import train, uses_cuda_graphs

from .common import (environment, model_flops_per_token, peak_note, peak_tflops, prepared_data, pyplot, result_path,
                     slug, write_result)
from .reference_curve import data_fingerprint, read_target

RUNS = ("reference", "reference+compile", "reference+sdpa", "guppy-fast")
TARGET_RTOL = 0.005  # reached: eval loss <= target * (1 + TARGET_RTOL); why 0.5 %: the header
SCHEMA_RUN_KEYS = ("name", "seconds_to_target", "setup_s", "target_eval_loss", "final_eval_loss", "tokens_per_s",
                   "mfu", "peak_mem_mb")


def run_configs(name: str, smoke: bool, eval_batches: int | None = None) -> tuple[ModelConfig, TrainConfig]:
    model_cfg, cfg = preset("guppy-9m-fast" if name == "guppy-fast" else "guppy-9m")
    if name.startswith("reference"):
        cfg.log_every = 1  # GuppyLM reads the loss back every step
        model_cfg.ops = "sdpa" if name == "reference+sdpa" else "reference"
        cfg.compile = name == "reference+compile"
    cfg.eval_batches = 50
    cfg.save_every = 10 ** 9  # only best/latest at evals and the end; train() keeps writes out of `elapsed`
    if smoke:
        model_cfg = ModelConfig(**{**model_cfg.to_dict(), "d_model": 64, "n_layers": 2, "n_heads": 2,
                                   "ffn_hidden": 128, "max_seq_len": 64})
        ratio = cfg.max_steps / 10_000
        cfg.max_steps = max(10, int(40 * ratio) // 5 * 5)
        cfg.warmup_steps, cfg.eval_every, cfg.eval_batches = 4, 10, 4
        cfg.batch_size = 8
        cfg.log_every = min(cfg.log_every, 5)
        cfg.lr, cfg.min_lr = 3e-3, 3e-4
    if eval_batches is not None:
        cfg.eval_batches = eval_batches
    return model_cfg, cfg


def plan_runs(runs: str, have_target: bool) -> list[str]:
    """The runs to do, reference first. Without a target file, reference is added: its final loss is the target."""
    names = [n.strip() for n in runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown or not names:
        raise ValueError(f"--runs {runs!r}: unknown run(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(RUNS)}")
    names = list(dict.fromkeys(names))
    if "reference" not in names and not have_target:
        names.insert(0, "reference")
    return sorted(names, key=lambda n: n != "reference")


def read_target_file(path: str) -> dict:
    """target_eval_loss, the eval setting it was scored with (None: not recorded), and the data fingerprint."""
    doc = read_target(path)
    target = doc["target_eval_loss"]
    eval_batches = doc.get("eval_batches", (doc.get("train_config") or {}).get("eval_batches"))
    baseline = next((r.get("seconds_to_target") for r in doc.get("runs", []) if r.get("name") == "reference"), None)
    return {"path": path, "target_eval_loss": target, "eval_batches": eval_batches, "data": doc.get("data"),
            "device": doc.get("device"), "reference_seconds_to_target": baseline}


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def summarise(name, records, summary, model_cfg, cfg, mean_conv_tokens, device_name):
    evals = [r for r in records if "eval_loss" in r]
    windows = [r for r in records if "tokens_per_s" in r][1:] or [r for r in records if "tokens_per_s" in r]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in windows)
    flops = model_flops_per_token(model_cfg, mean_conv_tokens / 2)
    peak = peak_tflops(device_name)
    return {
        "name": name, "ops": model_cfg.ops, "batch_mode": cfg.batch_mode, "batch_size": cfg.batch_size,
        "steps": summary["step"], "seconds": round(summary["seconds"], 2),
        "setup_s": round(summary["setup_s"], 2) if summary.get("setup_s") is not None else None,
        "save_s": round(summary.get("save_s", 0.0), 2),
        "steps_per_s": round(summary["step"] / summary["seconds"], 2),
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(tokens_per_s * flops / (peak * 1e12), 4) if peak else None,
        "peak_mem_mb": round(summary["peak_mem_mb"], 1) if "peak_mem_mb" in summary else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "eval_curve": [{"seconds": r["elapsed"], "step": r["step"], "conversations": r.get("conversations"),
                        "eval_loss": r["eval_loss"]} for r in evals],
    }


def reach_target(row: dict, target: float, rtol: float = TARGET_RTOL) -> dict:
    """seconds_to_target and conversations_to_target: the first eval at or under target * (1 + rtol) (None: not
    reached)."""
    hit = next((p for p in row["eval_curve"] if p["eval_loss"] <= target * (1 + rtol)), None)
    return {"target_eval_loss": target, "seconds_to_target": round(hit["seconds"], 2) if hit else None,
            "conversations_to_target": hit["conversations"] if hit else None}


def plot(result, path):
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in result["runs"]:
        if run.get("eval_curve"):
            ax.plot([p["seconds"] for p in run["eval_curve"]], [p["eval_loss"] for p in run["eval_curve"]],
                    marker="o", ms=3, label=run["name"])
    if result.get("target_eval_loss") is not None:
        ax.axhline(result["target_eval_loss"], color="gray", ls="--", lw=1, label="target")
    ax.set_xlabel("wall-clock seconds from train() start (evals included, checkpoint writes not)")
    ax.set_ylabel("held-out loss")
    ax.set_yscale("log")
    ax.set_title(f"{result['device']} | torch {result['torch']} | triton {result['triton']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_table(result, baseline_s):
    print(f"\n{'run':20s} {'setup s':>8s} {'s to target':>12s} {'speed-up':>9s} {'final eval':>11s} {'tok/s':>10s} "
          f"{'MFU':>7s} {'peak MB':>8s}")
    for r in result["runs"]:
        if r.get("skipped"):
            print(f"{r['name']:20s} skipped: {r['skipped']}")
            continue
        s, mfu, mem = r["seconds_to_target"], r["mfu"], r["peak_mem_mb"]
        speedup = f"{baseline_s / s:.1f}x" if s and baseline_s else "-"
        print(f"{r['name']:20s} {r['setup_s'] if r['setup_s'] is not None else '-':>8} "
              f"{s if s is not None else 'not reached':>12} {speedup:>9s} {r['final_eval_loss']:11.4f} "
              f"{r['tokens_per_s']:10,.0f} {f'{mfu:.1%}' if mfu is not None else '-':>7s} "
              f"{mem if mem is not None else '-':>8}")
    print(f"target eval loss {result['target_eval_loss']:.4f}, reached within {result['target_rtol']:.1%}"
          + (f" from {result['target_from']['path']}" if result["target_from"] else " (this call's reference run)")
          + f"; MFU peak: {result['peak']}")


def warm_up(dev):
    """Process-wide first-use costs (CUDA context, cuBLAS handles, autocast, the allocator, lazy imports) paid once
    here, so the first run's setup_s holds only its own path's one-time costs."""
    from guppy.model import GuppyLM
    from guppy.train import autocast, autocast_dtype
    model = GuppyLM(ModelConfig(d_model=32, n_layers=1, n_heads=2, ffn_hidden=64, max_seq_len=16, ops="reference"))
    model.to(dev)
    idx = torch.randint(0, model.config.vocab_size, (2, 16), device=dev)
    with autocast(dev, autocast_dtype(dev)):
        _, loss = model(idx, idx)
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(args):
    from guppy.train import resolve_device
    try:
        names = plan_runs(args.runs, have_target=bool(args.target_from))
    except ValueError as e:
        raise SystemExit(f"python -m bench train: {e}")
    rtol = TARGET_RTOL if args.target_rtol is None else args.target_rtol
    if not 0 <= rtol < 0.5:
        raise SystemExit(f"python -m bench train: --target-rtol {rtol}: expected a fraction in [0, 0.5) "
                         "(0.005 = within 0.5 %; 0 = strict)")
    try:
        target_file = read_target_file(args.target_from) if args.target_from else None
    except ValueError as e:
        raise SystemExit(f"python -m bench train: --target-from {e}")
    dev = resolve_device(args.device if not args.smoke else "cpu")
    env = environment(dev)

    work = tempfile.mkdtemp(prefix="guppy-bench-train-")
    data = prepared_data(args.data, work, samples=2000 if args.smoke else 60_000, seed=1337, log=print)
    with open(os.path.join(data, "meta.json")) as f:
        mean_conv_tokens = json.load(f)["tokens_per_conversation"]["mean"]

    target, eval_batches = None, None
    fingerprint = data_fingerprint(data)
    if target_file:
        target, eval_batches = target_file["target_eval_loss"], target_file["eval_batches"]
        target_file["data_matches"] = target_file.pop("data") in (None, fingerprint)
        if not target_file["data_matches"]:
            print(f"note: {args.target_from} was measured on other data (its fingerprint differs from {data}'s): "
                  "its target may not transfer")
    warm_up(dev)
    _, probe_cfg = run_configs(names[0], args.smoke, eval_batches)
    result = {**env, "benchmark": "time to GuppyLM's held-out loss", "smoke": bool(args.smoke),
              "run_names": names, "partial": set(names) != set(RUNS), "target_from": target_file,
              "target_eval_loss": target, "target_rtol": rtol, "eval_batches": probe_cfg.eval_batches,
              "peak_tflops": peak_tflops(env["device"]), "peak": peak_note(env["device"]), "data": fingerprint,
              "runs": []}
    # a smoke run is a check, not a result: it stays out of bench/results/ proper (smoke/ is git-ignored)
    out = result_path(args.out, result, subdir="smoke" if args.smoke else "")
    for name in names:
        if args.smoke and name == "reference+compile" and not args.compile_on_cpu:
            result["runs"].append({**{k: None for k in SCHEMA_RUN_KEYS}, "name": name,
                                   "skipped": "torch.compile on the CPU is slow to build; --compile-on-cpu runs it"})
            continue
        model_cfg, cfg = run_configs(name, args.smoke, eval_batches)
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
        if target is None:  # no target file: this is the reference run, first in `names`
            target = result["target_eval_loss"] = row["final_eval_loss"]
        row.update(reach_target(row, target, rtol))
        result["runs"].append(row)
        write_result(result, out)  # after every run: a call cut short keeps what it finished

    ref = next((r for r in result["runs"] if r["name"] == "reference"), None)
    baseline_s = ref["seconds_to_target"] if ref else None
    if baseline_s is None and target_file and target_file["device"] == env["device"]:
        baseline_s = target_file["reference_seconds_to_target"]  # the split's first call, on the same device
    result["baseline_seconds_to_target"] = baseline_s
    print_table(result, baseline_s)
    write_result(result, out, plot)
    return result
