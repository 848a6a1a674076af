"""What a fresh GPU runtime waits for before its first training step: Triton's JIT compiling every kernel
specialisation that step launches. Measured on a CPU, no GPU needed.

On a new Colab T4 (2 vCPUs, an empty ~/.triton/cache) the first step stops at each Triton launch whose specialisation
has not been compiled yet, and compiles it on the host CPU, one after the other. The compile is CPU work only, so the
same compiles on a machine with the same core count take what the user waits (GPU-FACTS.md).

1. `record_launches`: one training step (forward and backward) of the preset's model on CPU tensors, its Triton
   kernels running under the interpreter, each launch recorded as the JIT keys its cache: triton's own argument
   binder (`create_function_from_signature`, the one `JITFunction.run` calls) gives per argument the pointer dtype
   and 16-byte alignment, i32/i64 with divisibility by 16, a constant for an integer equal to 1, and the constexprs;
   plus num_warps and num_stages. Each distinct key is one compile on a GPU.
2. `cold_compile_seconds`: in a fresh process without the interpreter and with an empty TRITON_CACHE_DIR,
   `triton.compile` of each recorded specialisation for GPUTarget("cuda", arch, 32) (`guppy.targets.compile_entry`,
   driven by the recorded signature), timed one by one and as a whole.
3. `preset_compile_seconds`: both, each in its own subprocess where this process cannot run it: the call a benchmark
   makes.

Dtypes: the T4 trains under CUDA autocast fp16 (guppy.train.autocast_dtype). The embeddings and every parameter stay
fp32, so the residual stream is fp32 and norm1 and the final norm normalise fp32 rows; nn.Linear returns fp16, so
norm2 gets the attention projection's fp16 output with the fp32 residual and writes h and y in fp32 (promotion);
linear_cross_entropy casts the hidden rows and the tied weight to fp16, so the cross-entropy kernel reads and writes
fp16 logit chunks (fp32 Loss and Scale, int64 Target). Autocast hands a Linear's input gradient back in the input's
dtype, so every LayerNorm backward gets fp32 dy and dh. CPU autocast in float16 applies the same rules to these ops
(Linear, matmul to fp16; embedding and custom autograd Functions untouched), so the interpreter sees those dtypes;
tests/test_targets.py checks them.

Attention: on a T4 in fp16 `auto` runs the CUDA C++ kernel (guppy.ops.choose_attention; nvcc builds it, not Triton's
JIT) or, where it is unavailable, SDPA: no Triton attention either way with triton >= 3.3. The step is recorded with
the reference attention and the exclusion is stated in the result. Where choose_attention picks a Triton attention
(sm_80+), recording refuses: that launcher chooses its tiles from the GPU's arch, which the interpreter does not have.

Row count: no constexpr depends on it (LayerNorm's BLOCK_M/BLOCK_N from d_model, BLOCK_V from the vocabulary). The
rows enter as LayerNorm's M = B·T (divisible by 16 for any B when T is) and as linear_cross_entropy's chunk size (a
power of two, so the Target and Loss slices stay 16-byte aligned from 4 rows on). So a batch of 1 records what a
batch of 32 launches; only the launch counts differ.

Not counted: the import of triton (done by any run that uses the kernels), the one-time gcc build of triton's
cuda_utils driver module and loading each cubin on the GPU (both need libcuda), and nvcc's csrc build.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

KERNEL_MODULES = ("guppy.kernels.layer_norm", "guppy.kernels.cross_entropy", "guppy.kernels.attention",
                  "guppy.kernels.gemm_softmax")
TRITON_ATTENTIONS = ("triton", "gemm-softmax")


# ----------------------------------------------------------------------------------------------------------------------
# Recording: one training step under the interpreter, each launch keyed as the JIT keys it
# ----------------------------------------------------------------------------------------------------------------------
def _binder(fn):
    """triton's argument binder for the interpreted kernel `fn`, built as JITFunction builds its own:
    binder(*args, **kwargs) -> (bound args, [(type, specialisation)] per argument, launch options)."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import KernelParam, create_function_from_signature

    sig = inspect.signature(fn.fn)
    dns = tuple(fn.kwargs.get("do_not_specialize") or ())
    dnsa = tuple(fn.kwargs.get("do_not_specialize_on_alignment") or ())
    params = [KernelParam(i, p, i in dns or p.name in dns, i in dnsa or p.name in dnsa)
              for i, p in enumerate(sig.parameters.values())]
    return create_function_from_signature(sig, params, CUDABackend)


def _plain(value, what: str):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"guppy.launches: {what} = {value!r} is not a plain value; the recorder cannot carry it")


def kernel_label(name: str) -> str:
    """`_layer_norm_fwd_kernel` -> `layer_norm_fwd`, the names `guppy targets` shows."""
    return name.strip("_").removesuffix("_kernel")


def describe(rec: dict) -> str:
    """One line: the constexprs, the pointer dtypes, warps and stages of a recorded specialisation."""
    const = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(rec["constexprs"].items()))
    ptrs = " ".join(f"{k}:{t[1:]}" for k, t in rec["signature"].items() if t.startswith("*"))
    opts = rec["options"]
    return f"{const} | {ptrs} | warps={opts.get('num_warps', '-')} stages={opts.get('num_stages', '-')}"


class LaunchLog:
    """The distinct specialisations launched, in first-launch order, with a launch count each."""

    def __init__(self):
        self.records: dict[str, dict] = {}
        self.total = 0
        self._binders = {}

    def add(self, fn, args, kwargs):
        binder = self._binders.get(fn.fn) or self._binders.setdefault(fn.fn, _binder(fn))
        bound, spec, options = binder(*args, **kwargs)
        names = list(bound)
        rec = dict(module=fn.fn.__module__, fn=fn.fn.__qualname__, kernel=kernel_label(fn.fn.__name__),
                   signature={n: s[0] for n, s in zip(names, spec)},
                   constexprs={n: _plain(bound[n], n) for n, s in zip(names, spec) if s[0] == "constexpr"},
                   attrs={n: s[1] for n, s in zip(names, spec) if s[0] != "constexpr" and isinstance(s[1], str)},
                   options={k: _plain(v, k) for k, v in sorted(options.items())})
        key = json.dumps(rec, sort_keys=True)
        self.total += 1
        self.records.setdefault(key, dict(rec, config=describe(rec), launches=0))["launches"] += 1


@contextmanager
def recording(log: LaunchLog):
    """Every interpreted Triton launch in the block goes through `log.add` first, then runs as usual."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            log.add(self, args, kwargs)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield log
    finally:
        InterpretedFunction.run = original


def _interpreted_here() -> bool:
    """Whether guppy's Triton kernels in this process run through the interpreter (triton decides at their import)."""
    from triton.runtime.jit import JITFunction

    from guppy.kernels._utils import interpreting
    loaded = [sys.modules[m] for m in KERNEL_MODULES if m in sys.modules]
    if not loaded:
        return interpreting()
    return not any(isinstance(v, JITFunction) for m in loaded for v in vars(m).values())


def _dtype(dtype):
    import torch
    return getattr(torch, dtype.replace("torch.", "")) if isinstance(dtype, str) else dtype


def _model_config(preset: str, model_overrides: dict | None):
    import dataclasses

    from guppy.config import preset as preset_configs
    return dataclasses.replace(preset_configs(preset)[0], **(model_overrides or {}))


def excluded_ops(ops_name: str, arch: int, dtype, head_dim: int) -> dict:
    """{op: why it launches no Triton kernel} for what `ops_name` runs on sm_<arch>; ValueError where it would run a
    Triton attention (recording cannot give that launcher's arch-dependent tiles)."""
    import triton

    from guppy import ops
    if not ops.IMPLEMENTATIONS[ops_name].triton and ops_name != "auto":
        return {"all": f"ops {ops_name!r} runs no Triton kernel"}
    if ops_name == "auto":
        attention, why = ops.choose_attention((arch // 10, arch % 10), triton.__version__, dtype, head_dim,
                                              lambda: (True, "assumed to build, as on a working T4 setup"))
    else:
        attention, why = ops_name, ""
    if attention in TRITON_ATTENTIONS:
        raise ValueError(f"guppy.launches: on sm_{arch} ops {ops_name!r} runs Triton attention ({attention}), whose "
                         f"launcher picks its tiles from the GPU's arch; the interpreter has none, so its "
                         f"specialisations cannot be recorded here")
    kind = {"csrc": "CUDA C++ (csrc/attention.cu, built by nvcc, not Triton's JIT)",
            "sdpa": "torch SDPA"}.get(attention, attention)
    return {"attention": f"{kind}: guppy.ops.choose_attention for sm_{arch}, {str(dtype).replace('torch.', '')}, "
                         f"head dim {head_dim}{why}"}


def _packed_batch(B: int, T: int, V: int, seed: int):
    """A packed batch of the model's shape: two conversations per row, positions restarting, -100 at the ends."""
    import torch
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    cut = T // 3
    segment_ids = (torch.arange(T) >= cut).long().expand(B, T).contiguous()
    positions = torch.cat([torch.arange(cut), torch.arange(T - cut)]).expand(B, T).contiguous()
    targets[:, cut - 1] = -100
    targets[:, -1] = -100
    return idx, targets, segment_ids, positions


def _record_here(preset: str, dtype, arch: int, batch_size: int, model_overrides: dict | None, seed: int) -> dict:
    import dataclasses

    import torch

    from guppy import ops
    from guppy.model import GuppyLM

    model_cfg = _model_config(preset, model_overrides)
    excluded = excluded_ops(model_cfg.ops, arch, dtype, model_cfg.head_dim)
    torch.manual_seed(seed)
    model = GuppyLM(dataclasses.replace(model_cfg, ops="reference"))
    if "all" not in excluded:           # the seam: Triton LayerNorm and LM head + loss, as the GPU step runs them
        model.ops = ops.get_ops("triton")._replace(name=f"record-{model_cfg.ops}", attention=ops.REFERENCE.attention)
    model.train()
    idx, targets, segment_ids, positions = _packed_batch(batch_size, model_cfg.max_seq_len, model_cfg.vocab_size, seed)
    log = LaunchLog()
    t0 = time.perf_counter()
    with recording(log):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(idx, targets, segment_ids=segment_ids, positions=positions)
        (loss * 2.0 ** 16).backward()       # GradScaler's scale(loss): a power of two, no kernel of its own
    return dict(preset=preset, arch=arch, dtype=str(dtype).replace("torch.", ""), batch_size=batch_size,
                seq_len=model_cfg.max_seq_len, d_model=model_cfg.d_model, vocab_size=model_cfg.vocab_size,
                ops=model_cfg.ops, excluded=excluded, launches=list(log.records.values()),
                launches_recorded=log.total, record_s=round(time.perf_counter() - t0, 3))


def record_launches(preset: str = "guppy-9m-fast", dtype="float16", arch: int = 75, batch_size: int = 1,
                    model_overrides: dict | None = None, seed: int = 0) -> dict:
    """The Triton specialisations one training step of `preset` launches on sm_<arch> under autocast `dtype`.

    -> {"launches": [{"kernel", "config", "module", "fn", "signature", "constexprs", "attrs", "options",
    "launches"}], "launches_recorded": total launches, "excluded": {op: why no Triton}, "record_s", and the
    conditions (preset, arch, dtype, batch_size, seq_len, d_model, vocab_size, ops)}. Runs here when this
    process's kernels are interpreted, else in a subprocess with TRITON_INTERPRET=1. `model_overrides` replaces
    ModelConfig fields (tests use small dims)."""
    dtype = _dtype(dtype)
    cfg = _model_config(preset, model_overrides)
    excluded_ops(cfg.ops, arch, dtype, cfg.head_dim)      # refuses here, before any subprocess, what it cannot record
    if _interpreted_here():
        return _record_here(preset, dtype, arch, batch_size, model_overrides, seed)
    request = dict(preset=preset, dtype=str(dtype), arch=arch, batch_size=batch_size, model_overrides=model_overrides,
                   seed=seed)
    return _in_child("record", request, {"TRITON_INTERPRET": "1"})


# ----------------------------------------------------------------------------------------------------------------------
# Cold compile: a fresh process, an empty cache, each recorded specialisation compiled for the target
# ----------------------------------------------------------------------------------------------------------------------
def compile_entry_for(rec: dict) -> dict:
    """A `guppy.targets.compile_entry` entry that compiles exactly the recorded specialisation."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(rec["module"]), rec["fn"])
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"guppy.launches: {rec['fn']} was imported under TRITON_INTERPRET and cannot be compiled")
    attrs = {(fn.arg_names.index(n),): CUDABackend.parse_attr(d) for n, d in rec["attrs"].items()}
    return dict(kernel=rec["kernel"], config=rec["config"], fn=fn, constexprs=rec["constexprs"],
                signature=rec["signature"], attrs=attrs, options=rec["options"],
                num_warps=rec["options"].get("num_warps"), num_stages=rec["options"].get("num_stages"))


def _compile_here(launches: list[dict], arch: int) -> dict:
    from guppy.targets import compile_entry
    cache = os.environ.get("TRITON_CACHE_DIR")
    if not cache or (os.path.isdir(cache) and os.listdir(cache)):
        raise RuntimeError("guppy.launches: a cold compile needs TRITON_CACHE_DIR set to an empty folder")
    import torch  # noqa: F401 - imported by any run that launches the kernels, so outside both timings
    t0 = time.perf_counter()
    import triton
    triton_import_s = time.perf_counter() - t0
    entries = [compile_entry_for(rec) for rec in launches]
    rows = []
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    for rec, entry in zip(launches, entries):
        cpu = _cpu_seconds()
        c = compile_entry(entry, arch, resources=False)
        rows.append(dict(kernel=rec["kernel"], config=rec["config"], seconds=round(c["seconds"], 3),
                         cpu_s=round(_cpu_seconds() - cpu, 3), shared=c["shared"], launches=rec["launches"]))
    total, cpu_total = time.perf_counter() - t0, _cpu_seconds() - cpu0
    return {"triton_compile_s": round(total, 3), "triton_compile_cpu_s": round(cpu_total, 3), "kernels": rows,
            "arch": arch, "triton": triton.__version__, "specialisations": len(rows),
            "triton_import_s": round(triton_import_s, 3), "cpu_count": os.cpu_count(),
            "loadavg_1min": round(os.getloadavg()[0], 2)}


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): what the compiles cost with a core to
    themselves, whatever else runs on the machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cold_compile_seconds(launches: list[dict], arch: int = 75) -> dict:
    """Cross-compile each recorded specialisation (`record_launches(...)["launches"]`) for sm_<arch>, cold: in a new
    process without the interpreter, with an empty TRITON_CACHE_DIR (a temporary folder), one after the other as the
    JIT compiles them. -> {"triton_compile_s": wall time of all compiles (the first carries the backend's one-time
    set-up), "triton_compile_cpu_s": their CPU time (ptxas included; the wall time on an idle core), "kernels":
    [{"kernel", "config", "seconds", "cpu_s", "shared", "launches"}], "arch", "triton": version, "specialisations",
    "triton_import_s" (not in the total), "cpu_count", "loadavg_1min" (the other load on the cores)}."""
    with tempfile.TemporaryDirectory(prefix="guppy-cold-triton-") as tmp:
        cache = os.path.join(tmp, "cache")
        return _in_child("compile", dict(launches=launches, arch=arch), {"TRITON_CACHE_DIR": cache}, drop=(
            "TRITON_INTERPRET",))


def preset_compile_seconds(preset: str = "guppy-9m-fast", arch: int = 75, dtype="float16",
                           batch_size: int = 1) -> dict:
    """The seconds a fresh runtime's first training step of `preset` waits for Triton's JIT on sm_<arch>: the
    `cold_compile_seconds` dict of `record_launches`, plus "preset", "dtype", "launches_recorded", "excluded" and
    "record_s". {"triton_compile_s": None, "skipped": reason} without triton, or when a step fails."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return {"triton_compile_s": None, "skipped": f"triton is not installed ({e})"}
    try:
        rec = record_launches(preset, dtype, arch, batch_size)
        out = cold_compile_seconds(rec["launches"], arch)
    except (RuntimeError, ValueError) as e:
        return {"triton_compile_s": None, "skipped": str(e).splitlines()[0]}
    return dict(out, preset=preset, dtype=rec["dtype"], batch_size=batch_size,
                launches_recorded=rec["launches_recorded"], excluded=rec["excluded"], record_s=rec["record_s"])


# ----------------------------------------------------------------------------------------------------------------------
# Subprocesses
# ----------------------------------------------------------------------------------------------------------------------
def _in_child(what: str, request: dict, env_set: dict, drop=()) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_set)
    env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="guppy-launches-") as tmp:
        src, dst = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        with open(src, "w") as f:
            json.dump(request, f)
        r = subprocess.run([sys.executable, "-m", "guppy.launches", what, src, dst], env=env, capture_output=True,
                           text=True)
        if r.returncode != 0 or not os.path.exists(dst):
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"guppy.launches {what} subprocess failed (exit {r.returncode}): {tail[0]}")
        with open(dst) as f:
            return json.load(f)


def _child(argv: list[str]) -> int:
    what, src, dst = argv
    with open(src) as f:
        req = json.load(f)
    if what == "record":
        if not _interpreted_here():
            raise RuntimeError("guppy.launches: the record subprocess needs TRITON_INTERPRET=1")
        out = _record_here(req["preset"], _dtype(req["dtype"]), req["arch"], req["batch_size"],
                           req["model_overrides"], req["seed"])
    else:
        out = _compile_here(req["launches"], req["arch"])
    with open(dst, "w") as f:
        json.dump(out, f)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m guppy.launches [preset] [arch]`: the figures for a preset, as JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["record"], ["compile"]):
        return _child(argv)
    out = preset_compile_seconds(*(argv[:1] or ["guppy-9m-fast"]), *(int(a) for a in argv[1:2]))
    print(json.dumps(out, indent=1))
    return 0 if out["triton_compile_s"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
