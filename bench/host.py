"""The host side of the fast path: what the CPU does around each guppy-9m-fast step, measured on this machine.

    python -m bench host [--data DIR] [--steps N] [--out DIR|FILE.json] [--no-builds] [--no-progress]

A free Colab T4 runtime has about 2 vCPUs, like the machine CI runs on, so the CPU's share of a T4 run is measured
here, before any GPU runs it. A T4 step of 32 x 128 packed rows is projected at 12-15 ms (notes/t4-projection.md):
whatever the host does per step must fit in its shadow, and must never wait for the GPU.

What runs is the real training loop, guppy.train.train_loop, with the preset's real batcher (the default 57,000
training conversations), learning-rate schedule, metrics.jsonl, tqdm bar, and eval/save schedule, on the T4's path
(CUDA graphs, Muon). Only the arithmetic is taken out, in two ways:
  - the step is guppy.graphs.CudaGraphStep with its capture and replay emptied (HostOnlyGraphStep): what is left is
    exactly the host work of a replayed step (copy the batch into the static inputs, replay, clone the loss);
  - the model that evals use is the preset's with every width shrunk (d_model 16, a 64-token vocabulary), and each
    eval batch is cut to a corner (2 rows, 8 positions; one row would spare the copies reshapes make of a batch):
    the same layers and ops in the same order, so an eval dispatches what the preset's does, with next to no
    arithmetic. (The loop's own evals are left out, one eval is measured apart, and the one real save is of the
    full-size model.)
The CPU stands in for the device: ops on its tensors cost their Python and dispatch, as launches do, but not the CUDA
driver's few microseconds per launch, which is why the ops issued outside the graph are counted beside the time.
guppy.syncs.SyncCounter watches the whole loop and counts every host read of a tensor (on the CPU, each would be a
sync on a GPU: a stricter count than a GPU's).

Reported (JSON, bench/results/host-<device>-<date>.json by default):
    batch_ms                  one packed 32 x 128 batch from the default data (median of 300; p90 beside it)
    host_ms_per_step          the loop's wall time per step, everything but the compute: mean over the steps that
                              neither evaluate nor save (log windows included), median and p90 beside it
    syncs_per_step            host reads per step over those steps, counted (the log window's one read / log_every)
    ops_outside_graph_per_step  ops the host issues per step besides building the batch: on a GPU, the launches
                              outside the CUDA graph (copies into the graph's inputs, the lr, the loss's sum)
    eval_s, eval_ops, eval_syncs  one eval of the preset's eval_batches pad batches, host side (the twin)
    save_s                    one real checkpoint of the preset's model (8.7 M parameters) and Muon state, written here
    prepare_s, import_s, chat_first_reply_s   `guppy prepare` of the default data (when --data is not given), a fresh
                              `import guppy.train`, and `guppy chat --prompt` on the saved checkpoint (CPU)
    csrc_build_s              a cold nvcc build of exactly the csrc instances the preset uses, for sm_75 (needs nvcc)
    triton_compile_s          cold sm_75 compiles of exactly the Triton kernels one step of the preset launches
The counter sees every op (a Python call each): host_ms_per_step and eval_s are slight upper bounds. A CPU-only torch
cannot page-lock memory; on CUDA the batcher allocates pinned tensors (torch's caching host allocator).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from guppy import checkpoint as ckpt_lib
from guppy.config import preset
from guppy.data import IGNORE, Batcher
from guppy.errors import GuppyError
from guppy.graphs import CudaGraphStep
from guppy.model import GuppyLM
from guppy.syncs import SyncCounter
from guppy.train import Run, load_train_data, make_optimizer, train_loop

from .common import environment, prepared_data, result_path, write_result

PRESET = "guppy-9m-fast"
CPU = torch.device("cpu")
COUNTED_STEPS = 400  # the counted run: 8 log windows of 50


class HostOnlyGraphStep(CudaGraphStep):
    """guppy.graphs.CudaGraphStep with nothing to capture and nothing to replay: what remains of a step is its host
    side, exactly as the trainer runs it on a GPU (the copies into the static inputs, the replay call, the loss's
    clone)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, warmup=0, **kwargs)

    def _capture(self, b):
        self.static, self.graph = b, "host-only"
        self.static_loss = torch.zeros((), device=self.device)

    def _replay(self):
        pass


class StepClock:
    """wrap_step for train_loop: at the start of every step, the time and, given a SyncCounter, its host reads and its
    ops less those the batcher issued (the batch's tensors are host memory)."""

    def __init__(self, batcher: Batcher, counter: SyncCounter | None = None):
        self.counter, self.marks, self.batch_ops = counter, [], 0
        if counter is not None:
            build = batcher.next_batch

            def counted_build():
                before = counter.ops
                b = build()
                self.batch_ops += counter.ops - before
                return b
            batcher.next_batch = counted_build

    def __call__(self, step_fn):
        def clocked(batch):
            c = self.counter
            self.marks.append((time.perf_counter(), c.total if c else 0, c.ops - self.batch_ops if c else 0))
            return step_fn(batch)
        return clocked

    def intervals(self, skip_steps: set[int]) -> list[tuple[float, int, int]]:
        """(seconds, reads, ops) from the start of step s to the start of step s+1, for each step s (1-based) not in
        skip_steps: all the host does for one step, the step's own host work and the loop's around it."""
        out = []
        for s, (a, b) in enumerate(zip(self.marks, self.marks[1:]), 1):
            if s not in skip_steps:
                out.append((b[0] - a[0], b[1] - a[1], b[2] - a[2]))
        return out


def batch_ms(split, cfg, model_cfg, n=300):
    batcher = Batcher(split, cfg.batch_size, model_cfg.max_seq_len, "packed", seed=cfg.seed)
    for _ in range(10):
        batcher.next_batch()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        batcher.next_batch()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, statistics.quantiles(times, n=10)[-1] * 1e3


TWIN_VOCAB = 64


def host_twin(model_cfg):
    """The preset's model with every width shrunk, the vocabulary too (token ids taken modulo TWIN_VOCAB where it
    runs): the same ops in the same order, next to no arithmetic."""
    return GuppyLM(dataclasses.replace(model_cfg, d_model=16, n_heads=2, ffn_hidden=16, vocab_size=TWIN_VOCAB,
                                       ops="reference"))


def host_loop(data, cfg, model_cfg, work, progress, counter: SyncCounter | None = None):
    """The real loop with the compute taken out (module header), its evals apart, timed and, given a counter, counted
    (in its own run: the counter's Python per op would weigh on the times). -> (clock, summary)."""
    model = host_twin(model_cfg)
    optimizer = make_optimizer(model, cfg, CPU, cuda_graphs=True)
    batcher = Batcher(data.train, cfg.batch_size, model_cfg.max_seq_len, cfg.batch_mode, seed=cfg.seed)
    run = Run(model, cfg, optimizer, torch.amp.GradScaler("cpu", enabled=False), batcher, None, graphs=True,
              record={"preset": PRESET, "data": data.fingerprint})
    clock = StepClock(batcher, counter)
    out = tempfile.mkdtemp(prefix="loop-", dir=work)

    def host_only_step(_):
        return clock(HostOnlyGraphStep(model, optimizer, run.scaler, cfg.grad_clip, None))

    with counter or contextlib.nullcontext():  # evals are measured apart: the twin's vocabulary is not the data's
        summary = train_loop(run, dataclasses.replace(data, eval=None), out, CPU, progress=progress,
                             log=lambda *_: None, wrap_step=host_only_step)
    return clock, summary


def busy_steps(cfg) -> set[int]:
    """The steps that evaluate or save (measured apart)."""
    return {s for s in range(1, cfg.max_steps + 1)
            if s % cfg.eval_every == 0 or s % cfg.save_every == 0 or s == cfg.max_steps}


def one_eval(data, cfg, model_cfg):
    """The host side of one eval of the preset: its eval batches (pad, forward only) through the width-16 twin, each
    cut to its first 2 rows and 8 positions (the same ops in the same order, next to no arithmetic: an eval's cost
    on a GPU is its launches, ~8,700 here, and the arithmetic of the real shapes (projected in notes/t4-projection.md)).
    Timed without the counter, counted in a second pass. -> (seconds, ops, host reads, batches)."""
    from guppy.data import Batch, eval_batches
    from guppy.train import evaluate
    model = host_twin(model_cfg)
    batches = [Batch(b.idx[:2, :8] % TWIN_VOCAB, torch.where(b.targets[:2, :8] == IGNORE, IGNORE,
                                                              b.targets[:2, :8] % TWIN_VOCAB))
               for b in eval_batches(data.eval, cfg.batch_size, model_cfg.max_seq_len, cfg.eval_batches)]
    evaluate(model, batches[:1], CPU)  # first-call costs (allocator, dispatcher caches) are not an eval's
    t = time.perf_counter()
    evaluate(model, batches, CPU)
    seconds = time.perf_counter() - t
    with SyncCounter(count_cpu=True) as counter:
        evaluate(model, batches, CPU)
    return seconds, counter.ops, counter.total, len(batches)


def one_save(data_dir, cfg, model_cfg, work) -> tuple[float, str]:
    """One real checkpoint of the preset's model with its Muon state (after one step on the CPU), into a run folder
    that chat can read. -> (seconds, run folder)."""
    import shutil
    run_dir = os.path.join(work, "run")
    os.makedirs(run_dir)
    torch.manual_seed(0)
    model = GuppyLM(model_cfg.__class__(**{**model_cfg.to_dict(), "ops": "reference"}))
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    idx = torch.zeros(1, 8, dtype=torch.long)
    model(idx, idx)[1].backward()
    optimizer.step()
    for name in ("tokenizer.json", "persona.json"):
        if os.path.isfile(os.path.join(data_dir, name)):
            shutil.copyfile(os.path.join(data_dir, name), os.path.join(run_dir, name))
    t = time.perf_counter()
    ckpt_lib.save_checkpoint(run_dir, 1, model, model.config, cfg, optimizer, None, {"torch": torch.get_rng_state()},
                             extra={"best_eval": 9.9}, pointers=("best", "latest"), run={"preset": PRESET})
    return time.perf_counter() - t, run_dir


def timed_command(args: list[str]) -> float | None:
    """Wall seconds of `python ARGS` in a fresh process (None, and one line, if it fails)."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t
    if r.returncode:
        print(f"  {' '.join(args)} failed ({r.returncode}): {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        return None
    return round(seconds, 2)


def builds(result):
    from guppy.csrc.extension import measure_cold_build
    from guppy.launches import preset_compile_seconds
    model_cfg, _ = preset(PRESET)
    csrc = measure_cold_build(arch=75, head_dims=(model_cfg.head_dim,))
    result["csrc_build_s"] = csrc.get("csrc_build_s")
    result["csrc_build"] = csrc
    triton_ = preset_compile_seconds(preset=PRESET, arch=75)
    result["triton_compile_s"] = triton_.get("triton_compile_s")
    result["triton_compile"] = triton_


MIN_STEPS = 10  # the steady state needs steps that neither evaluate nor save, and a median and a p90 of them


def main(args):
    if args.steps is not None and args.steps < MIN_STEPS:
        raise GuppyError(f"--steps {args.steps}: at least {MIN_STEPS} (the figures are over the steps that neither "
                         "evaluate nor save)")
    model_cfg, cfg = preset(PRESET)
    result = {**environment("cpu"), "benchmark": f"host side of {PRESET} (the T4 path: one CUDA graph a step, Muon)",
              "python": sys.version.split()[0], "preset": PRESET,
              "batch": f"{cfg.batch_size} x {model_cfg.max_seq_len} packed"}
    result["loadavg_1min_start"] = round(os.getloadavg()[0], 2)  # other work on these cores slows every figure
    work = tempfile.mkdtemp(prefix="guppy-bench-host-")
    t = time.perf_counter()
    data_dir = prepared_data(args.data, work=work)
    if args.data is None:
        result["prepare_s"] = round(time.perf_counter() - t, 2)
    data = load_train_data(data_dir)
    result["n_train_conversations"] = len(data.train)

    result["batch_ms"], result["batch_ms_p90"] = (round(v, 3) for v in batch_ms(data.train, cfg, model_cfg))
    print(f"batch: {result['batch_ms']:.3f} ms median, {result['batch_ms_p90']:.3f} ms p90 (packed "
          f"{result['batch']}, {len(data.train):,} conversations)")

    if args.steps:
        cfg.max_steps = args.steps
    clock, summary = host_loop(data, cfg, model_cfg, work, not args.no_progress)
    seconds = [s for s, _, _ in clock.intervals(skip_steps=busy_steps(cfg))]
    counted_cfg = dataclasses.replace(cfg, max_steps=min(cfg.max_steps, COUNTED_STEPS))
    counter = SyncCounter(count_cpu=True)
    counted, _ = host_loop(data, counted_cfg, model_cfg, work, False, counter)
    steady = counted.intervals(skip_steps=busy_steps(counted_cfg))
    result.update(steps=cfg.max_steps, log_every=cfg.log_every, steady_steps=len(seconds),
                  host_ms_per_step=round(statistics.mean(seconds) * 1e3, 3),
                  host_ms_per_step_median=round(statistics.median(seconds) * 1e3, 3),
                  host_ms_per_step_p90=round(statistics.quantiles(seconds, n=10)[-1] * 1e3, 3),
                  loop_s=round(summary["seconds"], 2), loop_save_s=round(summary["save_s"], 2),
                  counted_steps=len(steady), syncs_per_step=round(sum(r for _, r, _ in steady) / len(steady), 4),
                  ops_outside_graph_per_step=round(sum(o for _, _, o in steady) / len(steady), 2),
                  counted_syncs_by_op=dict(counter.by_op))
    print(f"loop: {result['host_ms_per_step']:.3f} ms/step host side (median {result['host_ms_per_step_median']:.3f}"
          f", p90 {result['host_ms_per_step_p90']:.3f}, {len(seconds)} steps); over {len(steady)} counted steps: "
          f"{result['syncs_per_step']} syncs/step, {result['ops_outside_graph_per_step']} ops/step outside the graph")

    eval_s, result["eval_ops"], result["eval_syncs"], result["eval_batches"] = one_eval(data, cfg, model_cfg)
    result["eval_s"] = round(eval_s, 3)
    result["save_s"], run_dir = one_save(data_dir, cfg, model_cfg, work)
    result["save_s"] = round(result["save_s"], 3)
    print(f"eval: {result['eval_s']} s host side ({result['eval_batches']} batches, {result['eval_ops']} ops, "
          f"{result['eval_syncs']} sync); "
          f"save: {result['save_s']} s")
    result["import_s"] = timed_command(["-c", "import guppy.train"])
    result["chat_first_reply_s"] = timed_command(["-m", "guppy", "chat", "--checkpoint", run_dir, "--device", "cpu",
                                                  "--prompt", "hi guppy", "--seed", "0"])
    print(f"import guppy.train: {result['import_s']} s; guppy chat, first reply: {result['chat_first_reply_s']} s")
    if args.no_builds:
        result["csrc_build_s"] = result["triton_compile_s"] = None
        result["builds_skipped"] = "--no-builds"
    else:
        builds(result)
        print(f"cold csrc build (sm_75): {result['csrc_build_s']} s; cold Triton compiles (sm_75): "
              f"{result['triton_compile_s']} s")
    result["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    write_result(result, result_path(args.out, result, "host-"))
    return result
