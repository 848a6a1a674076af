"""Chat with an exported model through onnxruntime: `guppy chat --checkpoint DIR` (or DIR/model.onnx).

The same `Chat` as for a checkpoint (prompt encoding, lowercasing, sampling by `guppy.model.sample`, stopping at
<|im_end|>), with generation through the exported graph and its KV cache: one call on the prompt, then one call per
new token with the cache fed back (see guppy/export.py for the graph's inputs and outputs). With --temperature 0
both pick the argmax, so the replies of the two can be compared token for token.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from guppy.chat import Chat
from guppy.data import IM_END_ID
from guppy.export import empty_past, model_config, run, session
from guppy.model import sample


def is_onnx_export(path: str) -> bool:
    """An exported folder (it holds model.onnx) or an .onnx file."""
    return path.endswith(".onnx") or os.path.isfile(os.path.join(path, "model.onnx"))


class OnnxChat(Chat):
    def load(self, checkpoint: str) -> int:
        path = checkpoint if checkpoint.endswith(".onnx") else os.path.join(checkpoint, "model.onnx")
        self.session, self.checkpoint = session(path), path
        self.config = model_config(self.session)
        self.vocab_size = self.config.vocab_size
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
