"""Chat with an exported model through onnxruntime: `guppy chat --checkpoint DIR` (or DIR/model.onnx).

The same `Chat` as for a checkpoint (prompt encoding, lowercasing, sampling by `guppy.model.sample`, stopping at
<|im_end|>), with generation through the exported graph and its KV cache: one call on the prompt, then one call per
new token with the cache fed back (see guppy/export.py for the graph's inputs and outputs). With --temperature 0
both pick the argmax, so the replies of the two can be compared token for token.

Before the first reply the export is checked as chat checks a run, each failure one line naming the file: the
graph's metadata (guppy_config) and its inputs and outputs (guppy.export.check_graph), config.json beside it against
that config, and the tokenizer against the sha256 the export recorded (guppy_tokenizer_sha256): a folder that mixes
two exports, or a tokenizer.json from another dataset with the same vocab size, is refused rather than answered in
garbage. An export made before guppy recorded the tokenizer's sha256 is checked on its vocab size only (Chat).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from guppy.chat import Chat, find_tokenizer
from guppy.data import IM_END_ID, file_sha256
from guppy.errors import GuppyError, one_line
from guppy.export import check_graph, empty_past, model_config, run, session
from guppy.model import sample

SHAPE = ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "ffn_hidden")  # what config.json must match


def is_onnx_export(path: str) -> bool:
    """An exported folder (it holds model.onnx) or an .onnx file. A folder is a folder whatever its name: a run
    folder called fish.onnx is a run."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "model.onnx"))
    return path.endswith(".onnx")


class OnnxChat(Chat):
    def __init__(self, checkpoint: str, device="cpu", tokenizer: str | None = None, **kwargs):
        self._tokenizer_option = tokenizer  # load() checks the tokenizer against the export before Chat loads it
        super().__init__(checkpoint, device, tokenizer, **kwargs)

    def load(self, checkpoint: str) -> int:
        path = os.path.join(checkpoint, "model.onnx") if os.path.isdir(checkpoint) else checkpoint
        self.session, self.checkpoint = session(path), path
        self.config = model_config(self.session, path)
        check_graph(self.session, self.config, path)
        self.vocab_size = self.config.vocab_size
        check_config_json(path, self.config)
        meta = self.session.get_modelmeta().custom_metadata_map
        check_export_tokenizer(path, find_tokenizer(checkpoint, self._tokenizer_option),
                               meta.get("guppy_tokenizer_sha256"))
        return self.config.max_seq_len

    def generate(self, ids: list[int], use_cache: bool = True) -> list[int]:
        past_k = past_v = empty_past(self.config)
        step, new = np.array([ids], dtype=np.int64), []
        for _ in range(self.max_new_tokens):
            if len(ids) + len(new) >= self.max_seq_len:
                break
            logits, past_k, past_v = run(self.session, step, past_k, past_v)
            next_id = int(sample(torch.from_numpy(logits[:, -1, :]), self.temperature, self.top_k, self.top_p,
                                 self.generator))
            new.append(next_id)
            if next_id == IM_END_ID:
                break
            step = np.array([[next_id]], dtype=np.int64)
        return new


def check_config_json(model_path: str, config):
    """config.json beside model.onnx (what the page and the card's snippet read) has the shape of the model in it."""
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "config.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path, "rb") as f:
            stored = json.loads(f.read())
    except ValueError as e:  # not UTF-8, or not JSON
        raise GuppyError(f"{path}: not JSON ({one_line(e)[:120]}); the export is damaged: export it again") from None
    if not isinstance(stored, dict):
        raise GuppyError(f"{path}: not a JSON object of the model's shape; the export is damaged: export it again")
    for key in SHAPE:
        if stored.get(key) != getattr(config, key):
            raise GuppyError(f"{path}: says {key} {stored.get(key)!r}, but {model_path} has {getattr(config, key)}: "
                             "the folder mixes two exports; export it again (guppy export ... --force)")


def check_export_tokenizer(model_path: str, tokenizer: str, recorded: str | None):
    """The tokenizer is the one the model was exported with: the sha256 in its metadata (from the run's record)."""
    if recorded and file_sha256(tokenizer) != recorded:
        raise GuppyError(f"{tokenizer}: not the tokenizer {model_path} was exported with (its sha256 differs from the "
                         "one in the model's metadata); use the export's own tokenizer.json, or export again")
