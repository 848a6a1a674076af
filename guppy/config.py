"""Configuration: the model's shape, the training recipe, and the named presets that pair them.

`ModelConfig()` is GuppyLM's architecture exactly (8,726,016 parameters). `TrainConfig()` is GuppyLM's recipe.
Presets are plain dicts of overrides so that a reader sees in one place what each preset changes.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import ConfigError

# Upper bounds of a model's shape: far above any model guppy is for (guppy-9m: vocab 4096, context 128, d_model 384,
# 6 layers, 6 heads, FFN 768), far below what would exhaust memory before a weight is read.
MODEL_LIMITS = {"vocab_size": 1 << 20, "max_seq_len": 1 << 20, "d_model": 1 << 16, "n_layers": 1024, "n_heads": 1024,
                "ffn_hidden": 1 << 20}
MAX_PARAMS = 4e9  # 16 GB of fp32 weights


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    max_seq_len: int = 128
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 6
    ffn_hidden: int = 768
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    # Which implementation of LayerNorm / attention / cross-entropy the model calls (see guppy/ops.py).
    # Not part of the architecture: a checkpoint trained with one set of ops loads with any other.
    ops: str = "reference"

    def __post_init__(self):
        _check(self, positive_ints=("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "ffn_hidden"),
               positive=("layer_norm_eps",), fractions=("dropout",), strings=("ops",))
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        for name, most in MODEL_LIMITS.items():  # before any tensor is made: a config.json claiming a vocab of 2e9
            if getattr(self, name) > most:      # or 1e7 layers is this line, not a MemoryError minutes later
                raise ConfigError(f"{name}={getattr(self, name)}: must be at most {most:,}")
        d, f = self.d_model, self.ffn_hidden
        params = (self.vocab_size + self.max_seq_len) * d + self.n_layers * (4 * d * d + 2 * d * f)
        if params > MAX_PARAMS:
            raise ConfigError(f"vocab_size={self.vocab_size}, max_seq_len={self.max_seq_len}, d_model={d}, "
                              f"n_layers={self.n_layers}, ffn_hidden={f}: about {params:.2g} parameters, more than "
                              f"guppy builds ({MAX_PARAMS:.0g})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        _check_is_object(d)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class TrainConfig:
    batch_size: int = 32
    max_steps: int = 10_000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 200
    weight_decay: float = 0.1
    decay_all: bool = False          # GuppyLM decays every parameter; guppy's default skips norms, biases, embeddings
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    batch_mode: str = "pad"          # "pad" (GuppyLM's) or "packed"
    loss_on: str = "all"             # "all" tokens of the conversation, or "assistant" tokens only
    eval_every: int = 200
    eval_batches: int = 50           # 0 = the whole held-out set
    log_every: int = 10              # host syncs for metrics happen only this often
    save_every: int = 1000           # latest checkpoint; best-by-eval is saved at every eval that improves
    seed: int = 1337
    compile: bool = False
    fused_adamw: bool = False        # torch's fused AdamW kernel (CUDA only)
    cuda_graphs: bool = False        # capture the whole training step (packed mode, CUDA only)
    # The recipe knobs (bench/recipe.py sweeps them; notes/recipe.md has what they measured). The defaults keep
    # GuppyLM's recipe: AdamW and a cosine schedule.
    optimizer: str = "adamw"         # "adamw", or "muon": Muon on the hidden weight matrices, AdamW on the rest
    muon_lr: float = 0.02            # the Muon groups' peak lr; the schedule scales it as it scales lr
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0   # decoupled, scaled by muon_lr (`weight_decay` is the AdamW groups')
    schedule: str = "cosine"         # after warm-up, "cosine" or "linear" to min_lr (0 allowed), or "wsd": flat at
    decay_fraction: float = 0.2      # lr, then linear to min_lr over this share of max_steps
    # Issue 20's levers (notes/recipe.md, "Issue 20: levers"). Each default is today's recipe, bit for bit, and each
    # keeps the model a plain GuppyLM at inference.
    ema_decay: float = 0.0           # > 0: an exponential moving average of the weights, which evals, `best` and the
    ema_start: float = 0.0           # checkpoint's model.safetensors hold; it starts at ema_start * max_steps
    embed_lr_ratio: float = 1.0      # AdamW's lr on tok_emb / pos_emb (and the head tied to them), as a ratio of lr
    resid_init_scale: float = 1.0    # init std of attn.out / ffn.down is 0.02 times this (GPT-2: 1/sqrt(2 n_layers))
    z_loss: float = 0.0              # + z_loss * mean logsumexp(logits)^2 on the training loss (eval: plain CE)
    batch_ramp_steps: int = 0        # > 0: batch_size // 4 rows for the first half of these steps, // 2 for the rest
    curriculum: float = 0.0          # this share of epoch 0's conversations comes first, shortest first

    def __post_init__(self):
        _check(self, positive_ints=("batch_size", "max_steps", "eval_every", "log_every", "save_every"),
               non_negative_ints=("warmup_steps", "eval_batches", "seed", "batch_ramp_steps"),
               positive=("lr", "grad_clip", "embed_lr_ratio", "resid_init_scale"),
               non_negative=("min_lr", "weight_decay", "z_loss"), fractions=("ema_decay", "ema_start", "curriculum"),
               bools=("decay_all", "compile", "fused_adamw", "cuda_graphs"),
               choices={"batch_mode": ("pad", "packed"), "loss_on": ("all", "assistant")})
        if self.batch_ramp_steps and self.batch_size < 4:
            raise ConfigError(f"batch_ramp_steps={self.batch_ramp_steps} needs batch_size >= 4 (the ramp starts at "
                              f"a quarter of it), not {self.batch_size}")
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2
                and all(_is_number(b) and 0 <= b < 1 for b in self.betas)):
            raise ConfigError(f"betas={self.betas!r}: must be two numbers in [0, 1)")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        _check_is_object(d)
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if isinstance(d.get("betas"), list):
            d["betas"] = tuple(d["betas"])
        return cls(**d)


# --------------------------------------------------------------------------------------------------------------------
# Validation: a config read from a file (or built from options) holds values the model and the loop can use.
# Each message names the field and what it must be; the caller adds the file or the option.
# --------------------------------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(cfg, positive_ints=(), non_negative_ints=(), positive=(), non_negative=(), fractions=(), strings=(),
           bools=(), choices=None):
    rules = [(positive_ints, lambda v: _is_int(v) and v > 0, "a positive integer"),
             (non_negative_ints, lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
             (positive, lambda v: _is_number(v) and v > 0, "a finite number > 0"),
             (non_negative, lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
             (fractions, lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
             (strings, lambda v: isinstance(v, str), "a string"),
             (bools, lambda v: isinstance(v, bool), "true or false")]
    for names, ok, what in rules:
        for name in names:
            if not ok(getattr(cfg, name)):
                raise ConfigError(f"{name}={getattr(cfg, name)!r}: must be {what}")
    for name, allowed in (choices or {}).items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"{name}={getattr(cfg, name)!r}: must be one of {', '.join(allowed)}")


def _check_is_object(d):
    if not isinstance(d, dict):
        raise ConfigError(f"expected a JSON object of config fields, got a {type(d).__name__}")


# name -> (model overrides, train overrides)
PRESETS: dict[str, tuple[dict, dict]] = {
    # GuppyLM's recipe, unchanged: batch 32, 10,000 steps, lr 3e-4 -> 3e-5, 200 warm-up, pad batches.
    "guppy-9m": ({}, {}),
    # Small enough to train on 2 CPU cores in a few minutes and still answer in character.
    "cpu-demo": (
        dict(d_model=128, n_layers=2, n_heads=4, ffn_hidden=384, dropout=0.0),
        dict(batch_size=8, max_steps=1500, lr=3e-3, min_lr=3e-4, warmup_steps=50, batch_mode="packed",
             eval_every=250, eval_batches=8, save_every=500),
    ),
    # The fast path (issue: the 5-minute budget): guppy's kernels, packed rows, the step as one CUDA graph, metrics
    # read back every 50 steps. A packed row of 128 tokens holds ~3 conversations, so a step sees ~3x GuppyLM's data.
    # The recipe is the best of the recipe sweeps (notes/recipe.md, `python -m bench recipe`): Muon (lr 0.01,
    # momentum 0.9) on the hidden matrices, AdamW 2.4e-3 on the rest, no dropout, flat after 100 warm-up steps and
    # linear to 0 over the last 40 % (WSD), 1,000 steps: GuppyLM's final eval loss from 31 % of its conversations
    # (issue 20; bench/recipe.py's ISSUE_20_WINNER). fused_adamw applies when optimizer is "adamw".
    "guppy-9m-fast": (
        dict(ops="auto", dropout=0.0),
        dict(batch_size=32, max_steps=1000, lr=2.4e-3, min_lr=0.0, warmup_steps=100, batch_mode="packed",
             optimizer="muon", muon_lr=0.01, muon_momentum=0.9, schedule="wsd", decay_fraction=0.4,
             fused_adamw=True, cuda_graphs=True, log_every=50, eval_every=250, save_every=1000),
    ),
    # For tests: seconds on a CPU.
    "tiny": (
        dict(d_model=64, n_layers=2, n_heads=2, ffn_hidden=128, dropout=0.0, max_seq_len=64),
        dict(batch_size=8, max_steps=30, lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_every=10, eval_batches=2,
             save_every=10, log_every=5),
    ),
}


DEFAULT_PRESET = "guppy-9m"        # `guppy train` without --preset, on a CUDA GPU
DEFAULT_CPU_PRESET = "cpu-demo"    # and without CUDA (a CPU, Apple's MPS): see guppy.cli.default_preset


def preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    model_over, train_over = PRESETS[name]
    return ModelConfig(**model_over), TrainConfig(**train_over)
