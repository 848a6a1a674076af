"""The ops seam: the one table of implementation names, and the one rule for what `auto` runs on a GPU.

The rule (`choose_attention`) is a pure function of the GPU's capability, the Triton version, q's dtype and head dim,
and csrc's availability, so it is tested here with fake capabilities. The GPU branch of `auto` around it runs on CPU
tensors with a faked capability: the CUDA C++ kernel then runs through its host emulation, and its availability comes
from guppy.csrc's own cache (build + self-check on the CPU, as on a GPU).
"""
import os
import re

import pytest
import torch

import guppy.ops as ops
from guppy.cli import build_parser
from guppy.info import info
from guppy.reference import attention_reference, attention_sdpa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------------------------------
# One table of names
# --------------------------------------------------------------------------------------------------------------------
def readme_implementations() -> dict:
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("## The kernels", 1)[1].split("\n## ", 1)[0]
    table = section.split("| `--ops` | what runs |\n|---|---|\n", 1)[1].split("\n\n", 1)[0]
    return dict(re.fullmatch(r"\| `([^`]+)` \| (.+?) \|", row).groups() for row in table.splitlines())


def test_readme_kernel_table_lists_exactly_the_implementations():
    assert readme_implementations() == {name: impl.what for name, impl in ops.IMPLEMENTATIONS.items()}


def test_ops_option_takes_exactly_the_table_names(capsys):
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    (action,) = [a for a in train._actions if "--ops" in a.option_strings]
    assert list(action.choices) == ops.names() == list(ops.IMPLEMENTATIONS)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["train", "--data", "d", "--out", "o", "--ops", "triton-gemm"])
    assert e.value.code == 2 and "invalid choice: 'triton-gemm'" in capsys.readouterr().err


def test_info_says_each_implementation_and_what_it_is():
    text = info()
    for name, impl in ops.IMPLEMENTATIONS.items():
        (line,) = [ln for ln in text.splitlines() if ln.startswith(f"  {name} ")]
        assert impl.what in line and impl.needs in line
    assert re.search(r"^  reference +available ", text, flags=re.M)


def test_info_on_a_gpu_says_device_and_precision(monkeypatch):
    """GPU-only branch of `guppy info`, run with a faked torch.cuda."""
    from types import SimpleNamespace
    t4 = SimpleNamespace(name="Tesla T4", major=7, minor=5, total_memory=15 * 2**30, multi_processor_count=40)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: t4)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    lines = info().splitlines()
    assert "cuda:0 Tesla T4, compute capability 7.5, 15.0 GiB, 40 SMs" in lines
    assert "training precision: fp16 + GradScaler autocast" in lines


def test_unknown_name_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown ops implementation 'triton-flash'; choose one of: reference"):
        ops.get_ops("triton-flash")


# --------------------------------------------------------------------------------------------------------------------
# The auto rule, with fake capabilities
# --------------------------------------------------------------------------------------------------------------------
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

#  capability, triton, dtype, D, csrc ok -> expected; None: csrc must not be asked (it may build for minutes)
RULES = [
    ((9, 0), "3.6.0", BF16, 64, None, "triton"),
    ((8, 0), "3.6.0", F16, 64, None, "triton"),
    ((8, 0), "3.6.0", F16, 256, None, "sdpa"),            # outside the Triton kernel's 16..128
    ((8, 6), None, F16, 64, None, "sdpa"),                # no Triton
    ((7, 5), "3.6.0", F16, 64, True, "csrc"),
    ((7, 5), "3.6.0+git1a2b", F16, 128, True, "csrc"),
    ((7, 5), "3.6.0", F16, 64, False, "sdpa"),
    ((7, 5), "3.2.0", F16, 32, False, "triton"),          # tl.dot -> mma.sync m16n8k8 with Triton 3.1/3.2
    ((7, 5), "3.3.1", F16, 64, False, "sdpa"),
    ((7, 5), "3.6.0", F16, 48, None, "sdpa"),             # finding 2: a head dim csrc lacks falls back, not raises
    ((7, 5), "3.2.0", F16, 48, None, "triton"),
    ((7, 5), "3.6.0", F32, 64, None, "sdpa"),             # an fp32 model without autocast
    ((7, 5), "3.2.0", F32, 64, None, "triton"),
    ((7, 0), "3.2.0", F16, 64, None, "sdpa"),             # pre-Turing: no mma.sync m16n8k8
]


@pytest.mark.parametrize("cap,version,dtype,D,csrc_ok,expected", RULES)
def test_choose_attention(cap, version, dtype, D, csrc_ok, expected):
    asked = []

    def csrc_available():
        asked.append(1)
        return (csrc_ok, "" if csrc_ok else "no nvcc (planted)")

    name, why = ops.choose_attention(cap, version, dtype, D, csrc_available)
    assert name == expected
    assert len(asked) == (0 if csrc_ok is None else 1)
    if csrc_ok is False:
        assert "no nvcc (planted)" in why


def test_triton_head_dims_are_the_kernels_limits(device):
    """TRITON_HEAD_DIMS copies kernels/attention.py's limit; the kernel accepts its ends and refuses one past them."""
    from guppy.kernels.attention import attention
    for D in (ops.TRITON_HEAD_DIMS[0], ops.TRITON_HEAD_DIMS[-1]):
        q = torch.randn(1, 1, 2, D, device=device)
        torch.testing.assert_close(attention(q, q, q), attention_reference(q, q, q), rtol=1e-4, atol=1e-5)
    for D in (ops.TRITON_HEAD_DIMS[0] - 1, ops.TRITON_HEAD_DIMS[-1] + 1):
        q = torch.randn(1, 1, 2, D, device=device)
        with pytest.raises(ValueError, match="head dim"):
            attention(q, q, q)


# --------------------------------------------------------------------------------------------------------------------
# auto's GPU branch, run on CPU tensors with a faked capability (its CPU twin)
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_t4(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4 (fake)")
    monkeypatch.setattr(ops, "_SAID", set())
    return monkeypatch


def qkv(D, dtype=torch.float16, T=20):
    g = torch.Generator().manual_seed(D)
    return [torch.randn(2, 2, T, D, generator=g).to(dtype) for _ in range(3)]


def test_auto_on_a_t4_runs_csrc_for_fp16_and_falls_back_otherwise(fake_t4, capsys):
    from guppy import csrc
    q, k, v = qkv(32)
    fn = ops._auto_gpu_attention(q)
    assert fn is csrc.attention        # available("cpu") built the host emulation and passed its self-check
    ref = attention_reference(q.float(), k.float(), v.float())
    assert (fn(q, k, v).float() - ref).abs().max().item() < 5e-3
    q48, k48, v48 = qkv(48)            # finding 2: D = 48 is not a csrc head dim; auto must not raise
    fn = ops._auto_gpu_attention(q48)
    assert fn is attention_sdpa
    torch.testing.assert_close(fn(q48, k48, v48), attention_sdpa(q48, k48, v48))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("guppy: attention on Tesla T4 (fake) (sm_75, triton ") and lines[0].endswith(
        "for float16 q, head dim 32: csrc")
    assert "head dim 48: sdpa (guppy.csrc takes float16 and head dims (32, 64, 128)" in lines[1]
    assert len(lines) == 2


def test_auto_says_its_choice_once_per_device_dtype_and_head_dim(fake_t4, capsys):
    q, _, _ = qkv(48)
    for _ in range(3):
        ops._auto_gpu_attention(q)
    ops._auto_gpu_attention(q.float())
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "float16" in out[0] and "float32" in out[1]


def test_auto_reads_csrc_availability_from_its_one_cache(fake_t4, capsys):
    """The seam keeps no availability of its own: what guppy.csrc.available says now is what auto runs now."""
    from guppy import csrc
    q, _, _ = qkv(64)
    answers = []
    fake_t4.setattr(csrc, "available", lambda device, head_dims=None: answers[-1])
    answers.append((True, ""))
    assert ops._auto_gpu_attention(q) is csrc.attention
    answers.append((False, "self-check failed: out (planted)"))
    assert ops._auto_gpu_attention(q) is attention_sdpa


def test_auto_on_cpu_tensors_runs_the_reference():
    q, k, v = qkv(48, torch.float32)
    torch.testing.assert_close(ops.get_ops("auto").attention(q, k, v), attention_reference(q, k, v))
