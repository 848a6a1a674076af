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
    assert "crab: 7 topics" in r.stdout and "->  crab:" in r.stdout    # checked, with samples, before training
    assert "held-out loss" in r.stdout                                   # the eval losses after training
    assert r.stdout.count("crab> ") == 3                                 # the chat cell
    assert "uint8" in r.stdout and os.path.isfile(work / "export" / "model.onnx")
    assert os.path.isfile(work / "crab-export.zip")


def run_cells(cells: list[str], work, tmp_path, name: str) -> str:
    """Execute cells as one script, smoke-sized, in the work folder `work` -> its stdout (it must succeed)."""
    script = tmp_path / f"{name}.py"
    script.write_text("\n\n".join(cells) + '\n\nprint("RUN=" + RUN)\n')
    env = dict(os.environ, GUPPY_NOTEBOOK_SMOKE="1", GUPPY_NOTEBOOK_WORK=str(work))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, str(script)], cwd=os.path.join(ROOT, "notebooks"), env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_an_edited_character_gets_new_data_and_a_new_run_and_the_same_one_resumes(tmp_path):
    """Up to training, three times in one work folder: the character, then an edit of it (new data: a new run, not
    a resume of the old one), then the edit again (its own run resumes)."""
    import json

    from guppy.persona import default_persona_path
    cells = code_cells()
    train = next(i for i, c in enumerate(cells) if "guppy train" in c or "train --data" in c)
    first, character = cells[:train + 1], next(i for i, c in enumerate(cells) if "CHARACTER = " in c)
    before = 'description = "a grumpy hermit crab in a rock pool, always looking for a bigger shell"'
    assert 'default_persona_path("crab")' in first[character]
    edited = list(first)
    loaded = 'CHARACTER = open(default_persona_path("crab"), encoding="utf-8").read()\n'
    edit = ("CHARACTER = CHARACTER.replace('" + before + "', 'description = \"a cheerful crab who loves its shell\"')"
            ".replace('\"hmph. hello, {you}. {tag}\"', '\"oh hello! what a lovely day. {tag}\"')\n")
    edited[character] = first[character].replace(loaded, loaded + edit)
    assert edited[character].count("cheerful") == 1 and "lovely day" in edited[character]
    assert before in open(default_persona_path("crab"), encoding="utf-8").read()
    work = tmp_path / "work"

    def run_of(out: str) -> str:
        return out.strip().splitlines()[-1].removeprefix("RUN=")

    out1 = run_cells(first, work, tmp_path, "first")
    out2 = run_cells(edited, work, tmp_path, "edited")
    assert "resuming" not in out2, out2[-2000:]
    run1, run2 = run_of(out1), run_of(out2)
    assert run1 != run2 and os.path.isdir(run1)   # the old run is kept
    persona = json.load(open(os.path.join(run2, "persona.json")))
    assert persona["description"] == "a cheerful crab who loves its shell"
    assert "the character changed since" in out2

    out3 = run_cells(edited, work, tmp_path, "again")
    assert f"{run2} holds a run of this character: resuming it" in out3 and run_of(out3) == run2
