"""`guppy targets` over the LayerNorm and cross-entropy kernels: every configuration their launchers can pick
cross-compiles for sm_75, sm_80 and sm_90 and fits; the fit check itself rejects an oversized configuration."""
import importlib
import json

import pytest

from guppy import targets

# (the package re-exports functions under the same names, so fetch the modules themselves)
ln_mod = importlib.import_module("guppy.kernels.layer_norm")
ce_mod = importlib.import_module("guppy.kernels.cross_entropy")


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
        assert r["shared"] <= targets.SHARED_LIMIT[r["arch"]]


def test_fit_check_rejects_oversized_config():
    entry = dict(kernel="fabricated", config="BLOCK=huge", num_warps=4, num_stages=2, archs=(75, 80),
                 expect_tensor_cores={75: False, 80: True})
    big = 96 * 1024                                         # > sm_75's 64 KB per block, < sm_80's 163 KB
    on75 = targets.check_row(entry, 75, big, "FMA")
    on80 = targets.check_row(entry, 80, big, "mma")
    assert not on75["fits"] and not on75["ok"] and "shared" in on75["note"]
    assert on80["fits"] and on80["ok"]
    assert targets.exit_code([on80]) == 0 and targets.exit_code([on75, on80]) == 1
    # registers: 255 regs x 512 threads does not fit 64 K registers
    regs = targets.check_row(dict(entry, num_warps=16), 80, 1024, "mma", regs=255)
    assert not regs["fits"]
    # an unmet tensor-core expectation fails even when it fits
    miss = targets.check_row(entry, 80, 1024, "FMA")
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
    import os
    import subprocess
    import sys
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "guppy", "targets", "--arch", "75", "--json", str(out)],
                       capture_output=True, text=True, timeout=1200, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())
    kernels = {row["kernel"].split()[0] for row in rows["triton"]}
    assert {"layer_norm_fwd", "layer_norm_bwd", "cross_entropy_fwd", "attention_fwd", "attention_bwd_dkdv",
            "attention_bwd_dq", "masked_softmax_fwd", "masked_softmax_bwd"} <= kernels
    assert all(row["arch"] == 75 and row["fits"] and row["ok"] for row in rows["triton"])
    # on sm_75 with triton >= 3.4, tl.dot is FMA: the attention rows must say so rather than claim tensor cores
    assert all(row["dot"] == "FMA" for row in rows["triton"] if row["kernel"].startswith("attention_fwd"))
    if rows["csrc"]:  # nvcc present: every CUDA C++ attention kernel uses the tensor cores and does not spill
        assert all(row["hmma"] > 0 and row["spill_bytes"] == 0 and row["ok"] for row in rows["csrc"])
