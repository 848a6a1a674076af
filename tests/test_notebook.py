"""The Colab notebook is executable top to bottom: CI runs its code cells in order on the CPU, smoke-sized.

No Jupyter kernel is needed: the cells are plain Python (shell commands go through its own `sh()` helper), so they are
executed in one fresh interpreter, in order, exactly as a notebook kernel would run them.
"""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from notebook_cells import code_cells  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "benchmark.ipynb")


def test_notebook_is_valid_and_runs_top_to_bottom(tmp_path):
    code = code_cells(NOTEBOOK)
    script = tmp_path / "notebook.py"
    script.write_text("\n\n".join(code))
    # the notebook runs `guppy ...` through the shell, as on Colab where pip puts it on PATH. Here the command lives
    # beside this interpreter (.venv/bin), which is not on PATH when `make test` runs with no virtualenv active.
    env = dict(os.environ, GUPPY_NOTEBOOK_SMOKE="1",
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, str(script)], cwd=os.path.join(ROOT, "notebooks"), env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "guppy 0.1.0" in r.stdout            # guppy info ran
    assert "layer_norm_fwd" in r.stdout         # guppy targets ran
    assert "reference" in r.stdout and "guppy-fast" in r.stdout  # the results table was printed
    for name in ("guppy info", "guppy targets", "bench train", "results tables"):
        assert f"=== {name}: pass" in r.stdout, name
    assert "=== GPU parity tests: skipped (no GPU" in r.stdout
    assert "every stage passed or was skipped" in r.stdout      # the summary
    printed = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [res["benchmark"] for res in printed] == ["time to GuppyLM's held-out loss"]  # the result, as JSON


def _cells(*needles):
    """The code of the notebook's code cells that contain every needle, in order."""
    nb = json.load(open(NOTEBOOK))
    return ["".join(c["source"]) for c in nb["cells"]
            if c["cell_type"] == "code" and all(n in "".join(c["source"]) for n in needles)]


def test_notebook_starts_with_a_repository_form_field():
    nb = json.load(open(NOTEBOOK))
    first_code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    src = "".join(first_code["source"])
    assert '#@param {type:"string"}' in src and src.lstrip().startswith("#@title") and "GUPPY_REPO" in src
    assert "GUPPY_REPO" in "".join(nb["cells"][0]["source"])   # the instructions beside it say what to paste


def test_notebook_outside_a_clone_with_no_url_stops_with_one_line(tmp_path):
    """Colab, the field left empty: one line saying what to do, before anything is installed."""
    code = "\n\n".join(_cells("GUPPY_REPO = ") + _cells("def sh(") + _cells("REPO_DIR ="))
    env = {k: v for k, v in os.environ.items() if k not in ("GUPPY_REPO", "GUPPY_NOTEBOOK_SMOKE")}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "GUPPY_REPO is empty: paste your guppy repository's URL into the form at the top "
        "(e.g. https://github.com/you/guppy), then Runtime -> Run all"]


def test_notebook_helpers_stream_output_and_keep_going_after_a_failed_stage(capsys):
    import time
    ns = {}
    exec(_cells("GUPPY_REPO = ")[0] + "\n" + _cells("def sh(")[0], ns)
    seen = []

    class Clock:  # records when each piece of the command's output reached the notebook
        def write(self, text):
            seen.append((time.monotonic(), text))

        def flush(self):
            pass

    real = sys.stdout
    sys.stdout = Clock()
    try:
        t0 = time.monotonic()
        # the marker is built at run time, so the echoed command line cannot match it
        ns["sh"](f"{sys.executable} -c \"import time; print('fi' + 'rst', flush=True); time.sleep(1.5)\"")
        t_end = time.monotonic()
    finally:
        sys.stdout = real
    first = next(t for t, text in seen if "first" in text and "$ " not in text)
    assert first - t0 < t_end - t0 - 1.0                      # printed while the command still ran

    with ns["stage"]("breaks"):
        ns["sh"]("exit 3")
    with ns["stage"]("still runs"):
        pass
    ns["skip"]("needs a GPU", "no GPU")
    assert ns["STAGES"] == {"breaks": "fail: RuntimeError: `exit 3` exited with 3", "still runs": "pass",
                            "needs a GPU": "skip: no GPU"}
    assert ns["summary"]() == ["breaks"]
    assert "failed: breaks" in capsys.readouterr().out


def test_notebook_gpu_parity_cell_runs_gpu_checks_test_selection(monkeypatch):
    """The GPU branch of the parity cell, with a fake GPU and sh: it runs the command of gpu-check's tests stage
    (bench/gpu_check.py), the selection CI runs with the kernels compiled (tests/test_gpu_check.py)."""
    import shlex
    import tempfile
    from bench import gpu_check
    monkeypatch.setattr(sys, "path", list(sys.path))          # the cell puts the clone on sys.path
    ns = {}
    exec(_cells("GUPPY_REPO = ")[0] + "\n" + _cells("def sh(")[0], ns)
    ran = []
    ns.update(GPU=True, REPO_DIR=ROOT, sh=ran.append)
    exec(_cells("GPU parity tests")[0], ns)
    assert ns["STAGES"] == {"GPU parity tests": "pass"}
    junit = os.path.join(tempfile.gettempdir(), "guppy-gpu-tests.xml")
    assert [shlex.split(cmd) for cmd in ran] == [gpu_check.gpu_tests_command(junit)]
