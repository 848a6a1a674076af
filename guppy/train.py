"""The training loop: AdamW (or Muon + AdamW), a cosine, linear or WSD schedule with warm-up, gradient clipping, mixed
precision by device, evals on the held-out set (of a weight average when asked), atomic checkpoints, exact resume,
and DDP under torchrun.

Host syncs are kept off the hot path: the loss is accumulated on the device and read back every `log_every` steps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import checkpoint as ckpt_lib
from .config import ModelConfig, TrainConfig
from .data import IGNORE, Batcher, Split, eval_batches, fingerprint, load_split, load_tokenizer
from .errors import GuppyError
from .model import GuppyLM
from .ops import IMPLEMENTATIONS
from .runlock import RunLock
from .runstate import long_run_note, resume_command


# --------------------------------------------------------------------------------------------------------------------
# Device and precision
# --------------------------------------------------------------------------------------------------------------------
def mps_available() -> bool:
    """Apple Silicon's GPU (Metal). Its own function so that tests can stand in for a Mac."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """auto: cuda, else mps (Apple Silicon), else cpu. An explicit device that is absent is a one-line error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GuppyError(f"--device {name}: CUDA is not available here (torch {torch.__version__}"
                             f"{', a CPU-only build' if torch.version.cuda is None else ''}); use --device cpu")
        return torch.device(name)
    if name == "mps":
        if not mps_available():
            raise GuppyError("--device mps: Apple's Metal GPU is not available here (it needs an Apple Silicon Mac "
                             "and a torch build with MPS); use --device cpu")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise GuppyError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")


def autocast_dtype(device: torch.device):
    """fp16 (+ GradScaler) on sm_75 and older, bf16 on sm_80+, fp32 on the CPU and on Apple's MPS.

    CUDA is decided by compute capability: `torch.cuda.is_bf16_supported()` has said True on a T4, where bf16 is only
    emulated. MPS trains in fp32: its autocast covers fewer ops than CUDA's across the torch versions people have,
    fp16 would need a GradScaler that MPS lacks in older torch, and a 9M model is not bound by arithmetic there."""
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
        and not cfg.compile and not cfg.batch_ramp_steps  # a ramp changes the shape: one graph each, not built yet


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
    return embeddings_apart([
        {"params": hidden, "muon": True, "lr": make_lr(cfg.muon_lr), "lr_ratio": cfg.muon_lr / cfg.lr,
         "momentum": cfg.muon_momentum, "weight_decay": cfg.muon_weight_decay},
        {"params": rest, "muon": False, "lr": make_lr(cfg.lr),
         "weight_decay": cfg.weight_decay if cfg.decay_all else 0.0},
    ], model, cfg, make_lr)


def embeddings_apart(groups: list[dict], model, cfg: TrainConfig, make_lr) -> list[dict]:
    """cfg.embed_lr_ratio: the embeddings (tok_emb, pos_emb; the LM head is tok_emb) leave their AdamW group for one
    of their own at that ratio to the scheduled lr, with the same weight decay. At ratio 1 the groups are returned
    as they are: today's groups, and today's checkpoints resume."""
    if cfg.embed_lr_ratio == 1.0:
        return groups
    embeddings = {id(model.tok_emb.weight), id(model.pos_emb.weight)}
    out = []
    for g in groups:
        mine = [p for p in g["params"] if id(p) in embeddings]
        out.append({**g, "params": [p for p in g["params"] if id(p) not in embeddings]} if mine else g)
        if mine:
            out.append({**g, "params": mine, "lr": make_lr(cfg.lr * cfg.embed_lr_ratio),
                        "lr_ratio": cfg.embed_lr_ratio})
    return out


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
    make_lr = (lambda v: torch.tensor(v, device=device)) if cuda_graphs else float
    groups = embeddings_apart(param_groups(model, cfg.weight_decay, cfg.decay_all), model, cfg, make_lr)
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, **kwargs)


def set_lr(optimizer, lr: float):
    """Set the scheduled lr; a group with an `lr_ratio` (Muon's) gets lr times that."""
    for g in optimizer.param_groups:
        value = lr * g.get("lr_ratio", 1.0)
        if torch.is_tensor(g["lr"]):
            g["lr"].fill_(value)  # in place: a captured graph keeps reading this memory
        else:
            g["lr"] = value


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up from 0 to lr, then to min_lr at max_steps: a cosine ("cosine"), a straight line ("linear"), or
    flat at lr and a linear decay over the last decay_fraction of the steps ("wsd", warm-up/stable/decay)."""
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * cfg.max_steps))
        progress = min(1.0, max(0.0, (step - (cfg.max_steps - decay_steps)) / decay_steps))
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    raise ValueError(f"unknown schedule {cfg.schedule!r}; choose cosine, linear or wsd")


def batch_rows_at(step: int, cfg: TrainConfig) -> int:
    """cfg.batch_ramp_steps (N): the rows of the batch at `step`: batch_size // 4 for steps [0, N/2), batch_size // 2
    for [N/2, N), then batch_size. Doubling stages rather than a smooth ramp, because a GPU would capture one CUDA
    graph per batch shape: three at most (not built yet; a ramped run steps eagerly). The learning rate is not
    rescaled with the batch: the schedule is the run's as it would be without the ramp."""
    n = cfg.batch_ramp_steps
    if step >= n:
        return cfg.batch_size
    return max(1, cfg.batch_size // (4 if step < n // 2 else 2))


# --------------------------------------------------------------------------------------------------------------------
# Issue 20's levers that are not the optimiser's: residual init, z-loss, a weight average (notes/recipe.md). Each one
# is off at its TrainConfig default, and none changes the model: inference runs a plain GuppyLM.
# --------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def scale_residual_init(model, scale: float):
    """cfg.resid_init_scale: the projections into the residual stream (attn.out, ffn.down) start at std 0.02·scale
    instead of GuppyLM's 0.02 (GPT-2 uses 1/sqrt(2 n_layers)). The same draws, multiplied, so no other parameter
    changes; at scale 1 nothing is touched (today's init, bit for bit)."""
    if scale == 1.0:
        return
    for block in model.blocks:
        block.attn.out.weight.mul_(scale)
        block.ffn.down.weight.mul_(scale)


class WithZLoss(torch.nn.Module):
    """The training loss with PaLM's z-loss (cfg.z_loss): cross-entropy + z_loss · mean over target tokens of
    logsumexp(logits)², which keeps log Z of the softmax near 0. It wraps the model for training only (train_step and
    the CUDA graph call it as they call the model); evals call the model itself: plain cross-entropy. Its value is the
    cross-entropy alone, the z term added as t - t.detach() (0 in value, t in gradient), so train_loss compares with
    other runs. It builds the (B·T × V) logits: the ops' fused head + loss is not used."""

    def __init__(self, model, coefficient: float):
        super().__init__()
        self.model, self.coefficient = model, coefficient

    def forward(self, idx, targets, *, segment_ids=None, positions=None):
        logits, _ = self.model(idx, segment_ids=segment_ids, positions=positions)
        flat, targets = logits.view(-1, logits.size(-1)), targets.view(-1)
        counted = targets != IGNORE
        z = (flat.float().logsumexp(-1).square() * counted).sum() / counted.sum().clamp(min=1)
        penalty = self.coefficient * z
        return logits, self.model.ops.cross_entropy(flat, targets) + (penalty - penalty.detach())


class WeightAverage:
    """cfg.ema_decay: an exponential moving average of the parameters, begun at step round(ema_start · max_steps) as a
    copy of the weights, then avg <- decay·avg + (1 - decay)·w after every step. It is a GuppyLM's weights, so it costs
    nothing at inference. Once begun, evals score the average, and a checkpoint's model.safetensors holds it (so
    `best`, chat, eval and export read it unchanged) with the raw weights in state.safetensors (raw.<name>), which a
    resume trains on: the resume is exact."""

    def __init__(self, model, cfg: TrainConfig):
        self.named = list(model.named_parameters())
        self.decay, self.begin = cfg.ema_decay, round(cfg.ema_start * cfg.max_steps)
        self.avg = None  # the averaged tensors, in self.named's order, once begun

    @torch.no_grad()
    def update(self, step: int):
        """After the optimizer step that made `step` steps."""
        if step < self.begin:
            return
        weights = [p.detach() for _, p in self.named]
        if self.avg is None:
            self.avg = [w.clone() for w in weights]
        else:
            torch._foreach_lerp_(self.avg, weights, 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self):
        """Inside: the model holds the average (unchanged before it begins). Yields the raw weights as raw.<name>
        (None before it begins), and puts them back on the way out."""
        if self.avg is None:
            yield None
            return
        raw = {f"raw.{n}": p.detach().clone() for n, p in self.named}
        with torch.no_grad():
            for (_, p), a in zip(self.named, self.avg):
                p.copy_(a)
        try:
            yield raw
        finally:
            with torch.no_grad():
                for n, p in self.named:
                    p.copy_(raw[f"raw.{n}"])

    @torch.no_grad()
    def restore(self, tensors: dict):
        """On resume, the model loaded from model.safetensors: with raw.<name> tensors there, what it loaded is the
        average; keep it as such and train on the raw weights."""
        if not any(k.startswith("raw.") for k in tensors):
            return
        self.avg = [p.detach().clone() for _, p in self.named]
        for n, p in self.named:
            p.copy_(tensors[f"raw.{n}"])


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
    refs = [p.detach().clone() for p in model.parameters()]
    for ref in refs:
        dist.broadcast(ref, 0)
    worst = torch.stack([(p.detach() - ref).abs().max() for p, ref in zip(model.parameters(), refs)]).max().double()
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    wait_for_collectives_to_release(refs + [worst])
    return float(worst)


def wait_for_collectives_to_release(tensors, timeout_s: float = 10.0):
    """Return once the process group's worker threads hold none of `tensors` (or after timeout_s).

    A collective returns a moment before gloo's worker drops its reference to the tensor. If the Python tensor dies
    first, freeing it is left to the worker, which needs the GIL for that; when the interpreter is already exiting it
    cannot have it, and the process aborts ("terminate called without an active exception", SIGABRT after a
    finished run: about one torchrun in four on a busy 2-core machine). Tensors that outlive the worker's reference
    are freed here, by Python, instead. sleep() releases the GIL while the worker finishes.
    """
    if not hasattr(torch.Tensor, "_use_count"):  # an older torch cannot tell: give the worker a moment instead
        time.sleep(min(timeout_s, 0.05))
        return
    deadline = time.monotonic() + timeout_s
    while any(t._use_count() > 1 for t in tensors) and time.monotonic() < deadline:
        time.sleep(0.001)


# --------------------------------------------------------------------------------------------------------------------
# Starting a run: fresh, or resumed under the resume rule
# --------------------------------------------------------------------------------------------------------------------
# The resume rule: a resume continues the same recipe. It may change how far and how often (max_steps, stop_at_step,
# eval_every, save_every, log_every, eval_batches), where and how it runs (device, ops, compile, the progress bar),
# and the peak learning rate (lr: the rest of the cosine schedule follows the new peak; min_lr stays). Every other
# TrainConfig field, fields added later included, is the run's own, and so are its model, preset and data: a
# different value would change the data order or the meaning of the run, and is refused with one line. A value equal
# to the run's own is fine. (README "Training" and `guppy train --help` say the same.)
RESUME_MAY_CHANGE = ("max_steps", "eval_every", "save_every", "log_every", "eval_batches", "compile", "lr")


def resumed_recipe(run: TrainConfig, asked: TrainConfig) -> TrainConfig:
    """The recipe a resume continues with: the run's own, changed where `asked` differs and the resume rule allows."""
    out = dataclasses.replace(run)
    for f in dataclasses.fields(run):  # every field, those a newer TrainConfig adds included
        new, old = getattr(asked, f.name), getattr(run, f.name)
        if new == old:
            continue
        if f.name not in RESUME_MAY_CHANGE:
            option = f"--{f.name.replace('_', '-')}" + ("" if isinstance(new, bool) else f" {new}")
            raise GuppyError(f"{option}: a resume continues the run's recipe, whose {f.name} is {old}; leave the "
                             "option out, or start a new run in another --out")
        setattr(out, f.name, new)
    return out


def run_recipe(out_dir: str) -> TrainConfig:
    """The recipe of the run in out_dir, as --resume would continue it before any option changes it."""
    ckpt_dir = ckpt_lib.checkpoint_to_resume(out_dir, log=lambda *_: None)
    return ckpt_lib.read_train_config(ckpt_dir)


@dataclass
class TrainData:
    """A prepared data folder, as training reads it."""
    path: str
    train: Split
    eval: Split | None
    fingerprint: dict         # guppy.data.fingerprint: sha256 of tokenizer.json and of the train arrays
    vocab_size: int           # what the model's embedding must hold: the tokenizer's size, or the largest id + 1


def load_train_data(data_dir: str) -> TrainData:
    train_split = load_split(data_dir, "train")
    eval_split = load_split(data_dir, "eval") if os.path.isfile(os.path.join(data_dir, "eval.offsets.npy")) else None
    vocab = 1 + max(int(s.tokens.max(initial=0)) for s in (train_split, eval_split) if s is not None)
    tok_path = os.path.join(data_dir, "tokenizer.json")
    if os.path.isfile(tok_path):
        vocab = max(vocab, load_tokenizer(tok_path).get_vocab_size())
    return TrainData(data_dir, train_split, eval_split, fingerprint(data_dir), vocab)


@dataclass
class Run:
    """A run ready for its loop, fresh or resumed: the model and everything a checkpoint restores, on the device."""
    model: GuppyLM
    cfg: TrainConfig
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batcher: Batcher
    amp_dtype: torch.dtype | None
    graphs: bool                 # the step is one CUDA graph
    record: dict                 # what each checkpoint records about the run: its preset and data fingerprint
    step: int = 0
    best_eval: float = math.inf
    seen: dict = field(default_factory=lambda: {"conversations": 0, "tokens": 0})  # data seen, all ranks
    ema: WeightAverage | None = None  # cfg.ema_decay > 0


def start_run(data: TrainData, out_dir: str, model_cfg: ModelConfig | None, cfg: TrainConfig | None, dev,
              resume: bool = False, ops: str | None = None, preset: str | None = None, rank: int = 0,
              world: int = 1, log=print) -> Run:
    """Build the run to train: a fresh one (refused where out_dir already holds a run), or the run in out_dir
    resumed from its checkpoint under the resume rule (model_cfg/cfg None: the run's own). Writes nothing."""
    state, ckpt_dir = None, None
    if resume:
        ckpt_dir = ckpt_lib.checkpoint_to_resume(out_dir, log)
        state, tensors = ckpt_lib.load_training_state(ckpt_dir)
        state["raw"] = {k: v for k, v in tensors.items() if k.startswith("raw.")}  # under a weight average
        recorded = state.get("run") if isinstance(state.get("run"), dict) else {}
        _check_same_data(recorded.get("data"), data)
        if preset is not None and preset != recorded.get("preset"):
            was = f"--preset {recorded['preset']}" if recorded.get("preset") else "no recorded preset"
            raise GuppyError(f"--preset {preset}: a resume continues the run's recipe, which has {was}; leave "
                             "--preset out, or start a new run in another --out")
        run_model_cfg = ckpt_lib.read_model_config(os.path.join(ckpt_dir, "config.json"))
        if model_cfg is not None:
            _check_same_model(run_model_cfg, model_cfg)
        model_cfg, preset = run_model_cfg, recorded.get("preset")
        run_cfg = ckpt_lib.read_train_config(ckpt_dir)
        cfg = resumed_recipe(run_cfg, cfg if cfg is not None else run_cfg)
    else:
        found = ckpt_lib.run_contents(out_dir)
        if found:
            raise GuppyError(f"{out_dir}: already holds a training run ({', '.join(found[:3])}); pass --resume to "
                             "continue it, or choose another --out")
    model_cfg = dataclasses.replace(model_cfg, ops=ops or model_cfg.ops)
    if model_cfg.ops not in IMPLEMENTATIONS:  # a resumed run's config.json, or train() called with a bad name
        where = f"{ckpt_dir}/config.json: " if resume and not ops else ""
        raise GuppyError(f"{where}unknown ops {model_cfg.ops!r}; choose one of: {', '.join(IMPLEMENTATIONS)}")
    if IMPLEMENTATIONS[model_cfg.ops].triton and dev.type == "cpu" \
            and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise GuppyError(f"--ops {model_cfg.ops} runs Triton kernels, which need a CUDA GPU (or TRITON_INTERPRET=1 "
                         "to interpret them on the CPU, slowly); use --ops auto or reference here")
    if data.vocab_size > model_cfg.vocab_size:
        raise GuppyError(f"{data.path}: its tokenizer has {data.vocab_size} tokens but the model's vocab_size is "
                         f"{model_cfg.vocab_size}")

    if state is not None:
        model, _ = ckpt_lib.load_model(ckpt_dir, ops=model_cfg.ops)
    else:
        torch.manual_seed(cfg.seed + rank)
        model = GuppyLM(model_cfg)
        scale_residual_init(model, cfg.resid_init_scale)
    model.to(dev)
    amp_dtype = autocast_dtype(dev)
    graphs = uses_cuda_graphs(cfg, dev, world)
    run = Run(model, cfg, make_optimizer(model, cfg, dev, cuda_graphs=graphs),
              torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
              Batcher(data.train, cfg.batch_size, model_cfg.max_seq_len, cfg.batch_mode,
                      assistant_only=cfg.loss_on == "assistant", seed=cfg.seed, rank=rank, world_size=world,
                      pin_memory=dev.type == "cuda", curriculum=cfg.curriculum),
              amp_dtype, graphs, record={"preset": preset, "data": data.fingerprint})
    run.ema = WeightAverage(model, cfg) if cfg.ema_decay else None
    if state is not None:
        _restore(run, state, dev)
    return run


def _check_same_data(recorded: dict | None, data: TrainData):
    """A resume trains on the run's own data: the same tokenizer (token ids mean the same) and train arrays."""
    for key, what in (("tokenizer_sha256", "another tokenizer"), ("train_sha256", "other train data")):
        if recorded and recorded.get(key) and recorded[key] != data.fingerprint.get(key):
            raise GuppyError(f"--data {data.path}: {what} than the run's ({key} {str(data.fingerprint.get(key))[:12]}, "
                             f"the run recorded {recorded[key][:12]}); resume with the run's own data, or start a new "
                             "run in another --out")


def _check_same_model(run_cfg: ModelConfig, asked: ModelConfig):
    for name, old in run_cfg.to_dict().items():
        if name != "ops" and getattr(asked, name) != old:
            raise GuppyError(f"model {name}={getattr(asked, name)}: a resume continues the run's model, whose {name} "
                             f"is {old}; start a new run in another --out for another model")


def _restore(run: Run, state: dict, dev):
    """Put a checkpoint's training state into a freshly built run: step, optimiser, scaler, data position, RNG."""
    if "optimizer" in state:
        restore_optimizer(run.optimizer, state["optimizer"])
    if "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    run.batcher.load_state_dict(state["extra"]["data"])
    run.seen.update(state["extra"].get("seen", {}))
    run.step = state["step"]
    run.best_eval = state["extra"].get("best_eval", math.inf)
    set_rng_state(state["rng"], dev)
    if run.ema is not None:
        run.ema.restore(state.get("raw", {}))


# How this process steps, whatever the checkpoint's process did: torch's load_state_dict takes these from the saved
# groups, so a run saved on CUDA (fused) and resumed on a CPU, or the reverse, would step the other device's way.
BUILT_GROUP_KEYS = ("lr", "fused", "capturable", "foreach", "differentiable")


def restore_optimizer(optimizer, saved: dict):
    """Load a checkpoint's optimizer state into the optimizer this run built (make_optimizer), keeping what the build
    decided: its lr (the device tensor a CUDA graph reads), its fused/capturable flags, and where step counts live.

    torch keeps a loaded `step` on the CPU unless the saved group is fused or capturable. guppy's Muon keeps every
    step count on its parameter's device (its bias corrections are device arithmetic, captured in the CUDA graph):
    a CPU count there is read into the graph as a constant at capture, so after a resume AdamW's bias correction
    stayed frozen at the resumed step's value (~6 % too small updates for the rest of an early-resumed run, issue 18).
    """
    built = [{k: g[k] for k in BUILT_GROUP_KEYS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for g, keep in zip(optimizer.param_groups, built):
        for k in BUILT_GROUP_KEYS:
            if k in keep:
                g[k] = keep[k]
            else:
                g.pop(k, None)
    from .muon import Muon
    for g in optimizer.param_groups:
        on_device = isinstance(optimizer, Muon) or bool(g.get("fused")) or bool(g.get("capturable"))
        for p in g["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if torch.is_tensor(step):
                optimizer.state[p]["step"] = step.to(device=p.device if on_device else "cpu", dtype=torch.float32)


def _open_run_dir(out_dir: str, data: TrainData, resumed_at: int | None):
    """The run folder's own files: the tokenizer chat will use (copied once, at the start of the run: a resume has
    checked that its data has the same one) and persona card, and metrics.jsonl cut back to the step resumed from."""
    for name in ("tokenizer.json", "persona.json"):  # chat and export need only the run folder
        src, dst = os.path.join(data.path, name), os.path.join(out_dir, name)
        if os.path.isfile(src) and (resumed_at is None or not os.path.exists(dst)):
            shutil.copyfile(src, dst)
    if resumed_at is not None:
        MetricsLog(os.path.join(out_dir, "metrics.jsonl")).keep_through(resumed_at)


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

    def keep_through(self, step: int):
        """On resume: drop the lines past `step` (written after that checkpoint by a process that was then killed,
        and about to be written again), and a torn last line, so that each step is logged once."""
        if not os.path.isfile(self.path):
            return
        with open(self.path, "rb") as f:
            lines = f.readlines()
        kept = [ln for ln in lines if _logged_step(ln) is not None and _logged_step(ln) <= step]
        if kept != lines:
            ckpt_lib.atomic_write_bytes(self.path, b"".join(ln if ln.endswith(b"\n") else ln + b"\n" for ln in kept))


def _logged_step(line: bytes) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


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


def train(data_dir: str, out_dir: str, model_cfg: ModelConfig | None, cfg: TrainConfig | None, device: str = "auto",
          resume: bool = False, stop_at_step: int | None = None, progress: bool = True, log=print,
          ops: str | None = None, on_eval=None, preset: str | None = None) -> dict:
    """Train a GuppyLM on a prepared data folder, writing checkpoints and metrics.jsonl into out_dir.

    resume: continue the run in out_dir exactly (model, optimiser, scaler, RNG and data position) under the resume
        rule (RESUME_MAY_CHANGE above): model_cfg and cfg may be None (the run's own); where they differ from the
        run's, only what the rule allows changes, and anything else is refused. Without resume, out_dir must not
        hold a run already.
    stop_at_step: save and stop there, keeping the schedule of max_steps (train in pieces; resume later).
    ops: an op implementation (guppy/ops.py) to use instead of model_cfg's / the checkpoint's.
    on_eval: called with each eval's metrics record (step, eval_loss, elapsed, conversations, tokens); a true
        return ends the run there, as a normal finish with its checkpoint saved (the recipe sweep stops a variant
        once it reaches the target this way).
    preset: the preset's name, recorded in the run (a resume may name it again, and no other).
    out_dir is locked (guppy/runlock.py) for the whole training: a second training into it is refused.
    Returns a summary dict.
    """
    t_begin = time.perf_counter()
    group_was_there = dist.is_initialized()  # a caller's own process group is the caller's to destroy
    rank, world, local_rank = ddp_setup(device)
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local_rank)
    data = load_train_data(data_dir)
    go_on = resume_command(data_dir, out_dir, device, stop_at_step)
    try:
        with RunLock(out_dir) if rank == 0 else contextlib.nullcontext():
            run = start_run(data, out_dir, model_cfg, cfg, dev, resume, ops, preset, rank, world,
                            log if rank == 0 else lambda *_: None)
            if rank == 0:
                _open_run_dir(out_dir, data, run.step if resume else None)
            summary = train_loop(run, data, out_dir, dev, rank, world, stop_at_step, progress, log, on_eval,
                                 t_begin)
    except KeyboardInterrupt:  # a Ctrl-C: say how to go on, where a checkpoint was saved to go on from
        if rank == 0 and os.path.isfile(os.path.join(out_dir, "latest.json")):
            log(f"to continue: {go_on}")
        raise
    if rank == 0 and stop_at_step is not None and summary["step"] < run.cfg.max_steps:
        log(f"to continue: {resume_command(data_dir, out_dir, device)}")
    if world > 1 and not group_was_there:
        # Torch asks each process to destroy its group before it exits; the barrier first, so that no rank tears
        # down while another is still inside a collective. Only after a normal finish: after an error or a Ctrl-C
        # another rank may never reach the barrier.
        dist.barrier()
        dist.destroy_process_group()
    return summary


def make_step(run: Run, train_model, dev):
    """The training step as a function of a host batch: the whole step as one CUDA graph (guppy/graphs.py), which
    copies the batch into its static inputs, or `train_step` on the batch copied to dev. Neither waits for the copy
    or reads anything back: the host goes on to the next batch while the device computes this one."""
    if run.graphs:
        from .graphs import CudaGraphStep
        return CudaGraphStep(train_model, run.optimizer, run.scaler, run.cfg.grad_clip, run.amp_dtype)

    def step_fn(b):
        return train_step(train_model, b.to(dev, non_blocking=True), run.optimizer, run.scaler, run.cfg.grad_clip,
                          dev, run.amp_dtype)
    return step_fn


def train_loop(run: Run, data: TrainData, out_dir: str, dev, rank: int = 0, world: int = 1,
               stop_at_step: int | None = None, progress: bool = True, log=print, on_eval=None,
               t_begin: float | None = None, wrap_step=None) -> dict:
    """Train `run` from its step to max_steps (or stop_at_step): log, evaluate, save. Returns the summary.
    wrap_step(step_fn) -> step_fn: a stand-in or an observer for the step (`python -m bench host`, the tests)."""
    t_begin = time.perf_counter() if t_begin is None else t_begin
    model, cfg, optimizer, scaler, batcher, seen = run.model, run.cfg, run.optimizer, run.scaler, run.batcher, run.seen
    model_cfg, amp_dtype, best_eval, start_step = model.config, run.amp_dtype, run.best_eval, run.step
    is_main = rank == 0
    evals = (eval_batches(data.eval, cfg.batch_size, model_cfg.max_seq_len, cfg.eval_batches,
                          assistant_only=cfg.loss_on == "assistant") if data.eval is not None else [])

    train_model = model if not cfg.z_loss else WithZLoss(model, cfg.z_loss)
    if cfg.compile:
        train_model = torch.compile(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(train_model, device_ids=[dev.index] if dev.type == "cuda" else None)
    step_fn = make_step(run, train_model, dev)
    if wrap_step is not None:
        step_fn = wrap_step(step_fn)

    metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), enabled=is_main)
    end_step = cfg.max_steps if stop_at_step is None else min(cfg.max_steps, stop_at_step)
    if is_main:
        log(f"training {model.num_params():,} parameters on {dev} ({amp_dtype or torch.float32}), ops "
            f"{model_cfg.ops}, {cfg.batch_mode} batches of {cfg.batch_size}, steps {start_step} -> {end_step}"
            + (f", {world} ranks" if world > 1 else "") + (", CUDA graphs" if run.graphs else ""))
        if batcher.n_truncated:
            log(f"note: {batcher.n_truncated} conversations are longer than max_seq_len={model_cfg.max_seq_len} "
                "tokens and are cut")

    save_seconds = 0.0   # time spent writing checkpoints: kept out of `elapsed`
    eval_seconds = 0.0   # time spent in evaluations: inside `elapsed`, reported in the summary

    def elapsed() -> float:
        return time.perf_counter() - t_begin - save_seconds

    def averaged():
        return run.ema.applied() if run.ema is not None else contextlib.nullcontext()

    def save(step, pointers=("latest",)):
        nonlocal save_seconds
        if is_main:
            t = time.perf_counter()
            with averaged() as raw:  # under a weight average: the average in model.safetensors, the raw beside it
                ckpt_lib.save_checkpoint(out_dir, step, model, model_cfg, cfg, optimizer, scaler, rng_state(dev),
                                         extra={"best_eval": best_eval, "data": batcher.state_dict(),
                                                "seen": dict(seen)}, pointers=pointers, run=run.record, tensors=raw)
            save_seconds += time.perf_counter() - t

    bar = None
    if is_main and progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=end_step, initial=start_step, unit="step", dynamic_ncols=True, leave=True)

    step, setup_s = start_step, None
    loss_sum = torch.zeros((), device=dev)
    tokens_window, steps_window, t_window = 0, 0, time.time()
    last_eval = None
    interrupted, stop_requested_by_eval, timed = False, False, False
    model.train()
    stop = _StopAtStepBoundary()
    try:
        while step < end_step and not stop.requested and not stop_requested_by_eval:
            lr = lr_at(step, cfg)
            set_lr(optimizer, lr)
            if cfg.batch_ramp_steps:
                batcher.batch_size = batch_rows_at(step, cfg)
            batch = batcher.next_batch()
            n_tokens = batch.n_targets()
            tokens_window += n_tokens
            seen["conversations"] += batch.n_conversations * world
            seen["tokens"] += n_tokens * world
            loss = step_fn(batch)
            loss_sum += loss.float()
            step += 1
            if run.ema is not None:
                run.ema.update(step)
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
                if is_main and not timed:  # the first window times the run: hours without CUDA get one line
                    timed, note = True, long_run_note(dev.type, run.record.get("preset"), end_step - step,
                                                      dt / steps_window)
                    if note:
                        log(note)
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
                t_eval = time.perf_counter()
                with averaged():
                    last_eval = evaluate(model, evals, dev, amp_dtype)
                eval_seconds += time.perf_counter() - t_eval
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
        if step > start_step:  # nothing trained since the checkpoint this process started from: nothing to save
            if is_main:
                log(f"\ninterrupted at step {step}: saving a checkpoint before exiting")
            save(step)
    finally:
        stop.restore()
        if bar is not None:
            bar.close()

    summary = {"step": step, "best_eval": best_eval, "last_eval": last_eval, "seconds": elapsed(),
               "setup_s": setup_s, "save_s": save_seconds, "eval_s": eval_seconds, "interrupted": interrupted,
               "out_dir": out_dir, **seen}
    if dev.type == "cuda":
        summary["peak_mem_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    if world > 1 and not interrupted:
        summary["ddp_max_param_difference"] = ddp_max_param_difference(model)
        metrics.write(step=step, ddp_world_size=world, ddp_max_param_difference=summary["ddp_max_param_difference"])
    if is_main:
        best = f"best eval loss {best_eval:.4f}" if math.isfinite(best_eval) else \
            "no eval yet" if evals else "no held-out split to evaluate on"
        log(f"done: step {step}, {best}, {summary['seconds']:.1f} s; checkpoints in {out_dir}")
    if interrupted:
        raise KeyboardInterrupt
    return summary
