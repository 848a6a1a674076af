"""The code cells of a committed notebook, checked to run as plain Python (tests/test_notebook*.py)."""
import json


def code_cells(path: str) -> list[str]:
    """Each code cell's source, in order. The notebook is committed without outputs, and shell commands go through
    its own sh() helper rather than IPython magics, so the cells run in one plain interpreter as a kernel would."""
    with open(path) as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4 and nb["cells"]
    cells = []
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code")
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "commit the notebook without outputs"
            src = "".join(cell["source"])
            assert not any(line.lstrip().startswith(("!", "%")) for line in src.splitlines()), \
                "use sh() instead of IPython magics, so the notebook runs as plain Python"
            compile(src, f"cell {len(cells)}", "exec")
            cells.append(src)
    return cells
