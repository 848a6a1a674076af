"""Shared test setup for the kernel tests.

Without a CUDA GPU the Triton kernels run on CPU tensors through the interpreter. triton 3.x decides at *decoration*
time (when `guppy.kernels` is first imported) whether a @triton.jit function is compiled or interpreted, so
TRITON_INTERPRET must be set before any test module imports the kernels: conftest.py is imported first, so it is set
here. With a GPU it is left alone and the same tests run on CUDA tensors (plus the `gpu`-marked ones).

This is the one place that decides where the kernels run: DEVICE (and the `device` fixture) is the device a kernel
test puts its tensors on, INTERPRETED says whether the kernels run through the interpreter, and `requires_interpreter`
marks a test that can only run there (Triton kernels on CPU tensors on purpose; its name ends in `_on_cpu`). A kernel
test never builds CPU tensors for a kernel itself: on a GPU the kernels are compiled, and a CPU tensor fails with "got
a CPU tensor". gpu-check's tests stage (bench/gpu_check.py, GPU_TEST_KEYWORD "not cpu") leaves out every test whose
name, parameter id or marker says cpu: the interpreter-only ones, csrc's host-emulator cases, `cpu_only` tests.

GUPPY_TEST_COMPILED=1 runs the tests on a CPU as a GPU machine would, without its GPU: TRITON_INTERPRET is left unset
(the kernels compile), DEVICE is "cuda", HAS_CUDA stays False (the `gpu`-marked tests skip), and a test that reaches
for CUDA is skipped, since on a GPU it would run there. What fails is a test that hands a compiled kernel a CPU tensor,
as it would fail in `python -m bench gpu-check`; tests/test_gpu_check.py runs gpu-check's own selection this way.
"""
import os

# One intra-op thread, for this process and the CLI subprocesses the tests start: the tests' tensors are tiny, and
# on a 2-core CI machine torch's default of one thread per core made a tiny forward+backward ~200x slower whenever
# another process held a core (threads spin at barriers). Set before torch is imported, so children inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
COMPILED_WITHOUT_GPU = os.environ.get("GUPPY_TEST_COMPILED") == "1" and not HAS_CUDA
if COMPILED_WITHOUT_GPU:
    os.environ.pop("TRITON_INTERPRET", None)
elif not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

try:  # after TRITON_INTERPRET is decided: the kernels read it when they are first imported
    from guppy.kernels._utils import interpreting
    INTERPRETED = interpreting()
except ImportError:  # no triton: no Triton kernel runs anywhere, and the tests that need one say so
    INTERPRETED = False
DEVICE = "cuda" if HAS_CUDA or COMPILED_WITHOUT_GPU else "cpu"
requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
requires_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs Triton kernels on CPU tensors, which needs "
                                          "the interpreter (TRITON_INTERPRET=1, the CPU test run)")
# bf16 on a GPU only where it is native (T4 = sm_75 emulates it); in the interpreter it works through numpy
HAS_BF16 = (not HAS_CUDA) or torch.cuda.get_device_capability() >= (8, 0)


def interpreter_numpy_note(triton_version: str, numpy_version: str):
    """One line when Triton's interpreter cannot run under this NumPy, else None. Triton < 3.7 (3.6 is Colab's) turns
    a runtime scalar into an int with int(array), which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be
    converted to Python scalars"); triton-lang/triton#9172 fixed it in 3.7.0. The [test] extras pin numpy<2.4."""
    def version(v):
        return tuple(int(p) for p in v.split("+")[0].split(".")[:2] if p.isdigit())

    if version(triton_version) < (3, 7) and version(numpy_version) >= (2, 4):
        return (f"note: Triton {triton_version}'s interpreter fails with NumPy {numpy_version} (\"only 0-dimensional "
                "arrays can be converted to Python scalars\"); use numpy<2.4 (pip install -e \".[test]\") or "
                "triton>=3.7")
    return None


def _interpreter_note():
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None
    return interpreter_numpy_note(triton.__version__, numpy.__version__)


def pytest_report_header(config):
    return _interpreter_note()


def pytest_terminal_summary(terminalreporter):
    note = _interpreter_note()
    if note:
        terminalreporter.write_line(note, yellow=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds under the Triton interpreter")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "cpu_only: runs on the CPU whatever the machine has (no kernel on `device`); "
                            "gpu-check's test selection (-k \"not cpu\") leaves it out")


@pytest.fixture
def device():
    """Where the kernels run: "cuda" on a GPU, "cpu" (through the interpreter) without one; "cuda" under
    GUPPY_TEST_COMPILED=1, where a test that then reaches for CUDA is skipped."""
    return DEVICE


_NO_CUDA_ERRORS = ("Torch not compiled with CUDA enabled", "Cannot get CUDA generator", "Found no NVIDIA driver")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _skip_what_needs_cuda())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _skip_what_needs_cuda())


def _skip_what_needs_cuda():
    """GUPPY_TEST_COMPILED=1 only: a test that reaches for CUDA is skipped (on a GPU machine it runs there)."""
    try:
        return (yield)
    except (AssertionError, RuntimeError) as e:
        if COMPILED_WITHOUT_GPU and any(m in str(e) for m in _NO_CUDA_ERRORS):
            pytest.skip(f"GUPPY_TEST_COMPILED=1 without a GPU: needs CUDA ({str(e).splitlines()[0][:80]})")
        raise
