"""Training step time of guppy-9m on the current device, in pad and packed batches.

    python -m bench step [--steps 20] [--data DIR] [--device auto]

Each mode runs the same `guppy.train.train_step` the trainer runs (forward, backward, clip, AdamW, and AMP on a GPU)
on the same data; the first steps are warm-up and not timed. Reports ms per step (median), real tokens per step
(targets that carry loss: padding does not count), and real tokens per second.
"""
from __future__ import annotations

import statistics
import time

import torch

from guppy.config import preset
from guppy.data import Batcher, load_split
from guppy.model import GuppyLM
from guppy.train import autocast_dtype, make_optimizer, resolve_device, train_step

from .common import (default_result_path, environment, model_flops_per_token, peak_tflops, prepared_data,
                     write_result)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_mode(split, mode, dev, steps, warmup, ops="reference", batch_size=None):
    model_cfg, cfg = preset("guppy-9m")
    model_cfg.ops = ops
    cfg.batch_mode = mode
    if batch_size:
        cfg.batch_size = batch_size
    torch.manual_seed(0)
    model = GuppyLM(model_cfg).to(dev)
    opt = make_optimizer(model, cfg, dev)
    amp = autocast_dtype(dev)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    batcher = Batcher(split, cfg.batch_size, model_cfg.max_seq_len, mode, seed=0)
    batches = [batcher.next_batch() for _ in range(warmup + steps)]
    times, real = [], []
    for i, b in enumerate(batches):
        b = b.to(dev)
        sync(dev)
        t0 = time.perf_counter()
        train_step(model, b, opt, scaler, cfg.grad_clip, dev, amp)
        sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            real.append(b.n_targets())
    ms = statistics.median(times) * 1e3
    tokens = statistics.mean(real)
    slots = batches[-1].idx.numel() if mode == "packed" else statistics.mean(b.idx.numel() for b in batches[warmup:])
    flops = model_flops_per_token(model_cfg, 27.4 if mode == "pad" else model_cfg.max_seq_len / 2) * tokens
    row = {"mode": mode, "ops": ops, "batch_size": cfg.batch_size, "ms_per_step": round(ms, 2),
           "ms_p20": round(statistics.quantiles(times, n=5)[0] * 1e3, 2) if len(times) >= 5 else None,
           "ms_p80": round(statistics.quantiles(times, n=5)[-1] * 1e3, 2) if len(times) >= 5 else None,
           "real_tokens_per_step": round(tokens, 1), "padding_fraction": round(1 - tokens / slots, 3),
           "real_tokens_per_s": round(tokens / (ms / 1e3), 1), "steps_timed": len(times),
           "precision": str(amp or torch.float32).replace("torch.", "")}
    peak = peak_tflops(environment(dev)["device"])
    if peak:
        row["mfu"] = round(flops / (ms / 1e3) / (peak * 1e12), 4)
    return row


def main(args):
    dev = resolve_device(args.device)
    data = prepared_data(args.data, samples=args.samples, log=lambda *_: None)
    split = load_split(data, "train")
    steps = args.steps or (10 if dev.type == "cpu" else 100)
    warmup = 3 if dev.type == "cpu" else 20
    result = {**environment(dev), "benchmark": "guppy-9m training step", "model": "guppy-9m (8,726,016 params)",
              "rows": []}
    print(f"{result['device']}: torch {result['torch']}, triton {result['triton']}")
    print(f"{'mode':8s} {'ops':10s} {'ms/step':>9s} {'real tok/step':>14s} {'padding':>8s} {'real tok/s':>11s}")
    for mode in args.modes.split(","):
        for ops in args.ops.split(","):
            row = time_mode(split, mode, dev, steps, warmup, ops)
            result["rows"].append(row)
            print(f"{mode:8s} {ops:10s} {row['ms_per_step']:9.1f} {row['real_tokens_per_step']:14.0f} "
                  f"{row['padding_fraction']:8.1%} {row['real_tokens_per_s']:11,.0f}")
    if not args.no_save:
        write_result(result, args.out or default_result_path(result, "step-"))
    return result
