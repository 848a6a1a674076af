"""The `guppy` command end to end, as a user runs it, and the errors a user can make."""
import os
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
    """SIGINT mid-run: the trainer saves where it is and exits 130; --resume then carries on from that step."""
    import json
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
    r = guppy("train", "--data", data, "--out", run, "--preset", "tiny", "--device", "cpu", "--max-steps",
              str(step + 2), "--resume", "--quiet")
    assert r.returncode == 0 and f"steps {step} -> {step + 2}" in r.stdout, r.stderr


def test_command_names_known_before_parsing_are_the_parsers():
    """main() names the command before the parser is built (a Ctrl-C there says "guppy chat: interrupted"); that
    list must be the parser's own."""
    import argparse

    from guppy.cli import COMMANDS, build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert tuple(sub.choices) == COMMANDS
