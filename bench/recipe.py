"""Fewer steps to GuppyLM's quality: a sweep of training recipes, each run until it reaches the reference's loss.

    python -m bench recipe --target-from bench/results/reference-curve-....json [--variants a,b] [--size full|proxy]
    python -m bench recipe --smoke          # CPU, tiny, ~1 minute: its own small reference first (CI runs it)

Each variant is the fast path (`guppy-9m-fast`: packed rows of 128, the kernels, CUDA graphs on a GPU) with some
recipe knobs changed (VARIANTS below). It trains until its eval loss on the whole held-out split first reaches the
target, the final eval loss of the reference curve (`bench reference-curve`, read from --target-from), or until its
step cap, which is also the length of its schedule: a cosine or a WSD decay ends at max_steps, so a variant with a
1,500-step cap is the recipe one would ship as a 1,500-step preset. The eval every `--eval-every` steps gives
steps_to_target its resolution.

For each variant: steps, conversations, tokens (that carry loss) and wall seconds (evals and one-time setup included)
to the target, the final eval loss, and `guppy eval`'s keyword hit rate at the last checkpoint. The JSON is rewritten
after every variant, and `--keep` skips the variants a previous run already wrote into --out, so an interrupted sweep
continues where it stopped. One plot beside it: eval loss against conversations seen, every variant and the
reference curve.

--size proxy is the CPU proxy study (bench/reference_curve.py: proxy_configs): the same variants at the cpu-demo
model's shape and a quarter of the batch rows, against `bench reference-curve --proxy`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from guppy.config import ModelConfig, TrainConfig, preset
from guppy.train import train

from .common import RESULTS_DIR, environment, prepared_data, pyplot, slug, write_result
from .reference_curve import data_fingerprint, proxy_configs, read_target

# name -> overrides of BASE, the recipe guppy-9m-fast had before issue 12's sweep (AdamW 6e-4 -> 6e-5 cosine, 100
# warm-up, dropout 0.1), in that goal's 1,500 steps: TrainConfig fields, and the model's `dropout`. Everything else
# (32 packed rows, the kernels, CUDA graphs) is the guppy-9m-fast preset's. BASE names every recipe knob a later
# preset changed (Muon's lr and momentum, the WSD decay share), so a variant, and a result in bench/results, means the
# same recipe whatever the preset now says. Learning rates are full-size values; min_lr = lr / 10.
# "guppy-9m-fast" is the preset as it ships, untouched.
BASE = dict(max_steps=1500, optimizer="adamw", schedule="cosine", lr=6e-4, min_lr=6e-5, warmup_steps=100,
            weight_decay=0.1, dropout=0.1, muon_lr=0.02, muon_momentum=0.95, decay_fraction=0.2)
SHIPPED = dict(dropout=0.0, optimizer="muon", muon_lr=0.02, lr=2.4e-3, min_lr=2.4e-4)  # guppy-9m-fast after issue 12
# issue 20's proxy winners of one lever each, together: Muon momentum 0.9 and lr 0.01, WSD to 0 over the last 40 %
COMBO = dict(SHIPPED, muon_momentum=0.9, muon_lr=0.01, schedule="wsd", decay_fraction=0.4, min_lr=0.0)
# guppy-9m-fast after issue 20: the full-size confirmation's winner (notes/recipe.md), the preset's recipe since
ISSUE_20_WINNER = "muon-1000-mom0.9-lr0.01-wsd0.4-0"
VARIANTS: dict[str, dict | None] = {
    "guppy-9m-fast": None,
    "fast-3000": dict(max_steps=3000),                              # the old preset, at its own length
    "fast": dict(),                                                 # the old recipe in the goal's 1,500 steps
    "nodrop": dict(dropout=0.0),
    "lr1.2e-3": dict(dropout=0.0, lr=1.2e-3, min_lr=1.2e-4),
    "lr2.4e-3": dict(dropout=0.0, lr=2.4e-3, min_lr=2.4e-4),
    "lr4.8e-3": dict(dropout=0.0, lr=4.8e-3, min_lr=4.8e-4),
    "lr2.4e-3-drop": dict(dropout=0.1, lr=2.4e-3, min_lr=2.4e-4),
    "lr2.4e-3-wsd": dict(dropout=0.0, lr=2.4e-3, min_lr=2.4e-4, schedule="wsd"),
    "lr1.2e-3-wsd": dict(dropout=0.0, lr=1.2e-3, min_lr=1.2e-4, schedule="wsd"),
    "lr2.4e-3-wd0": dict(dropout=0.0, lr=2.4e-3, min_lr=2.4e-4, weight_decay=0.0),
    "lr2.4e-3-rows64": dict(dropout=0.0, lr=2.4e-3, min_lr=2.4e-4, batch_size=64, max_steps=750),
    "muon": dict(dropout=0.0, optimizer="muon", muon_lr=0.02, lr=1.2e-3, min_lr=1.2e-4),
    "muon-adam2.4e-3": dict(dropout=0.0, optimizer="muon", muon_lr=0.02, lr=2.4e-3, min_lr=2.4e-4),
    "muon-lr0.04": dict(dropout=0.0, optimizer="muon", muon_lr=0.04, lr=1.2e-3, min_lr=1.2e-4),
    "muon-wsd": dict(dropout=0.0, optimizer="muon", muon_lr=0.02, lr=1.2e-3, min_lr=1.2e-4, schedule="wsd"),
    "muon-lr0.01-adam2.4e-3": dict(dropout=0.0, optimizer="muon", muon_lr=0.01, lr=2.4e-3, min_lr=2.4e-4),
    "muon-1000": dict(dropout=0.0, optimizer="muon", muon_lr=0.02, lr=2.4e-3, min_lr=2.4e-4, max_steps=1000),
    # Issue 20 (<= 1,000 steps, stretch 650): the shipped recipe (SHIPPED) at a 650- or 1,000-step cap, one lever
    # changed (TrainConfig's issue-20 knobs; notes/recipe.md "Issue 20: levers"). Run with --run-to-cap: the loss at
    # the cap is what a preset of that length would ship, and steps_to_target still comes from the curve.
    "muon-650": dict(SHIPPED, max_steps=650),
    "muon-650-linear0": dict(SHIPPED, max_steps=650, schedule="linear", min_lr=0.0),
    "muon-650-ema": dict(SHIPPED, max_steps=650, ema_decay=0.98, ema_start=0.5),
    "muon-650-linear0-ema": dict(SHIPPED, max_steps=650, schedule="linear", min_lr=0.0, ema_decay=0.98,
                                 ema_start=0.5),
    "muon-650-wsd0.4-0": dict(SHIPPED, max_steps=650, schedule="wsd", decay_fraction=0.4, min_lr=0.0),
    "muon-650-lr0.01": dict(SHIPPED, max_steps=650, muon_lr=0.01),
    "muon-650-mom0.9": dict(SHIPPED, max_steps=650, muon_momentum=0.9),
    "muon-650-warmup50": dict(SHIPPED, max_steps=650, warmup_steps=50),
    "muon-650-embed0.5": dict(SHIPPED, max_steps=650, embed_lr_ratio=0.5),
    "muon-650-gpt2init": dict(SHIPPED, max_steps=650, resid_init_scale="gpt2"),
    "muon-650-zloss": dict(SHIPPED, max_steps=650, z_loss=1e-4),
    "muon-rows64-325": dict(SHIPPED, max_steps=325, batch_size=64, warmup_steps=50),  # 64 x 128, half the steps
    "muon-1000-linear0": dict(SHIPPED, max_steps=1000, schedule="linear", min_lr=0.0),
    "muon-1000-linear0-ema": dict(SHIPPED, max_steps=1000, schedule="linear", min_lr=0.0, ema_decay=0.98,
                                  ema_start=0.5),
    "muon-rows64-500-linear0": dict(SHIPPED, max_steps=500, batch_size=64, warmup_steps=50, schedule="linear",
                                    min_lr=0.0),
    # the proxy's winners of one lever each (momentum 0.9, Muon lr 0.01, WSD to 0; notes/recipe.md), together
    "muon-650-mom0.85": dict(SHIPPED, max_steps=650, muon_momentum=0.85),
    "muon-650-mom0.8": dict(SHIPPED, max_steps=650, muon_momentum=0.8),
    "muon-650-mom0.8-lr0.01-wsd0.4-0": dict(COMBO, max_steps=650, muon_momentum=0.8),
    # the proxy's best combination (COMBO), for the full-size confirmation: 1,000 steps, and 64 x 128 at half of 650
    "muon-1000-mom0.9-lr0.01-wsd0.4-0": dict(COMBO, max_steps=1000),
    "muon-rows64-325-mom0.9-lr0.01-wsd0.4-0": dict(COMBO, max_steps=325, batch_size=64, warmup_steps=50),
    "muon-650-mom0.9-lr0.01": dict(SHIPPED, max_steps=650, muon_momentum=0.9, muon_lr=0.01),
    "muon-650-mom0.9-wsd0.4-0": dict(SHIPPED, max_steps=650, muon_momentum=0.9, schedule="wsd", decay_fraction=0.4,
                                     min_lr=0.0),
    "muon-650-mom0.9-lr0.01-wsd0.4-0": dict(COMBO, max_steps=650),
    # the last two levers, on top of that combination: a batch-size ramp (a quarter, then half the rows, over the
    # first 100 or 200 steps) and a length curriculum (the first 10 % or 30 % of epoch 0, shortest first)
    "muon-650-mom0.9-lr0.01-wsd0.4-0-ramp100": dict(COMBO, max_steps=650, batch_ramp_steps=100),
    "muon-650-mom0.9-lr0.01-wsd0.4-0-ramp200": dict(COMBO, max_steps=650, batch_ramp_steps=200),
    "muon-650-mom0.9-lr0.01-wsd0.4-0-short0.1": dict(COMBO, max_steps=650, curriculum=0.1),
    "muon-650-mom0.9-lr0.01-wsd0.4-0-short0.3": dict(COMBO, max_steps=650, curriculum=0.3),
    # after the full-size confirmation, toward the 650-step stretch goal: the combination with a longer cool-down,
    # a lower momentum, the shorter warm-up, and a higher AdamW rate
    "muon-650-mom0.9-lr0.01-wsd0.6-0": dict(COMBO, max_steps=650, decay_fraction=0.6),
    "muon-650-mom0.7-lr0.01-wsd0.4-0": dict(COMBO, max_steps=650, muon_momentum=0.7),
    "muon-650-mom0.9-lr0.01-wsd0.4-0-warmup50": dict(COMBO, max_steps=650, warmup_steps=50),
    "muon-650-mom0.9-lr0.01-wsd0.4-0-adam3.6e-3": dict(COMBO, max_steps=650, lr=3.6e-3),
    "muon-650-mom0.9-lr0.01-wsd0.4-0-adam4.8e-3": dict(COMBO, max_steps=650, lr=4.8e-3),
    "muon-650-mom0.9-lr0.01-wsd0.4-0-adam3.6e-3-warmup50": dict(COMBO, max_steps=650, lr=3.6e-3, warmup_steps=50),
}
# the knobs a variant's line names when they differ from SHIPPED's (issue 12's recipe)
LEVER_DEFAULTS = {k: BASE.get(k, getattr(TrainConfig(), k)) for k in (
    "warmup_steps", "muon_momentum", "decay_fraction", "ema_decay", "ema_start", "embed_lr_ratio", "resid_init_scale",
    "z_loss", "batch_ramp_steps", "curriculum")}
SMOKE_VOCAB = 512
SCHEMA_VARIANT_KEYS = ("name", "steps_to_target", "conversations_to_target", "seconds_to_target", "final_eval_loss",
                       "keyword_hit_rate")


def variant_configs(name: str, size: str, smoke: bool = False) -> tuple[ModelConfig, TrainConfig]:
    """The model and recipe of one variant at a size: "full" (GuppyLM's model) or "proxy" (the CPU proxy)."""
    if name not in VARIANTS:
        raise SystemExit(f"bench recipe: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    model_cfg, cfg = preset("guppy-9m-fast")
    over = {} if VARIANTS[name] is None else {**BASE, **VARIANTS[name]}
    model_cfg.dropout = over.pop("dropout", model_cfg.dropout)
    if over.get("resid_init_scale") == "gpt2":  # GPT-2's 1/sqrt(2 n_layers), at the size's own depth
        shape = model_cfg if size != "proxy" else proxy_configs(model_cfg, TrainConfig())[0]
        over["resid_init_scale"] = (2 * shape.n_layers) ** -0.5
    cfg = TrainConfig.from_dict({**cfg.to_dict(), **over})
    cfg.eval_batches, cfg.save_every = 0, 10 ** 9   # the whole held-out split; a checkpoint only where it stops
    if size == "proxy":
        model_cfg, cfg = proxy_configs(model_cfg, cfg)
    if smoke:  # a tiny model and a quarter of the steps, on the CPU: a check that the machinery works
        model_cfg = ModelConfig(**{**model_cfg.to_dict(), "d_model": 32, "n_layers": 2, "n_heads": 2,
                                   "ffn_hidden": 64, "vocab_size": SMOKE_VOCAB})
        cfg.batch_size = max(2, cfg.batch_size // 8)
        cfg.max_steps, cfg.warmup_steps = max(8, cfg.max_steps // 50), 4
    return model_cfg, cfg


def first_reaching(curve: list[dict], target: float) -> dict | None:
    return next((p for p in curve if p["eval_loss"] <= target), None)


def run_variant(name, data, work, dev, target, size, smoke, eval_every, run_to_cap, progress) -> dict:
    from guppy.chat import evaluate_checkpoint
    from guppy.checkpoint import load_model

    model_cfg, cfg = variant_configs(name, size, smoke)
    cfg.eval_every = eval_every
    print(f"--- {name}: {cfg.optimizer}, {cfg.schedule}, lr {cfg.lr:g}"
          + (f", muon_lr {cfg.muon_lr:g}" if cfg.optimizer == "muon" else "")
          + f", {cfg.batch_size} {cfg.batch_mode} rows, dropout {model_cfg.dropout:g}, cap {cfg.max_steps} steps"
          + "".join(f", {k} {getattr(cfg, k):g}" for k, off in LEVER_DEFAULTS.items() if getattr(cfg, k) != off))
    curve = []

    def on_eval(record):
        curve.append({"step": record["step"], "conversations": record["conversations"], "tokens": record["tokens"],
                      "eval_loss": record["eval_loss"], "elapsed_s": record["elapsed"]})
        return record["eval_loss"] <= target and not run_to_cap

    run_dir = os.path.join(work, slug(name))
    if os.path.isdir(run_dir):  # a variant an interrupted sweep left unfinished (--keep found no result): anew
        print(f"--- {name}: removing {run_dir}, left unfinished by an interrupted sweep")
        shutil.rmtree(run_dir)
    summary = train(data, run_dir, model_cfg, cfg, device=str(dev), progress=progress, on_eval=on_eval)
    _, ckpt = load_model(run_dir, prefer="latest")
    scored = evaluate_checkpoint(ckpt, data, device=dev, log=lambda *_: None)
    hit = first_reaching(curve, target)
    return {
        "name": name, "overrides": VARIANTS[name], "optimizer": cfg.optimizer, "schedule": cfg.schedule,
        "lr": cfg.lr, "muon_lr": cfg.muon_lr if cfg.optimizer == "muon" else None, "dropout": model_cfg.dropout,
        "batch_size": cfg.batch_size, "max_steps": cfg.max_steps,
        "steps_to_target": hit and hit["step"], "conversations_to_target": hit and hit["conversations"],
        "tokens_to_target": hit and hit["tokens"], "seconds_to_target": hit and hit["elapsed_s"],
        "final_step": summary["step"], "final_eval_loss": curve[-1]["eval_loss"] if curve else None,
        "keyword_hit_rate": scored.get("keyword_hit_rate"), "keyword_prompts": scored.get("keyword_prompts"),
        "train_seconds": round(summary["seconds"], 2), "setup_s": summary["setup_s"] and round(summary["setup_s"], 2),
        "curve": curve,
    }


def smoke_reference(data, work, dev) -> tuple[dict, str]:
    """--smoke's own target: GuppyLM's recipe (pad rows, AdamW 3e-4 cosine, dropout 0.1) at the smoke size, 40 steps,
    through the reference curve's code."""
    from . import reference_curve

    model_cfg, _ = variant_configs("fast", "full", smoke=True)
    model_cfg.dropout, model_cfg.ops = 0.1, "reference"
    _, cfg = preset("guppy-9m")
    cfg.batch_size, cfg.max_steps, cfg.warmup_steps, cfg.eval_every = 4, 40, 4, 10
    ref = reference_curve.measure(model_cfg, cfg, data, os.path.join(work, "reference"), dev, progress=False)
    path = os.path.join(work, "reference-curve-smoke.json")
    write_result({**environment(dev), **ref}, path)
    return read_target(path), path


def plot(result, path):
    plt = pyplot()
    if plt is None:
        return None
    from matplotlib import ticker
    fig, ax = plt.subplots(figsize=(8, 4.8))
    ref = result.get("reference_points") or []
    if ref:
        ax.plot([p["conversations"] for p in ref], [p["eval_loss"] for p in ref], color="black", lw=2,
                label="reference (GuppyLM's recipe)")
    for v in result["variants"]:
        if v.get("curve"):
            ax.plot([p["conversations"] for p in v["curve"]], [p["eval_loss"] for p in v["curve"]], marker="o",
                    ms=2, lw=1, label=v["name"])
    ax.axhline(result["target_eval_loss"], color="gray", ls="--", lw=1, label="target")
    ax.set_xlabel("conversations seen")
    ax.set_ylabel("held-out loss")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.1f"))
    ax.set_title(f"bench recipe, {result['size']} size | {result['device']} | torch {result['torch']}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def repo_relative(path: str) -> str:
    """path relative to the repository when it lies inside it (a committed reference), else absolute."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.abspath(path)
    return os.path.relpath(path, root) if path.startswith(root + os.sep) else path


def check_same_data(data: str, ref: dict, target_from: str):
    """The target means something only on the held-out set it was measured on."""
    ours, theirs = data_fingerprint(data), ref.get("data", {})
    for key in ("sha256_eval.jsonl", "sha256_train.jsonl"):
        if key in theirs and ours.get(key) != theirs[key]:
            raise SystemExit(f"bench recipe: --data {data} is not the data of --target-from {target_from} "
                             f"({key.removeprefix('sha256_')} differs); prepare it as the reference was "
                             f"(60,000 samples, seed 1337) or pass the reference's folder")


def main(args):
    from guppy.train import resolve_device

    dev = resolve_device("cpu" if args.smoke else args.device)
    env = environment(dev)
    variants = args.variants or ("fast,muon-wsd" if args.smoke else "all")
    names = list(VARIANTS) if variants == "all" else [n.strip() for n in variants.split(",") if n.strip()]
    eval_every = args.eval_every or (5 if args.smoke else 100)
    for n in names:
        variant_configs(n, args.size)  # unknown names stop here, before any training
    if not args.smoke and not args.target_from:
        raise SystemExit("bench recipe: --target-from FILE is needed (a `bench reference-curve` result; "
                         "--smoke makes its own)")
    ref = None
    if not args.smoke:  # a bad target file stops here, before minutes of data preparation
        try:
            ref, target_from = read_target(args.target_from), args.target_from
        except ValueError as e:
            raise SystemExit(f"bench recipe: --target-from {e}") from None
    work = args.work or tempfile.mkdtemp(prefix="guppy-bench-recipe-")
    data = prepared_data(args.data, work, samples=1500 if args.smoke else 60_000, seed=1337,
                         vocab_size=SMOKE_VOCAB if args.smoke else 4096, log=print)
    if args.smoke:
        ref, target_from = smoke_reference(data, work, dev)
    else:
        check_same_data(data, ref, target_from)
    target = ref["target_eval_loss"]

    out = args.out or os.path.join(RESULTS_DIR, "smoke" if args.smoke else "",
                                   f"recipe-{args.size}-{slug(env['device'])}-{env['date']}.json")
    done = {}
    if args.keep and os.path.isfile(out):
        with open(out) as f:
            done = {v["name"]: v for v in json.load(f)["variants"]}
    model_cfg, _ = variant_configs(names[0], args.size, args.smoke)
    from guppy.model import GuppyLM
    result = {
        **env, "benchmark": "recipe sweep: steps to the reference's eval loss", "smoke": bool(args.smoke),
        "size": args.size, "model_params": GuppyLM(model_cfg).num_params(), "model_config": model_cfg.to_dict(),
        "target_eval_loss": target, "target_eval_loss_stderr": ref.get("eval_loss_stderr"),
        "target_keyword_hit_rate": ref.get("keyword_hit_rate"), "target_from": repo_relative(target_from),
        "reference_points": ref.get("points", []), "eval_every": eval_every, "run_to_cap": args.run_to_cap,
        "data": data_fingerprint(data), "variants": [done[n] for n in names if n in done],
    }
    for name in names:
        if name in done:
            print(f"--- {name}: kept from {out}")
            continue
        result["variants"].append(run_variant(name, data, work, dev, target, args.size, args.smoke, eval_every,
                                              args.run_to_cap, not args.no_progress))
        write_result(result, out, plot)  # after every variant: an interrupted sweep loses one variant at most

    print(f"\ntarget {target:.4f} (from {target_from})")
    print(f"{'variant':18s} {'steps':>6s} {'conversations':>13s} {'seconds':>8s} {'final eval':>10s} {'keywords':>8s}")
    for v in result["variants"]:
        reached = v["steps_to_target"] is not None
        print(f"{v['name']:18s} {v['steps_to_target'] if reached else '-':>6} "
              f"{v['conversations_to_target'] if reached else 'not reached':>13} "
              f"{v['seconds_to_target'] if reached else '-':>8} {v['final_eval_loss']:10.4f} "
              f"{v['keyword_hit_rate'] if v['keyword_hit_rate'] is not None else '-':>8}")
    return result
