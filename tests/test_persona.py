"""Persona loading, validation and sampling (guppy/persona.py) against the shipped guppy persona and small bad files;
the report of what a persona can make (guppy/persona_report.py); the starter crab."""
import os
import random
import re
import subprocess
import sys

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


# ---------------------------------------------------------------- the report: what a persona can make
# Expectations are computed here, by enumerating the few texts of small personas or by sampling, not by the code
# under test. guppy.persona_report is imported in each test, so the tests above still run without it.

# Two topics, two inputs and two outputs each, no slots: the "thin persona" of issue 19.
THIN = HEAD + "".join(f'[[topics]]\nname = "{name}"\nkeywords = ["x"]\ninputs = ["{name}?", "{name}, please?"]\n'
                      f'outputs = ["{name} yes.", "{name} no."]\n' for name in ("food", "sleep"))

# The README's example as it was: one topic, 4 inputs and 16 replies, 64 distinct conversations.
README_CRAB = """[persona]
name = "crab"
description = "a grumpy hermit crab who is always looking for a bigger shell"
lowercase = true

[slots]
shell = ["a snail shell", "a bottle cap", "half a coconut", "a tiny teacup"]
mood = ["grumpy", "sleepy", "suspicious"]

[[topics]]
name = "home"
keywords = ["shell", "home"]
inputs = ["where do you live", "is that your house", "nice shell {nickname}"]
outputs = [
  "this is {shell}. it is my home for now. i am already too big for it.",
  "i live in {shell}. i am {mood} about it.",
]
[topics.slots]
nickname = ["crabby", "little crab"]
"""


def readme_crab_by_hand():
    """(inputs, {reply: probability}) of README_CRAB, written out."""
    shells = ["a snail shell", "a bottle cap", "half a coconut", "a tiny teacup"]
    moods = ["grumpy", "sleepy", "suspicious"]
    inputs = {"where do you live", "is that your house", "nice shell crabby", "nice shell little crab"}
    replies = {f"this is {s}. it is my home for now. i am already too big for it.": 1 / 2 / 4 for s in shells}
    replies.update({f"i live in {s}. i am {m} about it.": 1 / 2 / 4 / 3 for s in shells for m in moods})
    return inputs, replies


def expected_unique(probabilities, n):
    return sum(1 - (1 - p) ** n for p in probabilities) / n


def test_report_counts_the_readme_crab_exactly_and_refuses_it(tmp_path):
    from guppy.persona_report import persona_report

    inputs, replies = readme_crab_by_hand()
    persona = load_persona(write(tmp_path, README_CRAB, "crab.toml"))
    r = persona_report(persona, 60_000, 0.05)
    assert (r.conversations, r.replies, r.exact) == (len(inputs) * len(replies), len(replies), True) == (64, 16, True)
    [home] = r.topics
    assert (home.inputs.distinct, home.outputs.distinct, home.output_slots) == (4, 16, {"shell": 4, "mood": 3})
    # 64 conversations cannot fill a held-out split of 3,000 draws: refused, with the fix
    assert r.fatal and "only 64 distinct conversations" in r.fatal and "3,000" in r.fatal
    assert "add outputs or slot values, first to 'home'" in r.fatal and "\n" not in r.fatal
    assert any("topic 'home' can say only 16 different replies" in w and "{shell} 4, {mood} 3" in w
               for w in r.warnings)
    # without a held-out split, the expected unique-reply fraction is the closed form over the 16 replies
    for n in (20, 200, 60_000):
        assert persona_report(persona, n, 0.0).unique_replies == pytest.approx(expected_unique(replies.values(), n))


def test_report_on_a_thin_persona_names_each_topic_and_its_fix(tmp_path):
    from guppy.persona_report import SEEN_REPLY_LIMIT, UNIQUE_REPLY_AIM, persona_report

    persona = load_persona(write(tmp_path, THIN))
    r = persona_report(persona, 60_000, 0.05)
    assert (r.conversations, r.replies, r.exact) == (2 * 2 * 2, 4, True)
    assert r.fatal and "only 8 distinct conversations" in r.fatal
    # where it can be prepared it passes, but not silently: each figure with its aim, each topic with its fix
    r = persona_report(persona, 100, 0.02)
    assert r.fatal is None and r.expected_train == 98
    assert r.unique_replies == pytest.approx(4 / 100, rel=0.01)  # 4 replies, all drawn
    text = "\n".join(r.warnings)
    assert f"aim: {UNIQUE_REPLY_AIM:.0%} or more" in text and f"aim: under {SEEN_REPLY_LIMIT:.0%}" in text
    assert "held-out loss then measures recall of seen replies" in text
    for name in ("food", "sleep"):
        assert f"topic {name!r} has 2 outputs and no slots for its ~50 samples" in text
    assert text.count("add outputs or slot values") >= 2
    # the table: a row per topic with its inputs, outputs, conversations and share of the samples
    assert re.search(r"food\s+1\s+50\s+2\s+2\s+4\s", r.text) and re.search(r"sleep\s+1\s+50\s+2\s+2\s+4\s", r.text)


def test_prepare_logs_the_report_before_the_data(tmp_path):
    from guppy.data import prepare

    lines = []
    prepare(str(tmp_path / "d"), samples=100, persona_path=str(write(tmp_path, THIN)), eval_fraction=0.02,
            vocab_size=300, log=lines.append)
    assert len(lines) == 2 and "unique replies, expected" in lines[0] and lines[1].startswith("prepared ")
    assert "warning: topic 'food' has 2 outputs and no slots" in lines[0]


def test_expected_figures_match_what_generate_dataset_draws(tmp_path):
    """A persona whose held-out split holds about half of the draws (train redraws them), and a large one."""
    from guppy.persona_report import persona_report

    ys = ", ".join(f'"y{i}"' for i in range(30))
    xs = ", ".join(f'"x{i}"' for i in range(10))
    persona = load_persona(write(tmp_path, HEAD + f'[slots]\nx = [{xs}]\ny = [{ys}]\n'
                                 '[[topics]]\nname = "a"\nkeywords = ["r"]\ninputs = ["q {x}"]\n'
                                 'outputs = ["r {y}", "s {y} {y}"]\n'
                                 '[[topics]]\nname = "b"\nweight = 3\nkeywords = ["ok"]\ninputs = ["hi", "hello"]\n'
                                 'outputs = ["ok {y}"]\n'))
    r = persona_report(persona, 1000, 0.1)
    unique, seen, redrawn = [], [], []
    for seed in range(20):
        train, ev, stats = generate_dataset(persona, 1000, seed=seed, eval_fraction=0.1)
        assert len(train) == r.expected_train == 900
        unique.append(stats["unique_reply_fraction"])
        train_replies = {s["output"] for s in train}
        seen.append(sum(s["output"] in train_replies for s in ev) / len(ev))
        redrawn.append(stats["rejected_for_overlap"] / (stats["rejected_for_overlap"] + len(train)))
    assert r.held_out_cover == pytest.approx(sum(redrawn) / 20, abs=0.03) and r.held_out_cover > 0.4
    assert r.unique_replies == pytest.approx(sum(unique) / 20, abs=0.01)
    assert r.held_out_seen == pytest.approx(sum(seen) / 20, abs=0.03)
    # the starter crab: its replies are estimated (too many to enumerate), not counted
    crab = load_persona(default_persona_path("crab"))
    r = persona_report(crab, 20_000, 0.05)
    assert not r.exact and r.conversations > 10**8
    assert r.unique_replies == pytest.approx(generate_dataset(crab, 20_000)[2]["unique_reply_fraction"], abs=0.01)


# ---------------------------------------------------------------- the starter character

def test_every_shipped_persona_prepares_at_the_defaults_without_a_warning():
    from guppy.persona import shipped_personas
    from guppy.persona_report import persona_report

    assert {"guppy", "crab"} <= set(shipped_personas())
    for name in shipped_personas():
        r = persona_report(load_persona(default_persona_path(name)), 60_000, 0.05)
        assert r.fatal is None and r.warnings == [], (name, r.fatal, r.warnings)
    with open(os.path.join(os.path.dirname(os.path.dirname(default_persona_path())), "..", "setup.py")) as f:
        assert '"guppy.personas": ["*.toml"]' in f.read()  # installed as package data


def test_starter_crab_is_short_and_its_replies_hit_their_keywords():
    crab = load_persona(default_persona_path("crab"))
    with open(crab.path) as f:
        assert 60 <= len(f.read().splitlines()) <= 120
    assert len(crab.topics) >= 6 and crab.slots
    rng = random.Random(0)
    by_topic = {t.name: t for t in crab.topics}
    hits = dict.fromkeys(by_topic, 0)
    n = dict.fromkeys(by_topic, 0)
    for _ in range(10_000):
        s = sample_conversation(crab, rng)
        words = " " + " ".join(w.strip(".,!?:*'") for w in s["output"].split()) + " "
        n[s["category"]] += 1
        hits[s["category"]] += any(f" {k} " in words for k in by_topic[s["category"]].keywords)
    assert all(hits[t] / n[t] >= 0.7 for t in n), {t: hits[t] / n[t] for t in n}


def test_the_readme_toml_is_the_starter_crab():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        section = f.read().split("## Make your own character", 1)[1].split("\n## ", 1)[0]
    assert "python -m guppy.persona --starter crab crab.toml" in section
    block = section.split("```toml\n", 1)[1].split("```", 1)[0]
    with open(default_persona_path("crab"), encoding="utf-8") as f:
        shipped = set(f.read().splitlines())
    missing = [ln for ln in block.splitlines() if ln.strip() and "# ..." not in ln and ln not in shipped]
    assert not missing, missing


def test_the_starter_crab_prepares_and_its_held_out_loss_falls(tmp_path):
    import json

    from guppy.config import preset
    from guppy.data import prepare
    from guppy.train import train

    lines = []
    data, run = str(tmp_path / "data"), str(tmp_path / "run")
    prepare(data, samples=2000, persona_path=default_persona_path("crab"), vocab_size=512, log=lines.append)
    assert "warning" not in lines[0] and "cannot" not in lines[0]
    model_cfg, cfg = preset("tiny")
    cfg.max_steps, cfg.eval_every, cfg.save_every = 40, 10, 40
    train(data, run, model_cfg, cfg, device="cpu", progress=False, log=lambda *_: None)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        losses = [m["eval_loss"] for m in map(json.loads, f) if "eval_loss" in m]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3, losses


# ---------------------------------------------------------------- the file, and the command

def test_a_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + (HEAD + GOOD_TOPIC).encode())
    assert load_persona(path).name == "t"
    path.write_bytes(b"\xef\xbb\xbf" + (HEAD + "[[topics]\n").encode())
    with pytest.raises(PersonaError, match="line 3: invalid TOML"):  # lines counted as before
        load_persona(path)


def test_a_missing_comma_is_reported_on_its_own_line(tmp_path):
    text = HEAD + GOOD_TOPIC.replace('outputs = ["food"]', 'outputs = [\n  "food",\n  "more food"  # yum\n\n'
                                                           '  "the end",\n]')
    line = text.splitlines().index('  "more food"  # yum') + 1
    with pytest.raises(PersonaError) as info:
        load_persona(write(tmp_path, text))
    msg = str(info.value)
    assert f": line {line}: invalid TOML: a ',' (or the closing ']') is probably missing after '\"more food\"'" in msg
    broken = 'outputs = ["food" "more"]'
    text = HEAD + GOOD_TOPIC.replace('outputs = ["food"]', broken)
    with pytest.raises(PersonaError, match=f"line {text.splitlines().index(broken) + 1}: invalid TOML: a ','"):
        load_persona(write(tmp_path, text, "b.toml"))


def test_the_command_has_a_real_help():
    r = subprocess.run([sys.executable, "-m", "guppy.persona", "--help"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith("usage: python -m guppy.persona") and "--starter" in r.stdout
    assert "--samples" in r.stdout and "--eval-fraction" in r.stdout


def test_the_command_copies_a_starter_and_reports_on_it(tmp_path):
    dest = tmp_path / "crab.toml"
    r = subprocess.run([sys.executable, "-m", "guppy.persona", "--starter", "crab", str(dest)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert dest.read_bytes() == open(default_persona_path("crab"), "rb").read()
    assert f"wrote {dest}" in r.stdout and "distinct conversations" in r.stdout and "warning" not in r.stdout


# ---------------------------------------------------------------- issue 21: limits, shared with prepare

def test_the_limits_are_prepares_own():
    """persona.py cannot import guppy.data (data imports it): the copies it keeps must equal data's."""
    from guppy import data, persona
    assert list(persona.CONTROL_TOKENS) == data.SPECIAL_TOKENS
    assert persona.MAX_CONVERSATION_CHARS == data.MAX_CONVERSATION_CHARS


SLOTS = '[slots]\nfood = ["flakes", "a worm"]\n'


@pytest.mark.parametrize("text, problem", [
    (HEAD.replace('"t"', '"t\\u001b]0;title\\u0007"') + GOOD_TOPIC, "[persona] name 't\\x1b]0;title\\x07' holds the "
                                                                     "control character '\\x1b'"),
    (HEAD + GOOD_TOPIC.replace('outputs = ["food"]', 'outputs = ["food \\u009b2J"]'),
     "topic 'food' outputs[0] 'food \\x9b2J' holds the control character '\\x9b'"),
    (HEAD + GOOD_TOPIC.replace('name = "food"', 'name = "fo\\nod"'), "name 'fo\\nod' holds the control character"),
    (HEAD + GOOD_TOPIC.replace('name = "food"', 'name = "food"\nweight = 1e6001'), "weight must be a positive"),
    (HEAD + GOOD_TOPIC.replace('name = "food"', 'name = "food"\nweight = 1000001'), "at most 1,000,000"),
    (HEAD.replace('"t"', '"t"\nlowercase = true') + GOOD_TOPIC.replace('inputs = ["hi"]', 'inputs = ["hi <PAD>"]'),
     "topic 'food' wrote <pad> in a filling of inputs[0]"),
    (HEAD + '[slots]\nstart = ["<|im_st"]\nfood = ["{start}art|>", "flakes"]\n' +
     GOOD_TOPIC.replace('outputs = ["food"]', 'outputs = ["{food}"]'), "wrote <|im_start|> in a filling of outputs"),
    (HEAD + SLOTS + GOOD_TOPIC.replace('outputs = ["food"]', 'outputs = ["' + "{food} " * 21 + '"]'),
     "has more than 20 placeholders"),
    (HEAD + SLOTS + 'deep = ' + "[" * 9 + '"x"' + "]" * 9 + "\n" + GOOD_TOPIC, "nested more than 8 levels deep"),
    (HEAD + SLOTS + 'deep = ' + "[" * 3000 + "]" * 3000 + "\n" + GOOD_TOPIC, "nested too deeply"),
])
def test_limits_and_text_rules(tmp_path, text, problem):
    with pytest.raises(PersonaError) as info:
        load_persona(write(tmp_path, text))
    msg = str(info.value)
    assert problem in msg and "\n" not in msg and msg.isprintable(), msg


def test_what_the_limits_allow(tmp_path):
    """A tab or a line break in a template is whitespace (collapsed); "<PAD>" in an output is text; 20 placeholders
    and a weight of 1,000,000 are allowed."""
    text = (HEAD + SLOTS + GOOD_TOPIC.replace('outputs = ["food"]', 'outputs = ["food\\tnow\\n{food}", "<PAD>", "'
                                              + "{food} " * 20 + '"]').replace('name = "food"',
                                                                                'name = "food"\nweight = 1e6'))
    p = load_persona(write(tmp_path, text))
    rng = random.Random(0)
    outs = {sample_conversation(p, rng)["output"] for _ in range(50)}
    assert "food now flakes" in outs and "<PAD>" in outs


def test_the_report_stays_fast_on_uneven_slots(tmp_path):
    """20 placeholders whose slots list their values unevenly: the histograms' bins are bounded (persona_report's
    _coarsen); 50 took minutes without it. The shipped fish never reaches the bounds, so its figures are exact."""
    import time

    from guppy import persona_report as pr
    slots = "\n".join(f's{i} = [' + ", ".join(['"a"'] * (i + 1) + [f'"v{j}"' for j in range(i % 7 + 2)]) + "]"
                      for i in range(20))
    template = " ".join(f"{{s{i}}}" for i in range(20))
    p = load_persona(write(tmp_path, f'{HEAD}[slots]\n{slots}\n[[topics]]\nname = "t"\nkeywords = ["k"]\n'
                                     f'inputs = ["{template}", "hi"]\noutputs = ["{template}", "hey"]\n'))
    t = time.time()
    r = pr.persona_report(p, 60_000, 0.05)
    assert time.time() - t < 10 and 0 <= r.unique_replies <= 1 and 0 <= r.held_out_seen <= 1
    fish = pr._topics(load_persona(), 60_000)
    assert max(max(len(t.inputs.hist), len(t.outputs.hist)) for t in fish) < pr.SIDE_BINS
