"""Training: the loss falls, resume is exact, checkpoints survive kill -9, DDP ranks agree."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from guppy import ModelConfig, TrainConfig
from guppy.checkpoint import load_model, read_pointer
from guppy.data import prepare
from guppy.errors import GuppyError
from guppy.model import GuppyLM
from guppy.train import lr_at, param_groups, train

MINI = dict(vocab_size=512, max_seq_len=64, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prepare(str(d), samples=1500, seed=3, eval_fraction=0.1, vocab_size=512, log=lambda *_: None)
    return str(d)


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def quiet(*_):
    pass


def test_loss_decreases(data_dir, tmp_path):
    cfg = TrainConfig(batch_size=16, max_steps=60, lr=3e-3, warmup_steps=5, eval_every=30, eval_batches=4,
                      log_every=10, batch_mode="packed")
    summary = train(data_dir, str(tmp_path / "run"), ModelConfig(**MINI, dropout=0.0), cfg, device="cpu",
                    progress=False, log=quiet)
    losses = [m["train_loss"] for m in metrics(str(tmp_path / "run")) if "train_loss" in m]
    assert losses[-1] < 0.85 * losses[0] and losses == sorted(losses, reverse=True), losses
    evals = [m["eval_loss"] for m in metrics(str(tmp_path / "run")) if "eval_loss" in m]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert summary["best_eval"] == min(evals)
    assert read_pointer(str(tmp_path / "run"), "best")["step"] == 60


def test_metrics_count_data_seen_and_keep_saves_out_of_elapsed(data_dir, tmp_path, monkeypatch):
    """conversations/tokens count what the batches held, carry over a resume, and `elapsed` skips checkpoint writes."""
    import guppy.checkpoint as ckpt_lib
    from guppy.data import Batcher, load_split

    real_save = ckpt_lib.save_checkpoint

    def slow_save(*args, **kwargs):
        time.sleep(0.5)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt_lib, "save_checkpoint", slow_save)
    def cfg():
        return TrainConfig(batch_size=8, max_steps=12, warmup_steps=2, eval_every=4, eval_batches=1, log_every=4,
                           save_every=2, batch_mode="packed")

    def mc():
        return ModelConfig(**{**MINI, "max_seq_len": 128})

    run = str(tmp_path / "run")
    train(data_dir, run, mc(), cfg(), device="cpu", stop_at_step=8, progress=False, log=quiet)
    wall = time.perf_counter()
    summary = train(data_dir, run, mc(), cfg(), device="cpu", resume=True, progress=False, log=quiet)
    wall = time.perf_counter() - wall

    batcher = Batcher(load_split(data_dir, "train"), 8, 128, "packed", seed=cfg().seed)
    expected = {"conversations": 0, "tokens": 0}
    by_step = {}
    for step in range(1, 13):
        b = batcher.next_batch()
        expected["conversations"] += int(((b.positions == 0) & (b.idx != 0)).sum())  # each starts at position 0
        expected["tokens"] += b.n_targets()
        by_step[step] = dict(expected)
    assert by_step[12]["conversations"] > 1.5 * 12 * 8  # packed rows of 128 hold several conversations each
    logged = [m for m in metrics(run) if "train_loss" in m]
    for m in logged:
        assert (m["conversations"], m["tokens"]) == (by_step[m["step"]]["conversations"], by_step[m["step"]]["tokens"])
    assert (summary["conversations"], summary["tokens"]) == (by_step[12]["conversations"], by_step[12]["tokens"])
    # the resumed process saved at least twice (steps 10 and 12), 0.5 s each, and none of it counts in elapsed
    assert summary["save_s"] >= 1.0 and wall - summary["seconds"] >= summary["save_s"]
    assert [m["setup_s"] for m in metrics(run) if "setup_s" in m] and summary["setup_s"] <= summary["seconds"]


def test_on_eval_can_end_the_run_with_a_checkpoint(data_dir, tmp_path):
    seen = []

    def stop_at_second_eval(record):
        seen.append(record)
        return len(seen) == 2

    run = str(tmp_path / "run")
    cfg = TrainConfig(batch_size=8, max_steps=40, warmup_steps=2, eval_every=5, eval_batches=1, log_every=5,
                      save_every=100)
    summary = train(data_dir, run, ModelConfig(**MINI), cfg, device="cpu", progress=False, log=quiet,
                    on_eval=stop_at_second_eval)
    assert [r["step"] for r in seen] == [5, 10] and summary["step"] == 10 and not summary["interrupted"]
    assert read_pointer(run, "latest")["step"] == 10
    assert seen[1]["eval_loss"] == [m for m in metrics(run) if "eval_loss" in m][-1]["eval_loss"]


@pytest.mark.parametrize("mode,optimizer,schedule", [("pad", "adamw", "cosine"), ("packed", "adamw", "cosine"),
                                                     ("packed", "muon", "wsd"), ("packed", "muon", "cosine"),
                                                     ("packed", "adamw", "wsd")])
def test_resume_is_exact(data_dir, tmp_path, mode, optimizer, schedule):
    """Stopping at step 7 and resuming gives the same losses and weights as never stopping (dropout on), with each
    batching mode, optimizer (Muon's momentum buffers are in the checkpoint too) and schedule."""
    def cfg():
        return TrainConfig(batch_size=8, max_steps=16, lr=3e-3, warmup_steps=4, eval_every=5, eval_batches=2,
                           log_every=1, save_every=100, batch_mode=mode, optimizer=optimizer, schedule=schedule,
                           decay_fraction=0.5, muon_weight_decay=0.1)

    def mc():
        return ModelConfig(**MINI, dropout=0.1)

    full, pieces = str(tmp_path / "full"), str(tmp_path / "pieces")
    train(data_dir, full, mc(), cfg(), device="cpu", progress=False, log=quiet)
    train(data_dir, pieces, mc(), cfg(), device="cpu", stop_at_step=7, progress=False, log=quiet)
    assert read_pointer(pieces, "latest")["step"] == 7
    train(data_dir, pieces, mc(), cfg(), device="cpu", resume=True, progress=False, log=quiet)

    def by_step(run):
        return {(m["step"], k): m[k] for m in metrics(run) for k in ("train_loss", "eval_loss") if k in m}

    a, b = by_step(full), by_step(pieces)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), [(k, a[k], b.get(k)) for k in a if a[k] != b.get(k)]
    wa, wb = (load_model(r, prefer="latest")[0].state_dict() for r in (full, pieces))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_training_into_an_existing_run_needs_resume(data_dir, tmp_path):
    cfg = TrainConfig(batch_size=4, max_steps=2, eval_every=100, save_every=100, log_every=1)
    run = str(tmp_path / "run")
    train(data_dir, run, ModelConfig(**MINI), cfg, device="cpu", progress=False, log=quiet)
    with pytest.raises(GuppyError, match="pass --resume"):
        train(data_dir, run, ModelConfig(**MINI), cfg, device="cpu", progress=False, log=quiet)


def test_schedule_and_weight_decay_groups():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == 0 and lr_at(5, cfg) == 0.5 and lr_at(10, cfg) == 1.0
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)
    from guppy import GuppyLM
    m = GuppyLM(ModelConfig(**MINI))
    decay, no_decay = param_groups(m, 0.1, decay_all=False)
    assert {id(p) for p in decay["params"]} == {id(mod.weight) for b in m.blocks
                                                 for mod in (b.attn.qkv, b.attn.out, b.ffn.up, b.ffn.down)}
    assert id(m.tok_emb.weight) in {id(p) for p in no_decay["params"]}
    assert len(param_groups(m, 0.1, decay_all=True)) == 1


SAVER = textwrap.dedent("""
    import sys, torch
    from guppy import GuppyLM, ModelConfig
    from guppy.checkpoint import read_pointer, save_checkpoint
    cfg = ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, ffn_hidden=1024)
    m = GuppyLM(cfg)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward(); opt.step()
    step = (read_pointer(sys.argv[1], "latest") or {"step": 0})["step"] + 1  # carry on after the last kill
    while True:
        with torch.no_grad():
            for p in m.parameters():
                p.fill_(float(step))
        save_checkpoint(sys.argv[1], step, m, cfg, optimizer=opt)
        step += 1
""")


def _saving(run):
    """True while a save is writing its temporary checkpoint folder (it is renamed into place when complete)."""
    root = os.path.join(run, "checkpoints")
    return os.path.isdir(root) and any(n.startswith(".tmp-step-") for n in os.listdir(root))


def test_checkpoint_survives_kill_9(tmp_path):
    """Kill a process that saves checkpoints back to back while a save is under way (at its start, and further into
    it): latest.json always names a complete checkpoint whose weights are those of its step. Each kill waits for a
    save to begin (its temporary folder appearing), not for a fixed time, so a loaded machine only makes it slower."""
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    run = str(tmp_path / "run")
    for round, into_save_s in enumerate((0.0, 0.05, 0.2)):
        proc = subprocess.Popen([sys.executable, str(script), run])
        deadline = time.time() + 300
        saved = (read_pointer(run, "latest") or {"step": 0})["step"]
        # a save that follows a complete one (from this process or the last), so there is a checkpoint to keep
        while time.time() < deadline and proc.poll() is None and not (
                (read_pointer(run, "latest") or {"step": 0})["step"] > saved and _saving(run)):
            time.sleep(0.002)
        time.sleep(into_save_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the saver ended before it was killed"
        pointer = read_pointer(run, "latest")
        assert pointer is not None and pointer["step"] > saved, f"no save completed in round {round}"
        model, ckpt = load_model(run, prefer="latest")
        assert all(torch.all(p == float(pointer["step"])) for p in model.parameters())
        assert load_file(os.path.join(ckpt, "state.safetensors"))  # the optimiser state is complete too


def test_wait_for_collectives_to_release_waits_for_the_other_thread():
    """The tensors of a finished collective are still held for a moment by the process group's worker thread; the
    wait returns once that thread lets go (a view stands in for its reference here), and gives up after its timeout."""
    import threading

    from guppy.train import wait_for_collectives_to_release
    tensor = torch.zeros(4)
    held = [tensor.view(2, 2)]  # a view holds a reference to the tensor, as the worker's work object does
    assert tensor._use_count() > 1
    threading.Timer(0.2, held.clear).start()
    t0 = time.monotonic()
    wait_for_collectives_to_release([tensor])
    assert tensor._use_count() == 1 and 0.15 < time.monotonic() - t0 < 5

    view = tensor.view(2, 2)  # never let go: the wait ends at its timeout, the tensor still held
    t0 = time.monotonic()
    wait_for_collectives_to_release([tensor], timeout_s=0.1)
    assert 0.1 <= time.monotonic() - t0 < 5 and tensor._use_count() > 1
    del view


def test_ddp_two_gloo_ranks_agree(data_dir, tmp_path):
    import socket
    with socket.socket() as s:  # a port nothing else holds (a fixed one can collide with a lingering socket)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "--master_addr=127.0.0.1",
           "-m", "guppy", "train", "--data", data_dir, "--out", run, "--preset", "tiny", "--device", "cpu",
           "--max-steps", "6", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "terminate called" not in r.stderr, r.stderr[-3000:]  # the process group is destroyed before exit
    rec = [m for m in metrics(run) if "ddp_world_size" in m]
    assert rec and rec[0]["ddp_world_size"] == 2 and rec[0]["ddp_max_param_difference"] == 0.0
    # both ranks trained: tokens/s counts the two ranks' tokens, and the run finished all steps
    assert read_pointer(run, "latest")["step"] == 6


# --- the host side of the step: no sync in the steady state, a resume that keeps the device's optimizer -------------
def counted_steps(log):
    """wrap_step for train_loop: each step runs under its own SyncCounter (host reads counted on CPU tensors too: the
    CPU stands in for the device), its count appended to log."""
    from guppy.syncs import SyncCounter

    def wrap(step_fn):
        def counted(batch):
            with SyncCounter(count_cpu=True) as syncs:
                loss = step_fn(batch)
            log.append(syncs.total)
            return loss
        return counted
    return wrap


def loop_syncs(data_dir, out, steps=12, log_every=4):
    """Syncs of a real training loop on the CPU: per step, and over the whole loop (evals and saves off until the
    end: the last step evaluates and saves)."""
    from guppy.syncs import SyncCounter
    from guppy.train import load_train_data, start_run, train_loop

    cfg = TrainConfig(batch_size=4, max_steps=steps, warmup_steps=2, batch_mode="packed", optimizer="muon",
                      log_every=log_every, eval_every=10 ** 6, save_every=10 ** 6, eval_batches=1)
    data = load_train_data(data_dir)
    os.makedirs(out)
    run = start_run(data, out, ModelConfig(**MINI, dropout=0.0), cfg, torch.device("cpu"), log=quiet)
    per_step = []
    with SyncCounter(count_cpu=True) as whole:
        train_loop(run, data, out, torch.device("cpu"), progress=False, log=quiet, wrap_step=counted_steps(per_step))
    return per_step, whole.total


def test_the_steady_state_step_never_reads_back(data_dir, tmp_path):
    """Counted, not assumed: no step reads a value back; the whole loop reads once per log window and once for its
    one eval (a host read on the CPU is where a GPU would make the host wait)."""
    per_step, whole = loop_syncs(data_dir, str(tmp_path / "run"))
    assert per_step == [0] * 12
    assert whole == 12 // 4 + 1


def test_a_planted_item_in_the_step_is_counted(data_dir, tmp_path, monkeypatch):
    import guppy.train as train_lib

    real_step = train_lib.train_step

    def step_that_logs(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        loss.item()  # what the counter exists to catch
        return loss

    monkeypatch.setattr(train_lib, "train_step", step_that_logs)
    per_step, _ = loop_syncs(data_dir, str(tmp_path / "run"), steps=3, log_every=3)
    assert per_step == [1, 1, 1]


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_a_resume_keeps_the_optimizer_this_device_built(tmp_path, optimizer):
    """A checkpoint's optimizer state loaded on another device (here the fake device "meta", standing in for CUDA)
    puts every state tensor on its parameter's device, Muon's AdamW step counts included (torch leaves a loaded
    `step` on the CPU unless the saved group was fused or capturable: a CUDA graph then froze the bias correction),
    and keeps the lr tensors and the fused/capturable flags this run built, not the saved run's."""
    from guppy.train import make_optimizer, restore_optimizer

    cfg = TrainConfig(optimizer=optimizer, fused_adamw=True)
    torch.manual_seed(0)
    saved_model = GuppyLM(ModelConfig(**MINI))
    saved_opt = make_optimizer(saved_model, cfg, torch.device("cpu"))
    saved_model(torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))[1].backward()
    saved_opt.step()
    saved = saved_opt.state_dict()
    for g in saved["param_groups"]:  # as a CUDA run of the other kind would have saved them
        g["fused"], g["capturable"] = optimizer == "muon", optimizer == "muon"

    meta = torch.device("meta")
    with meta:
        model = GuppyLM(ModelConfig(**MINI))
    opt = make_optimizer(model, cfg, meta, cuda_graphs=optimizer == "muon")
    built = [{k: g.get(k) for k in ("lr", "fused", "capturable")} for g in opt.param_groups]
    restore_optimizer(opt, saved)
    for g, b in zip(opt.param_groups, built):
        assert g["lr"] is b["lr"] and (g.get("fused"), g.get("capturable")) == (b["fused"], b["capturable"])
    steps = [s["step"] for s in opt.state.values() if "step" in s]
    assert steps and len(opt.state) == len(list(model.parameters()))
    for p, s in opt.state.items():
        for name, t in s.items():
            if torch.is_tensor(t):
                device = "cpu" if optimizer == "adamw" and name == "step" else "meta"  # plain AdamW: torch's rule
                assert t.device.type == device, (name, t.device)


# --- what a run says when it stops early or will take hours ----------------------------------------------------------
def test_a_run_stopped_before_its_first_eval_says_no_eval_yet_and_how_to_go_on(data_dir, tmp_path):
    lines = []
    cfg = TrainConfig(batch_size=4, max_steps=6, eval_every=100, save_every=100, log_every=1)
    run = str(tmp_path / "run")
    train(data_dir, run, ModelConfig(**MINI), cfg, device="cpu", stop_at_step=2, progress=False, log=lines.append)
    done = [ln for ln in lines if ln.startswith("done:")]
    assert done and done[0].startswith("done: step 2, no eval yet, ") and "inf" not in done[0], lines
    assert lines[-1].endswith(f"train --data {data_dir} --out {run} --resume --device cpu"), lines
    assert lines[-1].startswith("to continue: "), lines


def test_a_long_run_without_cuda_says_how_long_and_names_cpu_demo(data_dir, tmp_path):
    """Timed on its first log window: 100,000 steps at 0.05 s/step is more than an hour, so one line; the same steps
    on a run of 20 steps say nothing, nor does a cpu-demo run however long."""
    from guppy.train import load_train_data, start_run, train_loop

    def slow(step_fn):
        def step(batch):
            time.sleep(0.05)
            return step_fn(batch)
        return step

    def loop(out, max_steps, preset=None):
        lines = []
        cfg = TrainConfig(batch_size=4, max_steps=max_steps, warmup_steps=1, log_every=2, eval_every=4,
                          eval_batches=1, save_every=10 ** 6)
        data = load_train_data(data_dir)
        os.makedirs(out)
        run = start_run(data, out, ModelConfig(**MINI), cfg, torch.device("cpu"), preset=preset, log=quiet)
        train_loop(run, data, out, torch.device("cpu"), progress=False, log=lines.append, wrap_step=slow,
                   on_eval=lambda record: True)  # the first eval (step 4) ends the run
        return [ln for ln in lines if "s/step" in ln]

    notes = loop(str(tmp_path / "long"), 100_000)
    assert len(notes) == 1 and notes[0].startswith("note: at 0.") and " s/step on this cpu, the 99,998 steps to go " \
        "take about " in notes[0] and notes[0].endswith(" h; --preset cpu-demo trains a fish here in minutes "
                                                        "(Ctrl-C saves, --resume continues)"), notes
    assert loop(str(tmp_path / "short"), 20) == []
    assert loop(str(tmp_path / "demo"), 100_000, preset="cpu-demo") == []


def test_a_training_that_starts_during_a_readers_probe_waits_for_it(tmp_path):
    """chat and eval ask whether a run is training (held_by) by taking the lock shared for an instant; a training
    that starts in that instant waits, and is not refused."""
    import fcntl
    import threading

    from guppy.runlock import LOCK_NAME, RunLock, held_by
    run = str(tmp_path / "run")
    os.makedirs(run)
    assert held_by(run) is None  # never trained: no lock file
    fd = os.open(os.path.join(run, LOCK_NAME), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a reader's probe, held longer than any real one
    threading.Timer(0.2, os.close, [fd]).start()
    with RunLock(run):
        assert held_by(run).startswith(f"a training (pid {os.getpid()} on ")
    assert held_by(run) is None
