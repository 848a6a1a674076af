"""Data: determinism, train/eval disjointness, tokenizer round trip, and the two batching modes."""
import json
import os
import re

import numpy as np
import pytest
import torch

from guppy.data import (IGNORE, IM_END_ID, IM_START_ID, PAD_ID, SPECIAL_TOKENS, Batcher, load_split, load_tokenizer,
                        prepare, prompt_text, read_jsonl, reply_text, train_tokenizer, write_jsonl)
from guppy.errors import GuppyError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prepare(str(d), samples=3000, seed=7, eval_fraction=0.1, vocab_size=512, log=lambda *_: None)
    return str(d)


def test_prepare_is_deterministic_for_a_seed(tmp_path, data_dir):
    again = tmp_path / "again"
    prepare(str(again), samples=3000, seed=7, eval_fraction=0.1, vocab_size=512, log=lambda *_: None)
    for name in ("train.jsonl", "eval.jsonl", "tokenizer.json", "train.tokens.npy", "eval.offsets.npy"):
        assert (again / name).read_bytes() == open(os.path.join(data_dir, name), "rb").read(), name
    other = tmp_path / "other"
    prepare(str(other), samples=3000, seed=8, eval_fraction=0.1, vocab_size=512, log=lambda *_: None)
    assert (other / "train.jsonl").read_bytes() != (again / "train.jsonl").read_bytes()


def test_eval_pairs_are_absent_from_train(data_dir):
    train = read_jsonl(os.path.join(data_dir, "train.jsonl"))
    evals = read_jsonl(os.path.join(data_dir, "eval.jsonl"))
    assert len(evals) == 300 and len(train) == 2700
    train_pairs = {(r["input"], r["output"]) for r in train}
    assert not any((r["input"], r["output"]) in train_pairs for r in evals)
    assert all(set(r) == {"input", "output", "category"} for r in train[:50])
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    assert meta["eval_pairs_in_train"] == 0
    assert meta["unique_reply_fraction"] == pytest.approx(len({r["output"] for r in train + evals}) / 3000, abs=1e-4)


def test_tokenizer_round_trip_and_special_ids(data_dir):
    tok = load_tokenizer(os.path.join(data_dir, "tokenizer.json"))
    assert [tok.token_to_id(t) for t in ("<pad>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    for text in ["hello little fish!", "  spaces   and\ttabs\n", "émoji 🐟 and ünïcode", "numbers 12345.6789"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    ids = tok.encode(prompt_text("hi") + reply_text("blub"), add_special_tokens=False).ids
    assert ids[0] == IM_START_ID and ids[-1] == IM_END_ID and ids.count(IM_START_ID) == 2


def test_token_arrays_hold_each_conversation(data_dir):
    tok = load_tokenizer(os.path.join(data_dir, "tokenizer.json"))
    rows = read_jsonl(os.path.join(data_dir, "eval.jsonl"))
    split = load_split(data_dir, "eval")
    assert len(split) == len(rows)
    for c in (0, 17, len(rows) - 1):
        text = tok.decode(split.conversation(c).tolist(), skip_special_tokens=False)
        assert text == prompt_text(rows[c]["input"]) + reply_text(rows[c]["output"])
        prompt = tok.decode(split.conversation(c)[:split.prompt_len[c]].tolist(), skip_special_tokens=False)
        assert prompt == prompt_text(rows[c]["input"])


def test_pad_batches(data_dir):
    split = load_split(data_dir, "train")
    b = Batcher(split, 8, 128, "pad", seed=1).next_batch()
    assert b.idx.shape == b.targets.shape and b.idx.shape[0] == 8
    for i in range(8):
        real = b.targets[i] != IGNORE
        n = int(real.sum())
        # a conversation of L tokens gives L-1 targets, left-aligned; the rest is padding
        assert real[:n].all() and not real[n:].any()
        assert (b.idx[i, 1:n] == b.targets[i, :n - 1]).all()
        assert (b.idx[i, n:] == PAD_ID).all()
    assert b.idx.shape[1] == int((b.targets != IGNORE).sum(1).max())  # padded to the batch's longest


def test_packed_batches_hold_whole_conversations(data_dir):
    split = load_split(data_dir, "train")
    batcher = Batcher(split, 4, 128, "packed", seed=1)
    b = batcher.next_batch()
    assert b.idx.shape == (4, 128)
    used = 0
    for r in range(4):
        seg, pos, idx, tgt = b.segment_ids[r], b.positions[r], b.idx[r], b.targets[r]
        for s in seg.unique().tolist():
            where = (seg == s).nonzero().flatten()
            assert (where.diff() == 1).all()  # contiguous
            conv = idx[where]
            if (tgt[where] == IGNORE).all():
                assert (conv == PAD_ID).all()  # the padding tail
                continue
            used += len(where)
            assert (pos[where] == np.arange(len(where))).all()  # positions restart
            assert conv[0] == IM_START_ID and conv[-1] == IM_END_ID  # a whole conversation
            assert (tgt[where][:-1] == conv[1:]).all() and tgt[where][-1] == IGNORE
    assert used / (4 * 128) > 0.8  # packing leaves little waste


def test_assistant_only_loss_masks_the_prompt(data_dir):
    split = load_split(data_dir, "train")
    b = Batcher(split, 4, 128, "pad", assistant_only=True, seed=1, shuffle=False).next_batch()
    for i in range(4):
        p = int(split.prompt_len[i])
        assert (b.targets[i, :p - 1] == IGNORE).all()
        assert b.targets[i, p - 1] == split.conversation(i)[p]  # first reply token is predicted


def test_batcher_resumes_exactly(data_dir):
    split = load_split(data_dir, "train")
    a = Batcher(split, 16, 128, "packed", seed=3)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch().idx for _ in range(400)]  # crosses an epoch boundary
    b = Batcher(split, 16, 128, "packed", seed=3)
    b.load_state_dict(state)
    assert all((b.next_batch().idx == e).all() for e in expected)


def test_ddp_ranks_see_disjoint_batches(data_dir):
    """Two ranks split each epoch's permutation: between them they visit every conversation once per epoch."""
    split = load_split(data_dir, "train")
    seen = []
    for rank in (0, 1):
        b = Batcher(split, 10, 128, "pad", seed=2, rank=rank, world_size=2)
        convs = []
        while b.epoch == 0:
            c = b._next_conversation()
            if b.epoch == 0:
                convs.append(c)
        seen.append(convs)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(len(split)))
    r0, r1 = (Batcher(split, 4, 128, "pad", seed=2, rank=r, world_size=2) for r in (0, 1))
    assert not torch.equal(r0.next_batch().idx[:, :5], r1.next_batch().idx[:, :5])


def test_prepare_refuses_to_overwrite_and_keeps_the_data(data_dir):
    before = open(os.path.join(data_dir, "train.jsonl"), "rb").read()
    with pytest.raises(GuppyError, match="already holds a dataset"):
        prepare(data_dir, samples=100, log=lambda *_: None)
    assert open(os.path.join(data_dir, "train.jsonl"), "rb").read() == before


def test_from_jsonl(tmp_path):
    rows = [{"input": f"q{i % 50}", "output": f"a{i}", "category": "c"} for i in range(400)]
    src = tmp_path / "in.jsonl"
    write_jsonl(str(src), rows)
    meta = prepare(str(tmp_path / "d"), from_jsonl=str(src), eval_fraction=0.1, vocab_size=300, log=lambda *_: None)
    train = read_jsonl(str(tmp_path / "d" / "train.jsonl"))
    evals = read_jsonl(str(tmp_path / "d" / "eval.jsonl"))
    assert meta["eval_pairs_in_train"] == 0 and len(evals) == 40 and len(train) == 360


def test_bad_jsonl_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n{not json\n')
    with pytest.raises(GuppyError, match=r"bad.jsonl: line 2: not valid JSON"):
        read_jsonl(str(bad))


@pytest.mark.parametrize("token", ["<|im_end|>", "<|im_start|>", "<pad>"])
def test_a_written_control_token_in_jsonl_is_refused_with_its_line(tmp_path, token):
    """The tokenizer turns the written token into the real one (the turn would end mid-reply in training), while chat
    encodes the same characters typed by a user as text: a conversation may not hold one."""
    tok = train_tokenizer(["hello there"], vocab_size=300)
    assert tok.encode(f"a{token}b", add_special_tokens=False).ids[1] == SPECIAL_TOKENS.index(token)
    src = tmp_path / "in.jsonl"
    write_jsonl(str(src), [{"input": "hi", "output": "ok"}] * 2 + [{"input": "hi", "output": f"blub{token} more"}])
    with pytest.raises(GuppyError, match=rf'in.jsonl: line 3: "output" contains {re.escape(token)}'):
        prepare(str(tmp_path / "d"), from_jsonl=str(src), vocab_size=300, log=lambda *_: None)
    assert not (tmp_path / "d").exists()


def test_a_persona_that_writes_a_control_token_is_refused_with_its_topic(tmp_path):
    persona = tmp_path / "p.toml"
    persona.write_text('[persona]\nname = "t"\n[[topics]]\nname = "food"\nkeywords = ["food"]\ninputs = ["hi"]\n'
                       'outputs = ["{end} food", "food"]\nslots = { end = ["<|im_end|>", "yum"] }\n')
    with pytest.raises(GuppyError, match=r"p.toml: topic 'food' wrote <\|im_end\|>"):
        prepare(str(tmp_path / "d"), samples=50, persona_path=str(persona), vocab_size=300, log=lambda *_: None)


def test_prepare_force_leaves_no_arrays_of_the_dataset_it_replaced(tmp_path):
    """A dataset replaced by one without a held-out split loses the old eval arrays too: training must not evaluate
    on token ids of the old tokenizer."""
    rows = [{"input": f"q{i % 50}", "output": f"a{i}", "category": "c"} for i in range(200)]
    src, d = tmp_path / "in.jsonl", str(tmp_path / "d")
    write_jsonl(str(src), rows)
    prepare(d, from_jsonl=str(src), eval_fraction=0.1, vocab_size=300, log=lambda *_: None)
    assert os.path.isfile(os.path.join(d, "eval.tokens.npy"))
    prepare(d, from_jsonl=str(src), eval_fraction=0.0, vocab_size=300, force=True, log=lambda *_: None)
    assert not any(n.startswith("eval.") and n.endswith(".npy") for n in os.listdir(d))
    assert len(load_split(d, "train")) == 200


def plain_packed_batches(split, batch_size, max_seq_len, n_batches, seed, assistant_only=False, rank=0, world=1):
    """The packed-batch specification written plainly: walk each epoch's permutation (np.random.default_rng([seed,
    epoch]), this rank's every world-th entry), place each conversation, cut to max_seq_len, into the first row with
    room, and end the batch at the first one that fits nowhere (it opens the next batch)."""
    def conversations():
        epoch = 0
        while True:
            yield from np.random.default_rng([seed, epoch]).permutation(len(split))[rank::world].tolist()
            epoch += 1

    stream, pending = conversations(), None
    for _ in range(n_batches):
        rows = [[] for _ in range(batch_size)]  # per row: (conversation, its tokens)
        while True:
            c = pending if pending is not None else next(stream)
            conv = split.conversation(c)[:max_seq_len]
            row = next((r for r in rows if sum(len(t) for _, t in r) + len(conv) <= max_seq_len), None)
            if row is None:
                pending = c
                break
            row.append((c, conv))
            pending = None
        idx = np.full((batch_size, max_seq_len), PAD_ID)
        targets = np.full((batch_size, max_seq_len), IGNORE)
        segments = np.zeros((batch_size, max_seq_len), dtype=np.int32)
        positions = np.zeros((batch_size, max_seq_len))
        for r, row in enumerate(rows):
            at = 0
            for s, (c, conv) in enumerate(row):
                n = len(conv)
                idx[r, at:at + n], segments[r, at:at + n], positions[r, at:at + n] = conv, s, np.arange(n)
                targets[r, at:at + n - 1] = conv[1:]
                if assistant_only:
                    targets[r, at:at + max(0, int(split.prompt_len[c]) - 1)] = IGNORE
                at += n
            segments[r, at:] = len(row)
        yield idx, targets, segments, positions, sum(len(row) for row in rows)


@pytest.mark.parametrize("assistant_only,rank,world,max_seq_len", [(False, 0, 1, 128), (True, 0, 1, 128),
                                                                   (False, 1, 2, 128), (False, 0, 1, 40)])
def test_packed_batches_follow_the_plain_specification(data_dir, assistant_only, rank, world, max_seq_len):
    """The same conversations in the same rows, for the same seed, across an epoch boundary, as the plain packer:
    what keeps exact resume and the committed reference and recipe curves (their data order) as they were."""
    split = load_split(data_dir, "train")
    batcher = Batcher(split, 16, max_seq_len, "packed", assistant_only=assistant_only, seed=5, rank=rank,
                      world_size=world)
    n_batches = 150 if max_seq_len == 128 else 250  # 2,700 conversations (1,350 a rank): past the first epoch
    for i, expected in enumerate(plain_packed_batches(split, 16, max_seq_len, n_batches, 5, assistant_only, rank,
                                                      world)):
        b = batcher.next_batch()
        got = (b.idx, b.targets, b.segment_ids, b.positions)
        for name, g, e in zip(("idx", "targets", "segment_ids", "positions"), got, expected):
            assert np.array_equal(g.numpy(), e), (i, name)
        assert b.n_conversations == expected[4]
    assert batcher.epoch >= 1


def test_packed_batches_can_be_page_locked(data_dir):
    """pin_memory=True asks for page-locked tensors (only a CUDA build of torch can make them: here the request is
    checked to reach torch)."""
    split = load_split(data_dir, "train")
    if torch.cuda.is_available():
        b = Batcher(split, 4, 128, "packed", seed=1, pin_memory=True).next_batch()
        assert all(t.is_pinned() for t in (b.idx, b.targets, b.segment_ids, b.positions))
    else:
        with pytest.raises(RuntimeError):  # a CPU-only torch cannot pin memory: the flag reached torch.full
            Batcher(split, 4, 128, "packed", seed=1, pin_memory=True).next_batch()
