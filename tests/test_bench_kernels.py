"""The output check that `python -m bench kernels` and bench/test_kernels.py run before timing a case (GPU only
there), here on the CPU: every suite's reference wiring runs, a correct implementation passes, wrong ones fail."""
import pytest
import torch

from bench.kernels import Case, attention_cases, check_output, cross_entropy_cases, layer_norm_cases
from guppy import reference


@pytest.mark.parametrize("suite", [layer_norm_cases, cross_entropy_cases, attention_cases])
def test_each_suite_checks_its_reference_implementation(suite):
    """The plain PyTorch case of each suite (eager / naive) through the real `make` and reference lambdas: the
    wiring of inputs to the reference (argument order, segment ids, dtype) holds."""
    cases = [c for c in suite(torch.float32, quick=True, device="cpu") if c.impl in ("eager", "naive")]
    assert cases
    for case in cases:
        assert check_output(case) < 1e-5, case


def _ln_case(impl, dtype=torch.float32):
    def make():
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(64, 48, generator=g), torch.randn(48, generator=g), torch.randn(48, generator=g)
        x, w, b = (t.to(dtype) for t in (x, w, b))
        return (lambda: impl(x, w, b, 1e-5)), [x, w, b], \
            (lambda: reference.layer_norm_reference(x.float(), w.float(), b.float(), 1e-5))
    return Case("layer_norm", "64x48", "fake", make)


def test_a_correct_output_passes_at_its_dtypes_tolerance():
    ln = torch.nn.functional.layer_norm
    assert check_output(_ln_case(lambda x, w, b, eps: ln(x, (48,), w, b, eps))) < 1e-5
    assert check_output(_ln_case(lambda x, w, b, eps: ln(x, (48,), w, b, eps), torch.bfloat16)) < 0.2


@pytest.mark.parametrize("wrong", [
    lambda x, w, b, eps: torch.nn.functional.layer_norm(x, (48,), w, None, eps),           # forgets the bias
    lambda x, w, b, eps: torch.nn.functional.layer_norm(x, (48,), w, b, eps) * (1 + 1e-3),  # 0.1 % off
    lambda x, w, b, eps: torch.nn.functional.layer_norm(x, (48,), w, b, eps)[:, :47],      # wrong shape
], ids=["no-bias", "scaled", "shape"])
def test_a_wrong_output_fails_naming_the_case(wrong):
    with pytest.raises(AssertionError, match="layer_norm 64x48 fake differs from the reference"):
        check_output(_ln_case(wrong))
