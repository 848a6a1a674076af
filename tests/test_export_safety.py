"""guppy export and chat on an export, against issue 21's adversarial review: the real command in a subprocess, as the
corpus (tests/test_bad_inputs.py) runs it: the exit code, no traceback, at most one line on stderr naming the problem,
and the sha256 of every file that existed before a refused command unchanged. Each test is one failure the review
found, and fails on the export of before (guppy/export_folder.py's header has the scheme that fixes them).

One tiny run (tests/tiny_export.py's, with the data fingerprint a trained run records), two more datasets (one with
another tokenizer of the same size, one with a bigger tokenizer) and one export of the run are shared by the module.
The kill -9 cases at the swap itself run the real command with the graph export replaced by a copy of the shared
export's model.onnx (seconds instead of a minute each; everything else is the command's own code).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_bad_inputs import assert_one_line, checksums, edit_json, guppy, refused, sha256  # noqa: E402
from tiny_export import make_run  # noqa: E402

pytest.importorskip("onnxruntime", reason="pip install 'guppy[export]'")
pytest.importorskip("onnxscript", reason="pip install 'guppy[export]'")

from guppy.data import fingerprint, prepare  # noqa: E402
from guppy.export import export  # noqa: E402
from guppy.export_folder import MANIFEST, WORK_PREFIX  # noqa: E402

USER_FILES = {"NOTES.txt": b"my notes\n", ".gitattributes": b"*.onnx filter=lfs diff=lfs merge=lfs -text\n",
              ".git/HEAD": b"ref: refs/heads/main\n", ".git/objects/ab/cdef01": b"\x78\x01blob"}


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("safety"))
    data, run = make_run(root)
    state = os.path.join(run, "checkpoints", "step-0000000", "state.json")
    edit_json(state, lambda s: {**s, "run": {"preset": "tiny", "data": fingerprint(data)}})  # as train records it
    other = os.path.join(root, "other")  # the same persona, another sample: another tokenizer, also of 300 tokens
    prepare(other, samples=600, vocab_size=300, seed=1, log=quiet)
    bigger = os.path.join(root, "bigger")
    prepare(bigger, samples=600, vocab_size=400, seed=2, log=quiet)
    base = os.path.join(root, "base")
    export(run, base, log=quiet)
    return {"root": root, "data": data, "run": run, "other": other, "bigger": bigger, "base": base}


def copy_export(shared, dest, user_files=False) -> str:
    dest = str(dest)
    shutil.copytree(shared["base"], dest)
    if user_files:
        for rel, content in USER_FILES.items():
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            with open(os.path.join(dest, rel), "wb") as f:
                f.write(content)
    return dest


def copy_run(shared, dest) -> str:
    shutil.copytree(shared["run"], str(dest), ignore=shutil.ignore_patterns(".lock"))
    return str(dest)


def manifest(folder) -> dict:
    with open(os.path.join(folder, MANIFEST)) as f:
        return json.load(f)


def assert_complete(folder) -> str:
    """folder is one whole export: every file its manifest lists, with that sha256. -> its id."""
    m = manifest(folder)
    wrong = [rel for rel, h in m["files"].items() if not os.path.isfile(os.path.join(folder, rel))
             or sha256(os.path.join(folder, rel)) != h]
    assert not wrong, f"not the files of export {m['id']}: {wrong}"
    return m["id"]


def assert_user_files(folder):
    for rel, content in USER_FILES.items():
        with open(os.path.join(folder, rel), "rb") as f:
            assert f.read() == content, rel


def leftovers(parent) -> list:
    return sorted(n for n in os.listdir(parent) if n.startswith(WORK_PREFIX))


def wait_for(predicate, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the export ended first: {proc.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --------------------------------------------------------------------------------------------------------------------
# Data loss
# --------------------------------------------------------------------------------------------------------------------
def test_force_into_an_earlier_export_keeps_the_users_other_files(shared, tmp_path):
    out = copy_export(shared, tmp_path / "site", user_files=True)
    (tmp_path / "site" / "README.md").write_text("the user's edit of the card, which --force replaces\n")
    old = manifest(out)["id"]
    r = guppy("export", "--checkpoint", shared["run"], "--out", out, "--force")
    assert_one_line(r, 0)
    assert assert_complete(out) != old
    assert_user_files(out)
    assert "the user's edit" not in (tmp_path / "site" / "README.md").read_text()
    assert leftovers(str(tmp_path)) == []


@pytest.mark.parametrize("what", ["run", "checkpoint", "dataset"])
def test_force_into_a_run_or_a_dataset_is_refused(shared, tmp_path, what):
    """Even with a model.onnx in it (a copy kept beside the run): a model.onnx was all the old check looked for, and
    --force then deleted best.json, latest.json, metrics.jsonl and checkpoints/."""
    run = copy_run(shared, tmp_path / "run")
    data = str(tmp_path / "data")
    shutil.copytree(shared["data"], data, ignore=shutil.ignore_patterns(".lock"))
    target = {"run": run, "checkpoint": os.path.join(run, "checkpoints", "step-0000000"), "dataset": data}[what]
    shutil.copyfile(os.path.join(shared["base"], "model.onnx"), os.path.join(target, "model.onnx"))
    refused(["export", "--checkpoint", shared["run"], "--out", target, "--force"], [str(tmp_path)],
            target, "not an earlier export")
    assert leftovers(os.path.dirname(target)) == []


def test_a_file_written_into_the_folder_during_the_export_is_kept(shared, tmp_path):
    out = copy_export(shared, tmp_path / "site")
    go = tmp_path / "go"  # the quick export holds after its model.onnx until this exists: no race with a fast disk
    proc = subprocess.Popen(quick_export(shared, out, "--force", kill_at="wait-for-" + str(go)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: any(os.path.isdir(tmp_path / n) for n in leftovers(str(tmp_path))), proc)
    (tmp_path / "site" / "written-during.txt").write_bytes(b"mine")   # while the export builds beside the folder
    go.write_bytes(b"")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()
    assert (tmp_path / "site" / "written-during.txt").read_bytes() == b"mine"
    assert_complete(out)
    assert leftovers(str(tmp_path)) == []


def test_a_second_export_into_a_folder_in_use_is_refused(shared, tmp_path):
    from guppy.export_folder import ExportLock

    out = copy_export(shared, tmp_path / "site")
    with ExportLock(os.path.realpath(out), out):  # the lock a running export holds
        line = refused(["export", "--checkpoint", shared["run"], "--out", out, "--force"], [str(tmp_path)],
                       out, "in use by an export")
    assert f"pid {os.getpid()}" in line
    assert leftovers(str(tmp_path)) == []


def test_force_replaces_only_the_files_the_earlier_export_listed(tmp_path):
    """The swap on its own, no model: ort/ held the earlier export's runtime and a file of the user's; the new export
    has no ort/. The runtime goes, the user's file stays, and so does a file written after the links were made."""
    from guppy.export_folder import carry_foreign, export_files, recover, swap_in, write_journal

    def write(folder, files):
        for rel, content in files.items():
            os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
            with open(os.path.join(folder, rel), "w") as f:
                f.write(content)

    target, work = str(tmp_path / "site"), str(tmp_path / (WORK_PREFIX + "test"))
    new = os.path.join(work, "new")
    write(target, {"model.onnx": "old", "ort/ort.wasm.min.js": "runtime", "ort/mine.txt": "mine", "NOTES.txt": "n",
                   ".git/HEAD": "ref", MANIFEST: json.dumps({"id": "old", "files": {
                       "model.onnx": "x", "ort/ort.wasm.min.js": "y"}})})
    write(new, {"model.onnx": "new", MANIFEST: json.dumps({"id": "new", "files": {"model.onnx": "z"}})})
    write_journal(work, target, "new", "building")
    ours = export_files(target)
    assert ours == {"model.onnx", "ort/ort.wasm.min.js", MANIFEST}
    carry_foreign(target, new, ours, target)
    write(target, {"late.txt": "late"})  # after carry_foreign, before the swap
    write_journal(work, target, "new", "swapping")
    swap_in(work, new, target, ours)
    assert recover(work) and not os.path.exists(work)
    got = {os.path.relpath(os.path.join(d, n), target): open(os.path.join(d, n)).read()
           for d, _, names in os.walk(target) for n in names if n != MANIFEST}
    assert got == {"model.onnx": "new", "ort/mine.txt": "mine", "NOTES.txt": "n", ".git/HEAD": "ref",
                   "late.txt": "late"}

    # an export of guppy before the manifest: its files are known by name, and the user's are not among them
    os.remove(os.path.join(target, MANIFEST))
    write(target, {"config.json": "{}", "index.html": "", "README.md": "card"})
    assert export_files(target) == {"model.onnx", "config.json", "index.html", "README.md", MANIFEST}


# The real command with the graph export replaced by a copy of a finished model.onnx (the minute of torch.onnx is not
# what these tests are about), killed (SIGKILL) at a point of the swap, held until a file exists ("wait-for-PATH"),
# or left alone ("none")
QUICK = r"""
import os, shutil, signal, sys, time
import guppy.export as E
import guppy.export_folder as F

model, point = sys.argv[1], sys.argv[2]
E.export_onnx = lambda m, path, log=print: shutil.copyfile(model, path)
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if point == "before-exchange":
    F._exchange = die
elif point == "after-exchange":
    exchange = F._exchange
    F._exchange = lambda a, b: (exchange(a, b), die())
elif point == "during-merge":
    F._merge_back = die
elif point.startswith("wait-for-"):  # not killed: it holds after its model.onnx until the file named exists
    go, copy_model = point[len("wait-for-"):], E.export_onnx
    def copy_then_wait(m, path, log=print):
        copy_model(m, path)
        while not os.path.exists(go):
            time.sleep(0.02)
    E.export_onnx = copy_then_wait
elif point == "between-renames":   # a system without an atomic exchange: the two renames, killed between them
    F._exchange = lambda a, b: False
    rename = os.rename
    os.rename = lambda a, b: (rename(a, b), os.path.basename(b) == "old" and die())
from guppy.cli import main
main(sys.argv[3:])
"""


def quick_export(shared, out, *extra, kill_at="none"):
    return [sys.executable, "-c", QUICK, os.path.join(shared["base"], "model.onnx"), kill_at, "export",
            "--checkpoint", shared["run"], "--out", out, *extra]


def test_kill_9_leaves_the_old_or_the_new_export_and_the_next_export_cleans_up(shared, tmp_path):
    out = copy_export(shared, tmp_path / "site", user_files=True)
    parent = str(tmp_path)
    ids = {manifest(out)["id"]}

    # killed while it builds (from outside, as a user would; held there, so that it cannot finish first): the folder
    # is the old export, untouched
    before = checksums(out)
    never = os.path.join(parent, "never-written")
    proc = subprocess.Popen(quick_export(shared, out, "--force", kill_at="wait-for-" + never),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: any(os.path.isfile(os.path.join(parent, n, "model.fp32.onnx")) for n in leftovers(parent)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checksums(out) == before

    # killed at each step of the swap: the folder is one whole export, old or new, with the user's files
    for point in ("before-exchange", "after-exchange", "during-merge"):
        r = subprocess.run(quick_export(shared, out, "--force", kill_at=point), capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == -signal.SIGKILL, (point, r.stderr)
        got = assert_complete(out)
        if point == "before-exchange":  # the swap had not begun: still the old export
            assert got in ids
        ids.add(got)
        assert_user_files(out)
    # where the system cannot exchange: killed between the two renames, the folder's name is missing for a moment;
    # both whole folders are in the work folder, and the next export puts the new one in place
    r = subprocess.run(quick_export(shared, out, "--force", kill_at="between-renames"), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not os.path.exists(out) and leftovers(parent)

    r = subprocess.run(quick_export(shared, out, "--force"), capture_output=True, text=True, timeout=600)
    assert_one_line(r, 0)
    assert assert_complete(out) not in ids
    assert_user_files(out)
    assert leftovers(parent) == []  # every work folder, and the lock files, gone


# --------------------------------------------------------------------------------------------------------------------
# Wrong results without a word
# --------------------------------------------------------------------------------------------------------------------
def test_onnx_chat_refuses_a_tokenizer_from_another_dataset_of_the_same_size(shared, tmp_path):
    out = copy_export(shared, tmp_path / "site")
    with open(os.path.join(shared["other"], "meta.json")) as f:
        assert json.load(f)["vocab_size"] == 300
    shutil.copyfile(os.path.join(shared["other"], "tokenizer.json"), os.path.join(out, "tokenizer.json"))
    refused(["chat", "--checkpoint", out, "--prompt", "hi"], [str(tmp_path)], "tokenizer.json",
            "not the tokenizer")


def test_export_refuses_a_tokenizer_the_run_was_not_trained_with(shared, tmp_path):
    run = copy_run(shared, tmp_path / "run")
    shutil.copyfile(os.path.join(shared["other"], "tokenizer.json"), os.path.join(run, "tokenizer.json"))
    refused(["export", "--checkpoint", run, "--out", str(tmp_path / "site")], [str(tmp_path)], "not the tokenizer")
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_export_refuses_an_invalid_tokenizer_before_writing_anything(shared, tmp_path):
    run = copy_run(shared, tmp_path / "run")
    with open(os.path.join(run, "tokenizer.json"), "w") as f:
        f.write('{"model": {"type": "BPE"')
    refused(["export", "--checkpoint", run, "--out", str(tmp_path / "site")], [str(tmp_path)], "tokenizer.json",
            "not a tokenizer")
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_onnx_chat_refuses_a_folder_that_mixes_two_exports(shared, tmp_path):
    """What a kill -9 left before the swap was atomic: the new model.onnx with the old config.json (vocab 4096)."""
    out = copy_export(shared, tmp_path / "site")
    edit_json(os.path.join(out, "config.json"), lambda c: {**c, "vocab_size": 4096})
    refused(["chat", "--checkpoint", out, "--prompt", "hi"], [str(tmp_path)], "config.json", "mixes two exports")


# --------------------------------------------------------------------------------------------------------------------
# Tracebacks instead of one line
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("vocab_size", 2_000_000_000), ("n_layers", 10_000_000)])
def test_a_config_claiming_a_huge_model_is_one_line_at_once(shared, tmp_path, field, value):
    run = copy_run(shared, tmp_path / "run")
    config = os.path.join(run, "checkpoints", "step-0000000", "config.json")
    edit_json(config, lambda c: {**c, field: value})
    t0 = time.monotonic()
    refused(["export", "--checkpoint", run, "--out", str(tmp_path / "site")], [str(tmp_path)], config, field)
    assert time.monotonic() - t0 < 60


def short_run(dest, max_seq_len: int) -> str:
    import torch

    from guppy.checkpoint import save_checkpoint
    from guppy.config import ModelConfig
    from guppy.model import GuppyLM

    cfg = ModelConfig(vocab_size=300, max_seq_len=max_seq_len, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32,
                      dropout=0.0)
    torch.manual_seed(0)
    save_checkpoint(str(dest), 0, GuppyLM(cfg), cfg, pointers=("latest", "best"))
    return str(dest)


@pytest.mark.parametrize("max_seq_len", [1, 2])
def test_a_context_too_short_for_the_exporter_is_one_line(shared, tmp_path, max_seq_len):
    run = short_run(tmp_path / "run", max_seq_len)
    shutil.copyfile(os.path.join(shared["run"], "tokenizer.json"), os.path.join(run, "tokenizer.json"))
    refused(["export", "--checkpoint", run, "--out", str(tmp_path / "site")], [str(tmp_path)], "max_seq_len",
            "at least 3")


def test_a_context_of_4_exports(shared, tmp_path):
    """The exporter's example lengths were 5 and 7: a model with max_seq_len 4 failed an assertion inside torch."""
    import numpy as np

    from guppy.export import empty_past, model_config, run, session

    folder = short_run(tmp_path / "run", 4)
    shutil.copyfile(os.path.join(shared["run"], "tokenizer.json"), os.path.join(folder, "tokenizer.json"))
    export(folder, str(tmp_path / "site"), log=quiet)
    sess = session(str(tmp_path / "site" / "model.onnx"))
    cfg = model_config(sess)
    logits, k, _ = run(sess, np.array([[1, 5, 6, 7]]), empty_past(cfg), empty_past(cfg))
    assert logits.shape == (1, 4, 300) and k.shape[3] == 4


def test_data_made_with_a_bigger_tokenizer_is_one_line(shared, tmp_path):
    out = str(tmp_path / "site")
    refused(["export", "--checkpoint", shared["run"], "--out", out, "--data", shared["bigger"]],
            [shared["root"], str(tmp_path)], "--data", shared["bigger"], "tokenizer")
    assert not os.path.exists(out)


def test_chat_on_a_config_json_that_is_not_json_names_the_file(shared, tmp_path):
    out = copy_export(shared, tmp_path / "site")
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write("{vocab_size: 300")
    refused(["chat", "--checkpoint", out, "--prompt", "hi"], [str(tmp_path)], os.path.join(out, "config.json"),
            "not JSON")


def test_chat_on_a_graph_with_other_inputs_names_the_file(shared, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    out = copy_export(shared, tmp_path / "site")
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    with open(os.path.join(out, "config.json")) as f:  # guppy's metadata, on someone else's graph
        helper.set_model_props(proto, {"guppy_config": f.read()})
    onnx.save_model(proto, os.path.join(out, "model.onnx"))
    refused(["chat", "--checkpoint", out, "--prompt", "hi"], [str(tmp_path)], os.path.join(out, "model.onnx"),
            "not guppy's")


@pytest.mark.parametrize("value", ["{not json", '{"vocab_size": "many"}'])
def test_chat_on_damaged_metadata_names_the_file(shared, tmp_path, value):
    from guppy.export import write_metadata

    out = copy_export(shared, tmp_path / "site")
    write_metadata(os.path.join(out, "model.onnx"), {"guppy_config": value})
    refused(["chat", "--checkpoint", out, "--prompt", "hi"], [str(tmp_path)], os.path.join(out, "model.onnx"),
            "guppy_config")


# --------------------------------------------------------------------------------------------------------------------
# Unclear lines
# --------------------------------------------------------------------------------------------------------------------
def test_export_without_a_tokenizer_says_what_export_takes(shared, tmp_path):
    run = copy_run(shared, tmp_path / "run")
    os.remove(os.path.join(run, "tokenizer.json"))
    line = refused(["export", "--checkpoint", run, "--out", str(tmp_path / "site")], [str(tmp_path)],
                   "no tokenizer.json", "copy")
    assert "--tokenizer" not in line  # export has no such option


def test_a_run_folder_named_like_an_onnx_file_is_a_run(shared, tmp_path):
    run = copy_run(shared, tmp_path / "fish.onnx")
    r = guppy("chat", "--checkpoint", run, "--prompt", "hi guppy", "--temperature", "0")
    assert_one_line(r, 0)
    assert r.stdout.strip()
