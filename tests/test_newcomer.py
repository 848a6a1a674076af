"""A newcomer's first hour, as the README tells it, run whole: `make demo` with no virtual environment active, then a
character of their own from the starter (validated, prepared, trained briefly, chatted with, exported).

CI runs this in its fresh clone of main, where `.venv` is the one `make` made; the data and runs go to a temporary
folder, so nothing of the checkout is touched. `make demo` trains the cpu-demo preset for real (~2 minutes on 2 cores):
the point is the path a person takes, not a shortcut of it.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(ROOT, ".venv", "bin")


def newcomer_env():
    """The environment of a shell where nothing was activated: no VIRTUAL_ENV, .venv/bin not on PATH."""
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if os.path.realpath(p) != os.path.realpath(VENV_BIN))
    return {**{k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}, "PATH": path}


@pytest.mark.skipif(not os.path.isfile(os.path.join(VENV_BIN, "python")),
                    reason="make demo uses .venv (CI and `make test` create it); run `make test` once first")
def test_make_demo_trains_chats_and_says_how_to_use_guppy_next(tmp_path):
    data, run = tmp_path / "data", tmp_path / "demo"
    r = subprocess.run(["make", "-s", "demo", f"DATA={data}", f"RUN={run}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=1200, env=newcomer_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "no --preset given: training cpu-demo" in out and "done: step 1500" in out, out[-3000:]
    asked = [line for line in out.splitlines() if line.startswith("you> ")]
    replies = [line for line in out.splitlines() if line.startswith("guppy> ") and line.strip() != "guppy>"]
    assert len(asked) == 4 and len(replies) == 4, out[-2000:]  # the Makefile's four prompts, each answered
    assert out.strip().splitlines()[-1] == "to use guppy in this shell: source .venv/bin/activate", out[-500:]


def test_a_character_of_your_own_from_the_starter_to_an_export(tmp_path):
    """The README's "Make your own character" commands, with a brief training (the tiny preset) instead of cpu-demo's
    minutes: each step exits 0 and leaves what the next one needs."""
    def guppy(*args, timeout=600):
        r = subprocess.run([sys.executable, "-m", "guppy", *args], cwd=tmp_path, capture_output=True, text=True,
                           timeout=timeout)
        assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-2000:])
        return r

    def persona(*args):
        r = subprocess.run([sys.executable, "-m", "guppy.persona", *args], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-2000:])
        return r

    persona("--starter", "crab", "crab.toml")
    report = persona("crab.toml").stdout
    assert "distinct conversations" in report and "warning" not in report, report
    guppy("prepare", "--out", "data/crab", "--persona", "crab.toml", "--samples", "3000")
    guppy("train", "--data", "data/crab", "--out", "runs/crab", "--preset", "tiny", "--device", "cpu", "--quiet")
    reply = guppy("chat", "--checkpoint", "runs/crab", "--prompt", "hi crab", "--seed", "0").stdout
    assert reply.strip(), reply
    guppy("export", "--checkpoint", "runs/crab", "--out", "crab-web")
    assert (tmp_path / "crab-web" / "model.onnx").is_file() and (tmp_path / "crab-web" / "index.html").is_file()
