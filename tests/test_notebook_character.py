"""notebooks/train-your-character.ipynb runs top to bottom on the CPU, smoke-sized, as CI runs the benchmark
notebook (tests/test_notebook.py): its code cells, in order, in one fresh interpreter."""
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import notebook_cells  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "train-your-character.ipynb")


def code_cells() -> list[str]:
    return notebook_cells.code_cells(NOTEBOOK)


def test_notebook_starts_with_the_repository_form_field():
    first = code_cells()[0]
    assert first.lstrip().startswith("#@title") and 'GUPPY_REPO = ""  #@param {type:"string"}' in first
    assert "KEEP_ON_DRIVE" in first


def test_notebook_outside_a_clone_with_no_url_stops_with_one_line(tmp_path):
    cells = code_cells()
    env = {k: v for k, v in os.environ.items() if k not in ("GUPPY_REPO", "GUPPY_NOTEBOOK_SMOKE")}
    r = subprocess.run([sys.executable, "-c", cells[0] + "\n" + cells[1]], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "GUPPY_REPO is empty: paste your guppy repository's URL into the form at the top "
        "(e.g. https://github.com/you/guppy), then Runtime -> Run all"]


def test_notebook_runs_top_to_bottom(tmp_path):
    script = tmp_path / "notebook.py"
    script.write_text("\n\n".join(code_cells()))
    work = tmp_path / "work"
    env = dict(os.environ, GUPPY_NOTEBOOK_SMOKE="1", GUPPY_NOTEBOOK_WORK=str(work))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, str(script)], cwd=os.path.join(ROOT, "notebooks"), env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "crab: 4 topics" in r.stdout and "->  crab:" in r.stdout    # checked, with samples, before training
    assert "held-out loss" in r.stdout                                   # the eval losses after training
    assert r.stdout.count("crab> ") == 3                                 # the chat cell
    assert "uint8" in r.stdout and os.path.isfile(work / "export" / "model.onnx")
    assert os.path.isfile(work / "crab-export.zip")
