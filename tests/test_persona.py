"""Persona loading, validation and sampling (guppy/persona.py) against the shipped guppy persona and small bad files."""
import random

import pytest

from guppy.persona import (PersonaError, default_persona_path, eval_prompts, generate_dataset, load_persona,
                           sample_conversation)


@pytest.fixture(scope="module")
def guppy():
    return load_persona()


def write(tmp_path, text, name="p.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


GOOD_TOPIC = """
[[topics]]
name = "food"
keywords = ["food"]
inputs = ["hi"]
outputs = ["food"]
"""
HEAD = '[persona]\nname = "t"\n'


# ---------------------------------------------------------------- the shipped persona

def test_shipped_persona_loads(guppy):
    assert guppy.name == "guppy"
    assert guppy.path == default_persona_path()
    assert len(guppy.topics) >= 60
    assert len({t.name for t in guppy.topics}) == len(guppy.topics)


def test_every_topic_is_complete(guppy):
    for t in guppy.topics:
        assert 2 <= len(t.keywords) <= 6, t.name
        assert 5 <= len(t.inputs) <= 12, t.name
        assert 8 <= len(t.outputs) <= 20, t.name


def test_shipped_replies_hit_their_keywords_and_stay_short(guppy):
    # The keyword eval is only meaningful if the training replies themselves carry the keywords.
    rng = random.Random(0)
    by_topic = {t.name: t for t in guppy.topics}
    hits, n = {}, {}
    for _ in range(20_000):
        s = sample_conversation(guppy, rng)
        words = s["output"].split()
        assert len(words) <= 40, s
        assert s["output"] == " ".join(words) and "{" not in s["output"] and "}" not in s["output"], s
        text = " " + " ".join(w.strip(".,!?:*'") for w in words) + " "
        n[s["category"]] = n.get(s["category"], 0) + 1
        keywords = by_topic[s["category"]].keywords
        hits[s["category"]] = hits.get(s["category"], 0) + any(f" {k} " in text for k in keywords)
    assert set(n) == set(by_topic)  # every topic gets sampled
    for name in n:
        assert hits[name] / n[name] >= 0.7, (name, hits[name] / n[name])


def test_unique_reply_fraction(guppy):
    train, ev, _ = generate_dataset(guppy, 20_000, seed=1337)
    outputs = [s["output"] for s in train + ev]
    assert len(outputs) == 20_000
    assert len(set(outputs)) / len(outputs) >= 0.5


# ---------------------------------------------------------------- the dataset

def test_dataset_is_deterministic(guppy):
    a = generate_dataset(guppy, 3000, seed=7)
    b = generate_dataset(guppy, 3000, seed=7)
    c = generate_dataset(guppy, 3000, seed=8)
    assert a == b
    assert a[0] != c[0] and a[1] != c[1]


def test_dataset_does_not_touch_the_global_rng(guppy):
    random.seed(0)
    before = random.random()
    random.seed(0)
    generate_dataset(guppy, 500, seed=1)
    assert random.random() == before


def test_dataset_sizes_format_and_stats(guppy):
    train, ev, stats = generate_dataset(guppy, 1001, seed=3, eval_fraction=0.1)
    assert (len(train), len(ev)) == (901, 100)
    assert (stats["n_train"], stats["n_eval"], stats["topics"]) == (901, 100, len(guppy.topics))
    categories = {t.name for t in guppy.topics}
    for s in train + ev:
        assert set(s) == {"input", "output", "category"}
        assert s["input"] and s["output"] and s["category"] in categories
    outs = [s["output"] for s in train + ev]
    assert stats["unique_reply_fraction"] == pytest.approx(len(set(outs)) / len(outs))


def test_eval_pairs_absent_from_train(guppy):
    train, ev, _ = generate_dataset(guppy, 20_000, seed=11, eval_fraction=0.1)
    eval_pairs = {(s["input"], s["output"]) for s in ev}
    assert not eval_pairs & {(s["input"], s["output"]) for s in train}


def test_tiny_persona_overlap_is_rejected_and_bounded(tmp_path):
    # 2 inputs x 2 outputs = 4 possible pairs: the eval set takes them all, so train can never be filled.
    path = write(tmp_path, HEAD + '[[topics]]\nname = "a"\nkeywords = ["x"]\ninputs = ["a", "b"]\n'
                                  'outputs = ["c", "d"]\n')
    train, ev, stats = generate_dataset(load_persona(path), 400, seed=0, eval_fraction=0.5)
    eval_pairs = {(s["input"], s["output"]) for s in ev}
    assert len(eval_pairs) == 4
    assert train == []
    assert stats["train_shortfall"] == 200 and stats["rejected_for_overlap"] == 50 * 200


def test_fresh_draw_for_every_sample_and_every_placeholder(tmp_path):
    values = ", ".join(f'"v{i}"' for i in range(50))
    path = write(tmp_path, HEAD + f'[[topics]]\nname = "x"\nkeywords = ["v"]\ninputs = ["{{x}} and {{x}}"]\n'
                                  f'outputs = ["{{x}}"]\n[topics.slots]\nx = [{values}]\n')
    persona = load_persona(path)
    rng = random.Random(0)
    samples = [sample_conversation(persona, rng) for _ in range(500)]
    assert len({s["output"] for s in samples}) >= 45
    # two occurrences in one template are independent draws
    assert sum(a != b for a, b in (s["input"].split(" and ") for s in samples)) > 400


def test_slots_shadowing_nesting_and_escapes(tmp_path):
    path = write(tmp_path, HEAD + '[slots]\ncolor = ["red"]\nthing = ["{color} ball"]\n'
                                  '[[topics]]\nname = "a"\nkeywords = ["x"]\ninputs = ["q"]\n'
                                  'outputs = ["{{literal}} {thing} {color}"]\n'
                                  '[[topics]]\nname = "b"\nkeywords = ["x"]\ninputs = ["q"]\n'
                                  'outputs = ["{color} {mine}"]\n'
                                  '[topics.slots]\ncolor = ["blue"]\nmine = ["my {color} cup"]\n')
    persona = load_persona(path)
    rng = random.Random(0)
    outs = {s["category"]: s["output"] for s in (sample_conversation(persona, rng) for _ in range(50))}
    # shared values resolve against the shared slots; topic-local values against the topic's own
    assert outs == {"a": "{literal} red ball red", "b": "blue my blue cup"}


def test_weights(tmp_path):
    path = write(tmp_path, HEAD + '[[topics]]\nname = "a"\nweight = 9\nkeywords = ["x"]\ninputs = ["q"]\n'
                                  'outputs = ["a"]\n[[topics]]\nname = "b"\nkeywords = ["x"]\ninputs = ["q"]\n'
                                  'outputs = ["b"]\n')
    train, _, _ = generate_dataset(load_persona(path), 5000, seed=0, eval_fraction=0)
    share = sum(s["category"] == "a" for s in train) / len(train)
    assert 0.87 < share < 0.93


def test_eval_prompts(guppy):
    prompts = eval_prompts(guppy, n_per_topic=3, seed=0)
    assert len(prompts) == 3 * len(guppy.topics)
    assert prompts == eval_prompts(guppy, n_per_topic=3, seed=0)
    by_topic = {t.name: t for t in guppy.topics}
    for p in prompts:
        assert p["keywords"] and p["keywords"] == by_topic[p["category"]].keywords
        assert p["prompt"].strip() and "{" not in p["prompt"]
    # prompts of one topic use different input templates while they last
    greetings = [p["prompt"] for p in prompts if p["category"] == "greeting"]
    assert len(set(greetings)) == 3


# ---------------------------------------------------------------- malformed files

BAD = {
    "missing_slot": (HEAD + GOOD_TOPIC.replace('outputs = ["food"]', 'outputs = ["{snack} now"]'),
                     "topic 'food' uses slot {snack} which is not defined"),
    "bad_toml": (HEAD + "[[topics]\n", "line 3: invalid TOML"),
    "no_topics": (HEAD, "no [[topics]]"),
    "empty_topics": ("topics = []\n" + HEAD, "no [[topics]]"),
    "no_outputs": (HEAD + GOOD_TOPIC.replace('outputs = ["food"]\n', ''), "topic 'food' has no outputs"),
    "empty_outputs": (HEAD + GOOD_TOPIC.replace('outputs = ["food"]', 'outputs = []'), "outputs is an empty list"),
    "empty_inputs": (HEAD + GOOD_TOPIC.replace('inputs = ["hi"]', 'inputs = []'), "inputs is an empty list"),
    "no_keywords": (HEAD + GOOD_TOPIC.replace('keywords = ["food"]\n', ''), "has no keywords"),
    "no_name": (HEAD + GOOD_TOPIC.replace('name = "food"\n', ''), "topic 1 has no name"),
    "duplicate": (HEAD + GOOD_TOPIC + GOOD_TOPIC, "topics 1 and 2 are both named 'food'"),
    "unknown_key": (HEAD + GOOD_TOPIC.replace('outputs =', 'ouputs = ["x"]\noutputs ='), "unknown key 'ouputs'"),
    "unknown_top_key": ("topic = 1\n" + HEAD + GOOD_TOPIC, "unknown top-level key 'topic'"),
    "wrong_type_outputs": (HEAD + GOOD_TOPIC.replace('outputs = ["food"]', 'outputs = "food"'),
                           "outputs must be a list of strings"),
    "wrong_type_item": (HEAD + GOOD_TOPIC.replace('outputs = ["food"]', 'outputs = ["food", 3]'),
                        "outputs[1] must be a string"),
    "wrong_type_weight": (HEAD + GOOD_TOPIC.replace('name = "food"', 'name = "food"\nweight = "high"'),
                          "weight must be a positive number"),
    "negative_weight": (HEAD + GOOD_TOPIC.replace('name = "food"', 'name = "food"\nweight = -1'),
                        "weight must be a positive number"),
    "empty_slot": ('[slots]\nfood = []\n' + HEAD + GOOD_TOPIC, "slot {food} is an empty list"),
    "slot_not_list": ('[slots]\nfood = "flakes"\n' + HEAD + GOOD_TOPIC, "slot {food} must be a list"),
    "unclosed_brace": (HEAD + GOOD_TOPIC.replace('outputs = ["food"]', 'outputs = ["{food"]'),
                       "has a '{' with no closing '}'"),
    "stray_brace": (HEAD + GOOD_TOPIC.replace('outputs = ["food"]', 'outputs = ["food}"]'),
                    "has a '}' with no opening '{'"),
    "bad_placeholder": (HEAD + GOOD_TOPIC.replace('outputs = ["food"]', 'outputs = ["{two words}"]'),
                        "invalid placeholder {two words}"),
    "self_recursion": ('[slots]\na = ["{a}"]\n' + HEAD + GOOD_TOPIC, "placeholders nest one level deep only"),
    "deep_nesting": ('[slots]\na = ["x"]\nb = ["{a}"]\nc = ["{b}"]\n' + HEAD + GOOD_TOPIC, "one level deep only"),
    "nested_missing": ('[slots]\nb = ["{nope}"]\n' + HEAD + GOOD_TOPIC,
                       "slot {b} uses slot {nope} which is not defined"),
    "no_persona": (GOOD_TOPIC, "no [persona] table"),
    "not_utf8": (None, "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_files_raise_one_line_errors(tmp_path, case):
    text, expected = BAD[case]
    path = tmp_path / "my persona.toml"
    if text is None:
        path.write_bytes(b'[persona]\nname = "\xff"\n')
    else:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(PersonaError) as info:
        load_persona(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: "), msg
    assert expected in msg, msg
    assert isinstance(info.value, ValueError)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(PersonaError) as info:
        load_persona(str(path))
    assert str(info.value).startswith(f"{path}: cannot read file") and "\n" not in str(info.value)


def test_error_from_multiline_template_is_one_line(tmp_path):
    path = write(tmp_path, HEAD + GOOD_TOPIC.replace('outputs = ["food"]', 'outputs = ["""line one\n{snack}"""]'))
    with pytest.raises(PersonaError) as info:
        load_persona(path)
    assert "\n" not in str(info.value) and "{snack}" in str(info.value)
