"""The fast path trains like the reference: same data, same batch composition, same losses.

On the CPU the "triton" ops run through the interpreter (LayerNorm with fused residual, FlashAttention with packed
segments, the fused LM head + loss). Dropout is off so that both paths compute the same function (the reference draws
its dropout mask from torch's RNG, the kernels from Philox: equal in distribution, not element by element).
On a GPU, the whole step as a CUDA graph is checked against the eager step. Its CPU twin runs CudaGraphStep's logic
(warm-up, capture, static buffers, replay, the GradScaler inside the graph) with torch.cuda's graph and stream calls
replaced by a recorded trace of aten ops, which is what a CUDA graph is.
"""
import contextlib
import copy
import json
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import requires_gpu, requires_interpreter
from guppy.config import ModelConfig, TrainConfig, preset
from guppy.data import Batch, prepare
from guppy.graphs import CudaGraphStep
from guppy.model import GuppyLM
from guppy.train import make_optimizer, set_lr, train, train_step

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


@requires_interpreter  # the CPU variant; on a GPU, test_cuda_graph_step_matches_eager runs the fast path
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


# --------------------------------------------------------------------------------------------------------------------
# CPU twin of the CUDA graph step: torch.cuda's graph and streams faked by a recorded trace
# --------------------------------------------------------------------------------------------------------------------
class RecordedGraph:
    """A fake torch.cuda.CUDAGraph. Capture records every aten op (autograd's backward and the optimizer included)
    with its tensors; replay runs them again on the same tensors, writing results into the recorded outputs, as a
    CUDA graph replays its kernels on the same memory. A real capture executes nothing, so the capture here undoes
    what it wrote. A host sync (.item(), bool(tensor)) inside the capture raises, as it does on a GPU."""

    def __init__(self):
        self.ops = []

    @torch.no_grad()
    def replay(self):
        for func, args, kwargs, out in self.ops:
            new = func(*args, **kwargs)
            for o, n in zip(tree_leaves(out), tree_leaves(new)):
                if isinstance(o, torch.Tensor) and o is not n:
                    o.copy_(n)


class _Recorder(TorchDispatchMode):
    def __init__(self, graph):
        super().__init__()
        self.graph, self.before = graph, {}   # id -> (tensor, its value before the capture first wrote it)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            raise RuntimeError("host sync inside a CUDA graph capture")
        values = list(args) + [kwargs.get(a.name) for a in func._schema.arguments[len(args):]]
        for arg, value in zip(func._schema.arguments, values):
            if arg.alias_info is not None and arg.alias_info.is_write:
                for t in tree_leaves(value):
                    if isinstance(t, torch.Tensor) and id(t) not in self.before:
                        self.before[id(t)] = (t, t.clone())
        out = func(*args, **kwargs)
        self.graph.ops.append((func, args, kwargs, out))
        return out


@contextlib.contextmanager
def recorded_capture(graph):
    recorder = _Recorder(graph)
    with recorder:
        yield
    with torch.no_grad():
        for t, value in recorder.before.values():
            t.copy_(value)


class NoStream:
    def wait_stream(self, other):
        pass


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Stream", NoStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: NoStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", RecordedGraph)
    monkeypatch.setattr(torch.cuda, "graph", recorded_capture)


def mini_batches(n, B=4, T=16, vocab=64):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        idx = torch.randint(0, vocab, (B, T + 1), generator=g)
        cut = int(torch.randint(2, T - 2, (1,), generator=g))
        seg = torch.tensor([[0] * cut + [1] * (T - cut)] * B, dtype=torch.int32)
        pos = torch.tensor([list(range(cut)) + list(range(T - cut))] * B)
        out.append(Batch(idx[:, :-1].contiguous(), idx[:, 1:].contiguous(), seg, pos))
    return out


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("scaled", [False, True], ids=["no-scaler", "grad-scaler"])
def test_cuda_graph_step_logic_matches_eager_steps(fake_cuda_graphs, scaled, optimizer):
    """3 warm-up steps, the capture, then replays, each on a new batch with a new learning rate: the same losses and
    weights, bit for bit, as guppy.train.train_step run eagerly. With a GradScaler (fp16, the T4), its unscale, the
    clip, the step and the scale update are captured too: the recorder raises on any host read inside the capture,
    which GradScaler.step makes for an optimizer that cannot skip a step on the device."""
    torch.manual_seed(0)
    eager = GuppyLM(ModelConfig(**{**MINI, "vocab_size": 64, "max_seq_len": 16}))
    graphed = copy.deepcopy(eager)
    # as make_optimizer builds it for graphs: lr a tensor the graph reads; AdamW fused and capturable
    cfg = TrainConfig(optimizer=optimizer, fused_adamw=True)
    opt_e, opt_g = (make_optimizer(m, cfg, torch.device("cpu"), cuda_graphs=True) for m in (eager, graphed))
    if optimizer == "adamw":  # make_optimizer fuses only on CUDA; torch's CPU AdamW fuses as well
        opt_e, opt_g = (torch.optim.AdamW(m.parameters(), lr=torch.tensor(1e-2), fused=True, capturable=True)
                        for m in (eager, graphed))
    scaler_e, scaler_g = (torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, enabled=scaled) for _ in range(2))
    step = CudaGraphStep(graphed, opt_g, scaler_g, grad_clip=1.0, amp_dtype=None, warmup=3)
    for i, b in enumerate(mini_batches(7)):
        for opt in (opt_e, opt_g):
            set_lr(opt, 1e-2 / (1 + i))
        want = train_step(eager, b, opt_e, scaler_e, 1.0, torch.device("cpu"), None)
        got = step(b)
        assert got.item() == want.item(), i
    assert step.graph is not None and len(step.graph.ops) > 100   # forward, backward (and the optimizer) recorded
    for a, b in zip(eager.parameters(), graphed.parameters()):
        assert torch.equal(a, b)


def test_cuda_graph_capture_refuses_a_host_sync(fake_cuda_graphs, monkeypatch):
    model = GuppyLM(ModelConfig(**{**MINI, "vocab_size": 64, "max_seq_len": 16}))
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3), fused=True, capturable=True)
    step = CudaGraphStep(model, opt, torch.amp.GradScaler("cpu", enabled=False), 1.0, None, warmup=0)
    forward = model.forward

    def forward_that_logs_its_loss(*args, **kwargs):
        logits, loss = forward(*args, **kwargs)
        print(loss.item())   # reads the loss on the host: not capturable
        return logits, loss

    monkeypatch.setattr(model, "forward", forward_that_logs_its_loss)
    with pytest.raises(RuntimeError, match="host sync inside a CUDA graph capture"):
        step(mini_batches(1)[0])


def test_cuda_graph_step_needs_a_tensor_learning_rate():
    model = GuppyLM(ModelConfig(**{**MINI, "vocab_size": 64, "max_seq_len": 16}))
    with pytest.raises(ValueError, match="lr is a CUDA tensor"):
        CudaGraphStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3), None, 1.0, None)
