"""Export a trained guppy to ONNX, for onnxruntime anywhere and onnxruntime-web in a browser.

    guppy export --checkpoint RUN --out DIR [--quantize none|uint8] [--data DATA] [--runtime-dir TGZ|DIR] [--force]

writes a folder that can be served, zipped, or uploaded to a model hub as it is:

    DIR/model.onnx       the model, one self-contained file (weights inside); uint8 weights with --quantize uint8
    DIR/tokenizer.json   the run's tokenizer (byte-level BPE)
    DIR/persona.json     name, description, lowercase option and sample prompts of the character
    DIR/config.json      the model's shape (guppy's ModelConfig), also stored in model.onnx's metadata
    DIR/README.md        the model card: how to use it (with guppy, and in ~15 lines of plain onnxruntime), where
                         the page can be hosted, architecture, data, training run, eval loss, export figures, license
    DIR/index.html ...   the browser chat page (guppy/web/), and runtime.json: where it gets onnxruntime-web (a CDN,
                         or DIR/ort/ with --runtime-dir, the .tgz of `npm pack onnxruntime-web`: works offline)
    DIR/.guppy-export.json   the manifest: every file above with its sha256, and the run's fingerprint

`--format hf` writes a transformers GPT-2 folder instead (config.json, model.safetensors, tokenizer files with a
chat template, generation_config.json, persona.json, README.md): guppy/hf.py, called from `export()` below, which
keeps the folder handling (checks, manifest, lock, swap) one for both formats.

The fingerprint (manifest and model.onnx metadata `guppy_tokenizer_sha256`, `guppy_fingerprint`): the sha256 of the
tokenizer (the one the run recorded, guppy.data.fingerprint; the export refuses a tokenizer.json that differs from it,
does not load, or has more tokens than the model), the model's shape, and the run's record. `guppy chat` on an export
(guppy/onnx_chat.py) checks tokenizer.json against it and config.json against the metadata's config, as chat on a
run checks the run's record: one line on a mismatch, never replies from a mixed folder.

Before any work, each input is checked and refused in one line: the shape (guppy/config.py's bounds, and what the
exporter can write: max_seq_len >= EXPORT_MIN_SEQ_LEN, the fp32 weights under protobuf's 2 GB), the tokenizer,
--data (its tokenizer must be the model's), --runtime-dir, and --out (below).

The folder (guppy/export_folder.py has the scheme): never deleting what the export did not write. --out is new,
empty, or an earlier export, replaced only with --force and then only the files it wrote; the export is built
beside it under a lock and swapped in whole, so even kill -9 leaves the old export or the new one, never a mix.

The graph (one graph for the prompt and for each new token; a KV cache, so each new token costs one position):

    inputs   input_ids       int64   (batch, seq)                                   the new tokens
             past_keys       float32 (n_layers, batch, n_heads, past, head_dim)     the keys of the tokens before them
             past_values     float32 (n_layers, batch, n_heads, past, head_dim)     their values
    outputs  logits          float32 (batch, seq, vocab)                            next-token logits at each new token
             present_keys    float32 (n_layers, batch, n_heads, past + seq, head_dim)   past_keys and the new keys
             present_values  float32 (n_layers, batch, n_heads, past + seq, head_dim)

A reply is a prefill call on the prompt with past = 0 (empty past tensors), then one call per token with seq = 1,
feeding present_* back as past_*. Token i sits at position past + i; past + seq must stay <= max_seq_len (128 for
guppy-9m). Causal attention is built in, so a batch of prompts right-padded to one length gives exact logits at
every real token (how `heldout_loss` scores a held-out set).

The model is exported on the reference ops (`guppy/ops.py`), so no Triton or CUDA C++ ends up in the graph, and
through `GuppyLM.forward` itself: the only export-specific code is the cache (`_ConcatCache`) and the positions.
Traps of the exporters, handled here:
- torch.onnx's dynamo exporter (the default from torch 2.9; Colab has 2.11) can write the weights to a separate
  `model.onnx.data` file. `_save_single_file` inlines them, so the page and a hub upload get one file.
- `torch.arange` exports as `Range`, on which the quantizer's shape inference gives up. The positions are a cumulative
  sum of ones instead, and `export_onnx` refuses a graph that still holds a Range.
Dependencies: `pip install "guppy[export]"` (onnx, onnxscript, onnxruntime); each is imported only when needed.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import shutil
import tempfile
import warnings

import numpy as np
import torch
import torch.nn as nn

from guppy.errors import GuppyError, one_line
from guppy.export_folder import building, files_written, inspect_target

INPUTS = ("input_ids", "past_keys", "past_values")
OUTPUTS = ("logits", "present_keys", "present_values")
OPSET = 18  # LayerNormalization needs 17; 18 is read by onnxruntime >= 1.14 and onnxruntime-web alike


def require(*modules: str):
    """Import the export extras, or one line saying how to install them."""
    import importlib

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise GuppyError(f"{', '.join(missing)} not installed; pip install 'guppy[export]' "
                         f"(or: pip install onnx onnxscript onnxruntime)")


# --------------------------------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------------------------------
class _ConcatCache:
    """`KVCache`'s interface (append, length) without its preallocated buffers: each layer's keys and values are the
    past ones with the new ones concatenated, kept for the `present_*` outputs. Traceable, with a dynamic past."""

    def __init__(self, past_keys, past_values):
        self.past_keys, self.past_values = past_keys, past_values
        # GuppyLM.forward reads `length` only to check start + seq <= max_seq_len and to make positions, which the
        # decoder passes itself. 0 keeps that check a bound on seq alone, which the exporter can prove from the
        # declared ranges; with the symbolic past length it would be a guard on past + seq that it cannot.
        self.length = 0
        self.keys, self.values = [], []

    def append(self, layer: int, k, v):
        k = torch.cat([self.past_keys[layer], k], dim=2)
        v = torch.cat([self.past_values[layer], v], dim=2)
        self.keys.append(k)
        self.values.append(v)
        return k, v


class OnnxDecoder(nn.Module):
    """(input_ids, past_keys, past_values) -> (logits, present_keys, present_values): the exported function."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, past_keys, past_values):
        cache = _ConcatCache(past_keys, past_values)
        # positions past, past+1, ...: a cumulative sum, because arange would export as Range (see the header)
        positions = torch.cumsum(torch.ones_like(input_ids), dim=1) - 1 + past_keys.shape[3]
        logits, _ = self.model(input_ids, positions=positions, cache=cache)
        return logits, torch.stack(cache.keys), torch.stack(cache.values)


def empty_past(config, batch: int = 1) -> np.ndarray:
    """The past_keys / past_values of a prompt: no tokens before it."""
    return np.zeros((config.n_layers, batch, config.n_heads, 0, config.head_dim), dtype=np.float32)


def export_onnx(model, path: str, log=print):
    """Write `model` (a GuppyLM, any ops) as a one-file ONNX graph on the reference ops. Returns the path."""
    require("onnx", "onnxscript")
    import onnx
    from torch.export import Dim

    cfg = model.config
    model = _reference_copy(model)
    decoder = OnnxDecoder(model).eval()
    # Example sizes >= 2: torch.export specialises dimensions of size 0 and 1 to constants, and an example must lie
    # in its declared range (seq <= max_seq_len, past <= max_seq_len - 1): so max_seq_len >= EXPORT_MIN_SEQ_LEN (3),
    # which `export` checks first. Two distinct past tensors: given one tensor twice, the exporter would wire both
    # inputs to one graph input.
    if cfg.max_seq_len < EXPORT_MIN_SEQ_LEN:
        raise GuppyError(f"max_seq_len={cfg.max_seq_len}: the ONNX export needs at least {EXPORT_MIN_SEQ_LEN}")
    ids = torch.full((3, min(5, cfg.max_seq_len)), 3, dtype=torch.long)
    past_k = torch.zeros(cfg.n_layers, 3, cfg.n_heads, min(7, cfg.max_seq_len - 1), cfg.head_dim)
    past_v = torch.zeros_like(past_k)
    batch, seq = Dim("batch", min=1, max=1024), Dim("seq", min=1, max=cfg.max_seq_len)
    past_len = Dim("past", min=0, max=cfg.max_seq_len - 1)
    dims = {"input_ids": {0: batch, 1: seq}, "past_keys": {1: batch, 3: past_len},
            "past_values": {1: batch, 3: past_len}}
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(decoder, (ids, past_k, past_v), dynamo=True, input_names=list(INPUTS),
                                    output_names=list(OUTPUTS), dynamic_shapes=dims, opset_version=OPSET,
                                    verbose=False)
    _save_single_file(program, path)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    if "Range" in ops:  # a torch that traced arange anyway: the quantizer would fail on it later, less clearly
        raise GuppyError(f"{path}: the exported graph holds a Range op, which onnxruntime's quantizer cannot "
                         f"shape-infer (torch {torch.__version__}); please report this")
    return path


@contextlib.contextmanager
def _quiet():
    """The exporter's warnings and log lines (deprecations inside torch, "torchvision is not installed", axis
    renames) are about torch, not about this model: keep them off the user's terminal."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _reference_copy(model):
    """The same weights in a fresh GuppyLM on the reference ops, in eval mode on the CPU (no kernels in the graph)."""
    from guppy.config import ModelConfig
    from guppy.model import GuppyLM

    cfg = ModelConfig.from_dict({**model.config.to_dict(), "ops": "reference"})
    ref = GuppyLM(cfg)
    ref.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    return ref.eval()


def _save_single_file(program, path: str):
    """Save an ONNXProgram as one file. Older and newer torch.onnx differ in whether `save` writes the weights
    beside the graph (`model.onnx.data`); whatever it wrote, the result is reloaded and saved with the weights
    inside. The ONNX protobuf limit is 2 GB; guppy-9m is 35 MB."""
    import onnx

    folder = tempfile.mkdtemp(prefix=".guppy-onnx-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        tmp = os.path.join(folder, "model.onnx")
        try:
            program.save(tmp, external_data=False)
        except TypeError:  # a torch.onnx whose save() has no external_data option
            program.save(tmp)
        proto = onnx.load(tmp, load_external_data=True)
        onnx.save_model(proto, path, save_as_external_data=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def quantize_uint8(src: str, dst: str):
    """onnxruntime's dynamic quantization: MatMul and Gather weights (the embedding, tied to the LM head) stored as
    uint8 with a scale and zero point; activations are quantized on the fly, per call."""
    require("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" advice is for conv nets; the graph is already lean
    try:
        quantize_dynamic(src, dst, weight_type=QuantType.QUInt8)
    finally:
        root.setLevel(level)
    return dst


# --------------------------------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------------------------------
def session(path: str):
    """An onnxruntime CPU session of an exported model, with its config read from the graph's metadata."""
    require("onnxruntime")
    import onnxruntime as ort

    if not os.path.isfile(path):
        raise GuppyError(f"{path}: no such ONNX model")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep, not spin
    try:
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types for a damaged file
        raise GuppyError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None


def model_config(sess, path: str = "this ONNX model"):
    """The ModelConfig stored in the graph's metadata by `write_metadata`; `path` names the file in the one line
    that says it is missing or damaged."""
    from guppy.config import ModelConfig

    meta = sess.get_modelmeta().custom_metadata_map
    if "guppy_config" not in meta:
        raise GuppyError(f"{path}: not exported by guppy (no guppy_config in its metadata)")
    try:
        return ModelConfig.from_dict(json.loads(meta["guppy_config"]))
    except (ValueError, GuppyError) as e:  # not JSON, or not a config guppy can build
        raise GuppyError(f"{path}: its guppy_config metadata is damaged ({one_line(e)[:160]}); export it "
                         "again") from None


def check_graph(sess, config, path: str):
    """The graph is guppy's: these inputs and outputs (INPUTS, OUTPUTS), with the cache and logits shapes that the
    config in its metadata gives. One line naming the file otherwise (a graph from elsewhere, or metadata copied
    from another export)."""
    ins = {i.name: i.shape for i in sess.get_inputs()}
    outs = {o.name: o.shape for o in sess.get_outputs()}
    if set(ins) != set(INPUTS) or set(outs) != set(OUTPUTS):
        raise GuppyError(f"{path}: its graph takes ({', '.join(ins)}) and gives ({', '.join(outs)}), not guppy's "
                         f"({', '.join(INPUTS)}) -> ({', '.join(OUTPUTS)}); export it again")
    cache = (config.n_layers, None, config.n_heads, None, config.head_dim)
    for name, dims in (("past_keys", cache), ("past_values", cache), ("logits", (None, None, config.vocab_size))):
        shape = {**ins, **outs}[name]
        if len(shape) != len(dims) or any(isinstance(s, int) and d is not None and s != d
                                          for s, d in zip(shape, dims)):
            want = ", ".join("?" if d is None else str(d) for d in dims)
            raise GuppyError(f"{path}: its {name} has shape {list(shape)}, but its guppy_config says ({want}): the "
                             "metadata is not this graph's; export it again")


def write_metadata(path: str, entries: dict):
    """Store key -> JSON-able value in the ONNX file's metadata_props (read back by `model_config`)."""
    import onnx

    proto = onnx.load(path)
    for key, value in entries.items():
        prop = next((p for p in proto.metadata_props if p.key == key), None) or proto.metadata_props.add()
        prop.key, prop.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save_model(proto, path, save_as_external_data=False)


def run(sess, input_ids: np.ndarray, past_keys: np.ndarray, past_values: np.ndarray):
    """One call of the graph -> (logits, present_keys, present_values) as numpy arrays."""
    return sess.run(list(OUTPUTS), {"input_ids": input_ids.astype(np.int64), "past_keys": past_keys,
                                    "past_values": past_values})


def heldout_loss(sess, config, data_dir: str, batch_size: int = 32, max_batches: int = 0) -> float:
    """Mean loss per target token over the held-out split, as `guppy.train.evaluate` computes it for PyTorch:
    the same pad batches, the same targets, summed in float64."""
    from guppy.data import IGNORE, eval_batches, load_split

    total, count = 0.0, 0
    for b in eval_batches(load_split(data_dir, "eval"), batch_size, config.max_seq_len, max_batches):
        idx, targets = b.idx.numpy(), b.targets.numpy()
        logits, _, _ = run(sess, idx, empty_past(config, len(idx)), empty_past(config, len(idx)))
        logits = logits.astype(np.float64)
        keep = targets != IGNORE
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        picked = np.take_along_axis(logits, np.where(keep, targets, 0)[..., None], -1)[..., 0]
        total += float(((lse - picked) * keep).sum())
        count += int(keep.sum())
    return total / max(1, count)


# --------------------------------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------------------------------
EXPORT_MIN_SEQ_LEN = 3            # export_onnx: example lengths >= 2 for seq and for past, and past < max_seq_len
ONNX_LIMIT_BYTES = 2 ** 31        # protobuf's limit on one file, which holds all the fp32 weights
HUB_ID = r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*"  # a Hugging Face repository id, OWNER/NAME


def export(checkpoint: str, out_dir: str, quantize: str = "none", data_dir: str | None = None,
           runtime_dir: str | None = None, persona_path: str | None = None, force: bool = False, log=print,
           license: str = "mit", format: str = "onnx", dataset: str | None = None) -> dict:
    """Write the export folder (see the module header). Returns what the model card reports. `license`: the card's
    (a Hugging Face license id); `dataset`: the hub id of the data it was trained on, for the card's `datasets:`.
    format="hf": a transformers GPT-2 folder instead (guppy/hf.py), same folder rules.
    Everything that can be checked is checked before the first file is written; the folder is then built beside
    --out and swapped in (guppy/export_folder.py's `building`)."""
    from guppy.chat import find_beside
    from guppy.checkpoint import load_model, read_run_record, resolve_checkpoint

    if format not in ("onnx", "hf"):
        raise GuppyError(f"--format must be onnx or hf, got {format!r}")
    if format == "hf":
        from guppy.hf import require_transformers
        require_transformers()
        for option, given in (("--quantize", quantize != "none"), ("--runtime-dir", runtime_dir), ("--data", data_dir)):
            if given:  # they act on the ONNX files and the page, which an hf folder does not have
                raise GuppyError(f"{option}: only for --format onnx")
    else:
        require("onnx", "onnxscript", "onnxruntime")
    if quantize not in ("none", "uint8"):
        raise GuppyError(f"--quantize must be none or uint8, got {quantize!r}")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license):
        raise GuppyError(f"--license {license!r}: expected a license id such as mit, apache-2.0 or cc-by-4.0")
    if dataset is not None and not re.fullmatch(HUB_ID, dataset):
        raise GuppyError(f"--dataset {dataset!r}: expected a Hugging Face dataset id, OWNER/NAME")
    writes = files_written(format, runtime_dir)
    inspect_target(out_dir, force, writes)  # again in building(), under the lock
    if runtime_dir is not None:  # the inputs are checked before the minute of exporting, not after
        from guppy.web import find_runtime
        find_runtime(runtime_dir)
    ckpt = resolve_checkpoint(checkpoint)
    stored = _stored_config(ckpt)
    if stored:  # the shape a checkpoint declares, checked before its weights are read (a vocab of 2e9 is one line)
        _check_shape(*stored, format)
        tokenizer, tokenizer_sha = _export_tokenizer(checkpoint, ckpt, stored[0].vocab_size, find_beside)
        if data_dir is not None:
            _check_data(data_dir, tokenizer_sha, stored[0].vocab_size)
    card = _persona_card(checkpoint, persona_path, find_beside)
    model, ckpt = load_model(ckpt, ops="reference")
    model.eval()
    if not stored:  # a .pt file's or a transformers folder's shape is known only now
        _check_shape(model.config, ckpt, format)
        tokenizer, tokenizer_sha = _export_tokenizer(checkpoint, ckpt, model.config.vocab_size, find_beside)
        if data_dir is not None:
            _check_data(data_dir, tokenizer_sha, model.config.vocab_size)
    fingerprint = {"tokenizer_sha256": tokenizer_sha, "config": _shape(model.config),
                   "run": read_run_record(ckpt) if os.path.isdir(ckpt) else None}

    with building(out_dir, force, writes, format, ckpt, fingerprint) as (new, work):
        if format == "hf":
            from guppy.hf import write_hf_folder
            report = write_hf_folder(model, tokenizer, card, new, checkpoint=ckpt, license=license, log=log,
                                      dataset=dataset)
        else:
            report = _write_onnx_folder(model, ckpt, card, tokenizer, fingerprint, new, work, quantize, data_dir,
                                        runtime_dir, license, log, dataset)
    if format == "hf":
        log(f"exported to {out_dir}: transformers GPT-2, model.safetensors {_mb(report['model_bytes'])}")
        log(f"chat: guppy chat --checkpoint {out_dir}    transformers: AutoModelForCausalLM.from_pretrained")
    else:
        _log_report(report, out_dir, log)
    return report


def _write_onnx_folder(model, ckpt, card, tokenizer, fingerprint, new, work, quantize, data_dir, runtime_dir,
                       license, log, dataset=None) -> dict:
    """The files of an ONNX export, into the folder `new`; the intermediate files in `work`."""
    from guppy.web import install_page

    fp32 = os.path.join(work, "model.fp32.onnx")
    log(f"exporting {ckpt} to ONNX (opset {OPSET}, torch {torch.__version__})")
    export_onnx(model, fp32)
    final = fp32
    if quantize == "uint8":
        final = quantize_uint8(fp32, os.path.join(work, "model.uint8.onnx"))
    for p in {fp32, final}:
        write_metadata(p, {"guppy_config": model.config.to_dict(), "guppy_persona": card["name"],
                           "guppy_tokenizer_sha256": fingerprint["tokenizer_sha256"],
                           "guppy_fingerprint": fingerprint})
    report = {"checkpoint": os.path.abspath(ckpt), "quantize": quantize, "fp32_bytes": os.path.getsize(fp32),
              "license": license, "dataset": dataset}
    if quantize == "uint8":
        report["uint8_bytes"] = os.path.getsize(final)
    if data_dir is not None:
        report.update(_score(model, fp32, final if quantize == "uint8" else None, data_dir, log))
    os.replace(final, os.path.join(new, "model.onnx"))
    report["model_bytes"] = os.path.getsize(os.path.join(new, "model.onnx"))
    shutil.copyfile(tokenizer, os.path.join(new, "tokenizer.json"))
    with open(os.path.join(new, "persona.json"), "w", encoding="utf-8") as f:
        json.dump(card, f, indent=2, ensure_ascii=False)
    with open(os.path.join(new, "config.json"), "w") as f:  # the page reads the shapes of the cache here
        json.dump(_shape(model.config), f, indent=2)
    report["runtime"] = install_page(new, runtime_dir)
    with open(os.path.join(new, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(model, card, ckpt, report))
    return report


def _shape(cfg) -> dict:
    """config.json of an ONNX export: the ModelConfig without `ops` (which kernels ran, not part of the shape)."""
    return {k: v for k, v in cfg.to_dict().items() if k != "ops"}


# ---- what is checked before any work ---------------------------------------------------------------------------
def _stored_config(ckpt: str):
    """(ModelConfig, config.json) of a guppy checkpoint folder, read without its weights; None for a .pt file or a
    transformers folder, whose shape comes with the weights."""
    from guppy.checkpoint import read_model_config
    from guppy.hf import is_hf_folder

    path = os.path.join(ckpt, "config.json")
    if os.path.isdir(ckpt) and os.path.isfile(path) and not is_hf_folder(ckpt):
        return read_model_config(path), path  # ModelConfig's own bounds (guppy/config.py) apply here
    return None


def _approx_params(cfg) -> int:
    d, f = cfg.d_model, cfg.ffn_hidden
    return (cfg.vocab_size + cfg.max_seq_len) * d + cfg.n_layers * (4 * d * d + 2 * d * f + 9 * d + f) + 2 * d


def _check_shape(cfg, where: str, format: str):
    """What the ONNX exporter can write, on top of ModelConfig's own bounds."""
    if format != "onnx":
        return
    if cfg.max_seq_len < EXPORT_MIN_SEQ_LEN:
        raise GuppyError(f"{where}: max_seq_len={cfg.max_seq_len}: the ONNX export needs at least "
                         f"{EXPORT_MIN_SEQ_LEN} (torch.export fixes a dimension whose example is 0 or 1, and the "
                         "cache's length must be free to range over 0 .. max_seq_len - 1)")
    n = _approx_params(cfg)
    if 4 * n >= ONNX_LIMIT_BYTES:
        raise GuppyError(f"{where}: about {n:,} parameters, {_mb(4 * n)} in fp32: more than one ONNX file can hold "
                         "(protobuf's limit is 2 GB)")


def _export_tokenizer(checkpoint: str, ckpt: str, vocab: int, find_beside) -> tuple[str, str]:
    """(path, sha256) of the tokenizer the export copies: the run's, which loads, is the one the run recorded (where
    it recorded one) and has no more tokens than the model."""
    from guppy.chat import check_tokenizer
    from guppy.data import file_sha256, load_tokenizer

    path = find_beside(checkpoint, "tokenizer.json")
    if not path:
        folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
        raise GuppyError(f"{checkpoint}: no tokenizer.json beside this checkpoint (export takes the one in the "
                         "checkpoint's folder or the run folder above it); copy there the tokenizer.json of the data "
                         f"it was trained on (`guppy prepare` writes it), e.g. into {folder}")
    tok = load_tokenizer(path)
    check_tokenizer(ckpt, path, vocab, tok)
    return path, file_sha256(path)


def _check_data(data_dir: str, tokenizer_sha: str, vocab: int):
    """--data is scored with the model: its token ids must be this model's tokenizer's."""
    from guppy.data import file_sha256, load_split

    split = load_split(data_dir, "eval")
    theirs = os.path.join(data_dir, "tokenizer.json")
    if os.path.isfile(theirs) and file_sha256(theirs) != tokenizer_sha:
        raise GuppyError(f"--data {data_dir}: its tokenizer.json is not the model's (their sha256 differ); score the "
                         "export on the data the model was trained on")
    top = int(split.tokens.max(initial=0))
    if top >= vocab:
        raise GuppyError(f"--data {data_dir}: its token ids go up to {top}, beyond the model's vocab of {vocab}; it "
                         "was made with another tokenizer")


def _persona_card(checkpoint: str, persona_path, find_beside) -> dict:
    from guppy.persona import load_persona, persona_card, read_card

    if persona_path:
        return persona_card(load_persona(persona_path))
    path = find_beside(checkpoint, "persona.json")
    if path:
        return read_card(path)
    return {"name": "guppy", "description": "", "lowercase": False, "sample_prompts": []}


def _score(model, fp32: str, uint8: str | None, data_dir: str, log) -> dict:
    """Held-out loss of the PyTorch model and of each exported file, on the same batches."""
    from guppy.data import eval_batches, load_split
    from guppy.train import evaluate

    log(f"scoring on the held-out split of {data_dir}")
    batches = eval_batches(load_split(data_dir, "eval"), 32, model.config.max_seq_len)
    out = {"data": os.path.abspath(data_dir), "torch_loss": evaluate(model, batches, torch.device("cpu")),
           "fp32_loss": heldout_loss(session(fp32), model.config, data_dir)}
    if uint8:
        out["uint8_loss"] = heldout_loss(session(uint8), model.config, data_dir)
    return out


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _log_report(r: dict, out_dir: str, log):
    size = f"model.onnx {_mb(r['model_bytes'])}"
    if "uint8_bytes" in r:
        size = f"model.onnx {_mb(r['fp32_bytes'])} fp32 -> {_mb(r['uint8_bytes'])} uint8"
    log(f"exported to {out_dir}: {size}")
    if "fp32_loss" in r:
        line = f"held-out loss: PyTorch {r['torch_loss']:.4f}, ONNX fp32 {r['fp32_loss']:.4f}"
        if "uint8_loss" in r:
            line += f", ONNX uint8 {r['uint8_loss']:.4f} ({r['uint8_loss'] / r['fp32_loss'] - 1:+.2%} vs fp32)"
        log(line)
    elif r["quantize"] == "uint8":
        log("(pass --data DATA to compare the held-out loss of fp32 and uint8)")
    log(f"chat: guppy chat --checkpoint {out_dir}    browser: guppy serve {out_dir}")
    runtime = r.get("runtime") or {}
    if str(runtime.get("base", "")).startswith("https://"):
        v = runtime["version"]
        log(f"(the page loads onnxruntime-web {v} from a CDN; for one that works offline, export with "
            f"--runtime-dir onnxruntime-web-{v}.tgz, from `npm pack onnxruntime-web@{v}`)")


def model_card(model, card: dict, ckpt: str, report: dict) -> str:
    """README.md of the export folder: the model card a model hub shows."""
    from guppy.hf import front_matter
    from guppy.web import ORT_WEB_VERSION

    cfg, state = model.config, _training_state(ckpt)
    name = card["name"]
    lines = front_matter(report, "onnxruntime", ["onnx", "guppy", "tiny"]) + [f"# {name}", ""]
    if card.get("description"):
        lines += [f"{card['description']}.", ""]
    lines += [
        f"A {model.num_params() / 1e6:.1f}M-parameter language model trained from scratch with "
        "guppy to talk as this character, exported to ONNX.", "",
        "## Use it", "",
        "```bash",
        "guppy chat --checkpoint .              # onnxruntime, in a terminal (pip install 'guppy[export]')",
        "guppy serve .                          # the chat page, in your browser (onnxruntime-web, WASM)",
        "```", "",
        "The page needs a web server (browsers do not run it from `file://`): `guppy serve`, or any static web "
        "host, or a Hugging Face Space with the Static SDK. A model repository stores the files but does not serve "
        "the page. Without internet, or where the CDN is blocked, export with `--runtime-dir` (the .tgz of "
        f"`npm pack onnxruntime-web@{ORT_WEB_VERSION}`): the runtime then sits in the folder.", "",
        "Without guppy (`pip install onnxruntime tokenizers numpy`, run in this folder; greedy, as "
        "`guppy chat --temperature 0`):", "",
        "```python", python_snippet(card), "```", "",
        "## Files", "",
        "| file | what |", "|---|---|",
        f"| `model.onnx` | the model, {_mb(report['model_bytes'])}"
        + (", weights as uint8 (onnxruntime dynamic quantization)" if report["quantize"] == "uint8" else ", fp32")
        + " |",
        "| `tokenizer.json` | byte-level BPE; `<pad>`=0, `<|im_start|>`=1, `<|im_end|>`=2 |",
        "| `persona.json` | name, description, whether user text is lowercased, sample prompts |",
        "| `config.json` | the model's shape |",
        "| `index.html`, `*.js`, `runtime.json` | the browser chat page |",
        "| `.guppy-export.json` | the export's manifest: each file's sha256, and the run's fingerprint |", "",
        "## Architecture", "",
        f"A pre-norm transformer (GuppyLM's): {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads "
        f"of {cfg.head_dim}, ReLU FFN {cfg.ffn_hidden}, LayerNorm, learned positions, LM head tied to the "
        f"embedding; vocabulary {cfg.vocab_size}, context {cfg.max_seq_len} tokens; "
        f"{model.num_params():,} parameters.", "",
        "Prompt format (ChatML): `<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n`; the reply "
        "ends at `<|im_end|>`." + (" User text is lowercased first." if card.get("lowercase") else ""), "",
        "### The ONNX graph", "",
        "One graph for the prompt and for each new token, with a KV cache:", "",
        "| | name | type and shape |", "|---|---|---|",
        "| input | `input_ids` | int64 (batch, seq): the new tokens |",
        "| input | `past_keys`, `past_values` | float32 (n_layers, batch, n_heads, past, head_dim): "
        "the cache; past = 0 for the prompt |",
        "| output | `logits` | float32 (batch, seq, vocab) |",
        "| output | `present_keys`, `present_values` | float32 (n_layers, batch, n_heads, past + seq, head_dim): "
        "feed back as past |", "",
        f"Token i of a call sits at position past + i; past + seq <= {cfg.max_seq_len}.", "",
        "## Data", "",
        (f"Synthetic conversations sampled from the persona file of `{name}` (`guppy prepare`), split so that no "
         "held-out (prompt, reply) pair occurs in training." if card.get("sample_prompts") else
         "Not recorded in the run (it was not prepared from a guppy persona file)."), "",
        "## Training", "",
    ]
    if state:
        tc, step, trained = state.get("train_config", {}), state.get("step", 0), _trained_steps(ckpt)
        trained = step if trained is None else trained
        lines += [f"{trained:,} steps, optimizer {tc.get('optimizer', 'adamw')}, batch {tc.get('batch_size', '?')} "
                  f"({tc.get('batch_mode', '?')} rows), peak lr {tc.get('lr', '?')}, {tc.get('schedule', 'cosine')} "
                  f"schedule to {tc.get('min_lr', '?')}, loss on {tc.get('loss_on', 'all')} tokens.", ""]
        if step != trained:
            lines += [f"The weights here are the run's checkpoint of step {step:,}"
                      + (", the best held-out loss of the run." if _is_best(ckpt) else "."), ""]
        best = state.get("extra", {}).get("best_eval")
        if best is not None and best != float("inf"):
            lines += [f"Best held-out loss during training: {best:.4f} (per token).", ""]
    else:
        lines += ["A GuppyLM checkpoint (no guppy training record).", ""]
    lines += ["## Export", "",
              f"Exported {datetime.date.today().isoformat()} with torch {torch.__version__}, opset {OPSET}, "
              f"on the reference ops."]
    if "uint8_bytes" in report:
        lines += ["", f"uint8 dynamic quantization: {_mb(report['fp32_bytes'])} (fp32) -> "
                      f"{_mb(report['uint8_bytes'])}."]
    if "fp32_loss" in report:
        lines += ["", "| model | held-out loss |", "|---|---|",
                  f"| PyTorch, fp32 | {report['torch_loss']:.4f} |", f"| ONNX, fp32 | {report['fp32_loss']:.4f} |"]
        if "uint8_loss" in report:
            lines += [f"| ONNX, uint8 | {report['uint8_loss']:.4f} |"]
    lines += ["", "## License", "", f"{report.get('license', 'mit')}, as chosen at export (the `license:` line at the "
              "top; guppy, which trained and exported this model, is MIT). Change it if the character calls for "
              "another."]
    return "\n".join(lines) + "\n"


def python_snippet(card: dict) -> str:
    """The card's chat without guppy: greedy decoding with the KV cache, with tokenizers, onnxruntime and numpy only,
    run in the export folder. It gives `guppy chat --temperature 0`'s reply (tests/test_export.py runs it as the card
    prints it). guppy's chat also keeps a typed "<|im_end|>" from becoming a control token, and cuts long prompts."""
    text = repr((card.get("sample_prompts") or ["hello"])[0]) + (".lower()" if card.get("lowercase") else "")
    return "\n".join([
        "import json, numpy as np, onnxruntime as ort",
        "from tokenizers import Tokenizer",
        'tok, cfg = Tokenizer.from_file("tokenizer.json"), json.load(open("config.json"))',
        'sess = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])',
        f'ids = tok.encode("<|im_start|>user\\n" + {text} + "<|im_end|>\\n<|im_start|>assistant\\n").ids',
        'k = v = np.zeros((cfg["n_layers"], 1, cfg["n_heads"], 0, cfg["d_model"] // cfg["n_heads"]), np.float32)',
        "step, reply = ids, []",
        'while len(reply) < 64 and len(ids) + len(reply) < cfg["max_seq_len"]:  # greedy: the likeliest next token',
        '    logits, k, v = sess.run(None, {"input_ids": np.array([step], np.int64), '
        '"past_keys": k, "past_values": v})',
        "    step = [int(logits[0, -1].argmax())]",
        "    if step == [2]:  # <|im_end|>: the reply is over",
        "        break",
        "    reply += step",
        "print(tok.decode(reply).strip())"])


def _run_pointer(ckpt: str, name: str) -> dict | None:
    """The pointer `name` (latest, best) of the run that holds the checkpoint folder RUN/checkpoints/step-N."""
    from guppy.checkpoint import DamagedPointer, read_pointer

    parent = os.path.dirname(os.path.abspath(ckpt))
    if os.path.basename(parent) != "checkpoints":
        return None
    try:
        return read_pointer(os.path.dirname(parent), name)
    except DamagedPointer:
        return None


def _trained_steps(ckpt: str) -> int | None:
    """How many steps the run trained (its latest checkpoint's), whichever of its checkpoints is exported."""
    latest = _run_pointer(ckpt, "latest")
    return latest["step"] if latest else None


def _is_best(ckpt: str) -> bool:
    best = _run_pointer(ckpt, "best")
    return bool(best) and os.path.basename(best["checkpoint"]) == os.path.basename(os.path.abspath(ckpt))


def _training_state(ckpt: str) -> dict | None:
    path = os.path.join(ckpt, "state.json") if os.path.isdir(ckpt) else None
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
