"""The training loop: AdamW (or Muon + AdamW), a cosine or WSD schedule with warm-up, gradient clipping, mixed
precision by device, evals on the held-out set, atomic checkpoints, exact resume, and DDP under torchrun.

Host syncs are kept off the hot path: the loss is accumulated on the device and read back every `log_every` steps.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time

import torch
import torch.distributed as dist

from . import checkpoint as ckpt_lib
from .config import ModelConfig, TrainConfig
from .data import Batcher, eval_batches, load_split
from .errors import GuppyError
from .model import GuppyLM


# --------------------------------------------------------------------------------------------------------------------
# Device and precision
# --------------------------------------------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GuppyError(f"--device {name}: CUDA is not available here (torch {torch.__version__}"
                             f"{', a CPU-only build' if torch.version.cuda is None else ''}); use --device cpu")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise GuppyError(f"unknown device {name!r}; choose auto, cpu or cuda")


def autocast_dtype(device: torch.device):
    """fp16 (+ GradScaler) on sm_75 and older, bf16 on sm_80+, fp32 on the CPU. Decided by compute capability:
    `torch.cuda.is_bf16_supported()` has said True on a T4, where bf16 is only emulated."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------------------------------------
def param_groups(model, weight_decay: float, decay_all: bool):
    """Decay the matrices of the linear layers; not norms, biases or embeddings (unless decay_all, GuppyLM's way)."""
    if decay_all:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    embeddings = {id(model.tok_emb.weight), id(model.pos_emb.weight)}
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def uses_cuda_graphs(cfg: TrainConfig, device, world_size: int = 1) -> bool:
    """Graphs need one static batch shape (packed mode), a CUDA device, and no other wrapper around the step."""
    return cfg.cuda_graphs and device.type == "cuda" and cfg.batch_mode == "packed" and world_size == 1 \
        and not cfg.compile


def muon_param_groups(model, cfg: TrainConfig, lr_tensor=None):
    """Muon's groups: the hidden weight matrices (attention and FFN linears) under Muon, and the rest under AdamW:
    the embeddings (and the LM head tied to them), norms and biases, without weight decay unless decay_all.
    Each group carries its peak lr as a ratio to cfg.lr, which set_lr applies to the scheduled lr; lr_tensor(value)
    gives each group its own lr tensor when a CUDA graph reads them."""
    embeddings = {id(model.tok_emb.weight), id(model.pos_emb.weight)}
    hidden = [p for p in model.parameters() if p.dim() == 2 and id(p) not in embeddings]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in hidden_ids]
    make_lr = lr_tensor or float
    return [
        {"params": hidden, "muon": True, "lr": make_lr(cfg.muon_lr), "lr_ratio": cfg.muon_lr / cfg.lr,
         "momentum": cfg.muon_momentum, "weight_decay": cfg.muon_weight_decay},
        {"params": rest, "muon": False, "lr": make_lr(cfg.lr),
         "weight_decay": cfg.weight_decay if cfg.decay_all else 0.0},
    ]


def make_optimizer(model, cfg: TrainConfig, device, cuda_graphs: bool = False):
    """AdamW (torch's fused kernel on CUDA when asked), or Muon + AdamW (guppy/muon.py) with cfg.optimizer "muon".
    Inside a CUDA graph the learning rate must live in device memory (a tensor the captured step reads), and the
    optimizer must be capturable."""
    if cfg.optimizer == "muon":
        from .muon import Muon
        lr_tensor = (lambda v: torch.tensor(v, device=device)) if cuda_graphs else None
        return Muon(muon_param_groups(model, cfg, lr_tensor), betas=cfg.betas,
                    ns_dtype=autocast_dtype(device) or torch.float32)
    if cfg.optimizer != "adamw":
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose adamw or muon")
    kwargs = {}
    if (cfg.fused_adamw or cuda_graphs) and device.type == "cuda":
        kwargs["fused"] = True
    if cuda_graphs:
        kwargs["capturable"] = True
    lr = torch.tensor(cfg.lr, device=device) if cuda_graphs else cfg.lr
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.decay_all), lr=lr, betas=cfg.betas,
                             **kwargs)


def set_lr(optimizer, lr: float):
    """Set the scheduled lr; a group with an `lr_ratio` (Muon's) gets lr times that."""
    for g in optimizer.param_groups:
        value = lr * g.get("lr_ratio", 1.0)
        if torch.is_tensor(g["lr"]):
            g["lr"].fill_(value)  # in place: a captured graph keeps reading this memory
        else:
            g["lr"] = value


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up from 0 to lr, then to min_lr at max_steps: a cosine ("cosine"), or flat at lr and a linear
    decay over the last decay_fraction of the steps ("wsd", warm-up/stable/decay)."""
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * cfg.max_steps))
        progress = min(1.0, max(0.0, (step - (cfg.max_steps - decay_steps)) / decay_steps))
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    raise ValueError(f"unknown schedule {cfg.schedule!r}; choose cosine or wsd")


# --------------------------------------------------------------------------------------------------------------------
# RNG state (for exact resume)
# --------------------------------------------------------------------------------------------------------------------
def rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device):
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train_step(model, b, optimizer, scaler, grad_clip, dev, amp_dtype):
    """One optimiser step on batch b (already on dev): forward, backward, unscale, clip, step. Returns the loss
    (a detached device tensor: reading it is a host sync, left to the caller)."""
    with autocast(dev, amp_dtype):
        _, loss = model(b.idx, b.targets, segment_ids=b.segment_ids, positions=b.positions)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, batches, device, amp_dtype=None) -> float:
    """Mean loss per target token over the held-out batches (token-weighted, so every mode and run compares)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    for b in batches:
        n = b.n_targets()  # counted on the host copy: no device sync per batch
        b = b.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            _, loss = model(b.idx, b.targets, segment_ids=b.segment_ids, positions=b.positions)
        total += loss.double() * n
        count += n
    model.train(was_training)
    return float(total) / max(1, count)  # the one sync of the evaluation


# --------------------------------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------------------------------
def ddp_setup(device_name: str):
    """Under torchrun (WORLD_SIZE > 1): join the process group. Returns (rank, world_size, local_rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), world, local_rank


def ddp_max_param_difference(model) -> float:
    """Largest |p - p on rank 0| over all parameters and ranks: 0.0 when DDP kept the replicas identical."""
    worst = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, 0)
        worst = torch.maximum(worst, (p.detach() - ref).abs().max().double().cpu())
    worst = worst.to(next(model.parameters()).device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


# --------------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------------
class MetricsLog:
    """RUN/metrics.jsonl, one JSON object per line. Every line has `step`; the others carry what was measured:
    train_loss, lr, tokens_per_s (a log window); eval_loss (an eval); setup_s (once per process: from the start of
    train() to the end of its first optimizer step, builds, JIT compiles and graph capture included).
    `elapsed` is seconds since train() started, evals included and checkpoint writes excluded, so that runs that
    save differently compare. `conversations` and `tokens` count the data seen since the run began (whole
    conversations, and tokens that carry loss), summed over ranks; they survive a resume."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def saved_train_config(out_dir: str) -> TrainConfig:
    """The TrainConfig of the run in out_dir (its latest checkpoint): the base a resume starts from."""
    pointer = ckpt_lib.read_pointer(out_dir, "latest")
    if pointer is None:
        raise GuppyError(f"{out_dir}: nothing to resume (no latest.json); start without --resume")
    state, _ = ckpt_lib.load_training_state(os.path.join(out_dir, pointer["checkpoint"]))
    return TrainConfig.from_dict(state["train_config"])


class _StopAtStepBoundary:
    """Ctrl-C during training finishes the step under way, so the checkpoint saved on the way out is a consistent
    one (weights, optimiser, data position and step count agree) and --resume continues exactly. A second Ctrl-C
    interrupts at once."""

    def __init__(self):
        self.requested, self._previous = False, None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def train(data_dir: str, out_dir: str, model_cfg: ModelConfig, cfg: TrainConfig, device: str = "auto",
          resume: bool = False, stop_at_step: int | None = None, progress: bool = True, log=print,
          ops: str | None = None, on_eval=None) -> dict:
    """Train a GuppyLM on a prepared data folder, writing checkpoints and metrics.jsonl into out_dir.

    resume: continue from out_dir's latest checkpoint exactly (model, optimiser, scaler, RNG and data position).
        The run's own model config, ops included, come from the checkpoint; `ops` overrides them.
    stop_at_step: save and stop there, keeping the schedule of max_steps (train in pieces; resume later).
    ops: an op implementation (guppy/ops.py) to use instead of model_cfg's / the checkpoint's.
    on_eval: called with each eval's metrics record (step, eval_loss, elapsed, conversations, tokens); a true
        return ends the run there, as a normal finish with its checkpoint saved (the recipe sweep stops a variant
        once it reaches the target this way).
    Returns a summary dict.
    """
    t_begin = time.perf_counter()
    if resume:
        pointer = ckpt_lib.read_pointer(out_dir, "latest")
        if pointer is None:
            raise GuppyError(f"{out_dir}: nothing to resume (no latest.json); start without --resume")
        with open(os.path.join(out_dir, pointer["checkpoint"], "config.json")) as f:
            model_cfg = ModelConfig.from_dict(json.load(f))
    if ops is not None:
        model_cfg.ops = ops
    rank, world, local_rank = ddp_setup(device)
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local_rank)
    is_main = rank == 0
    if model_cfg.ops in ("triton", "triton-gemm", "csrc") and dev.type == "cpu" \
            and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise GuppyError(f"--ops {model_cfg.ops} runs Triton kernels, which need a CUDA GPU (or TRITON_INTERPRET=1 "
                         "to interpret them on the CPU, slowly); use --ops auto or reference here")

    train_split = load_split(data_dir, "train")
    eval_split = load_split(data_dir, "eval") if os.path.isfile(os.path.join(data_dir, "eval.offsets.npy")) else None
    meta_path = os.path.join(data_dir, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            vocab = json.load(f).get("vocab_size", model_cfg.vocab_size)
        if vocab > model_cfg.vocab_size:
            raise GuppyError(f"{data_dir}: its tokenizer has {vocab} tokens but the model's vocab_size is "
                             f"{model_cfg.vocab_size}")

    start_step, best_eval, state = 0, float("inf"), None
    if resume:
        ckpt_dir = os.path.join(out_dir, pointer["checkpoint"])
        model, _ = ckpt_lib.load_model(ckpt_dir, ops=model_cfg.ops)
        model_cfg = model.config
        state, _ = ckpt_lib.load_training_state(ckpt_dir)
        saved_cfg = TrainConfig.from_dict(state["train_config"])
        # the schedule and data order must be the run's own; what may change on resume is how far and how often
        for keep in ("max_steps", "eval_every", "save_every", "log_every", "eval_batches"):
            setattr(saved_cfg, keep, getattr(cfg, keep))
        cfg = saved_cfg
        start_step = state["step"]
        best_eval = state["extra"].get("best_eval", float("inf"))
    else:
        if ckpt_lib.read_pointer(out_dir, "latest") is not None:
            raise GuppyError(f"{out_dir}: already holds a training run; pass --resume to continue it, "
                             "or choose another --out")
        torch.manual_seed(cfg.seed + rank)
        model = GuppyLM(model_cfg)
    model.to(dev)
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        tok_src = os.path.join(data_dir, "tokenizer.json")
        if os.path.isfile(tok_src):  # chat needs only the run folder
            shutil.copyfile(tok_src, os.path.join(out_dir, "tokenizer.json"))

    amp_dtype = autocast_dtype(dev)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    graphs = uses_cuda_graphs(cfg, dev, world)
    optimizer = make_optimizer(model, cfg, dev, cuda_graphs=graphs)
    seen = {"conversations": 0, "tokens": 0}   # data seen since the run began (all ranks)
    batcher = Batcher(train_split, cfg.batch_size, model_cfg.max_seq_len, cfg.batch_mode,
                      assistant_only=cfg.loss_on == "assistant", seed=cfg.seed, rank=rank, world_size=world)
    if state is not None:
        if "optimizer" in state:
            lr_tensors = [g["lr"] for g in optimizer.param_groups]
            optimizer.load_state_dict(state["optimizer"])
            for g, lr in zip(optimizer.param_groups, lr_tensors):
                g["lr"] = lr  # keep the device tensor a CUDA graph reads (a float otherwise)
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        batcher.load_state_dict(state["extra"]["data"])
        seen.update(state["extra"].get("seen", {}))
        set_rng_state(state["rng"], dev)
    evals = (eval_batches(eval_split, cfg.batch_size, model_cfg.max_seq_len, cfg.eval_batches,
                          assistant_only=cfg.loss_on == "assistant") if eval_split is not None else [])

    train_model = model
    if cfg.compile:
        train_model = torch.compile(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(train_model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if graphs:
        from .graphs import CudaGraphStep
        step_fn = CudaGraphStep(train_model, optimizer, scaler, cfg.grad_clip, amp_dtype)
    else:
        def step_fn(b):
            return train_step(train_model, b, optimizer, scaler, cfg.grad_clip, dev, amp_dtype)

    metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), enabled=is_main)
    end_step = cfg.max_steps if stop_at_step is None else min(cfg.max_steps, stop_at_step)
    if is_main:
        log(f"training {model.num_params():,} parameters on {dev} ({amp_dtype or torch.float32}), ops "
            f"{model_cfg.ops}, {cfg.batch_mode} batches of {cfg.batch_size}, steps {start_step} -> {end_step}"
            + (f", {world} ranks" if world > 1 else "") + (", CUDA graphs" if graphs else ""))
        if batcher.n_truncated:
            log(f"note: {batcher.n_truncated} conversations are longer than max_seq_len={model_cfg.max_seq_len} "
                "tokens and are cut")

    save_seconds = 0.0   # time spent writing checkpoints: kept out of `elapsed`

    def elapsed() -> float:
        return time.perf_counter() - t_begin - save_seconds

    def save(step, pointers=("latest",)):
        nonlocal save_seconds
        if is_main:
            t = time.perf_counter()
            ckpt_lib.save_checkpoint(out_dir, step, model, model_cfg, cfg, optimizer, scaler, rng_state(dev),
                                     extra={"best_eval": best_eval, "data": batcher.state_dict(), "seen": dict(seen)},
                                     pointers=pointers)
            save_seconds += time.perf_counter() - t

    bar = None
    if is_main and progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=end_step, initial=start_step, unit="step", dynamic_ncols=True, leave=True)

    step, setup_s = start_step, None
    loss_sum = torch.zeros((), device=dev)
    tokens_window, steps_window, t_window = 0, 0, time.time()
    last_eval = None
    interrupted, stop_requested_by_eval = False, False
    model.train()
    stop = _StopAtStepBoundary()
    try:
        while step < end_step and not stop.requested and not stop_requested_by_eval:
            lr = lr_at(step, cfg)
            set_lr(optimizer, lr)
            batch = batcher.next_batch()
            n_tokens = batch.n_targets()
            tokens_window += n_tokens
            seen["conversations"] += batch.n_conversations * world
            seen["tokens"] += n_tokens * world
            loss = step_fn(batch.to(dev, non_blocking=True))
            loss_sum += loss.float()
            step += 1
            steps_window += 1
            if setup_s is None:  # the first step of this process ends its one-time costs
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                setup_s = elapsed()
                metrics.write(step=step, setup_s=round(setup_s, 3))

            if step % cfg.log_every == 0 or step == end_step:
                train_loss = float(loss_sum) / steps_window  # the one host sync of this window
                dt = time.time() - t_window
                tok_s = tokens_window * world / max(dt, 1e-9)
                metrics.write(step=step, train_loss=train_loss, lr=lr, tokens_per_s=round(tok_s, 1),
                              elapsed=round(elapsed(), 3), **seen)
                if bar is not None:
                    bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tok_s:,.0f}",
                                    eval=f"{last_eval:.4f}" if last_eval is not None else "-", refresh=False)
                loss_sum.zero_()
                tokens_window, steps_window, t_window = 0, 0, time.time()
            if bar is not None:
                bar.update(1)

            is_eval = evals and (step % cfg.eval_every == 0 or step == cfg.max_steps)
            if is_eval:
                last_eval = evaluate(model, evals, dev, amp_dtype)
                improved = last_eval < best_eval
                best_eval = min(best_eval, last_eval)
                record = dict(step=step, eval_loss=last_eval, elapsed=round(elapsed(), 3), **seen)
                metrics.write(**record)
                if improved:
                    save(step, pointers=("best", "latest"))
                if on_eval is not None and on_eval(record):
                    stop_requested_by_eval = True
            if step % cfg.save_every == 0 or step == end_step or stop_requested_by_eval:
                save(step)
        if stop.requested:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        interrupted = True
        if is_main:
            log(f"\ninterrupted at step {step}: saving a checkpoint before exiting")
        save(step)
    finally:
        stop.restore()
        if bar is not None:
            bar.close()

    summary = {"step": step, "best_eval": best_eval, "last_eval": last_eval, "seconds": elapsed(),
               "setup_s": setup_s, "save_s": save_seconds, "interrupted": interrupted, "out_dir": out_dir, **seen}
    if dev.type == "cuda":
        summary["peak_mem_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    if world > 1 and not interrupted:
        summary["ddp_max_param_difference"] = ddp_max_param_difference(model)
        metrics.write(step=step, ddp_world_size=world, ddp_max_param_difference=summary["ddp_max_param_difference"])
    if is_main:
        log(f"done: step {step}, best eval loss {best_eval:.4f}, {summary['seconds']:.1f} s; checkpoints in {out_dir}")
    if interrupted:
        raise KeyboardInterrupt
    return summary
