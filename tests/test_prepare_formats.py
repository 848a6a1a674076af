"""guppy prepare --from-jsonl reads the three dataset formats: GuppyLM's {"input", "output", "category"}, GuppyLM's
ChatML {"text", "category"} (data/train.jsonl) and the OpenAI / Hugging Face {"messages": [...]} (train_openai.jsonl).
The files are written as those tools write them: json.dumps per line, ASCII escapes (ensure_ascii's default).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from guppy.data import IGNORE, conversation_targets, load_split, load_tokenizer, prepare, read_jsonl
from guppy.errors import GuppyError

# (input, output, category): unicode, emoji, quotes, backslashes, a newline inside a reply
PAIRS = [(f"hi fish {i % 40} 🐟", f"blub {i}. \"bubbles\" \\ é\nmore", f"c{i % 3}") for i in range(120)]


def write(path, objs):
    with open(path, "w") as f:  # as GuppyLM's generate_data.py writes its files
        for o in objs:
            f.write(json.dumps(o) + "\n")
    return str(path)


def chatml(user, reply):
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{reply}<|im_end|>"


def made(tmp_path, name, objs, **kw):
    src = write(tmp_path / f"{name}.jsonl", objs)
    out = str(tmp_path / name)
    prepare(out, from_jsonl=src, vocab_size=300, log=lambda *a: None, **{"eval_fraction": 0.1, **kw})
    return out


def arrays(d):
    return [np.load(os.path.join(d, f"{s}.{k}.npy")) for s in ("train", "eval") for k in ("tokens", "offsets",
                                                                                         "prompt_len")]


def test_the_three_formats_make_the_same_dataset(tmp_path):
    io = made(tmp_path, "io", [{"input": i, "output": o, "category": c} for i, o, c in PAIRS])
    text = made(tmp_path, "text", [{"text": chatml(i, o), "category": c} for i, o, c in PAIRS])
    openai = made(tmp_path, "openai", [{"messages": [{"role": "user", "content": i},
                                                     {"role": "assistant", "content": o}]} for i, o, _ in PAIRS])
    for other in (text, openai):
        for a, b in zip(arrays(io), arrays(other)):
            assert np.array_equal(a, b)
        with open(os.path.join(io, "tokenizer.json")) as f, open(os.path.join(other, "tokenizer.json")) as g:
            assert f.read() == g.read()
    assert read_jsonl(os.path.join(io, "train.jsonl")) == read_jsonl(os.path.join(text, "train.jsonl"))
    assert {r["category"] for r in read_jsonl(os.path.join(openai, "train.jsonl"))} == {"unknown"}


def test_chatml_text_may_end_with_a_newline(tmp_path):
    rows = [{"text": chatml(i, o) + "\n", "category": c} for i, o, c in PAIRS]
    assert read_jsonl(write(tmp_path / "t.jsonl", rows))[0] == {"input": PAIRS[0][0], "output": PAIRS[0][1],
                                                                "category": PAIRS[0][2]}


def test_a_multi_turn_conversation_is_one_conversation_with_loss_on_its_last_reply(tmp_path):
    """A system message and earlier turns are the prompt of the final reply; --loss-on assistant trains on that
    reply alone. prepare writes the conversation back as a messages row."""
    convs = [[{"role": "system", "content": "you are a fish"},
              {"role": "user", "content": f"hi {k}"}, {"role": "assistant", "content": f"hello {k}"},
              {"role": "user", "content": "food?"}, {"role": "assistant", "content": f"yes {k}. always."}]
             for k in range(30)]
    d = made(tmp_path, "multi", [{"messages": m, "category": "chat"} for m in convs], eval_fraction=0.0)
    tok = load_tokenizer(os.path.join(d, "tokenizer.json"))
    split = load_split(d, "train")
    for c, m in enumerate(convs):
        conv = split.conversation(c)
        text = "\n".join(f"<|im_start|>{t['role']}\n{t['content']}<|im_end|>" for t in m)
        assert conv.tolist() == tok.encode(text, add_special_tokens=False).ids
        prompt = text[:text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")]
        assert split.prompt_len[c] == len(tok.encode(prompt, add_special_tokens=False).ids)
        targets = conversation_targets(conv.astype(np.int64), int(split.prompt_len[c]), assistant_only=True)
        assert tok.decode(targets[targets != IGNORE].tolist(), skip_special_tokens=False) == \
            m[-1]["content"] + "<|im_end|>"
    with open(os.path.join(d, "train.jsonl")) as f:
        written = [json.loads(line) for line in f]
    assert written == [{"messages": m, "category": "chat"} for m in convs]
    assert read_jsonl(os.path.join(d, "train.jsonl"))[0]["context"] == convs[0][:3]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "hi", "completion": "blub"}, 'line 3: fits none of the formats: {"input", "output", "category"}, '
                                             '{"text": "<|im_start|>user'),
    (["hi", "blub"], "line 3: expected a JSON object, one of:"),
    ({"input": "hi", "output": 3}, "line 3: fits none of the formats"),
    ({"messages": [{"role": "assistant", "content": "blub"}, {"role": "user", "content": "hi"}]},
     'line 3: "messages" has the turns assistant, user; expected user, assistant'),
    ({"messages": [{"role": "user", "content": "hi"}]}, '"messages" has the turns user; expected'),
    ({"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}]},
     '"messages" must be a list of {"role": ..., "content": ...} objects with string values'),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a <pad> b"}]},
     '"messages": turn 2 (assistant) contains <pad>, one of guppy\'s control tokens'),
    ({"text": "<|im_start|>user\nhi<|im_end|><|im_start|>assistant\nblub<|im_end|>"},
     '"text" is not a ChatML conversation'),
    ({"text": chatml("hi <|im_start|> there", "blub")}, '"text" is not a ChatML conversation'),
    ({"text": chatml("hi <pad> there", "blub")}, '"text": turn 1 (user) contains <pad>'),
    ({"text": chatml("hi", "blub").replace("user", "system")}, '"text" has the turns system, assistant'),
    ({"messages": [{"role": "system", "content": "x" * 9_000}, {"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "y" * 2_000}]}, "a conversation of 11,002 characters"),
])
def test_a_row_of_no_format_is_one_line_with_its_number(tmp_path, row, message):
    src = write(tmp_path / "in.jsonl", [{"input": "hi", "output": "blub"}, {"text": chatml("a", "b")}, row])
    with pytest.raises(GuppyError) as e:
        prepare(str(tmp_path / "d"), from_jsonl=src, vocab_size=300, log=lambda *a: None)
    assert str(e.value).startswith(f"{src}: line 3: ") and message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "d").exists()


def test_the_cli_says_it_in_one_line(tmp_path, capsys):
    from guppy.cli import main

    src = write(tmp_path / "in.jsonl", [{"question": "hi", "answer": "blub"}])
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--out", str(tmp_path / "d"), "--from-jsonl", src])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"guppy prepare: error: {src}: line 1: fits none of the formats")
    assert all(f in err for f in ('"input", "output"', '"text"', '"messages"'))
