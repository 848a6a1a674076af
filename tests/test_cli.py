"""The `guppy` command end to end, as a user runs it, and the errors a user can make."""
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest


def guppy(*args, timeout=600, **kw):
    return subprocess.run([sys.executable, "-m", "guppy", *args], capture_output=True, text=True, timeout=timeout,
                          **kw)


def assert_user_error(r, *fragments):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("guppy "), r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data, run = str(root / "data"), str(root / "run")
    r = guppy("prepare", "--out", data, "--samples", "1200", "--vocab-size", "400")
    assert r.returncode == 0, r.stderr
    assert "unique replies" in r.stdout
    r = guppy("train", "--data", data, "--out", run, "--preset", "tiny", "--device", "cpu", "--max-steps", "12")
    assert r.returncode == 0, r.stderr
    return root, data, run


def test_end_to_end(trained):
    root, data, run = trained
    for name in ("train.jsonl", "eval.jsonl", "tokenizer.json", "meta.json", "train.tokens.npy"):
        assert os.path.isfile(os.path.join(data, name))
    assert os.path.isfile(os.path.join(run, "latest.json")) and os.path.isfile(os.path.join(run, "best.json"))
    r = guppy("chat", "--checkpoint", run, "--prompt", "hi guppy", "--seed", "0", "--max-new-tokens", "8")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    r = guppy("chat", "--checkpoint", run, "--prompt", "", "--prompt", "hello")
    assert r.returncode == 0 and "empty prompt" in r.stdout
    r = guppy("chat", "--checkpoint", run, "--prompt", "blub " * 200, "--max-new-tokens", "4")
    assert r.returncode == 0 and "truncated" in r.stderr
    r = guppy("chat", "--checkpoint", run, input="hello\n\n/quit\n")
    assert r.returncode == 0 and r.stdout.count("guppy>") == 1
    r = guppy("eval", "--checkpoint", run, "--data", data)
    assert r.returncode == 0 and "held-out loss" in r.stdout and "keyword hit rate" in r.stdout, r.stderr
    r = guppy("info")
    assert r.returncode == 0 and "torch" in r.stdout and "reference" in r.stdout
    r = guppy("train", "--data", data, "--out", run, "--preset", "tiny", "--device", "cpu", "--max-steps", "14",
              "--resume", "--quiet")
    assert r.returncode == 0 and "steps 12 -> 14" in r.stdout, r.stderr
    # without --preset/--max-steps a resume keeps the run's own recipe (not guppy-9m's 10,000 steps): nothing to do
    r = guppy("train", "--data", data, "--out", run, "--device", "cpu", "--resume", "--quiet")
    assert r.returncode == 0 and "steps 14 -> 14" in r.stdout and "2 layers" not in r.stdout, r.stderr


def test_missing_and_empty_data_dir(tmp_path):
    assert_user_error(guppy("train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")),
                      "no such data folder")
    (tmp_path / "empty").mkdir()
    assert_user_error(guppy("train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")),
                      "missing train.tokens.npy")


def test_missing_and_truncated_checkpoint(trained, tmp_path):
    _, data, run = trained
    assert_user_error(guppy("chat", "--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"), "no such checkpoint")
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    ckpt = os.path.join(broken, "checkpoints", sorted(os.listdir(os.path.join(broken, "checkpoints")))[-1])
    weights = os.path.join(ckpt, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    assert_user_error(guppy("chat", "--checkpoint", ckpt, "--prompt", "hi"), "unreadable checkpoint")
    os.remove(weights)
    assert_user_error(guppy("chat", "--checkpoint", ckpt, "--prompt", "hi"), "model.safetensors is missing")


def test_malformed_persona(tmp_path):
    bad = tmp_path / "fish.toml"
    bad.write_text("[persona]\nname = 'x'\n[[topics]]\nname = 'a'\ninputs = [\n")
    r = guppy("prepare", "--out", str(tmp_path / "d"), "--persona", str(bad))
    assert_user_error(r, "fish.toml")
    assert not (tmp_path / "d").exists()


def test_unknown_preset_and_no_cuda(trained, tmp_path):
    _, data, _ = trained
    assert_user_error(guppy("train", "--data", data, "--out", str(tmp_path / "r"), "--preset", "whale"),
                      "unknown preset 'whale'")
    import torch
    if not torch.cuda.is_available():
        assert_user_error(guppy("train", "--data", data, "--out", str(tmp_path / "r"), "--device", "cuda"),
                          "CUDA is not available")
    assert not (tmp_path / "r").exists()


def test_failed_commands_keep_existing_work(trained):
    _, data, run = trained
    before = {n: os.path.getmtime(os.path.join(data, n)) for n in os.listdir(data)}
    assert_user_error(guppy("prepare", "--out", data, "--samples", "100"), "already holds a dataset")
    assert {n: os.path.getmtime(os.path.join(data, n)) for n in os.listdir(data)} == before
    assert_user_error(guppy("train", "--data", data, "--out", run, "--preset", "tiny", "--device", "cpu"),
                      "pass --resume")


def test_build_ext_without_cuda_is_a_one_line_error():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the build would run")
    assert_user_error(guppy("build-ext"), "could not build the cuda extension", "--device cpu")


def test_torch_cuda_probe_line_stays_out_of_the_one_line_error(tmp_path):
    """A CUDA build of torch on a machine with a CUDA toolkit and no GPU logs "No CUDA runtime is found, using
    CUDA_HOME=..." when torch.utils.cpp_extension is imported. guppy drops that line, so build-ext's error stays one
    line. CPU twin of that machine: this CPU torch told it was compiled with CUDA, CUDA_HOME set."""
    code = ("import sys, torch; torch.cuda._is_compiled = lambda: True; torch.cuda.is_available = lambda: False; "
            "torch.version.cuda = '12.8'; "
            "from guppy.cli import main; main(['build-ext'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, CUDA_HOME=str(tmp_path)))
    assert_user_error(r, "could not build the cuda extension")


def test_ctrl_c_saves_a_checkpoint_before_exiting(trained, tmp_path):
    """SIGINT mid-run: the trainer saves where it is, prints the command that continues it, and exits 130; that
    command then carries on from that step."""
    import signal
    import time
    _, data, _ = trained
    run = str(tmp_path / "interrupted")
    proc = subprocess.Popen([sys.executable, "-m", "guppy", "train", "--data", data, "--out", run, "--preset",
                             "tiny", "--device", "cpu", "--max-steps", "100000", "--save-every", "100000",
                             "--eval-every", "100000", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(run, "metrics.jsonl")) and time.time() < deadline:
        time.sleep(0.2)  # wait until training is under way
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "saving a checkpoint" in out
    step = json.load(open(os.path.join(run, "latest.json")))["step"]
    assert 0 < step < 100000
    # it says how to go on, and that command, run as printed (a shorter --max-steps added), carries on
    go_on = [ln for ln in out.splitlines() if ln.startswith("to continue: ")]
    assert len(go_on) == 1, out
    command = shlex.split(go_on[0][len("to continue: "):])
    assert command[-8:] == ["train", "--data", data, "--out", run, "--resume", "--device", "cpu"], command
    r = subprocess.run([*command, "--max-steps", str(step + 2), "--quiet"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and f"steps {step} -> {step + 2}" in r.stdout, r.stderr


def test_command_names_known_before_parsing_are_the_parsers():
    """main() names the command before the parser is built (a Ctrl-C there says "guppy chat: interrupted"); that
    list must be the parser's own."""
    import argparse

    from guppy.cli import COMMANDS, build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert tuple(sub.choices) == COMMANDS


# --------------------------------------------------------------------------------------------------------------------
# The first hour of a newcomer (issue 19)
# --------------------------------------------------------------------------------------------------------------------
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACTIVATE_LINE = "to use guppy in this shell: source .venv/bin/activate"


def make(*args, env_extra=None, drop=("VIRTUAL_ENV",), timeout=600):
    """make in the repository, as a newcomer's shell runs it (no make flags inherited from a `make test` above)."""
    if shutil.which("make") is None:
        pytest.skip("no make here")
    env = {k: v for k, v in os.environ.items() if k not in (*drop, "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**env, **(env_extra or {})})


def test_make_demo_ends_with_the_line_that_puts_guppy_on_path():
    """Without an active venv, `make demo` installs into .venv, which is not on PATH: its last command prints the
    line that activates it (and that line works: guppy runs after it). With a venv active, nothing is printed."""
    r = make("-n", "demo")
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    shown = subprocess.run(["sh", "-c", last], capture_output=True, text=True, timeout=60)
    assert shown.stdout == ACTIVATE_LINE + "\n", (last, shown)
    active = make("-n", "demo", drop=(), env_extra={"VIRTUAL_ENV": os.path.join(REPO, ".venv")})
    assert active.returncode == 0 and ACTIVATE_LINE not in active.stdout, active.stdout
    if not os.path.isfile(os.path.join(REPO, ".venv", "bin", "activate")) or shutil.which("bash") is None:
        pytest.skip("no .venv here to activate (make creates it; CI has it), or no bash")
    venv_bin = os.path.join(REPO, ".venv", "bin")
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if os.path.realpath(p) != os.path.realpath(venv_bin))
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    r = subprocess.run(["bash", "-c", f"{ACTIVATE_LINE.split(': ', 1)[1]} && command -v guppy && guppy --help"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env={**env, "PATH": path})
    found = r.stdout.splitlines()[0] if r.stdout else ""
    assert r.returncode == 0 and os.path.realpath(os.path.dirname(found)) == os.path.realpath(venv_bin), \
        (r.stdout[-500:], r.stderr[-500:])


def stopped_run(data, run, steps=8, stop_at=4):
    """A tiny run of `steps` steps, stopped at `stop_at` (as --stop-at-step or a Ctrl-C leaves it)."""
    from guppy.config import preset
    from guppy.train import train
    model_cfg, cfg = preset("tiny")
    cfg.max_steps, cfg.eval_every, cfg.save_every = steps, 2, 2
    train(data, run, model_cfg, cfg, device="cpu", stop_at_step=stop_at, progress=False, log=lambda *_: None,
          preset="tiny")
    return run


def test_make_demo_resumes_an_interrupted_run_and_keeps_a_finished_one(trained, tmp_path):
    """`make demo` on a run stopped at step 4 of 8 resumes it to 8, and on a finished run only chats: its training
    step, run here without the install (make -o install) on a tiny run."""
    _, data, _ = trained
    run = stopped_run(data, str(tmp_path / "demo"))
    args = ("-s", "-o", "install", "demo-train", f"PY={sys.executable}", f"DATA={data}", f"RUN={run}")
    r = make(*args)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert f"{run}: stopped at step 4 of 8; resuming it" in r.stdout and "steps 4 -> 8" in r.stdout, r.stdout
    assert json.load(open(os.path.join(run, "latest.json")))["step"] == 8
    before = os.path.getmtime(os.path.join(run, "latest.json"))
    r = make(*args)
    assert r.returncode == 0 and f"{run} already trained (finished at step 8 of 8)" in r.stdout, r.stdout
    assert "training" not in r.stdout and os.path.getmtime(os.path.join(run, "latest.json")) == before


def test_train_without_a_preset_on_a_cpu_trains_cpu_demo_and_says_so(trained, tmp_path):
    _, data, _ = trained
    run = str(tmp_path / "run")
    r = guppy("train", "--data", data, "--out", run, "--device", "cpu", "--max-steps", "2", "--eval-batches", "1",
              "--quiet")
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("no --preset given: training cpu-demo") and "--preset guppy-9m" in first, r.stdout
    latest = json.load(open(os.path.join(run, "latest.json")))["checkpoint"]
    state = json.load(open(os.path.join(run, latest, "state.json")))
    assert state["run"]["preset"] == "cpu-demo" and state["train_config"]["batch_mode"] == "packed"


@pytest.mark.parametrize("argv, resolved, expected", [
    ([], "cuda", "guppy-9m"),                            # a GPU keeps GuppyLM's recipe as the default
    (["--preset", "guppy-9m"], "cpu", "guppy-9m"),       # an explicit preset runs on a CPU too
    (["--preset", "tiny"], "cpu", "tiny"),
])
def test_a_gpu_and_an_explicit_preset_keep_their_preset(tmp_path, monkeypatch, capsys, argv, resolved, expected):
    import torch

    import guppy.train
    from guppy import cli
    called = {}
    monkeypatch.setattr(guppy.train, "resolve_device", lambda name="auto": torch.device(resolved))
    monkeypatch.setattr(guppy.train, "train", lambda *a, **kw: called.update(kw, model_cfg=a[2]))
    cli.main(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"), *argv])
    assert called["preset"] == expected and "no --preset" not in capsys.readouterr().out


def test_chat_and_eval_on_an_unfinished_run_say_which_step_they_loaded(trained, tmp_path):
    from guppy.runlock import RunLock
    _, data, finished = trained
    run = stopped_run(data, str(tmp_path / "run"))

    def note(*args):
        r = guppy(*args)
        assert r.returncode == 0, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) <= 1, r.stderr
        return lines[0] if lines else ""

    chat = ("chat", "--checkpoint", run, "--prompt", "hi", "--max-new-tokens", "2")
    line = note(*chat)
    assert line.startswith(f"note: chatting with step 4 of {run}, a run that is not finished (stopped at step 4 of 8;")
    assert f"--out {run} --resume" in line, line
    line = note("eval", "--checkpoint", run, "--data", data)
    assert line.startswith(f"note: evaluating step 4 of {run}, a run that is not finished (stopped at step 4 of 8")
    with RunLock(run):  # a training holds it, as `guppy train` does while it runs
        line = note(*chat)
    assert line.startswith(f"note: chatting with step 4 of {run}, a run that is not finished (training now (a "
                           f"training (pid {os.getpid()} on "), line
    assert "saved through step 4 of 8" in line and "--resume" not in line, line
    assert note("chat", "--checkpoint", finished, "--prompt", "hi", "--max-new-tokens", "2") == ""
    ckpt = os.path.join(run, "checkpoints", "step-0000004")  # a checkpoint named directly: the user chose it
    assert note("chat", "--checkpoint", ckpt, "--prompt", "hi", "--max-new-tokens", "2") == ""
