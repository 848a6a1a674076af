"""GuppyLM: a vanilla pre-norm transformer. Multi-head attention, ReLU FFN, LayerNorm, learned positions, tied head.

Parameter names match the original GuppyLM (`tok_emb`, `blocks.{i}.attn.qkv`, ...), so its checkpoints load here.
LayerNorm, attention and the loss go through `guppy.ops`; which implementation runs is `config.ops`.

Packed rows: `forward` takes optional `segment_ids` (B, T), which keep packed conversations from attending to each
other, and `positions` (B, T), which restart at 0 for each conversation. Generation uses a KV cache (`KVCache`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .ops import get_ops


class KVCache:
    """Per-layer keys and values of the tokens seen so far: (B, H, max_len, D) buffers and a fill length."""

    def __init__(self, config: ModelConfig, batch_size: int, device, dtype, max_len=None):
        shape = (batch_size, config.n_heads, max_len or config.max_seq_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.length = 0

    def append(self, layer: int, k, v):
        """Store this step's keys/values for `layer`; return all keys/values so far."""
        t0, t1 = self.length, self.length + k.shape[2]
        self.k[layer][:, :, t0:t1] = k
        self.v[layer][:, :, t0:t1] = v
        return self.k[layer][:, :, :t1], self.v[layer][:, :, :t1]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = config.n_heads, config.head_dim, config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)

    def forward(self, x, ops, segment_ids=None, cache=None, layer=0):
        B, T, C = x.shape
        # (B, T, 3, H, D) -> three (B, H, T, D) views of the one projection, no copies
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is not None:  # decoding: plain reference attention over the cached keys (tiny, latency-bound)
            k, v = cache.append(layer, k, v)
            y = get_ops("reference").attention(q, k, v, causal=True)
        else:
            y = ops.attention(q, k, v, causal=True, segment_ids=segment_ids,
                              dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class FFN(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = nn.Linear(config.d_model, config.ffn_hidden)
        self.down = nn.Linear(config.ffn_hidden, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down(F.relu(self.up(x))))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.ffn = FFN(config)

    def forward(self, x, ops, segment_ids=None, cache=None, layer=0):
        # x = x + attn(norm1(x)); x = x + ffn(norm2(x)), written so that norm2 can take the residual add with it:
        # ops.layer_norm(a, ..., residual=x) returns (norm2(x + a), x + a) in one pass when a kernel provides it.
        a = self.attn(ops.layer_norm(x, self.norm1.weight, self.norm1.bias, self.norm1.eps), ops, segment_ids,
                      cache, layer)
        h, x = ops.layer_norm(a, self.norm2.weight, self.norm2.bias, self.norm2.eps, residual=x)
        return x + self.ffn(h)


class GuppyLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.ops = get_ops(config.ops)
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def set_ops(self, name: str):
        self.config.ops = name
        self.ops = get_ops(name)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, *, segment_ids=None, positions=None, cache=None):
        """idx (B, T) token ids -> (logits (B, T, V), loss or None).

        targets (B, T): next-token ids, -100 where no loss is taken (pads, and prompts in assistant-only mode).
        When the ops fuse the LM head with the loss (`ops.fused_lm_head`) and targets are given, logits is None:
        the (B·T × V) logits are never built.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))
        for i, block in enumerate(self.blocks):
            x = block(x, self.ops, segment_ids, cache, i)
        if cache is not None:
            cache.length += T
        x = self.ops.layer_norm(x, self.norm.weight, self.norm.bias, self.norm.eps)

        if targets is None:
            return self.lm_head(x), None
        if self.ops.fused_lm_head:
            return None, self.ops.linear_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.view(-1))
        logits = self.lm_head(x)
        return logits, self.ops.cross_entropy(logits.view(B * T, -1), targets.view(-1))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens=64, temperature=0.7, top_k=50, top_p=0.9, stop_id=None,
                 use_cache=True, generator=None):
        """Sample up to max_new_tokens after the prompt idx (1, T). Stops early at stop_id.

        With use_cache the prompt is run once and each new token costs one position; without it, the whole context is
        re-run for every token (GuppyLM's way, kept as the reference the cache is tested against).
        temperature 0 means greedy.
        """
        was_training = self.training
        self.eval()
        out = idx
        cache = KVCache(self.config, idx.shape[0], idx.device, self.tok_emb.weight.dtype) if use_cache else None
        step_input = idx
        for _ in range(max_new_tokens):
            if out.shape[1] >= self.config.max_seq_len:
                break
            if use_cache:
                logits, _ = self(step_input, cache=cache)
            else:
                logits, _ = self(out)
            next_id = sample(logits[:, -1, :].float(), temperature, top_k, top_p, generator)
            out = torch.cat([out, next_id], dim=1)
            step_input = next_id
            if stop_id is not None and bool((next_id == stop_id).all()):
                break
        self.train(was_training)
        return out


def sample(logits, temperature=0.7, top_k=50, top_p=0.9, generator=None):
    """One token id per row of logits (B, V): temperature, then top-k, then nucleus (top-p) filtering."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop_sorted = cum - torch.softmax(sorted_logits, -1) >= top_p   # keep the smallest prefix with mass >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator)
