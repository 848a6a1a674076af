"""guppy export: the ONNX graph against the plain model, the ONNX chat against the PyTorch chat, uint8, the folder,
and every bad input as one line. CPU only, well under a minute of compute; it runs under torch 2.11 (the GPU
machine's and Colab's) as under the newest.

The reference for the graph is the plain model run on the whole sequence at once, without a cache: the exported
prefill + one-token decode calls must give the same logits at every position.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_export import PROMPTS, make_run  # noqa: E402

pytest.importorskip("onnxruntime", reason="pip install 'guppy[export]'")
pytest.importorskip("onnxscript", reason="pip install 'guppy[export]'")

from guppy.checkpoint import load_model  # noqa: E402
from guppy.export import INPUTS, OUTPUTS, empty_past, export, heldout_loss, model_config, run, session  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny run, its fp32 export, and its uint8 export scored on the held-out split."""
    root = str(tmp_path_factory.mktemp("export"))
    data, run_dir = make_run(root)
    fp32, uint8 = os.path.join(root, "fp32"), os.path.join(root, "uint8")
    export(run_dir, fp32, log=lambda *a: None)
    report = export(run_dir, uint8, quantize="uint8", data_dir=data, log=lambda *a: None)
    return {"root": root, "data": data, "run": run_dir, "fp32": fp32, "uint8": uint8, "report": report}


# ---------------------------------------------------------------------------------------------------------------
# the graph

def test_prefill_then_decode_equals_the_plain_model_at_every_position(exported):
    model, _ = load_model(exported["run"])
    model.eval()
    sess = session(os.path.join(exported["fp32"], "model.onnx"))
    cfg = model_config(sess)
    torch.manual_seed(1)
    for batch, prompt_len in ((1, 9), (3, 5)):
        idx = torch.randint(3, cfg.vocab_size, (batch, 20))
        with torch.no_grad():
            want, _ = model(idx)                                   # (B, 20, V), no cache
        logits, k, v = run(sess, idx[:, :prompt_len].numpy(), empty_past(cfg, batch), empty_past(cfg, batch))
        got = [logits]
        for t in range(prompt_len, idx.shape[1]):                  # one token per call, cache fed back
            logits, k, v = run(sess, idx[:, t:t + 1].numpy(), k, v)
            got.append(logits)
        got = np.concatenate(got, axis=1)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)
        assert k.shape == (cfg.n_layers, batch, cfg.n_heads, 20, cfg.head_dim) == v.shape


def test_keys_and_values_are_separate_inputs(exported):
    """Swapping past_keys and past_values must change the result (an exporter given one example tensor twice
    wires both inputs to one)."""
    sess = session(os.path.join(exported["fp32"], "model.onnx"))
    cfg = model_config(sess)
    rng = np.random.default_rng(0)
    k, v = (rng.standard_normal((cfg.n_layers, 1, cfg.n_heads, 4, cfg.head_dim)).astype(np.float32) for _ in "kv")
    ids = np.array([[5]])
    a, b = run(sess, ids, k, v)[0], run(sess, ids, v, k)[0]
    assert np.abs(a - b).max() > 1e-3


def test_graph_is_one_file_with_the_documented_interface_and_no_range(exported):
    import onnx

    folder = exported["fp32"]
    assert not [f for f in os.listdir(folder) if f.endswith(".data")]
    proto = onnx.load(os.path.join(folder, "model.onnx"), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert "Range" not in {n.op_type for n in proto.graph.node}
    sess = session(os.path.join(folder, "model.onnx"))
    cfg = model_config(sess)
    ins = {i.name: i.shape for i in sess.get_inputs()}
    outs = {o.name: o.shape for o in sess.get_outputs()}
    assert tuple(ins) == INPUTS and tuple(outs) == OUTPUTS
    assert ins["input_ids"] == ["batch", "seq"]
    assert ins["past_keys"] == [cfg.n_layers, "batch", cfg.n_heads, "past", cfg.head_dim]
    assert outs["logits"] == ["batch", "seq", cfg.vocab_size]


# ---------------------------------------------------------------------------------------------------------------
# chat through onnxruntime

def test_greedy_onnx_chat_equals_pytorch_chat(exported):
    from guppy.chat import Chat
    from guppy.onnx_chat import OnnxChat

    torch_chat = Chat(exported["run"], temperature=0.0)
    for where in (exported["fp32"], os.path.join(exported["fp32"], "model.onnx")):
        onnx_chat = OnnxChat(where, temperature=0.0)
        for prompt in PROMPTS:
            ids, _ = torch_chat.encode_prompt(prompt)
            assert onnx_chat.encode_prompt(prompt)[0] == ids
            want = torch_chat.generate(ids)
            assert len(want) > 5, "the tiny model should say something"
            assert onnx_chat.generate(ids) == want, prompt
            assert onnx_chat.reply(prompt) == torch_chat.reply(prompt)


def test_sampling_with_a_seed_repeats(exported):
    from guppy.onnx_chat import OnnxChat

    a = OnnxChat(exported["fp32"], temperature=0.8, top_k=20, top_p=0.9, seed=3).reply("hi")
    b = OnnxChat(exported["fp32"], temperature=0.8, top_k=20, top_p=0.9, seed=3).reply("hi")
    assert a == b


# ---------------------------------------------------------------------------------------------------------------
# uint8

def test_uint8_is_smaller_and_reports_both_losses(exported):
    import onnx

    r = exported["report"]
    assert r["uint8_bytes"] < 0.5 * r["fp32_bytes"] and r["model_bytes"] == r["uint8_bytes"]
    proto = onnx.load(os.path.join(exported["uint8"], "model.onnx"))
    assert any(t.data_type == onnx.TensorProto.UINT8 for t in proto.graph.initializer)
    # the ONNX scorer against the training code's evaluate() on the same weights
    assert r["fp32_loss"] == pytest.approx(r["torch_loss"], rel=1e-5)
    assert r["uint8_loss"] == pytest.approx(r["fp32_loss"], rel=0.02)
    card = open(os.path.join(exported["uint8"], "README.md")).read()
    assert f"{r['uint8_loss']:.4f}" in card and f"{r['fp32_loss']:.4f}" in card and "uint8" in card


def test_heldout_loss_matches_train_evaluate(exported):
    from guppy.data import eval_batches, load_split
    from guppy.train import evaluate

    model, _ = load_model(exported["run"])
    batches = eval_batches(load_split(exported["data"], "eval"), 7, model.config.max_seq_len)
    want = evaluate(model, batches, torch.device("cpu"))
    sess = session(os.path.join(exported["fp32"], "model.onnx"))
    assert heldout_loss(sess, model_config(sess), exported["data"], batch_size=7) == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the folder

def test_folder_holds_model_tokenizer_persona_card_and_page(exported):
    from guppy.web import ORT_WEB_CDN, ORT_WEB_FILES

    folder, run_dir = exported["fp32"], exported["run"]
    assert sorted(os.listdir(folder)) == [".guppy-export.json", "README.md", "chat.js", "config.json", "index.html",
                                          "model.onnx", "persona.json", "runtime.json", "tokenizer.js",
                                          "tokenizer.json"]
    for name in ("tokenizer.json", "persona.json"):
        assert open(os.path.join(folder, name), "rb").read() == open(os.path.join(run_dir, name), "rb").read()
    persona = json.load(open(os.path.join(folder, "persona.json")))
    assert persona["name"] == "guppy" and persona["lowercase"] is True and len(persona["sample_prompts"]) == 6
    runtime = json.load(open(os.path.join(folder, "runtime.json")))
    assert runtime["base"] == ORT_WEB_CDN and runtime["files"] == ORT_WEB_FILES
    card = open(os.path.join(folder, "README.md")).read()
    for fact in ("past_keys", "present_values", "input_ids", "parameters", "guppy serve", "lowercased"):
        assert fact in card


def test_force_replaces_an_export_and_leaves_nothing_stale(exported, tmp_path):
    folder = str(tmp_path / "ex")
    fake = tmp_path / "dist"
    fake.mkdir()
    from guppy.web import ORT_WEB_FILES
    for name in ORT_WEB_FILES:
        (fake / name).write_bytes(name.encode())
    export(exported["run"], folder, runtime_dir=str(fake), log=lambda *a: None)
    runtime = json.load(open(os.path.join(folder, "runtime.json")))
    assert runtime["base"] == "ort/" and sorted(os.listdir(os.path.join(folder, "ort"))) == sorted(ORT_WEB_FILES)
    export(exported["run"], folder, force=True, log=lambda *a: None)
    assert not os.path.exists(os.path.join(folder, "ort"))
    assert json.load(open(os.path.join(folder, "runtime.json")))["base"].startswith("https://")


def npm_tarball(path, files: dict, version: str | None = "1.30.0-test"):
    """A .tgz laid out as `npm pack` lays out onnxruntime-web's: package/dist/<file>, package/package.json."""
    import io
    import tarfile

    members = {f"package/dist/{name}": data for name, data in files.items()}
    if version:
        members["package/package.json"] = json.dumps({"name": "onnxruntime-web", "version": version}).encode()
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_runtime_dir_takes_the_npm_pack_tarball_as_it_is(tmp_path):
    from guppy.web import ORT_WEB_FILES, find_runtime, install_page, sri

    files = {name: f"// {name}".encode() for name in ORT_WEB_FILES}
    tgz = npm_tarball(tmp_path / "onnxruntime-web-1.30.0.tgz", files)
    assert find_runtime(tgz) == tgz
    folder = tmp_path / "page"
    folder.mkdir()
    runtime = install_page(str(folder), tgz)
    assert runtime == {"version": "1.30.0-test", "base": "ort/", "files": {n: sri(d) for n, d in files.items()}}
    assert {n: (folder / "ort" / n).read_bytes() for n in ORT_WEB_FILES} == files
    assert json.load(open(folder / "runtime.json")) == runtime


def test_card_counts_the_runs_steps_and_says_which_checkpoint_it_holds(exported, tmp_path):
    """A 1,500-step run whose best eval was at step 1,250: the export holds step 1,250 (best), and the card says
    both, from the checkpoints themselves."""
    import shutil

    from guppy.checkpoint import save_checkpoint
    from guppy.config import TrainConfig
    from guppy.export import model_card

    run_dir = str(tmp_path / "run")
    shutil.copytree(exported["run"], run_dir)
    model, _ = load_model(run_dir)
    recipe = TrainConfig(max_steps=3000, eval_every=250)   # a recipe stopped early: its max_steps is not the count
    save_checkpoint(run_dir, 1250, model, model.config, recipe, extra={"best_eval": 1.25}, pointers=("best",))
    save_checkpoint(run_dir, 1500, model, model.config, recipe, extra={"best_eval": 1.25}, pointers=("latest",))
    model, ckpt = load_model(run_dir)   # what export exports: the run's best
    card = model_card(model, {"name": "crab"}, ckpt, {"model_bytes": 1, "quantize": "none", "license": "mit"})
    assert "1,500 steps" in card and "1,250 steps" not in card and "3,000" not in card
    assert "checkpoint of step 1,250, the best held-out loss of the run" in card
    latest, _ = load_model(run_dir, prefer="latest")
    card = model_card(latest, {"name": "crab"}, os.path.join(run_dir, "checkpoints", "step-0001500"),
                      {"model_bytes": 1, "quantize": "none"})
    assert "1,500 steps" in card and "checkpoint of step" not in card


def test_card_has_a_license(exported):
    card = open(os.path.join(exported["fp32"], "README.md")).read()
    header = card.split("---")[1]
    assert "\nlicense: mit\n" in header and "\n## License\n" in card


def test_the_card_links_the_dataset_given_and_a_bad_id_is_one_line(exported, tmp_path):
    from guppy.errors import GuppyError
    from guppy.export import model_card

    model, ckpt = load_model(exported["run"])
    report = {"model_bytes": 1, "quantize": "none", "license": "mit", "dataset": "owner/fish-chats"}
    front = model_card(model, {"name": "crab"}, ckpt, report).split("---\n")[1]
    assert "datasets: [owner/fish-chats]" in front.splitlines(), front
    assert "datasets" not in model_card(model, {"name": "crab"}, ckpt, {**report, "dataset": None})
    with pytest.raises(GuppyError, match="--dataset"):
        export(exported["run"], str(tmp_path / "x"), dataset="fish chats\n---", log=lambda *a: None)
    assert not os.path.exists(tmp_path / "x")


def test_a_license_that_is_not_an_id_is_one_line(exported, tmp_path):
    from guppy.errors import GuppyError

    with pytest.raises(GuppyError, match="--license"):
        export(exported["run"], str(tmp_path / "x"), license="MIT: do what you like\n---", log=lambda *a: None)
    assert not os.path.exists(tmp_path / "x")


def test_the_cards_onnxruntime_snippet_runs_as_written_and_replies_as_guppy(exported):
    """The card's Python block, run as it is in each export folder (onnxruntime, tokenizers, numpy; no guppy), gives
    the reply of guppy's ONNX chat at temperature 0, token for token (the tiny model says a lot: see tiny_export)."""
    import re

    from guppy.onnx_chat import OnnxChat

    for folder in (exported["fp32"], exported["uint8"]):
        card = open(os.path.join(folder, "README.md")).read()
        blocks = re.findall(r"```python\n(.*?)```", card, re.S)
        assert len(blocks) == 1 and len(blocks[0].splitlines()) <= 15
        prompt = json.load(open(os.path.join(folder, "persona.json")))["sample_prompts"][0]
        assert repr(prompt) in blocks[0]
        r = subprocess.run([sys.executable, "-c", blocks[0]], cwd=folder, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        want = OnnxChat(folder, temperature=0.0).reply(prompt)
        assert len(want) > 10 and r.stdout == want + "\n"


# ---------------------------------------------------------------------------------------------------------------
# from a fresh clone, as the "done when" says: prepare, train --preset tiny, export, chat --temperature 0

def guppy(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "guppy", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_cli_prepare_train_export_chat(tmp_path):
    data, run_dir, out = str(tmp_path / "d"), str(tmp_path / "r"), str(tmp_path / "ex")
    assert guppy("prepare", "--out", data, "--samples", "600", "--vocab-size", "300").returncode == 0
    r = guppy("train", "--data", data, "--out", run_dir, "--preset", "tiny", "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(os.path.join(run_dir, "persona.json"))  # train carries the persona into the run
    r = guppy("export", "--checkpoint", run_dir, "--out", out)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"guppy serve {out}" in r.stdout
    assert "--runtime-dir onnxruntime-web-1.30.0.tgz, from `npm pack onnxruntime-web@1.30.0`" in r.stdout  # offline
    asks = ["--temperature", "0", "--prompt", "hi guppy", "--prompt", "What do you EAT?"]
    a, b = guppy("chat", "--checkpoint", run_dir, *asks), guppy("chat", "--checkpoint", out, *asks)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and "guppy> " in a.stdout


# ---------------------------------------------------------------------------------------------------------------
# bad inputs: one line naming the command and the cause, exit 2, no traceback, no file changed

def checksums(root: str) -> dict:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def assert_one_line_error(r, command: str, *fragments):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    # argparse's own errors come after its usage lines; everything else is the one line alone
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(("usage:", " "))]
    assert len(lines) == 1 and lines[0].startswith(f"guppy {command}: error: "), r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def bad(exported):
    """Folders for the bad-input cases, made once: a non-export folder, a file, a damaged model, a runtime-less dir,
    an export without its tokenizer, one with a damaged persona.json, and a stub `onnx` package that fails to import."""
    root = os.path.join(exported["root"], "bad")
    os.makedirs(os.path.join(root, "notes"))
    open(os.path.join(root, "notes", "keep.txt"), "w").write("mine")
    open(os.path.join(root, "file"), "w").write("x")

    def copy_of_export(name, skip=(), replace=None):
        os.makedirs(os.path.join(root, name))
        for f in ("model.onnx", "tokenizer.json", "persona.json", "index.html"):
            if f not in skip:
                content = (replace or {}).get(f) or open(os.path.join(exported["fp32"], f), "rb").read()
                open(os.path.join(root, name, f), "wb").write(content)

    copy_of_export("damaged", replace={"model.onnx": b"not a model"})
    copy_of_export("no-tokenizer", skip=("tokenizer.json",))
    copy_of_export("bad-persona", replace={"persona.json": b"{not json"})
    from guppy.web import ORT_WEB_FILES
    whole = open(npm_tarball(os.path.join(root, "whole.tgz"), {n: os.urandom(50_000) for n in ORT_WEB_FILES}),
                 "rb").read()
    open(os.path.join(root, "cut.tgz"), "wb").write(whole[:len(whole) // 2])        # a download cut short
    npm_tarball(os.path.join(root, "other.tgz"), {"ort.wasm.min.js": b"//"})          # another package
    os.makedirs(os.path.join(root, "stub", "onnx"))
    open(os.path.join(root, "stub", "onnx", "__init__.py"), "w").write("raise ImportError('no onnx here')\n")
    return root


def test_bad_inputs_are_one_line_errors(exported, bad):
    run_dir, fp32 = exported["run"], exported["fp32"]
    missing = os.path.join(bad, "missing")
    cases = [
        (["export", "--checkpoint", missing, "--out", missing + "-x"], "export", [missing]),
        (["export", "--checkpoint", run_dir, "--out", os.path.join(bad, "file")], "export", ["not a folder"]),
        (["export", "--checkpoint", run_dir, "--out", os.path.join(bad, "notes")], "export", ["not an earlier export"]),
        (["export", "--checkpoint", run_dir, "--out", fp32], "export", ["--force"]),
        (["export", "--checkpoint", run_dir, "--out", fp32, "--force", "--persona", missing], "export", [missing]),
        (["export", "--checkpoint", run_dir, "--out", missing, "--quantize", "int4"], "export", ["--quantize"]),
        (["export", "--checkpoint", run_dir, "--out", missing, "--runtime-dir", missing], "export", ["--runtime-dir"]),
        (["export", "--checkpoint", run_dir, "--out", missing, "--runtime-dir", os.path.join(bad, "notes")], "export",
         ["not an onnxruntime-web distribution"]),
        (["export", "--checkpoint", run_dir, "--out", missing, "--runtime-dir", os.path.join(bad, "cut.tgz")],
         "export", ["cut.tgz", "not a readable .tgz"]),
        (["export", "--checkpoint", run_dir, "--out", missing, "--runtime-dir", os.path.join(bad, "other.tgz")],
         "export", ["other.tgz", "not onnxruntime-web's npm package"]),
        (["export", "--checkpoint", run_dir, "--out", missing, "--data", missing], "export", [missing]),
        (["chat", "--checkpoint", os.path.join(bad, "damaged"), "--prompt", "hi"], "chat", ["onnxruntime cannot"]),
        (["chat", "--checkpoint", os.path.join(bad, "damaged", "model.onnx"), "--prompt", "hi"], "chat",
         ["onnxruntime cannot"]),
        (["chat", "--checkpoint", os.path.join(bad, "no-tokenizer"), "--prompt", "hi"], "chat", ["tokenizer.json"]),
        (["chat", "--checkpoint", os.path.join(bad, "bad-persona"), "--prompt", "hi"], "chat", ["persona.json"]),
        (["serve", missing], "serve", [missing]),
        (["serve", os.path.join(bad, "notes")], "serve", ["not an export folder"]),
        (["serve", fp32, "--port", "70000"], "serve", ["--port"]),
        (["serve", fp32, "--port", "http"], "serve", ["--port"]),
        (["train", "--data", exported["data"], "--out", missing, "--device", "mps"], "train", ["mps"]),
    ]
    before = checksums(exported["root"])
    # all at once: each is mostly interpreter start-up, which a machine with cores to spare runs side by side
    procs = [subprocess.Popen([sys.executable, "-m", "guppy", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for args, _, _ in cases]
    for proc, (args, command, fragments) in zip(procs, cases):
        out, err = proc.communicate(timeout=600)
        assert_one_line_error(subprocess.CompletedProcess(args, proc.returncode, out, err), command, *fragments)
    assert checksums(exported["root"]) == before
    assert not os.path.exists(missing) and not os.path.exists(missing + "-x")


def test_missing_export_extras_say_how_to_install(exported, bad, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.join(bad, "stub") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = guppy("export", "--checkpoint", exported["run"], "--out", str(tmp_path / "x"), env=env)
    assert_one_line_error(r, "export", "onnx", "pip install 'guppy[export]'")
    assert not os.path.exists(tmp_path / "x")


def test_serve_on_a_port_in_use_is_one_line(exported):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = str(s.getsockname()[1])
        assert_one_line_error(guppy("serve", exported["fp32"], "--port", port), "serve", "--port", port)
