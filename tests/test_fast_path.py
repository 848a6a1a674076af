"""The fast path trains like the reference: same data, same batch composition, same losses.

On the CPU the "triton" ops run through the interpreter (LayerNorm with fused residual, FlashAttention with packed
segments, the fused LM head + loss). Dropout is off so that both paths compute the same function (the reference draws
its dropout mask from torch's RNG, the kernels from Philox: equal in distribution, not element by element).
On a GPU, the whole step as a CUDA graph is checked against the eager step.
"""
import json
import os

import pytest
import torch

from conftest import HAS_CUDA, requires_gpu
from guppy.config import ModelConfig, TrainConfig, preset
from guppy.data import prepare
from guppy.train import train

MINI = dict(vocab_size=384, max_seq_len=32, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, dropout=0.0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prepare(str(d), samples=400, seed=5, eval_fraction=0.05, vocab_size=384, log=lambda *_: None)
    return str(d)


def losses(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r["train_loss"] for r in recs if "train_loss" in r], [r["eval_loss"] for r in recs if "eval_loss" in r]


def run(data_dir, out, ops, steps=20, device="cpu", **cfg_over):
    _, fast_cfg = preset("guppy-9m-fast")
    cfg = TrainConfig(**{**fast_cfg.to_dict(), "betas": tuple(fast_cfg.betas), "batch_size": 2, "max_steps": steps,
                         "warmup_steps": 3, "lr": 3e-3, "min_lr": 3e-4, "log_every": 1, "eval_every": steps,
                         "eval_batches": 1, "save_every": 10 ** 6, **cfg_over})
    train(data_dir, out, ModelConfig(**MINI, ops=ops), cfg, device=device, progress=False, log=lambda *_: None)
    return losses(out)


@pytest.mark.skipif(HAS_CUDA, reason="the CPU/interpreter variant; the GPU one is test_cuda_graph_step_matches_eager")
def test_fast_path_matches_reference_on_cpu(data_dir, tmp_path):
    ref_train, ref_eval = run(data_dir, str(tmp_path / "ref"), "reference")
    fast_train, fast_eval = run(data_dir, str(tmp_path / "fast"), "triton")
    assert len(ref_train) == len(fast_train) == 20
    assert ref_train[-1] < ref_train[0]
    # fp32 both ways; the kernels sum in a different order, and AdamW carries the difference forward
    torch.testing.assert_close(torch.tensor(fast_train), torch.tensor(ref_train), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(fast_eval), torch.tensor(ref_eval), rtol=1e-4, atol=1e-5)


@requires_gpu
def test_cuda_graph_step_matches_eager(data_dir, tmp_path):
    eager_train, eager_eval = run(data_dir, str(tmp_path / "eager"), "auto", steps=12, device="cuda",
                                  cuda_graphs=False)
    graph_train, graph_eval = run(data_dir, str(tmp_path / "graph"), "auto", steps=12, device="cuda",
                                  cuda_graphs=True)
    assert len(graph_train) == 12
    # bf16/fp16 autocast: same kernels, same order, but graph replay vs eager may pick different cuBLAS algorithms
    torch.testing.assert_close(torch.tensor(graph_train), torch.tensor(eager_train), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(torch.tensor(graph_eval), torch.tensor(eager_eval), rtol=2e-2, atol=2e-2)
