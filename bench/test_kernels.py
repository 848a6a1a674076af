"""The kernel suites under pytest-benchmark (GPU only): `pytest bench/test_kernels.py [--quick-shapes]`.

Each case's output is first compared with the reference on the same inputs (`bench.kernels.check_output`, once),
then timed by triton.testing.do_bench inside `bench.kernels.measure` (CUDA events; the benchmark fixture's own
wall-clock rounds would time the Python launch, not the kernel); the medians, GB/s or TFLOPS, peak memory and the
error against the reference land in the benchmark's extra_info, so `--benchmark-json` keeps them with the device and
versions. A wrong output fails the case, whoever's implementation it is; a backend that cannot run a case (cuDNN on
sm_75) fails it only when it is ours. The check itself is tested on the CPU in tests/test_bench_kernels.py.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the kernel benchmarks need a CUDA GPU", allow_module_level=True)

from bench.common import environment  # noqa: E402
from bench.kernels import SUITES, copy_bandwidth_gbs, measure  # noqa: E402

DTYPE = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
CASES = [c for suite in SUITES.values() for c in suite(DTYPE, quick=True)]


@pytest.fixture(scope="session")
def copy_gbs():
    return copy_bandwidth_gbs()


@pytest.mark.parametrize("case", CASES, ids=[f"{c.suite}-{c.shape}-{c.impl}".replace(" ", "_") for c in CASES])
def test_kernel(benchmark, case, copy_gbs):
    row = benchmark.pedantic(measure, args=(case, copy_gbs), rounds=1, iterations=1)
    benchmark.extra_info.update(row)
    benchmark.extra_info.update(environment("cuda"))
    if "error" in row and (case.impl.startswith("ours") or row["error"].startswith("AssertionError")):
        pytest.fail(row["error"])
    assert "max_abs_err" in row            # the output was compared with the reference before it was timed
