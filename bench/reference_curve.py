"""The reference learning curve: GuppyLM's recipe, run once to its end, eval loss against conversations seen.

    python -m bench reference-curve [--preset guppy-9m] [--data DIR] [--device auto] [--out FILE]

GuppyLM's recipe is the `guppy-9m` preset (pad batches of 32, AdamW 3e-4 -> 3e-5, 200 warm-up steps, dropout 0.1,
10,000 steps) on the reference ops. Every `--eval-every` steps the whole held-out split is scored (not a sample of it),
so the curve's points are comparable across runs and devices up to precision. The final eval loss is the target that
`bench train` and `bench recipe` read with `--target-from FILE`.

The final point also gets its standard error: the eval loss is a ratio (sum of token losses / number of target
tokens) over conversations, so its standard error is the ratio estimator's, computed from per-conversation sums.

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

from guppy.config import preset
from guppy.data import IGNORE, eval_batches, load_split, prepare
from guppy.train import train

from .common import RESULTS_DIR, environment, slug, write_result


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


def read_target(path: str) -> float:
    """The target eval loss a result file holds (`target_eval_loss`: a reference curve's final loss, or a `bench
    train` run's target). ValueError with one line naming the file when it has none."""
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
    return float(target)


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


def main(args):
    from guppy.chat import evaluate_checkpoint
    from guppy.checkpoint import load_model
    from guppy.train import resolve_device

    dev = resolve_device(args.device)
    env = environment(dev)
    work = args.work or tempfile.mkdtemp(prefix="guppy-reference-curve-")
    data = args.data or os.path.join(work, "data")
    if not args.data:
        prepare(data, samples=args.samples, seed=1337, log=print)
    model_cfg, cfg = preset(args.preset)
    model_cfg.ops = "reference"
    cfg.eval_every, cfg.eval_batches = args.eval_every, 0   # 0: the whole held-out split at every eval
    if args.max_steps:
        cfg.max_steps = args.max_steps
    if cfg.batch_mode != "pad":
        raise SystemExit("the reference curve is GuppyLM's recipe: pad batches (one conversation per row)")
    run_dir = os.path.join(work, "run")
    summary = train(data, run_dir, model_cfg, cfg, device=str(dev), progress=not args.no_progress)

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    points = [{"step": r["step"], "conversations": r["step"] * cfg.batch_size, "eval_loss": r["eval_loss"],
               "elapsed_s": r["elapsed"]} for r in records if "eval_loss" in r]
    model, ckpt = load_model(run_dir, device=dev, prefer="latest")
    final = eval_loss_with_stderr(model, data, dev)
    scored = evaluate_checkpoint(ckpt, data, device=dev)
    result = {
        **env, "benchmark": "reference learning curve (GuppyLM's recipe)", "preset": args.preset,
        "model_params": model.num_params(), "model_config": model_cfg.to_dict(), "train_config": cfg.to_dict(),
        "data": data_fingerprint(data), "run_dir": run_dir, "train_seconds": round(summary["seconds"], 1),
        "final_step": summary["step"], "final_conversations": summary["step"] * cfg.batch_size,
        **final, "target_eval_loss": final["eval_loss"],
        "keyword_hit_rate": scored.get("keyword_hit_rate"), "keyword_prompts": scored.get("keyword_prompts"),
        "points": points,
    }
    print(f"final eval loss {final['eval_loss']:.4f} ± {final['eval_loss_stderr']:.4f} (s.e.) over "
          f"{final['eval_conversations']} conversations; keyword hit rate {scored.get('keyword_hit_rate')}")
    out = args.out or os.path.join(RESULTS_DIR, f"reference-curve-{args.preset}-{slug(env['device'])}-"
                                                f"{env['date']}.json")
    write_result(result, out)
    return result
