"""`guppy targets`, the one cross-compile harness: every configuration the Triton launchers can pick compiles for
sm_75, sm_80 and sm_90 and fits; the CUDA C++ kernels use the T4's tensor cores without spilling; the verdicts, the
signature builder and the ptxas / SASS parsers hold on fabricated input. guppy.launches: the Triton specialisations
one training step launches, recorded under the interpreter, and their cold compile for sm_75."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import guppy.kernels.cross_entropy as ce_mod
import guppy.kernels.layer_norm as ln_mod
from guppy import launches, targets


@pytest.mark.parametrize("kernel,expected", [("layer_norm", 2 * len(ln_mod.reachable_configs())),
                                             ("cross_entropy", len(ce_mod.reachable_configs()))])
def test_targets_ln_ce_fit(tmp_path, kernel, expected):
    out = tmp_path / "rows.json"
    rc = targets.main(["--arch", "75,80,90", "--kernel", kernel, "--json", str(out), "--no-csrc"])
    rows = json.loads(out.read_text())["triton"]
    assert rc == 0
    assert len(rows) == 3 * expected                        # every reachable config on every arch
    assert {r["arch"] for r in rows} == {75, 80, 90}
    for r in rows:
        assert r["fits"] and r["ok"], r
        assert r["dot"] == "no dot", r                     # memory-bound kernels: no tl.dot
        assert r["shared"] <= targets.ARCH_LIMITS[r["arch"]].smem_per_block


def test_fit_check_rejects_oversized_config():
    entry = dict(kernel="fabricated", config="BLOCK=huge", num_warps=4, num_stages=2, archs=(75, 80))
    big = 96 * 1024                                         # > sm_75's 64 KB per block, < sm_80's 163 KB
    on75 = targets.check_row(dict(entry, expect_tensor_cores=False), 75, big, "FMA")
    on80 = targets.check_row(dict(entry, expect_tensor_cores=True), 80, big, "mma")
    assert not on75["fits"] and not on75["ok"] and "shared" in on75["note"]
    assert on80["fits"] and on80["ok"]
    assert targets.exit_code([on80]) == 0 and targets.exit_code([on75, on80]) == 1
    # registers: 255 regs x 512 threads does not fit 64 K registers
    regs = targets.check_row(dict(entry, num_warps=16), 80, 1024, "mma", regs=255)
    assert not regs["fits"]
    # an unmet tensor-core expectation fails even when it fits
    miss = targets.check_row(dict(entry, expect_tensor_cores=True), 80, 1024, "FMA")
    assert miss["fits"] and not miss["ok"] and "expected tensor cores" in miss["note"]


def test_dot_kind():
    assert targets.dot_kind("add.f32", "tt.load") == "no dot"
    assert targets.dot_kind("fma.rn.f32 ...", "tt.dot") == "FMA"
    assert targets.dot_kind("mma.sync.aligned.m16n8k16", "tt.dot") == "mma"
    assert targets.dot_kind("wgmma.mma_async", "tt.dot") == "wgmma"


def test_bad_arch_is_a_usage_error():
    assert targets.main(["--arch", "7x"]) == 2
    assert targets.main(["--arch", "12"]) == 2


def test_guppy_targets_every_kernel_fits_the_t4(tmp_path):
    """The command itself, over every kernel module and the CUDA C++ kernels, for sm_75: what would not launch on a
    T4 (shared memory, registers), an attention kernel expecting tensor cores it does not get, or a csrc kernel that
    spills or has no HMMA.1688, fails here."""
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "guppy", "targets", "--arch", "75", "--json", str(out)],
                       capture_output=True, text=True, timeout=1200, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())
    kernels = {row["kernel"].split()[0] for row in rows["triton"]}
    assert {"layer_norm_fwd", "layer_norm_bwd", "cross_entropy_fwd", "attention_fwd", "attention_bwd_dkdv",
            "attention_bwd_dq", "softmax_fwd", "softmax_bwd"} <= kernels
    assert all(row["arch"] == 75 and row["fits"] and row["ok"] for row in rows["triton"])
    # on sm_75 with triton >= 3.4, tl.dot is FMA: the attention rows must say so rather than claim tensor cores
    assert all(row["dot"] == "FMA" for row in rows["triton"] if row["kernel"].startswith("attention_fwd"))
    if rows["csrc"]:  # nvcc present: every CUDA C++ attention kernel uses the tensor cores and does not spill
        assert all(row["hmma"] > 0 and row["spill_bytes"] == 0 and row["ok"] for row in rows["csrc"])


def test_signature_is_built_from_the_argument_names():
    fn = SimpleNamespace(arg_names=["X", "Y", "SEED", "stride_x", "M", "eps", "BLOCK"])
    sig, attrs = targets.signature(fn, {"BLOCK": 64}, {"X": "*fp16", "Y": "*fp32", "SEED": "*i64", "eps": "fp32",
                                                       "unused": "*fp32"})
    assert sig == {"X": "*fp16", "Y": "*fp32", "SEED": "*i64", "stride_x": "i32", "M": "i32", "eps": "fp32",
                   "BLOCK": "constexpr"}
    # a real launch specialises 16-byte aligned pointers and strides divisible by 16
    assert attrs == {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3)}


def test_fit_counts_blocks_per_sm():
    # attn_fwd<D=64> on sm_75 (notes/csrc.md): 183 registers (184 allocated) x 128 threads and 16 KB -> 2 blocks per SM
    assert targets.fit(75, 16384, 128, 183) == (True, 2, [])
    assert targets.fit(75, 40960, 128, 100)[:2] == (True, 1)            # shared memory limits it to one block
    assert targets.fit(80, 8192, 128, None)[:2] == (True, 16)           # no register count: smem and threads only
    fits, blocks, notes = targets.fit(75, 64 * 1024 + 1, 128, 64)
    assert not fits and blocks == 0 and "shared" in notes[0]
    assert not targets.fit(80, 0, 512, 129)[0]                           # 136 allocated x 512 > 64 K registers


PTXAS = """ptxas info    : Compiling entry function '_ZN10guppy_attn8attn_fwdILi64EEEv17GuppyAttnParams' for 'sm_75'
ptxas info    : Function properties for _ZN10guppy_attn8attn_fwdILi64EEEv17GuppyAttnParams
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 183 registers, 432 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN10guppy_attn14attn_bwd_smallILi32EEEv17GuppyAttnParams' for 'sm_75'
ptxas info    : Function properties for _ZN10guppy_attn14attn_bwd_smallILi32EEEv17GuppyAttnParams
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, 16 bytes smem, 432 bytes cmem[0]
"""
SASS = """\tFunction : _ZN10guppy_attn8attn_fwdILi64EEEv17GuppyAttnParams
        /*0100*/                   LDSM.16.M88.4 R4, [R2] ;
        /*0110*/                   HMMA.1688.F32 R8, R4, R12, R8 ;
        /*0120*/                   HMMA.1688.F32 R16, R4, R14, R16 ;
\tFunction : _ZN10guppy_attn14attn_bwd_smallILi32EEEv17GuppyAttnParams
        /*0100*/                   FFMA R1, R2, R3, R4 ;
"""


def test_csrc_rows_from_ptxas_and_sass_text():
    """The parsers and the verdict on fabricated nvcc output; the shared bytes are the static ones plus what the
    launcher requests (here a fake `smem`)."""
    fwd = "_ZN10guppy_attn8attn_fwdILi64EEEv17GuppyAttnParams"
    small = "_ZN10guppy_attn14attn_bwd_smallILi32EEEv17GuppyAttnParams"
    ptxas, sass = targets.parse_ptxas(PTXAS), targets.parse_sass(SASS)
    assert ptxas[fwd] == {"regs": 183, "static_smem": 0, "spill": 0, "stack": 0}
    assert ptxas[small] == {"regs": 255, "static_smem": 16, "spill": 8, "stack": 8}
    assert sass == {fwd: {"hmma": 2, "ldsm": 1}, small: {"hmma": 0, "ldsm": 0}}
    smem = {("fwd", 64): 16384, ("bwd_small", 32): 16384}
    rows = {r["kernel"]: r for r in targets.csrc_arch_rows(75, ptxas, sass, lambda kind, D: smem[kind, D])}
    assert rows["attn_fwd<D=64>"]["shared"] == 16384 and rows["attn_fwd<D=64>"]["ok"]
    assert "2 block(s)/SM" in rows["attn_fwd<D=64>"]["note"]
    bad = rows["attn_bwd_small<D=32>"]
    assert bad["shared"] == 16400 and bad["fits"] and not bad["ok"]     # spills, and no HMMA.1688 on sm_75


def test_extension_reports_each_launchers_shared_memory():
    """The one source of the csrc shared-memory sizes: attention.cu's own smem functions, through the binding."""
    csrc = pytest.importorskip("guppy.csrc")
    smem = csrc.load("cpu").smem
    for D in (32, 64, 128):
        sizes = {k: smem(k, D) for k in ("fwd", "bwd_dq", "bwd_dkv")}
        assert all(0 < b <= targets.ARCH_LIMITS[75].smem_per_block for b in sizes.values()), (D, sizes)
        if D <= 64:   # the T <= 128 kernel runs both passes in one block: the larger of the two
            assert smem("bwd_small", D) == max(sizes["bwd_dq"], sizes["bwd_dkv"])
    assert smem("bwd_small", 128) == 0 and smem("fwd", 48) == 0 and smem("nope", 64) == 0


def _have_nvcc():
    return targets.find_cuda_tool("nvcc") is not None and targets.find_cuda_tool("cuobjdump") is not None


@pytest.mark.skipif(not _have_nvcc(), reason="needs nvcc and cuobjdump (no GPU needed)")
def test_csrc_rows_sm75_sm80_tensor_cores_no_spills():
    rows = targets.csrc_rows((75, 80))
    kernels = {r["kernel"] for r in rows}
    for D in (32, 64, 128):
        assert {f"attn_fwd<D={D}>", f"attn_bwd_dq<D={D}>", f"attn_bwd_dkv<D={D}>"} <= kernels
    assert {"attn_bwd_small<D=32>", "attn_bwd_small<D=64>"} <= kernels
    for r in rows:
        assert set(r) == {"kernel", "arch", "regs", "shared", "spill_bytes", "hmma", "ldsm", "fits", "ok", "note"}
        assert r["ok"], r
        if r["arch"] == 75:
            assert r["hmma"] > 0 and r["ldsm"] > 0 and r["spill_bytes"] == 0 and r["shared"] <= 64 * 1024


# ----------------------------------------------------------------------------------------------------------------------
# guppy.launches: what one training step launches, and its cold compile
# ----------------------------------------------------------------------------------------------------------------------
# Small dims with the fast path's ops: N = 96 is not a power of two, V = 300 is not divisible by 16, head dim 32 is one
# that csrc takes (so on sm_75 `auto` gives attention to csrc, and no Triton attention launches).
SMALL = dict(ops="auto", d_model=96, n_heads=3, n_layers=2, ffn_hidden=64, vocab_size=300, max_seq_len=32)


def _next_pow2(n):
    return 1 << (n - 1).bit_length()


@pytest.fixture(scope="module")
def small_step():
    return launches.record_launches("tiny", torch.float16, arch=75, batch_size=2, model_overrides=SMALL)


def _only(recs, kernel, **constexprs):
    found = [r for r in recs if r["kernel"] == kernel
             and all(r["constexprs"][k] == v for k, v in constexprs.items())]
    assert len(found) == 1, (kernel, constexprs, [r["config"] for r in recs])
    return found[0]


def _ptr_types(rec, *names):
    return tuple(rec["signature"][n] for n in names)


@pytest.mark.cpu_only
def test_one_step_launches_layer_norm_and_cross_entropy_with_the_fp16_autocast_dtypes(small_step):
    """Under fp16 autocast the residual stream (embeddings, parameters) is fp32 and nn.Linear returns fp16: norm1 and
    the final norm normalise fp32 rows; norm2 takes the attention projection's fp16 output with the fp32 residual;
    the LM head's logits chunks are fp16; every gradient reaching a LayerNorm is fp32."""
    recs = small_step["launches"]
    L, N, V = SMALL["n_layers"], SMALL["d_model"], SMALL["vocab_size"]
    block_n = max(16, _next_pow2(N))                      # 128: the next power of two of d_model
    block_m = max(1, 2048 // block_n)                     # rows per program: a tile of >= 2048 elements
    block_v = min(4096, max(128, _next_pow2(V)))          # 512: next power of two of V, clamped to 128..4096
    assert {r["kernel"] for r in recs} == {"layer_norm_fwd", "layer_norm_bwd", "cross_entropy_fwd"}
    assert len(recs) == 5                                 # 2 LayerNorm forwards, 2 backwards, 1 cross-entropy

    plain = _only(recs, "layer_norm_fwd", HAS_RESIDUAL=False)
    fused = _only(recs, "layer_norm_fwd", HAS_RESIDUAL=True)
    for r in (plain, fused):
        assert (r["constexprs"]["BLOCK_N"], r["constexprs"]["BLOCK_M"]) == (block_n, block_m)
        assert r["constexprs"]["HAS_WEIGHT"] and r["constexprs"]["HAS_BIAS"]
        assert _ptr_types(r, "W", "B", "Mean", "Rstd") == ("*fp32",) * 4
        assert r["attrs"]["N"] == "D" and r["attrs"]["M"] == "D"        # 96 and B·T = 64: multiples of 16
    assert _ptr_types(plain, "X", "Y") == ("*fp32", "*fp32")
    assert _ptr_types(fused, "X", "R", "H", "Y") == ("*fp16", "*fp32", "*fp32", "*fp32")
    assert (plain["launches"], fused["launches"]) == (L + 1, L)          # norm1 of each block + the final norm; norm2

    first = _only(recs, "layer_norm_bwd", HAS_DH=False)
    second = _only(recs, "layer_norm_bwd", HAS_DH=True)
    for r in (first, second):
        assert r["constexprs"]["HAS_DY"] and r["constexprs"]["BLOCK_N"] == block_n
        assert _ptr_types(r, "DY", "DH", "X", "DX", "DW", "DB") == ("*fp32",) * 6
    assert (first["launches"], second["launches"]) == (L + 1, L)

    ce = _only(recs, "cross_entropy_fwd")
    assert ce["constexprs"] == dict(COMPUTE_GRAD=True, HAS_SMOOTHING=False, BLOCK_V=block_v)
    assert _ptr_types(ce, "Logits", "Grad", "Target", "Loss", "Scale") == ("*fp16", "*fp16", "*i64", "*fp32", "*fp32")
    assert ce["attrs"]["V"] == ""                                        # 300 is not a multiple of 16
    assert small_step["launches_recorded"] == sum(r["launches"] for r in recs)
    assert "csrc" in small_step["excluded"]["attention"]


@pytest.mark.cpu_only
def test_the_specialisations_do_not_depend_on_the_batch_size(small_step):
    """Only launch counts change with B: no constexpr depends on the rows, M = B·T stays a multiple of 16, and the LM
    head's chunks keep the Target and Loss slices 16-byte aligned."""
    one = launches.record_launches("tiny", torch.float16, arch=75, batch_size=1, model_overrides=SMALL)

    def keys(rec):
        return sorted(json.dumps({k: v for k, v in r.items() if k != "launches"}, sort_keys=True)
                      for r in rec["launches"])
    assert keys(one) == keys(small_step)


@pytest.mark.cpu_only
def test_a_preset_without_triton_ops_launches_nothing():
    rec = launches.record_launches("tiny", torch.float16, arch=75, batch_size=1)      # "tiny" runs the reference ops
    assert rec["launches"] == [] and rec["launches_recorded"] == 0 and "all" in rec["excluded"]


@pytest.mark.cpu_only
def test_recording_refuses_where_triton_attention_would_run():
    with pytest.raises(ValueError, match="Triton attention"):
        launches.record_launches("tiny", torch.bfloat16, arch=80, batch_size=1, model_overrides=SMALL)


@pytest.mark.cpu_only
def test_cold_compile_of_the_recorded_step_for_sm75(small_step):
    """Each recorded specialisation compiles for sm_75 from an empty cache, in a process of its own."""
    import triton
    out = launches.cold_compile_seconds(small_step["launches"], arch=75)
    assert out["arch"] == 75 and out["triton"] == triton.__version__
    assert [(k["kernel"], k["config"]) for k in out["kernels"]] == [(r["kernel"], r["config"])
                                                                    for r in small_step["launches"]]
    seconds = [k["seconds"] for k in out["kernels"]]
    assert all(s > 0 for s in seconds)
    assert out["triton_compile_s"] >= max(seconds)
    assert all(0 <= k["shared"] <= targets.ARCH_LIMITS[75].smem_per_block for k in out["kernels"])


def test_preset_compile_seconds_without_triton_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)              # `import triton` raises ImportError
    out = launches.preset_compile_seconds("guppy-9m-fast")
    assert out["triton_compile_s"] is None and "triton" in out["skipped"]
