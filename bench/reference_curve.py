"""The reference learning curve: GuppyLM's recipe, run once to its end, eval loss against conversations seen.

    python -m bench reference-curve [--preset guppy-9m] [--proxy] [--data DIR] [--device auto] [--out FILE]

GuppyLM's recipe is the `guppy-9m` preset (pad batches of 32, AdamW 3e-4 -> 3e-5, 200 warm-up steps, dropout 0.1,
10,000 steps) on the reference ops. Every `--eval-every` steps the whole held-out split is scored (not a sample of it),
so the curve's points are comparable across runs and devices up to precision. The final eval loss is the target that
`bench train` and `bench recipe` read with `--target-from FILE`.

The final point also gets its standard error: the eval loss is a ratio (sum of token losses / number of target
tokens) over conversations, so its standard error is the ratio estimator's, computed from per-conversation sums.

--proxy: the same recipe at the CPU proxy's size (`proxy_configs`), the target of `bench recipe --size proxy`.

Writes bench/results/reference-curve-<device>-<date>.json (a CPU run of guppy-9m takes ~2 hours on 2 cores; a GPU
minutes). The run folder (checkpoints, metrics.jsonl) is kept for `guppy eval`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile

import torch
import torch.nn.functional as F

from guppy.config import PRESETS, preset
from guppy.data import IGNORE, eval_batches, load_split
from guppy.train import train

from .common import RESULTS_DIR, environment, prepared_data, slug, write_result


# The CPU proxy of issue 12: the cpu-demo preset's model shape (2 layers, d_model 128) with a quarter of the batch
# rows, so that a 2-core CPU runs a whole curve in minutes. It ranks recipe levers before a GPU is at hand; it is a
# proxy, and the full size decides.
PROXY_BATCH_DIVISOR = 4


def proxy_configs(model_cfg, cfg):
    """model_cfg, cfg shrunk to the proxy's size: the cpu-demo model's shape (keeping the recipe's dropout and ops),
    batch rows / PROXY_BATCH_DIVISOR. Everything else of the recipe stays."""
    shape = {k: v for k, v in PRESETS["cpu-demo"][0].items() if k != "dropout"}
    model_cfg = type(model_cfg).from_dict({**model_cfg.to_dict(), **shape})
    cfg = type(cfg).from_dict({**cfg.to_dict(), "batch_size": max(1, cfg.batch_size // PROXY_BATCH_DIVISOR)})
    return model_cfg, cfg


def data_fingerprint(data_dir: str) -> dict:
    """What the curve was measured on: the dataset's generation settings and the hashes of its text files."""
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    out = {k: meta[k] for k in ("seed", "n_train", "n_eval", "eval_fraction", "vocab_size")
           if k in meta}
    for name in ("train.jsonl", "eval.jsonl", "tokenizer.json"):
        h = hashlib.sha256()
        with open(os.path.join(data_dir, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[f"sha256_{name}"] = h.hexdigest()[:16]
    return out


def read_target(path: str) -> dict:
    """The whole result file that holds a target eval loss (`target_eval_loss`: a reference curve's final loss, or a
    `bench train` / `bench recipe` run's target), its target checked to be a finite number. ValueError with one line
    naming the file when it cannot be read or has no target."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
    target = doc.get("target_eval_loss") if isinstance(doc, dict) else None
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not math.isfinite(target):
        raise ValueError(f"{path}: no finite target_eval_loss in it (write one with python -m bench reference-curve)")
    return {**doc, "target_eval_loss": float(target)}


@torch.no_grad()
def eval_loss_with_stderr(model, data_dir: str, device) -> dict:
    """Token-weighted held-out loss over the whole eval split, and its standard error over conversations."""
    model.eval()
    split = load_split(data_dir, "eval")
    sums, counts = [], []
    for b in eval_batches(split, 32, model.config.max_seq_len):
        b = b.to(device)
        logits, _ = model(b.idx)  # no targets: the logits, for per-token losses
        per_token = F.cross_entropy(logits.float().flatten(0, 1), b.targets.flatten(), ignore_index=IGNORE,
                                    reduction="none").view(b.targets.shape)
        sums.append(per_token.double().sum(1).cpu())
        counts.append((b.targets != IGNORE).sum(1).double().cpu())
    s, n = torch.cat(sums), torch.cat(counts)
    loss = float(s.sum() / n.sum())
    k = len(s)
    # ratio estimator: Var(sum s / sum n) ~ k/(k-1) * sum (s_i - loss n_i)^2 / (sum n)^2
    se = math.sqrt(k / (k - 1) * float(((s - loss * n) ** 2).sum())) / float(n.sum())
    return {"eval_loss": loss, "eval_loss_stderr": se, "eval_conversations": k, "eval_target_tokens": int(n.sum())}


def measure(model_cfg, cfg, data: str, run_dir: str, dev, progress: bool = True) -> dict:
    """Train the reference in run_dir and score it: the curve's points, the final loss with its standard error, the
    keyword hit rate. cfg must be a pad recipe (GuppyLM's); its evals score the whole held-out split."""
    from guppy.chat import evaluate_checkpoint
    from guppy.checkpoint import load_model

    if cfg.batch_mode != "pad":
        raise SystemExit("the reference curve is GuppyLM's recipe: pad batches (one conversation per row)")
    cfg.eval_batches = 0   # 0: the whole held-out split at every eval
    summary = train(data, run_dir, model_cfg, cfg, device=str(dev), progress=progress)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    points = [{"step": r["step"], "conversations": r["step"] * cfg.batch_size, "eval_loss": r["eval_loss"],
               "elapsed_s": r["elapsed"]} for r in records if "eval_loss" in r]
    model, ckpt = load_model(run_dir, device=dev, prefer="latest")
    final = eval_loss_with_stderr(model, data, dev)
    scored = evaluate_checkpoint(ckpt, data, device=dev)
    print(f"final eval loss {final['eval_loss']:.4f} ± {final['eval_loss_stderr']:.4f} (s.e.) over "
          f"{final['eval_conversations']} conversations; keyword hit rate {scored.get('keyword_hit_rate')}")
    return {
        "model_params": model.num_params(), "model_config": model_cfg.to_dict(), "train_config": cfg.to_dict(),
        "data": data_fingerprint(data), "run_dir": run_dir, "train_seconds": round(summary["seconds"], 1),
        "final_step": summary["step"], "final_conversations": summary["step"] * cfg.batch_size,
        **final, "target_eval_loss": final["eval_loss"],
        "keyword_hit_rate": scored.get("keyword_hit_rate"), "keyword_prompts": scored.get("keyword_prompts"),
        "points": points,
    }


def main(args):
    from guppy.train import resolve_device

    dev = resolve_device(args.device)
    env = environment(dev)
    work = args.work or tempfile.mkdtemp(prefix="guppy-reference-curve-")
    data = prepared_data(args.data, work, samples=args.samples, seed=1337, log=print)
    model_cfg, cfg = preset(args.preset)
    model_cfg.ops = "reference"
    if args.proxy:
        model_cfg, cfg = proxy_configs(model_cfg, cfg)
    cfg.eval_every = args.eval_every
    if args.max_steps:
        cfg.max_steps = args.max_steps
    measured = measure(model_cfg, cfg, data, os.path.join(work, "run"), dev, progress=not args.no_progress)
    result = {**env, "benchmark": "reference learning curve (GuppyLM's recipe)", "preset": args.preset,
              "size": "proxy" if args.proxy else "full", **measured}
    name = args.preset + ("-proxy" if args.proxy else "")
    out = args.out or os.path.join(RESULTS_DIR, f"reference-curve-{name}-{slug(env['device'])}-{env['date']}.json")
    write_result(result, out)
    return result
