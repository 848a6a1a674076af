"""The Colab notebook is executable top to bottom: CI runs its code cells in order on the CPU, smoke-sized.

No Jupyter kernel is needed: the cells are plain Python (shell commands go through its own `sh()` helper), so they are
executed in one fresh interpreter, in order, exactly as a notebook kernel would run them.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "benchmark.ipynb")


def test_notebook_is_valid_and_runs_top_to_bottom(tmp_path):
    nb = json.load(open(NOTEBOOK))
    assert nb["nbformat"] == 4 and nb["cells"]
    code = []
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code")
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "commit the notebook without outputs"
            src = "".join(cell["source"])
            assert not any(line.lstrip().startswith(("!", "%")) for line in src.splitlines()), \
                "use sh() instead of IPython magics, so the notebook runs as plain Python"
            compile(src, f"cell {len(code)}", "exec")
            code.append(src)
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
