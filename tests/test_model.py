"""The plain model: GuppyLM's shape and names, the reference ops against torch.nn.functional, packed rows, KV cache."""
import math

import pytest
import torch
import torch.nn.functional as F

from guppy import GuppyLM, ModelConfig
from guppy import ops, reference
from guppy.checkpoint import load_model

MINI = dict(vocab_size=64, max_seq_len=32, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, dropout=0.0)


def test_parameter_count_is_guppylms():
    assert GuppyLM(ModelConfig()).num_params() == 8_726_016


def test_state_dict_names_are_guppylms():
    cfg = ModelConfig()
    keys = set(GuppyLM(cfg).state_dict())
    expected = {"tok_emb.weight", "pos_emb.weight", "norm.weight", "norm.bias", "lm_head.weight"}
    for i in range(cfg.n_layers):
        for mod in ("norm1", "attn.qkv", "attn.out", "norm2", "ffn.up", "ffn.down"):
            expected |= {f"blocks.{i}.{mod}.weight", f"blocks.{i}.{mod}.bias"}
    assert keys == expected


def test_lm_head_is_tied():
    m = GuppyLM(ModelConfig(**MINI))
    assert m.lm_head.weight.data_ptr() == m.tok_emb.weight.data_ptr()


def test_layer_norm_reference_matches_functional_and_fuses_the_residual():
    x, r = torch.randn(5, 33, dtype=torch.float64), torch.randn(5, 33, dtype=torch.float64)
    w, b = torch.randn(33, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    mean = (x + r).mean(-1, keepdim=True)
    var = ((x + r - mean) ** 2).mean(-1, keepdim=True)
    expected = (x + r - mean) / torch.sqrt(var + 1e-5) * w + b  # the math, written out independently
    y, h = reference.layer_norm_reference(x, w, b, 1e-5, residual=r)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(h, x + r)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_reference_matches_sdpa_with_segments(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 8, dtype=torch.float64) for _ in range(3))
    seg = torch.tensor([[0] * 4 + [1] * 5 + [2] * 2, [0] * 11])
    out = reference.attention_reference(q, k, v, causal=causal, segment_ids=seg)
    # independent mask: same segment, and j <= i when causal
    i, j = torch.arange(11)[:, None], torch.arange(11)[None, :]
    allowed = (seg[:, :, None] == seg[:, None, :]) & ((j <= i) if causal else True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(reference.attention_sdpa(q, k, v, causal=causal, segment_ids=seg), ref)


def _softmax_attention_written_out(q, k, v, causal):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("causal", [True, False])
def test_attention_sdpa_without_segments_follows_causal(causal):
    """The fused path (no segment ids, is_causal): causal=False must attend to every key."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 9, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(reference.attention_sdpa(q, k, v, causal=causal),
                               _softmax_attention_written_out(q, k, v, causal))


def test_attention_reference_dropout_rescales_the_kept_probabilities():
    """With v = I the output is the dropped probability matrix itself: every entry is 0 (dropped) or P / (1 - p)
    (kept, inverted-dropout scaling), with P the softmax written out here; about a fraction p is dropped."""
    torch.manual_seed(2)
    T, p = 16, 0.4
    q, k = (torch.randn(1, 4, T, T, dtype=torch.float64) for _ in range(2))
    eye = torch.eye(T, dtype=torch.float64).expand(1, 4, T, T)
    probs = _softmax_attention_written_out(q, k, eye, causal=True)
    out = reference.attention_reference(q, k, eye, causal=True, dropout_p=p)
    allowed = probs > 0
    kept = out[allowed] != 0
    torch.testing.assert_close(out[allowed][kept], probs[allowed][kept] / (1 - p))
    assert (out[~allowed] == 0).all()
    n = int(allowed.sum())
    assert abs((1 - kept.double().mean().item()) - p) <= 5 * math.sqrt(p * (1 - p) / n)


def test_attention_reference_decode_step_sees_all_cached_keys():
    q = torch.randn(1, 2, 1, 8, dtype=torch.float64)
    k, v = torch.randn(1, 2, 6, 8, dtype=torch.float64), torch.randn(1, 2, 6, 8, dtype=torch.float64)
    ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    torch.testing.assert_close(reference.attention_reference(q, k, v, causal=True), ref)


def test_cross_entropy_reference_all_ignored_and_smoothing():
    logits, t = torch.randn(4, 7), torch.full((4,), -100)
    assert torch.isnan(reference.cross_entropy_reference(logits, t))
    assert reference.cross_entropy_reference(logits, t, reduction="sum") == 0
    t = torch.tensor([1, 2, -100, 6])
    lp = torch.log_softmax(logits.double(), -1)
    eps, keep = 0.1, t != -100
    expected = (-(1 - eps) * lp[keep, t[keep]] - eps * lp[keep].mean(-1)).mean()
    torch.testing.assert_close(reference.cross_entropy_reference(logits, t, label_smoothing=eps).double(), expected,
                               atol=1e-6, rtol=1e-6)


def test_unknown_ops_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown ops implementation 'nope'"):
        ops.get_ops("nope")


def test_packed_row_loss_equals_sum_of_per_conversation_losses():
    """Two conversations packed in one row, with segment ids and restarted positions, give exactly the losses
    of each conversation run on its own."""
    torch.manual_seed(0)
    m = GuppyLM(ModelConfig(**MINI)).double().eval()
    a, b = torch.randint(3, 64, (9,)), torch.randint(3, 64, (13,))

    def alone(conv):
        _, loss = m(conv[None, :-1], conv[None, 1:])
        return loss * (len(conv) - 1)

    T = 24  # 9 + 13 tokens, and a 2-token tail of padding
    idx = torch.zeros(1, T, dtype=torch.long)
    tgt = torch.full((1, T), -100)
    idx[0, :9], idx[0, 9:22] = a, b
    tgt[0, :8], tgt[0, 9:21] = a[1:], b[1:]
    seg = torch.tensor([[0] * 9 + [1] * 13 + [2] * 2])
    pos = torch.tensor([list(range(9)) + list(range(13)) + [0, 1]])
    _, packed = m(idx, tgt, segment_ids=seg, positions=pos)
    torch.testing.assert_close(packed * 20, alone(a) + alone(b))
    _, unmasked = m(idx, tgt)  # without segments the second conversation sees the first: the loss differs
    assert not torch.allclose(unmasked * 20, alone(a) + alone(b))


def test_kv_cache_generation_equals_full_recompute():
    torch.manual_seed(0)
    m = GuppyLM(ModelConfig(**MINI)).eval()
    prompt = torch.randint(3, 64, (1, 5))
    greedy_cached = m.generate(prompt, 20, temperature=0, use_cache=True)
    greedy_full = m.generate(prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(greedy_cached, greedy_full)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sampled_cached = m.generate(prompt, 20, temperature=1.0, top_k=10, top_p=0.9, use_cache=True, generator=g1)
    sampled_full = m.generate(prompt, 20, temperature=1.0, top_k=10, top_p=0.9, use_cache=False, generator=g2)
    assert torch.equal(sampled_cached, sampled_full)
    # and the cached logits equal the full forward's, position by position
    full_logits, _ = m(greedy_full[:, :-1])
    from guppy.model import KVCache
    cache = KVCache(m.config, 1, "cpu", torch.float32)
    step_logits = [m(greedy_full[:, t:t + 1], cache=cache)[0] for t in range(greedy_full.shape[1] - 1)]
    torch.testing.assert_close(torch.cat(step_logits, 1), full_logits, atol=1e-5, rtol=1e-5)


def test_generation_stops_at_context_end():
    m = GuppyLM(ModelConfig(**MINI)).eval()
    out = m.generate(torch.randint(3, 64, (1, 30)), 50, temperature=0)
    assert out.shape[1] == MINI["max_seq_len"]


def test_original_guppylm_checkpoint_loads(tmp_path):
    """A dict with model_state_dict, as the original GuppyLM saves it, loads and gives the same logits."""
    torch.manual_seed(0)
    cfg = ModelConfig(**MINI)
    src = GuppyLM(cfg).eval()
    path = tmp_path / "final_model.pt"
    torch.save({"model_state_dict": src.state_dict(), "config": {"n_heads": 2}, "step": 5}, path)
    loaded, _ = load_model(str(path))
    idx = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(loaded.eval()(idx)[0], src(idx)[0])
    assert loaded.config.n_heads == 2 and loaded.config.d_model == 32
