"""The adversarial corpus (issue 14): hostile inputs and faults against the real `guppy` command, in a subprocess.

Every case asserts what a user sees and what they keep: the exit code, no traceback, at most one line on stderr
(`guppy <command>: error: <path or option>: <cause>`), and the sha256 of every file that existed before the command
unchanged. The runs that issue 14 saw lost or corrupted (cases 1-6) also get a test showing the run intact afterwards:
its tokenizer, its checkpoints, and a resume that carries on from them.

How the faults are made, unprivileged where possible:
- permission denied: chmod. Root ignores file modes, so as root the command runs under `setpriv` without
  CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, and the modes apply to it as to anyone else.
- a read-only filesystem and a full disk: a small tmpfs mounted for the test. That needs root (CAP_SYS_ADMIN);
  elsewhere those tests skip, and test_a_full_disk_during_a_save_keeps_the_previous_checkpoint (in-process, ENOSPC
  injected) still covers the save path.
One tiny dataset and one tiny run, stopped halfway, are shared by the module (CPU time); a case that changes them
works on a copy.
"""
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from guppy import GuppyLM, ModelConfig
from guppy.checkpoint import load_model, read_pointer
from guppy.config import preset
from guppy.data import prepare
from guppy.train import train

TINY_STEPS, STOPPED_AT = 8, 4   # the shared run: preset tiny, 8 steps planned, stopped at step 4


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------
def guppy(*args, prefix=(), stdin=None, timeout=600):
    """The real CLI, as a user runs it. stdout/stderr as text (bytes that are not UTF-8 shown replaced)."""
    r = subprocess.run([*prefix, sys.executable, "-m", "guppy", *args], input=stdin, capture_output=True,
                       timeout=timeout)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(errors="replace"),
                                       r.stderr.decode(errors="replace"))


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def checksums(*roots) -> dict:
    """sha256 of every file under the roots (but RUN/.lock, which each training rewrites with its pid)."""
    out = {}
    for root in roots:
        for d, _, names in os.walk(root):
            for n in (n for n in names if n != ".lock"):
                path = os.path.join(d, n)
                if os.path.isfile(path) and not os.path.islink(path):
                    out[path] = sha256(path)
    return out


def assert_unchanged(before: dict, ignore=()):
    after = checksums(*{os.path.dirname(p) for p in before})
    changed = [p for p, h in before.items() if after.get(p) != h and os.path.basename(p) not in ignore]
    assert not changed, f"changed or removed: {changed}"


def assert_one_line(r, code=2, *fragments, prefix="guppy "):
    """Exit code `code`, no traceback, at most one line on stderr; with an error, that line names what is wrong."""
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) <= 1, r.stderr
    if code != 0:
        assert lines and lines[0].startswith(prefix), r.stderr
        for f in fragments:
            assert f in lines[0], (f, lines[0])
    return lines[0] if lines else ""


def refused(args, roots, *fragments, code=2, prefix=(), stdin=None, ignore=()):
    """Run a command that must fail: one line naming the problem, and every file under roots as it was."""
    before = checksums(*roots)
    r = guppy(*args, prefix=prefix, stdin=stdin)
    line = assert_one_line(r, code, *fragments)
    assert_unchanged(before, ignore)
    return line


def as_user() -> list:
    """A command prefix under which file modes apply (see the module docstring)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: file modes cannot be made to apply to a command")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def chmod_tree(root, dir_mode, file_mode):
    for d, _, names in os.walk(root):
        for n in names:
            os.chmod(os.path.join(d, n), file_mode)
        os.chmod(d, dir_mode)


def copy_run(run, dest):
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".lock"))
    return str(dest)


def checkpoint_dirs(run):
    root = os.path.join(run, "checkpoints")
    return sorted(os.path.join(root, n) for n in os.listdir(root) if n.startswith("step-"))


def edit_json(path, fn):
    with open(path) as f:
        obj = json.load(f)
    obj = fn(obj)
    with open(path, "w") as f:
        json.dump(obj, f)


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data") / "d")
    prepare(d, samples=600, seed=3, eval_fraction=0.1, vocab_size=300, log=quiet)
    return d


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """preset tiny, TINY_STEPS planned, stopped at STOPPED_AT (checkpoints at 2 and 4; best and latest name 4)."""
    out = str(tmp_path_factory.mktemp("run") / "r")
    model_cfg, cfg = preset("tiny")
    cfg.max_steps, cfg.eval_every, cfg.save_every, cfg.log_every = TINY_STEPS, 2, 2, 1
    train(data, out, model_cfg, cfg, device="cpu", stop_at_step=STOPPED_AT, progress=False, log=quiet, preset="tiny")
    return out


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a folder on a tmpfs of its own (to fill up or remount read-only); root only."""
    mounted = []

    def mount(size="16m"):
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not root'})")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def read_only(d):
    subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)


def fill(d, leave_bytes):
    """Fill the filesystem of d up to `leave_bytes` of free space."""
    st = os.statvfs(d)
    with open(os.path.join(d, "filler"), "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave_bytes))


# --------------------------------------------------------------------------------------------------------------------
# 1. A damaged latest.json: the run is kept, reported, and --resume recovers
# --------------------------------------------------------------------------------------------------------------------
DAMAGES = {
    "truncated": lambda p: open(p, "r+b").truncate(20),
    "empty object": lambda p: open(p, "w").write("{}"),
    "names a missing checkpoint":
        lambda p: open(p, "w").write('{"checkpoint": "checkpoints/step-0000099", "step": 99}'),
    "deleted": os.remove,
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_latest_json_keeps_the_run_and_resume_recovers(run, data, tmp_path, damage):
    r = copy_run(run, tmp_path / "r")
    tokenizer = sha256(os.path.join(r, "tokenizer.json"))
    DAMAGES[damage](os.path.join(r, "latest.json"))
    # a fresh train into it is refused: a folder holding checkpoints is a run, whatever its pointers say
    refused(["train", "--data", data, "--out", r, "--preset", "tiny", "--max-steps", "12", "--seed", "99",
             "--quiet"], [r], "already holds a training run", "checkpoints/step-0000004")
    assert os.path.isdir(os.path.join(r, "checkpoints", "step-0000004"))
    # --resume says what is damaged and continues from the newest complete checkpoint
    res = guppy("train", "--data", data, "--out", r, "--resume", "--quiet", "--device", "cpu")
    assert_one_line(res, 0)
    assert "latest.json" in res.stdout and "resuming from checkpoints/step-0000004" in res.stdout, res.stdout
    assert f"steps {STOPPED_AT} -> {TINY_STEPS}" in res.stdout
    assert read_pointer(r, "latest")["step"] == TINY_STEPS
    assert sha256(os.path.join(r, "tokenizer.json")) == tokenizer


def test_no_complete_checkpoint_to_recover_is_one_line(run, data, tmp_path):
    r = copy_run(run, tmp_path / "r")
    open(os.path.join(r, "latest.json"), "w").write("{}")
    for ckpt in checkpoint_dirs(r):
        os.remove(os.path.join(ckpt, "state.json"))
    refused(["train", "--data", data, "--out", r, "--resume", "--quiet"], [r],
            "latest.json: damaged", "no complete checkpoint")


def test_a_damaged_pointer_stops_the_clean_up_and_chat_uses_the_other(tmp_path):
    """Nothing is deleted while a pointer cannot be read (what it named cannot be told); chat falls back to the
    other pointer with a note."""
    from guppy.checkpoint import save_checkpoint
    cfg = ModelConfig(vocab_size=300, max_seq_len=16, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32)
    model, run = GuppyLM(cfg), str(tmp_path / "r")
    save_checkpoint(run, 1, model, cfg, pointers=("best", "latest"))
    save_checkpoint(run, 2, model, cfg)
    open(os.path.join(run, "best.json"), "w").write('{"checkpoint": "check')
    save_checkpoint(run, 3, model, cfg)
    assert [os.path.basename(c) for c in checkpoint_dirs(run)] == ["step-0000001", "step-0000002", "step-0000003"]
    _, ckpt = load_model(run)
    assert ckpt.endswith("step-0000003")


# --------------------------------------------------------------------------------------------------------------------
# 2. Another dataset or tokenizer: refused by --resume, chat and eval; the run keeps its own tokenizer
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("other") / "d400")
    prepare(d, samples=600, seed=4, eval_fraction=0.1, vocab_size=400, log=quiet)
    return d


def test_another_dataset_is_refused_and_the_run_keeps_its_tokenizer(run, data, other_data, tmp_path):
    r = copy_run(run, tmp_path / "r")
    refused(["train", "--data", other_data, "--out", r, "--resume", "--max-steps", "20", "--quiet"],
            [r, other_data], f"--data {other_data}: another tokenizer than the run's")
    other_tok = os.path.join(other_data, "tokenizer.json")
    refused(["chat", "--checkpoint", r, "--tokenizer", other_tok, "--prompt", "hi"], [r, other_data],
            f"{other_tok}: not the tokenizer")
    refused(["eval", "--checkpoint", r, "--data", other_data], [r, other_data], f"{other_tok}: not the tokenizer")
    # the run is intact: its own tokenizer, its checkpoint, and a resume on its own data carries on
    assert sha256(os.path.join(r, "tokenizer.json")) == sha256(os.path.join(data, "tokenizer.json"))
    res = guppy("train", "--data", data, "--out", r, "--resume", "--quiet", "--device", "cpu")
    assert_one_line(res, 0)
    assert f"steps {STOPPED_AT} -> {TINY_STEPS}" in res.stdout


def test_same_tokenizer_other_train_data_is_refused(run, data, tmp_path):
    d = str(tmp_path / "d")
    shutil.copytree(data, d)
    shutil.copy(os.path.join(data, "eval.tokens.npy"), os.path.join(d, "train.tokens.npy"))
    shutil.copy(os.path.join(data, "eval.offsets.npy"), os.path.join(d, "train.offsets.npy"))
    shutil.copy(os.path.join(data, "eval.prompt_len.npy"), os.path.join(d, "train.prompt_len.npy"))
    refused(["train", "--data", d, "--out", run, "--resume", "--quiet"], [run, d], "other train data than the run's")


def test_a_model_smaller_than_its_tokenizer_is_refused(data, tmp_path):
    """An original GuppyLM .pt records no fingerprint: the vocab check still catches a tokenizer that is not its."""
    cfg = ModelConfig(vocab_size=200, max_seq_len=16, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32)
    pt = str(tmp_path / "model.pt")
    torch.save({"model_state_dict": GuppyLM(cfg).state_dict(), "config": {"n_heads": 2}}, pt)
    tok = os.path.join(data, "tokenizer.json")
    from guppy.data import load_tokenizer
    vocab = load_tokenizer(tok).get_vocab_size()
    refused(["chat", "--checkpoint", pt, "--tokenizer", tok, "--prompt", "hi"], [str(tmp_path), data],
            f"has {vocab} tokens but the model", "has 200")


# --------------------------------------------------------------------------------------------------------------------
# 3. One training per run folder
# --------------------------------------------------------------------------------------------------------------------
def test_a_second_training_into_a_busy_run_folder_is_refused(run, data, tmp_path):
    r = copy_run(run, tmp_path / "r")
    first = subprocess.Popen([sys.executable, "-m", "guppy", "train", "--data", data, "--out", r, "--resume",
                              "--max-steps", "100000", "--save-every", "100000", "--eval-every", "100000", "--quiet",
                              "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while max((m["step"] for m in metrics(r)), default=0) <= STOPPED_AT and time.time() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.1)  # until the first training is under way (its first step logged)
        for extra in (["--resume"], []):
            line = assert_one_line(guppy("train", "--data", data, "--out", r, "--quiet", *extra), 2)
            assert f"{r}: in use by a training (pid {first.pid} on " in line, line
    finally:
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 130 and "saving a checkpoint" in out, (out, err)
    # the lock died with its holder: the run carries on from where the first training saved
    step = read_pointer(r, "latest")["step"]
    res = guppy("train", "--data", data, "--out", r, "--resume", "--max-steps", str(step + 1), "--quiet")
    assert_one_line(res, 0)
    assert f"steps {step} -> {step + 1}" in res.stdout


# --------------------------------------------------------------------------------------------------------------------
# 4. The resume rule: what a resume may change is honoured, the rest refused
# --------------------------------------------------------------------------------------------------------------------
def test_resume_honours_lr_and_how_often(run, data, tmp_path):
    r = copy_run(run, tmp_path / "r")
    res = guppy("train", "--data", data, "--out", r, "--resume", "--lr", "1e-3", "--eval-every", "3", "--quiet",
                # options equal to the run's own are accepted
                "--batch-size", "8", "--seed", "1337", "--preset", "tiny", "--batch-mode", "pad", "--loss-on", "all")
    assert_one_line(res, 0)
    logged = {m["step"]: m["lr"] for m in metrics(r) if "lr" in m}
    # tiny: 5 warm-up steps to the peak, cosine to min_lr 3e-4 at step 8; the step logged as s ran at lr(s - 1)
    peak, low, warm = 1e-3, 3e-4, 5
    for s in range(STOPPED_AT + 1, TINY_STEPS + 1):
        t = s - 1
        want = peak * t / warm if t < warm else low + (peak - low) * 0.5 * (1 + math.cos(math.pi * (t - warm) / 3))
        assert logged[s] == pytest.approx(want, rel=1e-9), (s, logged[s], want)
    assert [m["step"] for m in metrics(r) if "eval_loss" in m] == [2, 4, 6, 8]   # 2, 4 from before; then every 3
    state = json.load(open(os.path.join(r, read_pointer(r, "latest")["checkpoint"], "state.json")))
    assert state["train_config"]["lr"] == 1e-3 and state["train_config"]["batch_size"] == 8


@pytest.mark.parametrize("option", [["--batch-size", "4"], ["--batch-mode", "packed"], ["--loss-on", "assistant"],
                                    ["--seed", "7"], ["--decay-all"], ["--preset", "cpu-demo"]])
def test_resume_refuses_what_changes_the_run(run, data, option):
    refused(["train", "--data", data, "--out", run, "--resume", "--quiet", *option], [run, data],
            f"{' '.join(option)}: a resume continues the run's recipe")


def test_the_rule_keeps_fields_it_does_not_know():
    """A TrainConfig field added later (say, by a new recipe) is the run's own unless the rule names it."""
    from dataclasses import dataclass

    from guppy.config import TrainConfig
    from guppy.errors import GuppyError
    from guppy.train import resumed_recipe

    @dataclass
    class Newer(TrainConfig):
        optimizer: str = "adamw"

    run_cfg = Newer(max_steps=10)
    assert resumed_recipe(run_cfg, Newer(max_steps=20, lr=1e-3)) == Newer(max_steps=20, lr=1e-3)
    with pytest.raises(GuppyError, match="--optimizer muon: a resume continues"):
        resumed_recipe(run_cfg, Newer(max_steps=10, optimizer="muon"))


# --------------------------------------------------------------------------------------------------------------------
# 5. A checkpoint left by a crash between its rename and the pointer update is replaced, not reused
# --------------------------------------------------------------------------------------------------------------------
def test_an_unnamed_checkpoint_from_a_crash_is_not_reused(data, tmp_path, monkeypatch):
    import guppy.checkpoint as ckpt_lib
    model_cfg, cfg = preset("tiny")
    cfg.max_steps, cfg.save_every, cfg.eval_every = 12, 2, 100
    crashed, clean = str(tmp_path / "crashed"), str(tmp_path / "clean")
    real = ckpt_lib.atomic_write_json

    def crash_at_step_6(path, obj):
        if obj.get("step") == 6:
            raise SystemExit("killed between the rename of step-0000006 and its pointer")
        real(path, obj)

    monkeypatch.setattr(ckpt_lib, "atomic_write_json", crash_at_step_6)
    with pytest.raises(SystemExit):
        train(data, crashed, preset("tiny")[0], cfg, device="cpu", progress=False, log=quiet, preset="tiny")
    monkeypatch.undo()
    assert read_pointer(crashed, "latest")["step"] == 4 and os.path.isdir(f"{crashed}/checkpoints/step-0000006")

    # the same run without the crash, resumed at step 4 with a longer schedule: what the resume must equal
    train(data, clean, model_cfg, cfg, device="cpu", stop_at_step=4, progress=False, log=quiet, preset="tiny")
    cfg.max_steps = 20
    train(data, clean, None, cfg, device="cpu", resume=True, stop_at_step=6, progress=False, log=quiet)

    res = guppy("train", "--data", data, "--out", crashed, "--resume", "--max-steps", "20", "--stop-at-step", "6",
                "--quiet")
    assert_one_line(res, 0)
    assert read_pointer(crashed, "latest")["step"] == 6
    state = json.load(open(f"{crashed}/checkpoints/step-0000006/state.json"))
    assert state["train_config"]["max_steps"] == 20
    a = load_file(f"{crashed}/checkpoints/step-0000006/model.safetensors")
    b = load_file(f"{clean}/checkpoints/step-0000006/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------------------------
# 6. metrics.jsonl after kill -9 and resume: each step once
# --------------------------------------------------------------------------------------------------------------------
def test_metrics_after_a_kill_and_resume_hold_each_step_once(data, tmp_path):
    r = str(tmp_path / "r")
    proc = subprocess.Popen([sys.executable, "-m", "guppy", "train", "--data", data, "--out", r, "--preset", "tiny",
                             "--max-steps", "1000", "--save-every", "100", "--eval-every", "4", "--log-every", "1",
                             "--quiet", "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        # polled while the training writes it: the file may be empty or end in a line not yet complete
        steps = [json_step(m) for m in metrics_lines(r)] if os.path.exists(os.path.join(r, "metrics.jsonl")) else []
        if max((s for s in steps if s is not None), default=-1) >= 13:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    latest = read_pointer(r, "latest")["step"]
    with open(os.path.join(r, "metrics.jsonl"), "a") as f:
        f.write('{"step": 99, "train_lo')  # and a line torn by the kill
    before = [m for m in metrics_lines(r) if json_step(m) is not None and json_step(m) <= latest]
    assert max(json_step(m) or 0 for m in metrics_lines(r)) > latest  # lines past the checkpoint: the case here

    res = guppy("train", "--data", data, "--out", r, "--resume", "--max-steps", str(latest + 6), "--quiet")
    assert_one_line(res, 0)
    after = metrics_lines(r)
    assert after[:len(before)] == before   # what led to the checkpoint stays as it was
    steps = [m["step"] for m in map(json.loads, after) if "train_loss" in m]
    assert steps == list(range(1, latest + 7))
    evals = [m["step"] for m in map(json.loads, after) if "eval_loss" in m]
    assert evals == sorted(set(range(4, latest + 7, 4)) | {latest + 6})  # every 4 steps, and at max_steps
    # and the checkpoints the CLI wrote follow the umask it ran under, like any other file (0700/0600 before)
    umask = os.umask(0)
    os.umask(umask)
    ckpt = os.path.join(r, read_pointer(r, "latest")["checkpoint"])
    assert all(os.stat(p).st_mode & 0o777 == 0o777 & ~umask for p in (r, os.path.dirname(ckpt), ckpt))
    assert all(os.stat(os.path.join(ckpt, f)).st_mode & 0o777 == 0o666 & ~umask for f in os.listdir(ckpt))
    assert os.stat(os.path.join(r, "latest.json")).st_mode & 0o777 == 0o666 & ~umask


def metrics_lines(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return f.read().splitlines()


def json_step(line):
    try:
        return json.loads(line).get("step")
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------------------------
# Option values: each refused by the parser in one line
# --------------------------------------------------------------------------------------------------------------------
BAD_OPTIONS = [
    ("train", "--ops", "fastest"), ("train", "--save-every", "0"), ("train", "--batch-size", "0"),
    ("train", "--seed", "-1"), ("train", "--lr", "nan"), ("train", "--max-steps", "0"), ("train", "--max-steps", "-5"),
    ("train", "--stop-at-step", "-3"), ("train", "--preset", "whale"), ("chat", "--top-k", "-5"),
    ("chat", "--top-p", "-1"), ("chat", "--temperature", "nan"), ("prepare", "--eval-fraction", "1.5"),
]


@pytest.mark.parametrize("command,option,value", BAD_OPTIONS, ids=[" ".join(c) for c in BAD_OPTIONS])
def test_bad_option_values_end_in_the_parser(run, data, tmp_path, command, option, value):
    where = {"train": ["--data", data, "--out", str(tmp_path / "new")], "chat": ["--checkpoint", run, "--prompt", "hi"],
             "prepare": ["--out", str(tmp_path / "new")]}[command]
    refused([command, *where, f"{option}={value}"], [run, data, str(tmp_path)], f"guppy {command}: error: ", option)
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------------------------------------------------
# Paths: an existing file, a folder we may not write or read, a read-only filesystem, a full disk
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["train"], ["train", "--resume"], ["prepare"]])
def test_out_that_is_a_file(data, tmp_path, command):
    f = tmp_path / "file"
    f.write_text("not a folder")
    extra = ["--data", data, "--quiet"] if command[0] == "train" else []
    refused([*command, "--out", str(f), *extra], [str(tmp_path)], f"{f}: exists and is not a folder")


@pytest.mark.parametrize("command", [["train"], ["train", "--resume"], ["prepare"]])
def test_out_we_may_not_write(run, data, tmp_path, command):
    prefix = as_user()
    parent = tmp_path / "locked"
    if "--resume" in command:
        out = copy_run(run, parent / "r")
    else:
        parent.mkdir()
        out = str(parent / "new")
    before = checksums(str(tmp_path))
    chmod_tree(parent, 0o555, 0o444)
    try:
        extra = ["--data", data, "--quiet"] if command[0] == "train" else ["--samples", "50"]
        r = guppy(*command, "--out", out, *extra, prefix=prefix)
    finally:
        chmod_tree(parent, 0o755, 0o644)
    assert_one_line(r, 2, "Permission denied")
    assert_unchanged(before)


@pytest.mark.parametrize("command", [["train"], ["train", "--resume"], ["prepare"], ["eval"]])
def test_read_only_filesystem(run, data, tmpfs, command):
    fs = tmpfs()
    out = copy_run(run, fs / "r") if "--resume" in command else str(fs / "new")
    read_only(fs)
    if command[0] == "train":
        args = [*command, "--data", data, "--out", out, "--quiet"]
    elif command[0] == "prepare":
        args = ["prepare", "--out", out, "--samples", "50"]
    else:
        args = ["eval", "--checkpoint", run, "--data", data, "--json", str(fs / "result.json")]
    refused(args, [str(fs), run], "Read-only file system" if command[0] != "eval" else "cannot write in")


def test_eval_json_into_a_missing_folder(run, data, tmp_path):
    refused(["eval", "--checkpoint", run, "--data", data, "--json", str(tmp_path / "nope" / "r.json")],
            [run, str(tmp_path)], "--json", "no folder")


def test_a_full_disk_during_resume_keeps_the_checkpoint(run, data, tmpfs):
    fs = tmpfs("24m")
    r = copy_run(run, fs / "r")
    fill(fs, 1 << 20)  # room for the metrics lines, not for the next checkpoint
    old_metrics = open(os.path.join(r, "metrics.jsonl")).read()
    # metrics.jsonl gains the lines of the steps trained before the save failed (a later resume cuts them back)
    refused(["train", "--data", data, "--out", r, "--resume", "--quiet"], [str(fs)], "No space left on device",
            ignore=("metrics.jsonl",))
    assert open(os.path.join(r, "metrics.jsonl")).read().startswith(old_metrics)
    assert read_pointer(r, "latest")["step"] == STOPPED_AT and not any(
        n.startswith(".tmp") for n in os.listdir(os.path.join(r, "checkpoints")))
    load_model(r, prefer="latest")


def test_a_full_disk_during_prepare_force_keeps_the_dataset(data, tmpfs):
    fs = tmpfs("24m")
    d = str(fs / "d")
    shutil.copytree(data, d)
    fill(fs, 64 << 10)
    refused(["prepare", "--out", d, "--samples", "3000", "--force"], [str(fs)], "No space left on device")
    assert [n for n in os.listdir(fs) if n.startswith(".guppy-prepare")] == []


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """In-process twin of the tmpfs test above, for machines where no tmpfs can be mounted: ENOSPC mid-save."""
    import errno

    import guppy.checkpoint as ckpt_lib
    cfg = ModelConfig(vocab_size=300, max_seq_len=16, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32)
    model, run = GuppyLM(cfg), str(tmp_path / "r")
    ckpt_lib.save_checkpoint(run, 1, model, cfg)
    real = ckpt_lib._write_bytes

    def full(path, data):
        if path.endswith("state.safetensors"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(path, data)

    monkeypatch.setattr(ckpt_lib, "_write_bytes", full)
    with pytest.raises(OSError, match="No space left"):
        ckpt_lib.save_checkpoint(run, 2, model, cfg)
    assert read_pointer(run, "latest")["step"] == 1
    assert os.listdir(os.path.join(run, "checkpoints")) == ["step-0000001"]


# --------------------------------------------------------------------------------------------------------------------
# Damaged files in a run or a dataset
# --------------------------------------------------------------------------------------------------------------------
def _model_cfg(change):
    return lambda r: [edit_json(os.path.join(c, "config.json"), change) for c in checkpoint_dirs(r)]


def _tensors(change):
    def edit(r):
        for c in checkpoint_dirs(r):
            path = os.path.join(c, "model.safetensors")
            save_file(change(load_file(path)), path)
    return edit


def _state(change):
    return lambda r: [edit_json(os.path.join(c, "state.json"), change) for c in checkpoint_dirs(r)]


def _without(name):
    return lambda r: [os.remove(os.path.join(c, name)) for c in checkpoint_dirs(r)]


def _garbage(name):
    return lambda r: open(os.path.join(r, name), "w").write("<html>not json</html>")


DAMAGED_RUNS = {  # id: (damage to a copy of the run, command, what the line must say)
    "n_heads=3": (_model_cfg(lambda c: {**c, "n_heads": 3}), "chat", "d_model=64 is not divisible by n_heads=3"),
    "n_heads=0": (_model_cfg(lambda c: {**c, "n_heads": 0}), "chat", "n_heads=0: must be a positive integer"),
    "string d_model": (_model_cfg(lambda c: {**c, "d_model": "64"}), "chat", "d_model='64'"),
    "config is a list": (_model_cfg(lambda c: [c]), "chat", "config.json: expected a JSON object"),
    "config shape": (_model_cfg(lambda c: {**c, "ffn_hidden": 256}), "chat", "has shape (128, 64), the model config "
                     "needs (256, 64)"),
    "no tok_emb": (_tensors(lambda t: {k: v for k, v in t.items() if k != "tok_emb.weight"}), "chat",
                   "tensor tok_emb.weight is missing"),
    "NaN weights": (_tensors(lambda t: {k: v.fill_(math.nan) if "ffn" in k else v for k, v in t.items()}), "chat",
                    "holds NaN or infinite values"),
    "garbage tokenizer": (_garbage("tokenizer.json"), "chat", "tokenizer.json: not a tokenizer file"),
    "resume, config.json missing": (_without("config.json"), "resume", "config.json is missing"),
    "resume, no train_config": (_state(lambda s: {k: v for k, v in s.items() if k != "train_config"}), "resume",
                                "state.json: cannot resume, it holds no train_config"),
    "resume, unknown ops": (_model_cfg(lambda c: {**c, "ops": "fastest"}), "resume", "unknown ops 'fastest'"),
}


@pytest.mark.parametrize("case", DAMAGED_RUNS)
def test_damaged_run_files(run, data, tmp_path, case):
    damage, command, fragment = DAMAGED_RUNS[case]
    r = copy_run(run, tmp_path / "r")
    damage(r)
    args = (["chat", "--checkpoint", r, "--prompt", "hi"] if command == "chat"
            else ["train", "--data", data, "--out", r, "--resume", "--quiet"])
    refused(args, [r, data], fragment)


def test_damaged_data_files(run, data, tmp_path):
    d = str(tmp_path / "d")
    shutil.copytree(data, d)
    with open(os.path.join(d, "meta.json"), "r+b") as f:
        f.truncate(30)
    refused(["eval", "--checkpoint", run, "--data", d], [run, d], "meta.json: damaged, not valid JSON")
    shutil.copytree(data, d + "2")
    open(os.path.join(d + "2", "tokenizer.json"), "w").write("[1, 2")
    refused(["train", "--data", d + "2", "--out", str(tmp_path / "new"), "--quiet"], [d + "2"],
            "tokenizer.json: not a tokenizer file")
    assert not (tmp_path / "new").exists()


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would run `touch marker`
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_is_never_run_nor_advised_to_be(tmp_path):
    pt, marker = str(tmp_path / "evil.pt"), tmp_path / "ran"
    torch.save({"model_state_dict": RunsCode(marker)}, pt)
    line = refused(["chat", "--checkpoint", pt, "--prompt", "hi"], [str(tmp_path)], f"{pt}: not a readable checkpoint",
                   "it holds Python objects other than tensors")
    assert "weights_only" not in line and "trust" not in line and not marker.exists()


# --------------------------------------------------------------------------------------------------------------------
# Unreadable folders say "Permission denied", not "missing"
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["data", "checkpoint"])
def test_an_unreadable_folder_is_not_called_missing(run, data, tmp_path, what):
    prefix = as_user()
    folder = copy_run(run, tmp_path / "r") if what == "checkpoint" else shutil.copytree(data, tmp_path / "d")
    args = (["chat", "--checkpoint", str(folder), "--prompt", "hi"] if what == "checkpoint"
            else ["train", "--data", str(folder), "--out", str(tmp_path / "new"), "--quiet"])
    before = checksums(str(tmp_path))
    os.chmod(folder, 0)
    try:
        r = guppy(*args, prefix=prefix)
    finally:
        os.chmod(folder, 0o755)
    line = assert_one_line(r, 2, f"{folder}", "Permission denied")
    assert "missing" not in line and "No such" not in line
    assert_unchanged(before)


# --------------------------------------------------------------------------------------------------------------------
# Text that is not UTF-8, and conversations too long to be one
# --------------------------------------------------------------------------------------------------------------------
def test_non_utf8_in_a_jsonl_file_names_the_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"input": "hi", "output": "blub"}\n{"input": "h\xffi", "output": "blub"}\n')
    refused(["prepare", "--out", str(tmp_path / "d"), "--from-jsonl", str(src)], [str(tmp_path)],
            f"{src}: line 2: not UTF-8 text")
    assert not (tmp_path / "d").exists()


def test_a_huge_conversation_is_refused_at_once(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"input": "hi", "output": "blub" * 500_000}) + "\n")  # a 2 MB one-word line
    t = time.time()
    refused(["prepare", "--out", str(tmp_path / "d"), "--from-jsonl", str(src)], [str(tmp_path)],
            "line 1: a conversation of 2,000,002 characters; the limit is 10,000")
    assert time.time() - t < 60


def test_a_held_out_split_that_takes_everything_says_so(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"input": "hi", "output": "blub"}) + "\n")
    refused(["prepare", "--out", str(tmp_path / "d"), "--from-jsonl", str(src)], [str(tmp_path)],
            "the held-out split took all 1 distinct (input, output) pairs")


def test_non_utf8_prompt(run):
    r = subprocess.run([sys.executable.encode(), b"-m", b"guppy", b"chat", b"--checkpoint", run.encode(),
                        b"--prompt", b"hi \xff fish"], capture_output=True, timeout=600)
    r = subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(errors="replace"),
                                    r.stderr.decode(errors="replace"))
    assert_one_line(r, 2, "--prompt: not UTF-8 text")


def test_non_utf8_line_on_the_chat_repl_is_reported_and_skipped(run):
    r = guppy("chat", "--checkpoint", run, "--max-new-tokens", "4", "--seed", "0",
              stdin=b"hello\n\xff\xfe\xfd\nhi guppy\n/quit\n")
    assert_one_line(r, 0)
    assert r.stdout.count("not UTF-8 text") == 1 and r.stdout.count("guppy>") == 2, r.stdout


# --------------------------------------------------------------------------------------------------------------------
# A persona with a mistake, checked the README's way
# --------------------------------------------------------------------------------------------------------------------
def test_persona_validation_prints_one_line(tmp_path):
    bad = tmp_path / "crab.toml"
    bad.write_text('[persona]\nname = "crab"\n[[topics]]\nname = "home"\nkeywords = ["shell"]\n'
                   'inputs = ["hi {nickname}"]\noutputs = ["shell"]\n')
    before = checksums(str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "guppy.persona", str(bad)], capture_output=True, text=True, timeout=300)
    assert_one_line(r, 2, f"{bad}", "{nickname}", prefix="python -m guppy.persona: error: ")
    assert_unchanged(before)


# One topic, 4 inputs, 16 replies: 64 distinct conversations, fewer than the 3,000 that --samples 60000 holds out
SMALL_CRAB = ('[persona]\nname = "crab"\n[slots]\nshell = ["a snail shell", "a bottle cap", "a coconut", "a cup"]\n'
              'mood = ["grumpy", "sleepy", "suspicious"]\n[[topics]]\nname = "home"\nkeywords = ["shell"]\n'
              'inputs = ["where do you live", "is that your house", "nice shell {nickname}"]\n'
              'outputs = ["this is {shell}. it is my home.", "i live in {shell}. i am {mood} about it."]\n'
              '[topics.slots]\nnickname = ["crabby", "little crab"]\n')


def test_a_persona_too_small_for_its_held_out_split_is_refused_with_the_fix(tmp_path):
    crab = tmp_path / "crab.toml"
    crab.write_text(SMALL_CRAB)
    d = tmp_path / "d"
    refused(["prepare", "--out", str(d), "--persona", str(crab)], [str(tmp_path)],
            f"{crab}: makes only 64 distinct conversations, fewer than the 3,000", "add outputs or slot values")
    assert not d.exists()
    d.mkdir()  # a dataset it would replace stays as it was
    (d / "train.jsonl").write_text('{"input": "hi", "output": "blub"}\n')
    refused(["prepare", "--out", str(d), "--persona", str(crab), "--force"], [str(tmp_path)], "64 distinct")


def test_the_persona_check_says_prepare_would_refuse_it(tmp_path):
    crab = tmp_path / "crab.toml"
    crab.write_text(SMALL_CRAB)
    before = checksums(str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "guppy.persona", str(crab)], capture_output=True, text=True, timeout=300)
    assert_one_line(r, 1, f"{crab}: guppy prepare would refuse it: makes only 64 distinct conversations",
                    prefix="python -m guppy.persona: error: ")
    assert "distinct conversations" in r.stdout and "warning: topic 'home' can say only 16 different" in r.stdout
    assert_unchanged(before)


def test_a_starter_copy_never_overwrites(tmp_path):
    mine = tmp_path / "crab.toml"
    mine.write_text(SMALL_CRAB)
    before = checksums(str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "guppy.persona", "--starter", "crab", str(mine)], capture_output=True,
                       text=True, timeout=300)
    assert_one_line(r, 2, f"{mine}: already exists", prefix="python -m guppy.persona: error: ")
    assert_unchanged(before)


def test_samples_that_leave_no_training_conversations_are_refused(tmp_path):
    refused(["prepare", "--out", str(tmp_path / "d"), "--samples", "2", "--eval-fraction", "0.75"], [str(tmp_path)],
            "--samples 2, --eval-fraction 0.75 leaves no training conversations")


# --------------------------------------------------------------------------------------------------------------------
# Ctrl-C at start-up
# --------------------------------------------------------------------------------------------------------------------
def _interrupt_when(proc, ready, timeout=120):
    deadline = time.time() + timeout
    while not ready() and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _loading_torch(pid):
    def ready():
        try:
            with open(f"/proc/{pid}/maps") as f:
                return "libtorch" in f.read()
        except OSError:
            return False
    return ready


def test_ctrl_c_while_chat_starts(run):
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc to see when torch is loading")
    proc = subprocess.Popen([sys.executable, "-m", "guppy", "chat", "--checkpoint", run], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert_one_line(_interrupt_when(proc, _loading_torch(proc.pid)), 130, "guppy chat: interrupted")


def test_ctrl_c_during_prepare_leaves_nothing(tmp_path):
    out = tmp_path / "d"
    proc = subprocess.Popen([sys.executable, "-m", "guppy", "prepare", "--out", str(out), "--samples", "60000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def working():
        return any(n.startswith(".guppy-prepare-") for n in os.listdir(tmp_path))

    assert_one_line(_interrupt_when(proc, working), 130, "guppy prepare: interrupted")
    assert os.listdir(tmp_path) == []


def test_ctrl_c_inside_a_string_exec_still_exits_130(tmp_path):
    """CPython marks a KeyboardInterrupt raised inside a string exec as unhandled even after guppy catches it, and
    `python -m` then ends by SIGINT (-2) instead of 130. Dataclasses build their methods with a string exec, so a
    Ctrl-C during an import can land there: CI saw `guppy prepare` end with -2 that way. Here it lands there always."""
    (tmp_path / "interrupt_in_exec.py").write_text(
        "import guppy.cli\n"
        "class Parser:\n"
        "    def parse_args(self, argv):\n"
        "        exec('raise KeyboardInterrupt')\n"
        "guppy.cli.build_parser = Parser\n"
        "guppy.cli.main(['prepare'])\n")
    r = subprocess.run([sys.executable, "-m", "interrupt_in_exec"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert_one_line(r, 130, "guppy prepare: interrupted")


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints are shared like any other file: modes follow the umask
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoint_modes_follow_the_umask(tmp_path, umask):
    from guppy.checkpoint import save_checkpoint
    cfg = ModelConfig(vocab_size=300, max_seq_len=16, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32)
    old = os.umask(umask)
    try:
        save_checkpoint(str(tmp_path / "r"), 1, GuppyLM(cfg), cfg, pointers=("latest", "best"))
    finally:
        os.umask(old)
    run = tmp_path / "r"
    for d in (run, run / "checkpoints", run / "checkpoints" / "step-0000001"):
        assert os.stat(d).st_mode & 0o777 == 0o777 & ~umask, d
    for f in [run / "latest.json", run / "best.json", *(run / "checkpoints" / "step-0000001").iterdir()]:
        assert os.stat(f).st_mode & 0o777 == 0o666 & ~umask, f


# --------------------------------------------------------------------------------------------------------------------
# `python -m guppy.runstate RUN`, make demo's question (train, resume or only chat): whatever RUN is, one line
# --------------------------------------------------------------------------------------------------------------------
def runstate(*args, prefix=()):
    return subprocess.run([*prefix, sys.executable, "-m", "guppy.runstate", *args], capture_output=True, text=True,
                          timeout=600)


def test_runstate_says_none_or_how_far_whatever_the_folder_holds(run, tmp_path):
    (tmp_path / "file").write_text("not a run")
    (tmp_path / "empty").mkdir()
    damaged = copy_run(run, tmp_path / "damaged")
    DAMAGES["truncated"](os.path.join(damaged, "latest.json"))
    cases = {str(tmp_path / "nope"): "none", str(tmp_path / "file"): "none", str(tmp_path / "empty"): "none",
             run: f"stopped at step {STOPPED_AT} of {TINY_STEPS}",
             damaged: "stopped at a step its latest.json does not say"}  # make demo resumes it: --resume recovers
    for path, said in cases.items():
        before = checksums(str(tmp_path), run)
        r = runstate(path)
        assert (r.returncode, r.stdout, r.stderr) == (0, said + "\n", ""), (path, r)
        assert_unchanged(before)
    prefix = as_user()
    locked = copy_run(run, tmp_path / "locked")
    os.chmod(locked, 0)
    try:
        r = runstate(locked, prefix=prefix)  # make demo then trains into it, which says "Permission denied"
    finally:
        os.chmod(locked, 0o755)
    assert (r.returncode, r.stdout, r.stderr) == (0, "none\n", ""), r
    assert_one_line(runstate(), 2, prefix="usage: python -m guppy.runstate RUN")


# --------------------------------------------------------------------------------------------------------------------
# Issue 21: --out that is another kind of guppy folder, and two prepares into one folder
# --------------------------------------------------------------------------------------------------------------------
def fake_export(folder, *names):
    """A folder holding what `guppy export` writes (only the names matter here), with a tokenizer to lose."""
    os.makedirs(folder)
    for name in ("tokenizer.json", "config.json", *names):
        with open(os.path.join(folder, name), "w") as f:
            f.write(f"{name} of an export\n")
    return str(folder)


def test_train_out_a_prepared_dataset_is_refused_and_its_tokenizer_kept(data, other_data, tmp_path):
    """Training into a data folder overwrote its tokenizer.json with another dataset's: its token arrays then no
    longer matched it, and a later `train --data` on it did not notice."""
    d = str(shutil.copytree(data, tmp_path / "d"))
    names = sorted(os.listdir(d))
    for source in (other_data, d):
        refused(["train", "--data", source, "--out", d, "--preset", "tiny", "--max-steps", "1", "--quiet"], [d],
                f"{d}: holds a prepared dataset (meta.json", "choose another --out")
    assert sorted(os.listdir(d)) == names  # no checkpoints/, no lock file: nothing was created there
    assert sha256(os.path.join(d, "tokenizer.json")) == sha256(os.path.join(data, "tokenizer.json"))


@pytest.mark.parametrize("marker", ["model.onnx", ".guppy-export.json"])
def test_train_out_an_export_folder_is_refused(data, tmp_path, marker):
    exp = fake_export(tmp_path / "exp", marker, *(["index.html"] if marker == "model.onnx" else []))
    names = sorted(os.listdir(exp))
    refused(["train", "--data", data, "--out", exp, "--preset", "tiny", "--max-steps", "1", "--quiet"], [exp],
            f"{exp}: holds an export ({marker}", "choose another --out")
    assert sorted(os.listdir(exp)) == names


def test_prepare_out_a_run_folder_is_refused_even_with_force(run, tmp_path):
    """prepare --force into a run replaced the run's tokenizer.json: its checkpoints then met other token ids."""
    r = copy_run(run, tmp_path / "r")
    for force in ([], ["--force"]):
        refused(["prepare", "--out", r, "--samples", "200", *force], [r], f"{r}: holds a training run (checkpoints",
                "choose another --out")
    assert not os.path.exists(os.path.join(r, "meta.json"))


@pytest.mark.parametrize("command", ["train", "prepare"])
def test_train_or_prepare_out_a_checkpoint_folder_is_refused(run, data, tmp_path, command):
    """A checkpoint folder (RUN/checkpoints/step-N) is no run: training into it would have made a new run inside the
    old one, and prepare would have written a dataset over its config.json's neighbours."""
    ckpt = checkpoint_dirs(copy_run(run, tmp_path / "r"))[-1]
    names = sorted(os.listdir(ckpt))
    args = {"train": ["train", "--data", data, "--out", ckpt, "--preset", "tiny", "--max-steps", "1", "--quiet"],
            "prepare": ["prepare", "--out", ckpt, "--samples", "200", "--force"]}[command]
    refused(args, [ckpt], f"{ckpt}: holds a checkpoint (state.json", "choose another --out")
    assert sorted(os.listdir(ckpt)) == names


def test_prepare_out_an_export_folder_is_refused_even_with_force(tmp_path):
    exp = fake_export(tmp_path / "exp", "model.onnx", "index.html")
    refused(["prepare", "--out", exp, "--samples", "200", "--force"], [exp], f"{exp}: holds an export (model.onnx",
            "choose another --out")
    assert sorted(os.listdir(exp)) == ["config.json", "index.html", "model.onnx", "tokenizer.json"]


def test_a_second_prepare_into_a_busy_folder_is_refused(tmp_path):
    """Two prepares into one folder at once both exited 0, and one dataset silently replaced the other."""
    out = tmp_path / "d"
    first = subprocess.Popen([sys.executable, "-m", "guppy", "prepare", "--out", str(out), "--samples", "60000"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not any(n.startswith(".guppy-prepare-") for n in os.listdir(tmp_path)) and time.time() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)  # until the first one works: it holds the folder's lock from before that
        line = assert_one_line(guppy("prepare", "--out", str(out), "--samples", "200", "--force", timeout=120), 2)
        assert f"{out}: in use by a prepare (pid {first.pid} on " in line, line
    finally:
        first.send_signal(signal.SIGINT)  # no need to wait for its dataset
        first.communicate(timeout=120)
    assert first.returncode == 130 and os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------------------------------
# Issue 21, security: text from files reaches the terminal escaped, never raw
# --------------------------------------------------------------------------------------------------------------------
TITLE, CLEAR, CLIPBOARD = "\x1b]0;owned\x07", "\x1b[2J", "\x1b]52;c;aGVsbG8=\x07"  # set the title, clear, OSC 52


def assert_no_raw_control(r):
    for stream in (r.stdout, r.stderr):
        raw = [c for c in stream if (ord(c) < 32 and c != "\n") or 0x7f <= ord(c) <= 0x9f]
        assert not raw, (raw, stream[-2000:])


def test_security_printable_escapes_every_control_character():
    from guppy.errors import one_line, printable
    text = f"fish{TITLE}{CLEAR}{CLIPBOARD}\r\nyou> forged\x9b\u202eevil\udcff"
    shown = printable(text)
    assert shown == ("fish\\x1b]0;owned\\x07\\x1b[2J\\x1b]52;c;aGVsbG8=\\x07\\r\\nyou> forged\\x9b\\u202eevil\\udcff")
    assert shown.isprintable()
    assert one_line("runs/a\nb: no such file", ["runs/a\nb"]) == "runs/a\\nb: no such file"


def test_security_a_hostile_persona_name_is_printed_escaped_by_chat(run, tmp_path):
    r = copy_run(run, tmp_path / "r")
    with open(os.path.join(r, "persona.json"), "w") as f:
        json.dump({"name": f"fish{TITLE}{CLEAR}{CLIPBOARD}"}, f)
    shown = "fish\\x1b]0;owned\\x07\\x1b[2J\\x1b]52;c;aGVsbG8=\\x07"
    res = guppy("chat", "--checkpoint", r, "--prompt", "hi", "--prompt", "food", "--max-new-tokens", "4", "--seed", "0")
    assert_one_line(res, 0)
    assert_no_raw_control(res)
    assert res.stdout.count(f"\n{shown}> ") == 2, res.stdout
    res = guppy("chat", "--checkpoint", r, "--max-new-tokens", "4", "--seed", "0", stdin=b"hello\n/help\n/quit\n")
    assert_one_line(res, 0)
    assert_no_raw_control(res)
    assert f"chatting with {shown} (" in res.stdout and f"{shown}> " in res.stdout, res.stdout


EVIL_REPLY = f"blub{TITLE}{CLEAR}{CLIPBOARD}\rdone\nyou> forged"


def test_security_a_reply_holding_escape_sequences_is_printed_escaped(run, tmp_path):
    """A model's reply is any bytes its tokens decode to: here one holding terminal sequences and a forged turn, as
    a model (or a tokenizer.json) could make, through the real `guppy chat` with the reply replaced."""
    (tmp_path / "evil_reply.py").write_text(
        "import sys\nimport guppy.chat\nimport guppy.cli\n"
        f"guppy.chat.Chat.reply = lambda self, text, use_cache=True: {EVIL_REPLY!r}\n"
        "guppy.cli.main(sys.argv[1:])\n")

    def chat(*args, stdin=None):
        res = subprocess.run([sys.executable, "-m", "evil_reply", "chat", "--checkpoint", run, *args], cwd=tmp_path,
                             input=stdin, capture_output=True, timeout=600)
        res = subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode(errors="replace"),
                                          res.stderr.decode(errors="replace"))
        assert_one_line(res, 0)
        assert_no_raw_control(res)
        assert "blub\\x1b]0;owned\\x07\\x1b[2J\\x1b]52;c;aGVsbG8=\\x07\\rdone\\nyou> forged" in res.stdout, res.stdout
        assert not any(line.startswith("you> forged") for line in res.stdout.splitlines()), res.stdout
        return res

    chat("--prompt", "hi")                      # the reply alone
    chat("--prompt", "hi", "--prompt", "yo")    # you> / guppy> turns
    chat(stdin=b"hi\n/quit\n")                  # the REPL


def test_security_eval_prints_hostile_topic_names_escaped(run, data, tmp_path):
    d = str(shutil.copytree(data, tmp_path / "d"))
    topic = f"food{TITLE}{CLEAR}"
    rows = [json.loads(line) for line in open(os.path.join(d, "eval.jsonl"))]
    with open(os.path.join(d, "eval.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps({**row, "category": topic}) + "\n")
    edit_json(os.path.join(d, "meta.json"), lambda m: {**m, "category_keywords": {topic: ["zzzz-never-said"]}})
    res = guppy("eval", "--checkpoint", run, "--data", d)
    assert_one_line(res, 0)
    assert_no_raw_control(res)
    assert "food\\x1b]0;owned\\x07\\x1b[2J 0/2" in res.stdout and "[food\\x1b]0;owned" in res.stdout, res.stdout


def test_a_newline_in_a_path_gives_one_stderr_line(tmp_path):
    path = str(tmp_path / "my\npersona.toml")
    r = subprocess.run([sys.executable, "-m", "guppy.persona", path], capture_output=True, text=True, timeout=300)
    assert_one_line(r, 2, f"{tmp_path}/my\\npersona.toml: cannot read file", prefix="python -m guppy.persona: error: ")
    refused(["prepare", "--out", str(tmp_path / "d"), "--persona", path], [str(tmp_path)],
            f"{tmp_path}/my\\npersona.toml: cannot read file")
    refused(["prepare", "--out", str(tmp_path / "d"), "--from-jsonl", str(tmp_path / "in\n.jsonl")],
            [str(tmp_path)], f"{tmp_path}/in\\n.jsonl: no such file")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------------------------------
# Issue 21: persona limits, one check shared by the validator and prepare (each refuses what the other does)
# --------------------------------------------------------------------------------------------------------------------
def persona_refused(tmp_path, persona, *fragments, timeout=25):
    """`python -m guppy.persona` and `guppy prepare` both refuse the persona at once, in one line naming the
    problem, and write nothing. persona: TOML text, or a path."""
    path = persona if persona.startswith("/dev/") else str(tmp_path / "p.toml")
    if path != persona:
        with open(path, "w", encoding="utf-8") as f:
            f.write(persona)
    before = checksums(str(tmp_path))
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "guppy.persona", path, "--samples", "200"], capture_output=True,
                       text=True, timeout=timeout)
    assert_one_line(r, 2, f"{path}: ", *fragments, prefix="python -m guppy.persona: error: ")
    assert time.time() - t < timeout
    r = guppy("prepare", "--out", str(tmp_path / "d"), "--persona", path, "--samples", "200", timeout=timeout)
    assert_one_line(r, 2, f"{path}: ", *fragments)
    assert_unchanged(before)
    assert not (tmp_path / "d").exists()


PERSONA_HEAD = '[persona]\nname = "crab"\n[slots]\nshell = ["a snail shell", "a bottle cap", "a cup"]\n'


def crab_topic(name="home", outputs='["i live in {shell}.", "this is {shell}."]', extra=""):
    return (f'[[topics]]\nname = "{name}"\nkeywords = ["shell"]\ninputs = ["where do you live", "nice shell"]\n'
            f"outputs = {outputs}\n{extra}")


def test_persona_weights_of_1e308_are_refused(tmp_path):
    """Two topics of weight 1e308: their total was infinite, and every sample went to one topic."""
    persona_refused(tmp_path, PERSONA_HEAD + crab_topic(extra="weight = 1e308\n") +
                    crab_topic("food", extra="weight = 1e308\n"), "topic 'home' weight must be a positive number, "
                    "at most 1,000,000", "got 1e+308")


@pytest.mark.parametrize("outputs", ['["i live in {shell}. <|im_end|>"]',     # written out
                                     '["i live in {shell}. <|im_{x}end|>"]',  # halves joined by an empty value
                                     '["i live in {shell}{end}end|>"]'])      # begun by a slot value
def test_the_validator_refuses_a_control_token_as_prepare_does(tmp_path, outputs):
    """The validator passed an output holding <|im_end|>, which prepare then refused."""
    persona_refused(tmp_path, PERSONA_HEAD + crab_topic(outputs=outputs, extra='[topics.slots]\nx = [""]\n'
                                                                              'end = [".", ". <|im_"]\n'),
                    "topic 'home' wrote <|im_end|> in a filling of outputs[0]")


def test_a_persona_nested_3000_deep_is_one_line(tmp_path):
    persona_refused(tmp_path, PERSONA_HEAD + "deep = " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply")


def test_a_persona_card_nested_3000_deep_is_one_line(run, tmp_path):
    r = copy_run(run, tmp_path / "r")
    with open(os.path.join(r, "persona.json"), "w") as f:
        f.write('{"name": "fish", "description": ' + "[" * 3000 + "]" * 3000 + "}")
    refused(["chat", "--checkpoint", r, "--prompt", "hi"], [r], "persona.json: unreadable persona card (nested")


def test_persona_and_prepare_on_dev_zero_are_one_line(tmp_path):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    persona_refused(tmp_path, "/dev/zero", "larger than 4 MiB")
    r = guppy("prepare", "--out", str(tmp_path / "d"), "--from-jsonl", "/dev/zero", timeout=25)
    assert_one_line(r, 2, "/dev/zero: line 1: longer than 16 MiB")
    assert os.listdir(tmp_path) == []


def test_a_template_of_20000_placeholders_is_refused_at_once(tmp_path):
    """A 60 kB output of 20,000 placeholders: the validator ran past 30 s."""
    persona_refused(tmp_path, PERSONA_HEAD + crab_topic(outputs='["' + "{shell}" * 20_000 + '"]'),
                    "topic 'home' outputs[0]", "is 140,000 characters long; the limit is 1,000")
    persona_refused(tmp_path, PERSONA_HEAD + crab_topic(outputs='["' + "{shell} " * 21 + '"]'),  # short, but many
                    "topic 'home' outputs[0]", "has more than 20 placeholders")


def test_a_template_holding_a_million_character_word_is_refused_at_once(tmp_path):
    """`prepare --samples 200` was still running at 240 s: BPE training is quadratic in the length of a word."""
    persona_refused(tmp_path, PERSONA_HEAD + crab_topic(outputs='["i live in ' + "a" * 1_000_000 + '."]'),
                    "topic 'home' outputs[0]", "is 1,000,011 characters long; the limit is 1,000")
    value = "b" * 900  # short texts, a long conversation: 12 of them filled into one reply
    persona_refused(tmp_path, PERSONA_HEAD.replace('"a cup"', f'"{value}"') +
                    crab_topic(outputs='["' + "{shell} " * 12 + '"]'), "topic 'home' can write a conversation of",
                    "the limit is 10,000")


def test_a_persona_saved_with_a_bom_is_read(tmp_path):
    """Windows Notepad saves UTF-8 with a byte-order mark: it is not "invalid TOML" at column 1."""
    crab = tmp_path / "crab.toml"
    crab.write_bytes(b"\xef\xbb\xbf" + SMALL_CRAB.encode())
    r = subprocess.run([sys.executable, "-m", "guppy.persona", str(crab), "--samples", "200"], capture_output=True,
                       text=True, timeout=300)
    assert_one_line(r, 0)
    assert f"{crab}: 'crab', 1 topic" in r.stdout, r.stdout


def test_the_persona_validator_help_is_its_usage(tmp_path):
    r = subprocess.run([sys.executable, "-m", "guppy.persona", "--help"], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert_one_line(r, 0)
    assert r.stdout.startswith("usage: python -m guppy.persona") and "--starter" in r.stdout, r.stdout
