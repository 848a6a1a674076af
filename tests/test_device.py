"""--device: auto picks cuda, then mps (Apple Silicon), then cpu; MPS trains in fp32 without a GradScaler.
No Mac here: availability is monkeypatched, the same code path a Mac takes."""
import pytest
import torch

import guppy.train as train_mod
from guppy.errors import GuppyError
from guppy.train import autocast_dtype, resolve_device


@pytest.mark.parametrize("cuda, mps, want", [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"),
                                             (False, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(train_mod, "mps_available", lambda: mps)
    assert resolve_device("auto").type == want


def test_mps_when_present_and_a_one_line_error_when_not(monkeypatch):
    monkeypatch.setattr(train_mod, "mps_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")
    monkeypatch.setattr(train_mod, "mps_available", lambda: False)
    with pytest.raises(GuppyError, match="--device mps: .*use --device cpu") as e:
        resolve_device("mps")
    assert "\n" not in str(e.value)


def test_mps_trains_in_fp32_so_no_grad_scaler():
    assert autocast_dtype(torch.device("mps")) is None
    assert autocast_dtype(torch.device("cpu")) is None   # train enables its GradScaler for fp16 autocast only


def test_mps_available_reads_torch_backends(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert train_mod.mps_available() is True
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert train_mod.mps_available() is False
