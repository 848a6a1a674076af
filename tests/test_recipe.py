"""The recipe knobs: Muon (+ AdamW on the rest), the schedules, issue 20's levers (weight average, z-loss, residual
init, embedding lr), exact resume with each, and `bench recipe`."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from guppy import ModelConfig, TrainConfig
from guppy.data import prepare
from guppy.model import GuppyLM
from guppy.muon import Muon, orthogonalize
from guppy.train import lr_at, make_optimizer, set_lr, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINI = dict(vocab_size=512, max_seq_len=64, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64)
CPU = torch.device("cpu")


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prepare(str(d), samples=1500, seed=3, eval_fraction=0.1, vocab_size=512, log=quiet)
    return str(d)


# --- schedule -------------------------------------------------------------------------------------------------------
def test_wsd_schedule_warms_up_holds_then_decays_linearly_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, schedule="wsd", decay_fraction=0.2)
    # decay over the last 22 steps: 88 -> 110
    assert [lr_at(s, cfg) for s in (0, 5, 10, 50, 88)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert lr_at(99, cfg) == pytest.approx(1.0 - 0.9 * 11 / 22) and lr_at(110, cfg) == pytest.approx(0.1)


def test_linear_schedule_warms_up_then_falls_in_a_straight_line_to_min_lr_even_zero():
    cfg = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=10, max_steps=110, schedule="linear")
    assert [lr_at(s, cfg) for s in (0, 5, 10, 35, 60, 85, 110, 200)] == pytest.approx(
        [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    cfg.min_lr = 0.1
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)


def test_unknown_schedule_and_optimizer_are_refused():
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(300, TrainConfig(schedule="step"))
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer(GuppyLM(ModelConfig(**MINI)), TrainConfig(optimizer="sgd"), CPU)


# --- Muon -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(48, 16), (16, 16), (16, 40), (3, 24, 8)])
def test_newton_schulz_keeps_the_singular_vectors_and_pulls_singular_values_near_one(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    o = orthogonalize(g.float(), steps=5).double()
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    inner = u.mT @ o @ vh.mT  # diagonal iff o shares g's singular vectors
    diag = torch.diagonal(inner, dim1=-2, dim2=-1)
    assert (inner - torch.diag_embed(diag)).abs().max() < 1e-4
    assert diag.min() > 0.6 and diag.max() < 1.25, diag  # the quintic's band (Keller Jordan's post: ~0.7-1.2)


def _muon_reference(params, grads_per_step, lr, mu, wd, steps=5):
    """Muon written out per matrix in float64: Nesterov momentum, the same quintic iteration, the sqrt(rows/cols)
    scale, decoupled decay."""
    a, b, c = 3.4445, -4.7750, 2.0315
    params = [p.double().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for p, buf, g in zip(params, bufs, grads):
            g = g.double()
            buf.mul_(mu).add_(g, alpha=1 - mu)
            x = (1 - mu) * g + mu * buf
            transposed = x.shape[0] > x.shape[1]
            x = x.T if transposed else x
            x = x / (x.norm() + 1e-7)
            for _ in range(steps):
                A = x @ x.T
                x = a * x + (b * A + c * A @ A) @ x
            x = x.T if transposed else x
            p.mul_(1 - lr * wd).sub_(lr * max(1, p.shape[0] / p.shape[1]) ** 0.5 * x)
    return params


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_muon_step_matches_a_per_matrix_float64_reference(tensor_lr):
    """Shapes repeat (batched together) and are tall, square and wide; a tensor lr (CUDA graphs) gives the same."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(24, 8), (24, 8), (8, 8), (8, 16), (8, 16)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    expected = _muon_reference([p.detach() for p in params], grads, lr=0.05, mu=0.9, wd=0.1)
    lr = torch.tensor(0.05) if tensor_lr else 0.05
    opt = Muon([{"params": params, "muon": True, "lr": lr, "momentum": 0.9, "weight_decay": 0.1}])
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, atol=2e-5, rtol=1e-5)


def test_muon_adamw_groups_step_like_torch_adamw():
    torch.manual_seed(0)
    ours = GuppyLM(ModelConfig(**MINI, dropout=0.0))
    theirs = GuppyLM(ModelConfig(**MINI, dropout=0.0))
    theirs.load_state_dict(ours.state_dict())
    opt_a = Muon([{"params": list(ours.parameters()), "lr": torch.tensor(1e-2), "weight_decay": 0.1}],
                 betas=(0.9, 0.95))
    opt_b = torch.optim.AdamW(theirs.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    idx = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        for model, opt in ((ours, opt_a), (theirs, opt_b)):
            model(idx, idx)[1].backward()
            opt.step()
            opt.zero_grad()
    assert_same_parameters(ours, theirs)


def assert_same_parameters(ours, theirs, atol=1e-6, rtol=1e-5):
    C = MINI["d_model"]
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        if name.endswith("attn.qkv.bias"):  # the key bias's true gradient is 0: its noise is Adam-normalised
            a, b = torch.cat([a[:C], a[2 * C:]]), torch.cat([b[:C], b[2 * C:]])
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = GuppyLM(ModelConfig(**MINI))
    cfg = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02)
    opt = make_optimizer(model, cfg, CPU)
    muon, rest = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)].split(".", 2)[2] for p in muon["params"]) == sorted(
        ["attn.qkv.weight", "attn.out.weight", "ffn.up.weight", "ffn.down.weight"] * MINI["n_layers"])
    assert len(muon["params"]) + len(rest["params"]) == len(list(model.parameters()))
    assert id(model.tok_emb.weight) in {id(p) for p in rest["params"]}
    set_lr(opt, 5e-4)  # the schedule's lr; Muon's group follows at its ratio
    assert rest["lr"] == 5e-4 and muon["lr"] == pytest.approx(0.01)


def test_muon_under_cuda_graphs_gets_one_lr_tensor_per_group():
    """The CPU twin of the graph path: every group reads its own lr tensor, which set_lr fills in place."""
    opt = make_optimizer(GuppyLM(ModelConfig(**MINI)), TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02), CPU,
                         cuda_graphs=True)
    lrs = [g["lr"] for g in opt.param_groups]
    assert all(torch.is_tensor(t) for t in lrs) and lrs[0] is not lrs[1]
    set_lr(opt, 5e-4)
    assert [g["lr"] for g in opt.param_groups] == lrs  # the same tensors, refilled
    assert lrs[0].item() == pytest.approx(0.01) and lrs[1].item() == pytest.approx(5e-4)


def _scaled_step(model, opt, scaler, idx, grad_clip=1.0):
    """The fp16 path's finish (guppy.train.train_step, guppy.graphs): scaled backward, unscale, clip, step, update."""
    scaler.scale(model(idx, idx)[1]).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip, foreach=True)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=False)


def _muon_pair():
    torch.manual_seed(0)
    models = [GuppyLM(ModelConfig(**MINI, dropout=0.0)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    cfg = TrainConfig(optimizer="muon", lr=1e-2, muon_lr=0.02, weight_decay=0.1, decay_all=True)
    return models, [make_optimizer(m, cfg, CPU) for m in models]


def test_muon_under_a_grad_scaler_steps_as_unscaled_and_never_reads_back():
    """GradScaler.step hands Muon found_inf as a tensor (no .item(): 0 host syncs, counted), and a finite step equals
    the unscaled optimizer's (the scale is a power of two: unscaling is exact)."""
    from guppy.syncs import SyncCounter

    (scaled, plain), (opt_s, opt_p) = _muon_pair()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    idx = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        with SyncCounter(count_cpu=True) as syncs:  # the CPU stands in for the device
            _scaled_step(scaled, opt_s, scaler, idx)
        assert syncs.total == 0, syncs.by_op
        _scaled_step(plain, opt_p, torch.amp.GradScaler("cpu", enabled=False), idx)
    assert_same_parameters(scaled, plain)


def test_muon_skips_an_overflowed_step_on_the_device():
    """An inf in one gradient: no parameter and no optimizer state changes (bitwise), the scale halves, and the next
    finite step goes on as if the skipped one had not happened."""
    (model, twin), (opt, opt_twin) = _muon_pair()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    idx = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    _scaled_step(model, opt, scaler, idx)
    _scaled_step(twin, opt_twin, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12), idx)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = [{k: v.clone() for k, v in s.items()} for s in opt.state.values()]
    model.tok_emb.weight.register_hook(lambda g: g.index_fill(0, torch.tensor([3]), float("inf")))
    hook = model.blocks[0].ffn.up.weight.register_hook(lambda g: g * float("nan"))  # a Muon matrix too
    _scaled_step(model, opt, scaler, idx)
    hook.remove()
    assert scaler.get_scale() == 2.0 ** 11
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for s, s0 in zip(opt.state.values(), state_before):
        assert all(torch.equal(s[k], s0[k]) for k in s0)
    model.tok_emb.weight._backward_hooks.clear()
    _scaled_step(model, opt, scaler, idx)  # halved scale: the same unscaled gradients, the same step as the twin's
    _scaled_step(twin, opt_twin, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12), idx)
    assert_same_parameters(model, twin)


@pytest.mark.parametrize("scale", [1.0, 1e-5, 1e-6])
def test_fp16_newton_schulz_does_not_depend_on_the_update_scale(scale):
    """Newton-Schulz normalises its input, so its result should not depend on the update's size. Cast to fp16 before
    normalising, 1e-6-sized entries lost ~2 % to fp16's subnormals (issue 18); normalised in fp32 first, the fp16
    result is as close to a float64 run of the same iteration at every scale."""
    g = torch.randn(3, 48, 96, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * scale
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(5):
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    got = orthogonalize(g.float(), steps=5, dtype=torch.float16).double()
    assert ((got - x).norm() / x.norm()).item() < 2e-3


# --- training with the knobs (exact resume with each: tests/test_train.py::test_resume_is_exact) ---------------------
def test_muon_trains(data_dir, tmp_path):
    cfg = TrainConfig(batch_size=16, max_steps=40, lr=3e-3, warmup_steps=5, eval_every=20, eval_batches=4,
                      log_every=10, batch_mode="packed", optimizer="muon", muon_lr=0.02)
    summary = train(data_dir, str(tmp_path / "run"), ModelConfig(**MINI, dropout=0.0), cfg, device="cpu",
                    progress=False, log=quiet)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        evals = [m["eval_loss"] for m in map(json.loads, f) if "eval_loss" in m]
    assert evals[1] < evals[0] < 6.0 and summary["step"] == 40  # ln(512) = 6.2 at the start


# --- bench recipe ---------------------------------------------------------------------------------------------------
def run_bench(*args, timeout=600):
    r = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    return r


def test_bench_recipe_refuses_a_bad_target_file_in_one_line_before_preparing_data(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"variants": []}')
    for target, says in ((bad, f"--target-from {bad}: no finite target_eval_loss"),
                         (tmp_path / "none.json", "cannot read it")):
        r = run_bench("recipe", "--target-from", str(target), "--work", str(tmp_path / "work"), timeout=120)
        assert r.returncode == 1 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "work").exists()  # refused before any data was prepared


def test_bench_recipe_smoke_writes_schema_plot_and_stops_at_target(tmp_path):
    out = tmp_path / "recipe.json"
    r = run_bench("recipe", "--smoke", "--no-progress", "--out", str(out), "--work", str(tmp_path / "work"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("device", "torch", "date", "smoke", "model_params", "target_eval_loss", "target_from", "variants"):
        assert key in result, key
    assert result["smoke"] is True and [v["name"] for v in result["variants"]] == ["fast", "muon-wsd"]
    with open(tmp_path / "work" / "reference-curve-smoke.json") as f:
        reference = json.load(f)
    assert result["target_eval_loss"] == reference["target_eval_loss"]
    assert reference["target_eval_loss"] == pytest.approx(reference["points"][-1]["eval_loss"], rel=1e-5)
    for v in result["variants"]:
        for key in ("name", "steps_to_target", "conversations_to_target", "seconds_to_target", "final_eval_loss",
                    "keyword_hit_rate"):
            assert key in v, (v["name"], key)
        with open(tmp_path / "work" / v["name"] / "metrics.jsonl") as f:
            evals = [m for m in map(json.loads, f) if "eval_loss" in m]
        assert [p["eval_loss"] for p in v["curve"]] == [m["eval_loss"] for m in evals]
        reached = [m for m in evals if m["eval_loss"] <= result["target_eval_loss"]]
        if reached:  # the first eval at or below the target, and the run ended there
            assert (v["steps_to_target"], v["conversations_to_target"]) == (reached[0]["step"],
                                                                            reached[0]["conversations"])
            assert v["final_step"] == v["steps_to_target"] == evals[-1]["step"]
        else:
            assert v["steps_to_target"] is None and v["final_step"] == v["max_steps"]
    assert (tmp_path / "recipe.png").stat().st_size > 1000
    # --keep continues a sweep: what --out holds is not trained again
    r = run_bench("recipe", "--smoke", "--no-progress", "--out", str(out), "--keep", "--variants", "fast")
    assert r.returncode == 0 and "fast: kept from" in r.stdout and "training" not in r.stdout.split("kept from")[1]


def test_bench_recipe_refuses_a_target_measured_on_other_data(data_dir, tmp_path):
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"target_eval_loss": 1.0, "data": {"sha256_eval.jsonl": "0123456789abcdef"}}))
    r = run_bench("recipe", "--target-from", str(ref), "--data", data_dir, "--variants", "fast", "--device", "cpu")
    assert r.returncode != 0 and "eval.jsonl differs" in r.stderr and "Traceback" not in r.stderr
    ref.write_text("{}")
    r = run_bench("recipe", "--target-from", str(ref), "--data", data_dir)
    assert r.returncode != 0 and "no finite target_eval_loss" in r.stderr and "Traceback" not in r.stderr
    r = run_bench("recipe", "--target-from", str(ref), "--variants", "fast,nope")
    assert r.returncode != 0 and "unknown variant 'nope'" in r.stderr


def test_committed_reference_curves_are_targets_for_default_data(tmp_path):
    """The committed reference curves (bench/results/reference-curve-*.json) are the targets a GPU session reads
    with --target-from, on data it prepares with `guppy prepare`'s defaults: that data must be theirs, byte for byte,
    and the file the docs name must be one of them."""
    import glob
    import re

    from bench.reference_curve import data_fingerprint, read_target
    curves = sorted(glob.glob(os.path.join(ROOT, "bench", "results", "reference-curve-*.json")))
    assert curves
    r = subprocess.run([sys.executable, "-m", "guppy", "prepare", "--out", str(tmp_path / "d")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ours = data_fingerprint(str(tmp_path / "d"))
    for path in curves:
        ref = read_target(path)
        assert 0 < ref["target_eval_loss"] < 10 and ref["eval_loss_stderr"] < 0.01, path
        for key in ("sha256_train.jsonl", "sha256_eval.jsonl", "sha256_tokenizer.json", "n_train", "n_eval"):
            assert ref["data"][key] == ours[key], (path, key)
    names = {os.path.basename(p) for p in curves}
    for doc in ("bench/gpu_check.py", "notes/recipe.md"):
        with open(os.path.join(ROOT, doc)) as f:
            cited = set(re.findall(r"reference-curve-[\w.-]+?\.json", f.read()))
        assert cited and cited <= names, (doc, cited - names)


# --- issue 20's levers: each against an independent reference, and off at its default -----------------------------
def test_the_levers_defaults_are_off_and_bad_values_are_refused():
    from guppy.errors import ConfigError
    cfg = TrainConfig()
    assert (cfg.ema_decay, cfg.ema_start, cfg.embed_lr_ratio, cfg.resid_init_scale, cfg.z_loss) == (0, 0, 1, 1, 0)
    for bad in (dict(ema_decay=1.0), dict(ema_start=-0.1), dict(embed_lr_ratio=0.0), dict(resid_init_scale=-1.0),
                dict(z_loss=-1e-4), dict(z_loss=float("nan"))):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_a_resume_refuses_to_change_a_lever():
    from guppy.errors import GuppyError
    from guppy.train import resumed_recipe
    run = TrainConfig(ema_decay=0.99, schedule="linear")
    for change in (dict(ema_decay=0.9), dict(ema_start=0.5), dict(z_loss=1e-4), dict(embed_lr_ratio=2.0),
                   dict(resid_init_scale=0.5), dict(schedule="cosine")):
        with pytest.raises(GuppyError, match=next(iter(change))):
            resumed_recipe(run, dataclasses.replace(run, **change))


def test_residual_init_scale_multiplies_the_same_draws_of_attn_out_and_ffn_down_only():
    big = dict(MINI, d_model=128, ffn_hidden=256, n_heads=4)
    torch.manual_seed(0)
    plain = GuppyLM(ModelConfig(**big))
    torch.manual_seed(0)
    scaled = GuppyLM(ModelConfig(**big))
    from guppy.train import scale_residual_init
    scale_residual_init(scaled, 0.5)
    residual = {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.out.weight", "ffn.down.weight")}
    for (name, a), b in zip(plain.state_dict().items(), scaled.state_dict().values()):
        if name in residual:
            assert torch.equal(b, a * 0.5), name
            assert b.std().item() == pytest.approx(0.01, rel=0.05), name  # 0.02 x 0.5
        else:
            assert torch.equal(a, b), name


def test_a_fresh_run_starts_from_guppylms_init_bit_for_bit_by_default_and_scaled_when_asked(data_dir, tmp_path):
    from guppy.train import load_train_data, start_run
    data = load_train_data(data_dir)
    torch.manual_seed(1337)
    reference = GuppyLM(ModelConfig(**MINI)).state_dict()
    for scale in (1.0, 0.25):
        run = start_run(data, str(tmp_path / "r"), ModelConfig(**MINI), TrainConfig(resid_init_scale=scale), CPU,
                        log=quiet)
        for name, v in run.model.state_dict().items():
            factor = scale if name.endswith(("attn.out.weight", "ffn.down.weight")) else 1.0
            assert torch.equal(v, reference[name] * factor if factor != 1.0 else reference[name]), (scale, name)


def test_z_loss_reports_cross_entropy_and_adds_z_squared_to_the_gradient_only():
    """Against F.cross_entropy + z * mean(logsumexp^2) over target tokens (pads ignored), on a float64 model."""
    import torch.nn.functional as F

    from guppy.train import WithZLoss
    torch.manual_seed(0)
    model = GuppyLM(ModelConfig(**MINI, dropout=0.0)).double()
    idx = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(1))
    targets = idx.roll(-1, 1)
    targets[0, 10:] = -100
    _, loss = WithZLoss(model, 1e-2)(idx, targets)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits, plain = model(idx, targets)
    assert loss.item() == plain.item()  # the value is the cross-entropy alone
    counted = targets != -100
    ref = F.cross_entropy(logits.view(-1, 512), targets.view(-1)) + 1e-2 * (
        logits.logsumexp(-1)[counted] ** 2).mean()
    ref.backward()
    for g, p in zip(got, model.parameters()):  # the loss ops compute in fp32
        torch.testing.assert_close(g, p.grad, atol=1e-8, rtol=1e-5)
    model.zero_grad()
    model(idx, targets)[1].backward()
    assert max((g - p.grad).abs().max().item() for g, p in zip(got, model.parameters())) > 1e-4  # z counted


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_embed_lr_ratio_gives_the_embeddings_their_own_adamw_group(optimizer, cuda_graphs):
    model = GuppyLM(ModelConfig(**MINI))
    names = {id(p): n for n, p in model.named_parameters()}
    base = make_optimizer(model, TrainConfig(optimizer=optimizer, lr=1e-3), CPU, cuda_graphs=cuda_graphs)
    opt = make_optimizer(model, TrainConfig(optimizer=optimizer, lr=1e-3, embed_lr_ratio=3.0), CPU,
                         cuda_graphs=cuda_graphs)
    assert len(opt.param_groups) == len(base.param_groups) + 1
    emb = [g for g in opt.param_groups if g.get("lr_ratio") == 3.0]
    assert len(emb) == 1 and sorted(names[id(p)] for p in emb[0]["params"]) == ["pos_emb.weight", "tok_emb.weight"]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    set_lr(opt, 5e-4)
    lrs = [float(g["lr"]) for g in opt.param_groups]
    assert float(emb[0]["lr"]) == pytest.approx(1.5e-3)
    assert all(lr == pytest.approx(5e-4) for g, lr in zip(opt.param_groups, lrs) if "lr_ratio" not in g)
    if cuda_graphs:  # one lr tensor per group: set_lr's in-place fill must not reach another group
        assert len({id(g["lr"]) for g in opt.param_groups}) == len(opt.param_groups) - (optimizer == "adamw")


def test_weight_average_matches_a_plain_python_loop():
    """From step round(ema_start * max_steps): avg = w, then avg = d * avg + (1 - d) * w, entry by entry."""
    from guppy.train import WeightAverage
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = WeightAverage(model, TrainConfig(ema_decay=0.9, ema_start=0.3, max_steps=10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshots = []
    for step in range(1, 11):
        model(torch.randn(4, 3)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        ema.update(step)
        snapshots.append([v for p in model.parameters() for v in p.detach().flatten().tolist()])
    expected = None
    for step, w in enumerate(snapshots, 1):
        if step >= 3:
            expected = list(w) if expected is None else [0.9 * a + 0.1 * b for a, b in zip(expected, w)]
    got = [v for a in ema.avg for v in a.flatten().tolist()]
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    raw = [p.detach().clone() for p in model.parameters()]
    with ema.applied() as saved:
        assert all(torch.equal(p, a) for p, a in zip(model.parameters(), ema.avg))
        assert all(torch.equal(saved[f"raw.{n}"], r) for (n, _), r in zip(model.named_parameters(), raw))
    assert all(torch.equal(p, r) for p, r in zip(model.parameters(), raw))


def lever_cfg(**kw):
    return TrainConfig(**{**dict(batch_size=8, max_steps=16, lr=3e-3, min_lr=0.0, warmup_steps=4, eval_every=5,
                                 eval_batches=2, log_every=1, save_every=100, batch_mode="packed", optimizer="muon",
                                 schedule="linear", ema_decay=0.8, ema_start=0.25, embed_lr_ratio=2.0,
                                 resid_init_scale=0.5, z_loss=1e-3), **kw})


def test_evals_and_checkpoints_hold_the_weight_average_and_the_raw_weights_beside_it(data_dir, tmp_path):
    from guppy.checkpoint import load_model, read_pointer
    from guppy.data import eval_batches, load_split
    from guppy.train import evaluate
    from safetensors.torch import load_file
    run = str(tmp_path / "run")
    train(data_dir, run, ModelConfig(**MINI, dropout=0.0), lever_cfg(z_loss=0.0), device="cpu", progress=False,
          log=quiet)
    model, ckpt = load_model(run, prefer="latest")  # what chat, eval and export read
    batches = eval_batches(load_split(data_dir, "eval"), 8, MINI["max_seq_len"], 2)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        last = [m for m in map(json.loads, f) if "eval_loss" in m][-1]
    assert last["step"] == 16 and evaluate(model, batches, CPU) == last["eval_loss"]
    raw = {k[4:]: v for k, v in load_file(os.path.join(ckpt, "state.safetensors")).items() if k.startswith("raw.")}
    assert raw.keys() == {n for n, _ in model.named_parameters()}
    assert any(not torch.equal(raw[n], p) for n, p in model.named_parameters())  # the average is not the raw
    assert read_pointer(run, "best")["step"] in (5, 10, 15, 16)


def test_resume_is_exact_with_every_lever_on(data_dir, tmp_path):
    """As tests/test_train.py::test_resume_is_exact (dropout on), the raw weights and the average both carried."""
    from guppy.checkpoint import load_model, read_pointer

    def metrics(run):
        with open(os.path.join(run, "metrics.jsonl")) as f:
            return {(m["step"], k): m[k] for m in map(json.loads, f) for k in ("train_loss", "eval_loss") if k in m}

    full, pieces = str(tmp_path / "full"), str(tmp_path / "pieces")
    train(data_dir, full, ModelConfig(**MINI, dropout=0.1), lever_cfg(), device="cpu", progress=False, log=quiet)
    train(data_dir, pieces, ModelConfig(**MINI, dropout=0.1), lever_cfg(), device="cpu", stop_at_step=7,
          progress=False, log=quiet)
    assert read_pointer(pieces, "latest")["step"] == 7  # past ema_start (step 4): the average is in the checkpoint
    train(data_dir, pieces, None, None, device="cpu", resume=True, progress=False, log=quiet)
    assert metrics(full) == metrics(pieces)
    wa, wb = (load_model(r, prefer="latest")[0].state_dict() for r in (full, pieces))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_every_variant_builds_at_both_sizes_and_gpt2_init_follows_the_depth():
    from bench.recipe import VARIANTS, variant_configs
    for name in VARIANTS:
        for size in ("proxy", "full"):
            variant_configs(name, size)
    assert variant_configs("muon-650-gpt2init", "proxy")[1].resid_init_scale == pytest.approx(0.5)
    assert variant_configs("muon-650-gpt2init", "full")[1].resid_init_scale == pytest.approx(12 ** -0.5)
    model_cfg, cfg = variant_configs("muon-rows64-325", "full")
    assert (cfg.batch_size, cfg.max_steps, cfg.optimizer, model_cfg.dropout) == (64, 325, "muon", 0.0)


def test_the_fast_preset_is_the_measured_winner_and_old_variants_keep_their_recipe():
    """guppy-9m-fast ships the recipe bench/results/recipe-full-levers.json measured (ISSUE_20_WINNER): every
    TrainConfig field equal but the bench's own eval and save cadence. And a variant named before the preset changed
    still runs the recipe it ran then (Muon lr 0.02, momentum 0.95, cosine over 1,500 steps), whatever the preset
    says now: its result in bench/results keeps its meaning."""
    from bench.recipe import ISSUE_20_WINNER, variant_configs
    from guppy.config import preset

    model_cfg, cfg = preset("guppy-9m-fast")
    won_model, won = variant_configs(ISSUE_20_WINNER, "full")
    bench_only = {"eval_every", "eval_batches", "save_every"}
    assert {k: v for k, v in cfg.to_dict().items() if k not in bench_only} == \
        {k: v for k, v in won.to_dict().items() if k not in bench_only}
    assert model_cfg == won_model
    with open(os.path.join(ROOT, "bench", "results", "recipe-full-levers.json")) as f:
        measured = {v["name"]: v for v in json.load(f)["variants"]}[ISSUE_20_WINNER]
    assert (measured["max_steps"], measured["muon_lr"], measured["schedule"]) == (cfg.max_steps, cfg.muon_lr,
                                                                               cfg.schedule)
    assert measured["steps_to_target"] is not None and measured["steps_to_target"] <= 1000
    assert measured["keyword_hit_rate"] >= 0.951

    old = variant_configs("muon-650", "full")[1]
    assert (old.muon_lr, old.muon_momentum, old.schedule, old.decay_fraction, old.min_lr, old.max_steps) == \
        (0.02, 0.95, "cosine", 0.2, 2.4e-4, 650)
    assert variant_configs("fast", "full")[1].max_steps == 1500


# --- batch-size ramp and conversation order (issue 20's last two levers) --------------------------------------------
def test_batch_rows_double_in_stages_over_the_ramp():
    from guppy.train import batch_rows_at
    cfg = TrainConfig(batch_size=32, batch_ramp_steps=100)
    assert [batch_rows_at(s, cfg) for s in (0, 49, 50, 99, 100, 5000)] == [8, 8, 16, 16, 32, 32]
    cfg = TrainConfig(batch_size=6, batch_ramp_steps=5)  # odd sizes: floor, halves at 5 // 2 = 2
    assert [batch_rows_at(s, cfg) for s in range(7)] == [1, 1, 3, 3, 3, 6, 6]
    assert all(batch_rows_at(s, TrainConfig(batch_size=32)) == 32 for s in (0, 1, 10 ** 6))  # off


def test_a_ramped_run_draws_the_ramps_rows_and_counts_what_it_drew(data_dir, tmp_path):
    from guppy.data import Batcher
    drawn = []
    real_next = Batcher.next_batch

    def recording(self):
        b = real_next(self)
        if self.mode == "packed":  # the run's batches; the evals' are pad batches of their own Batcher
            drawn.append((b.idx.shape[0], b.n_conversations))
        return b

    cfg = lever_cfg(batch_ramp_steps=8, ema_decay=0.0, z_loss=0.0, max_steps=12)
    run = str(tmp_path / "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Batcher, "next_batch", recording)
        train(data_dir, run, ModelConfig(**MINI, dropout=0.0), cfg, device="cpu", progress=False, log=quiet)
    assert [rows for rows, _ in drawn] == [2] * 4 + [4] * 4 + [8] * 4
    with open(os.path.join(run, "metrics.jsonl")) as f:
        last = [m for m in map(json.loads, f) if "conversations" in m][-1]
    assert last["step"] == 12 and last["conversations"] == sum(n for _, n in drawn)


def test_curriculum_puts_the_same_conversations_first_shortest_first(data_dir):
    import numpy as np

    from guppy.data import Batcher, load_split
    split = load_split(data_dir, "train")
    n = len(split)
    plain = Batcher(split, 8, 64, "packed", seed=5)
    for c in (0.1, 0.37):
        ordered = Batcher(split, 8, 64, "packed", seed=5, curriculum=c)
        head = round(c * n)
        a, b = ordered._permutation(0), plain._permutation(0)
        lengths = np.minimum(np.diff(split.offsets), 64)
        assert set(a[:head]) == set(b[:head]) and a[head:] == b[head:]
        assert (np.diff(lengths[a[:head]]) >= 0).all() and not (np.diff(lengths[b[:head]]) >= 0).all()
        assert ordered._permutation(1) == plain._permutation(1)  # later epochs as drawn
        ranks = [Batcher(split, 8, 64, "packed", seed=5, curriculum=c, rank=r, world_size=2)._permutation(0)
                 for r in (0, 1)]
        assert ranks[0] == a[0::2] and ranks[1] == a[1::2]  # the ranks split one order: disjoint, all of it
    assert Batcher(split, 8, 64, "packed", seed=5, curriculum=0.0)._permutation(0) == plain._permutation(0)


def test_resume_is_exact_mid_ramp_with_a_curriculum(data_dir, tmp_path):
    def metrics(run):
        with open(os.path.join(run, "metrics.jsonl")) as f:
            return {(m["step"], k): m[k] for m in map(json.loads, f)
                    for k in ("train_loss", "eval_loss", "conversations") if k in m}

    cfg = dict(batch_ramp_steps=10, curriculum=0.3)
    full, pieces = str(tmp_path / "full"), str(tmp_path / "pieces")
    train(data_dir, full, ModelConfig(**MINI, dropout=0.1), lever_cfg(**cfg), device="cpu", progress=False, log=quiet)
    train(data_dir, pieces, ModelConfig(**MINI, dropout=0.1), lever_cfg(**cfg), device="cpu", stop_at_step=7,
          progress=False, log=quiet)  # in the ramp's second stage, inside the curriculum
    train(data_dir, pieces, None, None, device="cpu", resume=True, progress=False, log=quiet)
    assert metrics(full) == metrics(pieces)


@pytest.mark.parametrize("bad", [dict(batch_ramp_steps=-1), dict(batch_ramp_steps=1.5),
                                 dict(batch_ramp_steps=10, batch_size=3), dict(curriculum=-0.1),
                                 dict(curriculum=1.0), dict(curriculum=float("nan"))])
def test_ramp_and_curriculum_values_are_checked(bad):
    from guppy.config import ConfigError
    with pytest.raises(ConfigError, match=next(iter(bad))):
        TrainConfig(**bad)


def test_a_ramped_run_does_not_capture_a_cuda_graph():
    from guppy.train import uses_cuda_graphs
    cuda = torch.device("cuda")  # only its type is read
    fast = TrainConfig(cuda_graphs=True, batch_mode="packed")
    assert uses_cuda_graphs(fast, cuda) and not uses_cuda_graphs(dataclasses.replace(fast, batch_ramp_steps=100), cuda)
