"""Shared test setup for the kernel tests.

Without a CUDA GPU the Triton kernels run on CPU tensors through the interpreter. triton 3.x decides at *decoration*
time (when `guppy.kernels` is first imported) whether a @triton.jit function is compiled or interpreted, so
TRITON_INTERPRET must be set before any test module imports the kernels: conftest.py is imported first, so it is set
here. With a GPU it is left alone and the same tests run on CUDA tensors (plus the `gpu`-marked ones).
"""
import os

# One intra-op thread, for this process and the CLI subprocesses the tests start: the tests' tensors are tiny, and
# on a 2-core CI machine torch's default of one thread per core made a tiny forward+backward ~200x slower whenever
# another process held a core (threads spin at barriers). Set before torch is imported, so children inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if HAS_CUDA else "cpu"
requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
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


@pytest.fixture
def device():
    return DEVICE
