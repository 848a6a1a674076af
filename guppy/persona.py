"""Personas: the TOML file that says who the model is, and the synthetic conversations sampled from it.

A persona is a list of topics. Each topic has a few ways a user might say something (`inputs`), a few ways the
character answers (`outputs`), and slot vocabularies that fill the `{placeholders}` in both. A training sample is one
topic, one input template and one output template, every placeholder filled by a fresh random draw:

    {"input": "are you hungry little fish", "output": "a bloodworm please. right now.", "category": "food"}

(GuppyLM's published dataset format). The shipped characters are in `guppy/personas/`: the fish (`guppy.toml`) and a
short starter (`crab.toml`). Copy one to make your own (`python -m guppy.persona --starter crab my.toml`) and check it
with `python -m guppy.persona my.toml`: it prints what the persona can make and what to fix (guppy/persona_report.py).

The file format
---------------
    [persona]
    name = "guppy"                      # required
    description = "a small pet fish"    # optional
    lowercase = true                    # optional (default false): user text is lowercased, in the generated
                                        # inputs and at chat time (guppy chat, the ONNX chat, the browser page)

    [slots]                             # optional: shared vocabularies; {food} in ANY template draws from here
    food = ["flakes", "a bloodworm", "{color} pellets"]
    color = ["red", "green"]

    [[topics]]                          # one block per topic, at least one
    name = "food"                       # required, unique; becomes the "category" field of a sample
    weight = 1.0                        # optional relative sampling weight (default 1); 2.0 = twice as often
    keywords = ["food", "flakes"]       # required: a good reply on this topic contains at least one (keyword eval)
    inputs = ["what do you eat", "are you hungry {nickname}"]   # required, what the user says
    outputs = ["{food} please. right now."]                     # required, what the character says
    [topics.slots]                      # optional, this topic only; shadows a shared slot of the same name
    nickname = ["little fish", "guppy"]

Rules:
- A placeholder is `{name}`, name a Python identifier. A literal brace is `{{` or `}}`.
- Every occurrence is an independent draw: "{food} or {food}" can give "flakes or a bloodworm".
  (GuppyLM drew its fillers once at import time, so every sample of a template said the same thing.)
- A slot value may itself hold placeholders, one level deep only: "{color} pellets" is fine, but `color`'s values
  must then be plain text. Nested placeholders resolve where the value is defined: in a shared value against the
  shared slots, in a topic-local value against that topic's slots (local first, then shared).
- Whitespace runs are collapsed after filling, so a slot value may be "" (an optional word).
- Every template is checked at load time; any problem raises `PersonaError("<file>: <problem>")`, one line.
  Unknown keys are errors, so that a typo ("ouputs") cannot silently drop a field. A TOML mistake names its line (a
  missing ',' the line that lacks it, not the next one, where tomllib stops); a UTF-8 byte-order mark is ignored.
- Limits, checked before any sampling: the same check serves `python -m guppy.persona` and `guppy prepare`, so the
  validator refuses exactly what prepare refuses. A file of at most MAX_FILE_BYTES, nested at most MAX_NESTING deep
  (tables and arrays); a text (a template, a slot value, a name, a keyword) of at most MAX_TEXT_CHARS characters and
  no control characters (a tab or a line break in a template is whitespace, collapsed like any other); at most
  MAX_PLACEHOLDERS placeholders in one template or slot value; a conversation (a topic's longest filled input and
  longest filled output) of at most MAX_CONVERSATION_CHARS, as for `guppy prepare --from-jsonl`; a weight above 0
  and at most MAX_WEIGHT; and no filling that writes one of guppy's control tokens (CONTROL_TOKENS: `<|im_end|>`,
  `<|im_start|>`, `<pad>`, also where a slot value completes one that its template starts, or a lowercased input
  makes one): only the chat template may place those. Why each bound: an unbounded file, depth or text made the
  validator or prepare run out of memory or recursion, or run for minutes (BPE training is quadratic in the length
  of a word: a 1,000,000-character word had prepare still running at 240 s; 20,000 placeholders in one template had
  the report running past 30 s); a weight of 1e308 made the weights' total infinite and every sample one topic's.
"""
from __future__ import annotations

import os
import random
import re
import tomllib
from bisect import bisect
from dataclasses import dataclass, field

from .errors import GuppyError, exit_interrupted, printable

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# One token of a template: an escaped brace, a {placeholder} (contents checked after), or a brace with no partner.
_TEMPLATE_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_TOP_KEYS = {"persona", "slots", "topics"}
_PERSONA_KEYS = {"name", "description", "lowercase"}
_TOPIC_KEYS = {"name", "weight", "keywords", "inputs", "outputs", "slots"}

MAX_FILE_BYTES = 4 << 20         # a persona file (the shipped fish is ~100 kB)
MAX_NESTING = 8                  # tables and arrays in tables and arrays (a persona needs 5)
MAX_TEXT_CHARS = 1_000           # one template, slot value, name, keyword or the description (the fish's longest: 110)
MAX_PLACEHOLDERS = 20            # in one template or slot value (the fish's most: 5)
MAX_CONVERSATION_CHARS = 10_000  # a filled input + output; = guppy.data.MAX_CONVERSATION_CHARS (tests/test_persona.py)
MAX_WEIGHT = 1e6                 # a topic's weight (relative: 2 is twice as often as 1)
MAX_CARD_BYTES = 1 << 20         # a persona.json
# guppy's control tokens; = guppy.data.SPECIAL_TOKENS (tests/test_persona.py), not imported: data imports this module
CONTROL_TOKENS = ("<pad>", "<|im_start|>", "<|im_end|>")
_TOKEN_PREFIXES = {t[:i] for t in CONTROL_TOKENS for i in range(1, len(t))}
_LONGEST_TOKEN = max(map(len, CONTROL_TOKENS))
# Characters a persona's text may not hold: control characters (ESC would reach the terminal through chat and the
# validator) and the bidirectional overrides. A template or slot value may hold a tab or a line break (whitespace,
# collapsed when filled); a name or a keyword may not.
_BIDI_AND_SURROGATES = r"\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_CONTROL_IN_TEXT = re.compile(rf"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f{_BIDI_AND_SURROGATES}]")
_CONTROL_IN_NAME = re.compile(rf"[\x00-\x1f\x7f-\x9f{_BIDI_AND_SURROGATES}]")


class PersonaError(GuppyError, ValueError):
    """A persona file that cannot be used. str() is one line: "<file path>: <problem>"."""

    def __init__(self, path, problem: str):
        self.path = os.fspath(path)
        self.problem = printable(" ".join(str(problem).split()))  # one line, whatever the problem text held
        super().__init__(f"{printable(self.path)}: {self.problem}")  # a newline in the path reads \n


@dataclass
class Topic:
    name: str
    weight: float
    keywords: list[str]
    inputs: list[str]
    outputs: list[str]
    slots: dict[str, list[str]]
    # Templates compiled at load time (see _compile): a tuple of parts per template, so sampling never re-parses.
    _inputs: list = field(default_factory=list, repr=False, compare=False)
    _outputs: list = field(default_factory=list, repr=False, compare=False)

    def output_slot_names(self) -> list[str]:
        """The slots its output templates name, each once, in order of first use."""
        return list(dict.fromkeys(name for o in self.outputs for name in _slot_names(_parse(o))))


@dataclass
class Persona:
    name: str
    description: str
    topics: list[Topic]
    slots: dict[str, list[str]]
    path: str
    lowercase: bool = False   # a model trained on lowercase inputs answers capitals with nonsense: lowercase them
    _cum_weights: list = field(default_factory=list, repr=False, compare=False)


def default_persona_path(name: str = "guppy") -> str:
    """A shipped persona, installed as package data of guppy.personas: "guppy" (the fish) or "crab" (the starter
    character, small enough to read and copy: `python -m guppy.persona --starter crab my.toml`)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "personas", f"{name}.toml")


def shipped_personas() -> list[str]:
    folder = os.path.dirname(default_persona_path())
    return sorted(n[:-len(".toml")] for n in os.listdir(folder) if n.endswith(".toml"))


# ----------------------------------------------------------------------------------------------------------------
# templates: "i want {food}." -> ("i want ", <choices of food>, ".")
# A compiled template is a tuple whose parts are either literal str or a list of choices (a slot bound to its
# vocabulary). A choice is a str (plain value) or a tuple of parts (a value with nested placeholders).

def _parse(template: str) -> list:
    """Split a template into literal strings and slot names (as 1-tuples); raises ValueError on bad braces."""
    parts, pos, placeholders = [], 0, 0
    for m in _TEMPLATE_TOKEN.finditer(template):
        parts.append(template[pos:m.start()])
        tok = m.group(0)
        if tok in ("{{", "}}"):
            parts.append(tok[0])
        elif tok == "{":
            raise ValueError("has a '{' with no closing '}' (write {{ for a literal brace)")
        elif tok == "}":
            raise ValueError("has a '}' with no opening '{' (write }} for a literal brace)")
        elif not _IDENT.match(m.group(1)):
            raise ValueError(f"has an invalid placeholder {tok} (a slot name is letters, digits and _)")
        else:
            parts.append((m.group(1),))
            placeholders += 1
            if placeholders > MAX_PLACEHOLDERS:
                raise ValueError(f"has more than {MAX_PLACEHOLDERS} placeholders, the limit for one template or "
                                 "slot value")
        pos = m.end()
    parts.append(template[pos:])
    return parts


def _slot_names(parts) -> list[str]:
    return [p[0] for p in parts if isinstance(p, tuple)]


def _bind(parts, scope: dict) -> tuple:
    """Replace slot names by the compiled choices in `scope`, merging neighbouring literals."""
    out = []
    for p in parts:
        if isinstance(p, tuple):
            out.append(scope[p[0]])
        elif p:
            if out and isinstance(out[-1], str):
                out[-1] += p
            else:
                out.append(p)
    return tuple(out)


def _fill(parts: tuple, rng: random.Random) -> str:
    pieces = []
    for p in parts:
        if p.__class__ is str:
            pieces.append(p)
        else:
            choice = p[int(rng.random() * len(p))]  # fresh draw for every occurrence
            pieces.append(choice if choice.__class__ is str else _fill(choice, rng))
    return " ".join("".join(pieces).split())


# ----------------------------------------------------------------------------------------------------------------
# loading and validation

def _short(value, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: an error message quotes what is wrong, not a whole file."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text):,} characters)"


def _check_text(v: str, what: str, fail, name: bool = False) -> str:
    """A persona's text: at most MAX_TEXT_CHARS characters, no control characters (in a name, not even a tab)."""
    if len(v) > MAX_TEXT_CHARS:
        fail(f"{what} {_short(v, 30)} is {len(v):,} characters long; the limit is {MAX_TEXT_CHARS:,} (a model sees "
             "a few hundred characters of a conversation)")
    bad = (_CONTROL_IN_NAME if name else _CONTROL_IN_TEXT).search(v)
    if bad:
        fail(f"{what} {_short(v, 40)} holds the control character {bad.group()!r}; a persona's text is plain text")
    return v


def _string_list(value, what: str, fail, allow_empty_strings: bool = False, names: bool = False) -> list[str]:
    if not isinstance(value, list):
        fail(f"{what} must be a list of strings, got {type(value).__name__}")
    if not value:
        fail(f"{what} is an empty list")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            fail(f"{what}[{i}] must be a string, got {type(v).__name__} {_short(v)}")
        if not allow_empty_strings and not v.strip():
            fail(f"{what}[{i}] is an empty string")
        _check_text(v, f"{what}[{i}]", fail, name=names)
    return value


def _slot_table(table, what: str, fail) -> dict[str, list[str]]:
    if not isinstance(table, dict):
        fail(f"{what} must be a table of name = [values], got {type(table).__name__}")
    for name, values in table.items():
        if not _IDENT.match(name):
            fail(f"{what} has an invalid slot name {name!r} (letters, digits and _)")
        _string_list(values, f"slot {{{name}}}", fail, allow_empty_strings=True)
    return table


def _compile_slots(raw: dict, outer: dict, fail) -> dict:
    """Compile slot vocabularies whose values may reference `outer` slots or each other, one level deep.

    Returns name -> list of choices. `outer` is already compiled and holds plain-text choices or nested ones."""
    parsed = {}
    for name, values in raw.items():
        parsed[name] = []
        for v in values:
            try:
                parsed[name].append(_parse(v))
            except ValueError as e:
                fail(f"slot {{{name}}} value {v!r} {e}")
    # A slot is "plain" if none of its values hold a placeholder; only plain slots may be referenced from a value.
    plain = {n for n, vals in parsed.items() if not any(_slot_names(p) for p in vals)}
    plain |= {n for n, choices in outer.items() if n not in parsed and all(c.__class__ is str for c in choices)}
    compiled = {n: c for n, c in outer.items() if n not in parsed}
    for name in parsed:  # plain local slots first, so nested values can bind to them
        if name in plain:
            compiled[name] = ["".join(p) for p in parsed[name]]
    for name, vals in parsed.items():
        if name in plain:
            continue
        choices = []
        for p in vals:
            for ref in _slot_names(p):
                if ref not in compiled and ref not in parsed:
                    fail(f"slot {{{name}}} uses slot {{{ref}}} which is not defined")
                if ref not in plain:
                    fail(f"slot {{{name}}} uses slot {{{ref}}}, whose values hold placeholders too "
                         f"(placeholders nest one level deep only)")
            choices.append(_bind(p, compiled) if _slot_names(p) else "".join(p))
        compiled[name] = choices
    return compiled


def _compile_templates(templates: list[str], scope: dict, what: str, fail) -> list[tuple]:
    out = []
    for i, t in enumerate(templates):
        try:
            parts = _parse(t)
        except ValueError as e:
            fail(f"{what}[{i}] {t!r} {e}")
        for ref in _slot_names(parts):
            if ref not in scope:
                fail(f"uses slot {{{ref}}} which is not defined (in {what}[{i}] {t!r})")
        out.append(_bind(parts, scope))
    return out


def _code_part(line: str) -> str:
    """A TOML line without its comment (a '#' outside a string)."""
    quote = None
    for i, ch in enumerate(line):
        if quote is None and ch == "#":
            return line[:i]
        if ch in "\"'" and (quote is None or quote == ch) and (i == 0 or line[i - 1] != "\\"):
            quote = ch if quote is None else None
    return line


def _toml_problem(text: str, msg: str) -> str:
    """tomllib's message, placed where the mistake is. A missing ',' in an array is reported by tomllib at the next
    value, often on the next line: name the line that lacks it instead, and the value it should follow."""
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)", msg)
    if not m:
        if "(at end of document)" in msg and msg.startswith("Unclosed"):
            return f"invalid TOML ({msg.split(' (')[0]} at the end of the file: a ']' or '}}' is missing)"
        return f"invalid TOML ({msg})"
    what, line, col = msg[:m.start()], int(m.group(1)), int(m.group(2))
    lines = text.splitlines()
    at = lines[line - 1][col - 1:col] if line <= len(lines) else ""
    if what.startswith("Unclosed inline table") and not at.strip():
        return f"line {line}: invalid TOML ({what}, column {col}): a '}}' is missing (an inline table ends on its line)"
    if what.startswith(("Unclosed array", "Unclosed inline table")):
        before = [_code_part(lines[line - 1][:col - 1])] + [_code_part(t) for t in reversed(lines[:line - 1])]
        for back, code in enumerate(before):
            if code.strip():
                closer = "]" if what.startswith("Unclosed array") else "}"
                return (f"line {line - back}: invalid TOML: a ',' (or the closing '{closer}') is probably missing "
                        f"after {code.strip()[-30:]!r} (tomllib: {what} at line {line}, column {col})")
    return f"line {line}: invalid TOML ({what}, column {col})"


def _nesting(data) -> int:
    """How deep tables and arrays sit inside one another (the top table is 1), counted without recursion; stops
    counting past MAX_NESTING."""
    deepest, stack = 0, [(data, 1)]
    while stack and deepest <= MAX_NESTING:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((c, depth + 1) for c in children)
    return deepest


def _max_chars(parts, memo: dict) -> int:
    """The most characters a compiled template (or nested value) can fill to, before whitespace is collapsed."""
    n = 0
    for p in parts:
        if p.__class__ is str:
            n += len(p)
        else:
            key = ("len", id(p))
            if key not in memo:
                memo[key] = (max(len(c) if c.__class__ is str else _max_chars(c, memo) for c in p), p)
            n += memo[key][0]
    return n


def _tail(text: str) -> str:
    """The longest end of `text` that begins a control token (what a following text could complete into one)."""
    if "<" not in text[-_LONGEST_TOKEN:]:
        return ""
    for i in range(max(0, len(text) - _LONGEST_TOKEN), len(text)):
        if text[i:] in _TOKEN_PREFIXES:
            return text[i:]
    return ""


def _control_token(parts, tails: frozenset, lower: bool, memo: dict) -> tuple[str | None, frozenset]:
    """(a control token some filling of `parts` writes, or None; the ends a filling can leave), where the text
    before it may end in any of `tails` (`_tail`). Every choice is followed, but only through these few ends, so
    this costs (choices x ends), not (fillings). Whitespace collapsing cannot make a token (none holds a space)."""
    for p in parts:
        key = (lower, id(p) if p.__class__ is not str else p, tails)
        if key not in memo:
            found, after = None, set()
            for c in ((p,) if p.__class__ is str else p):
                if c.__class__ is str:
                    c = c.lower() if lower else c
                    for t in tails:
                        found = next((tok for tok in CONTROL_TOKENS if tok in t + c), None)
                        if found:
                            break
                        after.add(_tail(t + c))
                else:
                    found, ends = _control_token(c, tails, lower, memo)
                    after |= ends
                if found:
                    break
            memo[key] = (found, frozenset(after), p)  # p kept alive: its id() stays its own
        found, tails = memo[key][:2]
        if found:
            return found, frozenset()
    return None, tails


def _check_fillings(topic: Topic, lowercase: bool, memo: dict, fail):
    """What a topic's filled templates can write: no control token, and no conversation over the length limit."""
    for what, templates, compiled, lower in (("inputs", topic.inputs, topic._inputs, lowercase),
                                             ("outputs", topic.outputs, topic._outputs, False)):
        for i, parts in enumerate(compiled):
            found, _ = _control_token(parts, frozenset({""}), lower, memo)
            if found:
                fail(f"wrote {found} in a filling of {what}[{i}] {_short(templates[i], 50)} (from the template or "
                     "a slot value): it is one of guppy's control tokens, which only the chat template may place; "
                     "remove it from the persona's text")
    longest = [max(range(len(c)), key=lambda i, c=c: _max_chars(c[i], memo)) for c in (topic._inputs, topic._outputs)]
    chars = [_max_chars(topic._inputs[longest[0]], memo), _max_chars(topic._outputs[longest[1]], memo)]
    if sum(chars) > MAX_CONVERSATION_CHARS:
        fail(f"can write a conversation of {sum(chars):,} characters (inputs[{longest[0]}] filled to {chars[0]:,}, "
             f"outputs[{longest[1]}] to {chars[1]:,}); the limit is {MAX_CONVERSATION_CHARS:,}, as for "
             "--from-jsonl (a model sees a few hundred): shorten its slot values")


def load_persona(path: str | os.PathLike | None = None) -> Persona:
    """Read, validate and compile a persona file (None = the shipped guppy persona). Raises PersonaError."""
    path = os.fspath(path) if path is not None else default_persona_path()

    def fail(problem):
        raise PersonaError(path, problem) from None  # the message already says what the cause was

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)  # never more: /dev/zero ends here, not in a MemoryError
        if len(raw) > MAX_FILE_BYTES:
            fail(f"larger than {MAX_FILE_BYTES >> 20} MiB, the limit for a persona file (the shipped fish is "
                 "~100 kB); is it a persona?")
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark, as some Windows editors save
    except OSError as e:
        fail(f"cannot read file ({e.strerror or e})")
    except UnicodeDecodeError as e:
        fail(f"not UTF-8 text ({e.reason} at byte {e.start})")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        fail(_toml_problem(text, str(e)))
    except RecursionError:  # tomllib parses nested arrays and inline tables by recursion
        fail(f"nested too deeply (arrays or inline tables hundreds of levels inside one another; a persona needs "
             f"5 levels, and the limit is {MAX_NESTING})")
    if _nesting(data) > MAX_NESTING:
        fail(f"nested more than {MAX_NESTING} levels deep (tables and arrays inside one another); a persona needs "
             "5 levels")

    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        fail(f"unknown top-level key {unknown[0]!r} (allowed: {', '.join(sorted(_TOP_KEYS))})")

    head = data.get("persona")
    if not isinstance(head, dict):
        fail("no [persona] table (it needs at least name = \"...\")")
    unknown = sorted(set(head) - _PERSONA_KEYS)
    if unknown:
        fail(f"[persona] has unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_PERSONA_KEYS))})")
    name, description = head.get("name"), head.get("description", "")
    if not isinstance(name, str) or not name.strip():
        fail("[persona] name must be a non-empty string")
    _check_text(name, "[persona] name", fail, name=True)
    if not isinstance(description, str):
        fail("[persona] description must be a string")
    _check_text(description, "[persona] description", fail)
    lowercase = head.get("lowercase", False)
    if not isinstance(lowercase, bool):
        fail(f"[persona] lowercase must be true or false, got {_short(lowercase)}")

    shared_raw = _slot_table(data.get("slots", {}), "[slots]", fail)
    shared = _compile_slots(shared_raw, {}, fail)

    raw_topics = data.get("topics")
    if raw_topics is None or raw_topics == []:
        fail("no [[topics]]")
    if not isinstance(raw_topics, list) or not all(isinstance(t, dict) for t in raw_topics):
        fail("topics must be written as [[topics]] tables")

    topics, seen, memo = [], {}, {}
    for i, raw in enumerate(raw_topics, start=1):
        tname = raw.get("name")
        label = f"topic {tname!r}" if isinstance(tname, str) and tname.strip() else f"topic {i}"

        def tfail(problem, label=label):
            fail(f"{label} {problem}")

        unknown = sorted(set(raw) - _TOPIC_KEYS)
        if unknown:
            tfail(f"has unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_TOPIC_KEYS))})")
        if not isinstance(tname, str) or not tname.strip():
            tfail("has no name (name = \"...\" becomes the category)")
        _check_text(tname, "name", tfail, name=True)
        if tname in seen:
            fail(f"topics {seen[tname]} and {i} are both named {tname!r} (topic names must be unique)")
        seen[tname] = i
        weight = raw.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (0 < weight <= MAX_WEIGHT):
            tfail(f"weight must be a positive number, at most {MAX_WEIGHT:,.0f} (weights are relative: 2 is twice as "
                  f"often as 1), got {_short(weight)}")
        for key in ("keywords", "inputs", "outputs"):
            if key not in raw:
                tfail(f"has no {key}")
        keywords = _string_list(raw["keywords"], "keywords", tfail, names=True)
        inputs = _string_list(raw["inputs"], "inputs", tfail)
        outputs = _string_list(raw["outputs"], "outputs", tfail)
        local_raw = _slot_table(raw.get("slots", {}), "[topics.slots]", tfail)
        scope = _compile_slots(local_raw, shared, tfail) if local_raw else shared
        topic = Topic(
            name=tname, weight=float(weight), keywords=list(keywords), inputs=list(inputs), outputs=list(outputs),
            slots=dict(local_raw),
            _inputs=_compile_templates(inputs, scope, "inputs", tfail),
            _outputs=_compile_templates(outputs, scope, "outputs", tfail),
        )
        _check_fillings(topic, lowercase, memo, tfail)
        topics.append(topic)

    cum, total = [], 0.0
    for t in topics:
        total += t.weight
        cum.append(total)
    return Persona(name=name, description=description, topics=topics, slots=dict(shared_raw), path=path,
                   lowercase=lowercase, _cum_weights=cum)


# ----------------------------------------------------------------------------------------------------------------
# sampling

def _pick_topic(persona: Persona, rng: random.Random) -> Topic:
    cum = persona._cum_weights
    i = bisect(cum, rng.random() * cum[-1])
    return persona.topics[min(i, len(cum) - 1)]  # min(): guards float round-off at the very top


def sample_conversation(persona: Persona, rng: random.Random) -> dict:
    """One {"input", "output", "category"} sample: a topic by weight, an input and an output template, fresh fills.
    With `lowercase`, the input is lowercased as chat will lowercase what a user types."""
    topic = _pick_topic(persona, rng)
    inp = topic._inputs[int(rng.random() * len(topic._inputs))]
    out = topic._outputs[int(rng.random() * len(topic._outputs))]
    text = _fill(inp, rng)
    return {"input": text.lower() if persona.lowercase else text, "output": _fill(out, rng), "category": topic.name}


def generate_dataset(persona: Persona, n_samples: int, seed: int = 1337,
                     eval_fraction: float = 0.05) -> tuple[list[dict], list[dict], dict]:
    """Sample (train, eval, stats), deterministic for a seed. No eval (input, output) pair appears in train.

    The eval set is drawn first; train draws that repeat an eval pair are rejected (counted in stats). A persona too
    small to supply n_train such draws within 50x attempts stops early and says so in stats["train_shortfall"].
    Duplicates within train are kept: a real persona repeats itself too."""
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    rng = random.Random(seed)
    n_eval = round(n_samples * eval_fraction)
    n_train = n_samples - n_eval

    eval_set = [sample_conversation(persona, rng) for _ in range(n_eval)]
    eval_pairs = {(s["input"], s["output"]) for s in eval_set}
    train, rejected, attempts = [], 0, 0
    max_attempts = 50 * n_train
    while len(train) < n_train and attempts < max_attempts:
        attempts += 1
        s = sample_conversation(persona, rng)
        if (s["input"], s["output"]) in eval_pairs:
            rejected += 1
            continue
        train.append(s)

    both = train + eval_set
    total = max(len(both), 1)
    stats = {
        "n_train": len(train),
        "n_eval": len(eval_set),
        "unique_reply_fraction": len({s["output"] for s in both}) / total,
        "unique_pair_fraction": len({(s["input"], s["output"]) for s in both}) / total,
        "topics": len(persona.topics),
        "rejected_for_overlap": rejected,
        "train_shortfall": n_train - len(train),
    }
    return train, eval_set, stats


def eval_prompts(persona: Persona, n_per_topic: int = 2, seed: int = 0) -> list[dict]:
    """Scored prompts for the keyword hit-rate eval: n_per_topic filled inputs per topic, deterministic for a seed.

    Input templates are taken without replacement while they last, so a topic's prompts differ in phrasing."""
    rng = random.Random(seed)
    prompts = []
    for topic in persona.topics:
        order = []
        while len(order) < n_per_topic:
            order += rng.sample(range(len(topic._inputs)), len(topic._inputs))
        for j in order[:n_per_topic]:
            text = _fill(topic._inputs[j], rng)
            prompts.append({"prompt": text.lower() if persona.lowercase else text, "keywords": list(topic.keywords),
                            "category": topic.name})
    return prompts


# ----------------------------------------------------------------------------------------------------------------
# persona.json: what chat, the export and the browser page need to know of the character, without its TOML file.
# `guppy prepare` writes it into the data folder, `guppy train` copies it into the run, `guppy export` into DIR.

CARD_FILE = "persona.json"


def persona_card(persona: Persona, n_prompts: int = 6, seed: int = 0) -> dict:
    """{name, description, lowercase, sample_prompts}: one filled input from each of n_prompts topics spread over
    the file (the page shows them as buttons)."""
    prompts = eval_prompts(persona, 1, seed)
    step = max(1, len(prompts) / n_prompts)
    picked = [prompts[int(i * step)]["prompt"] for i in range(min(n_prompts, len(prompts)))]
    return {"name": persona.name, "description": persona.description, "lowercase": persona.lowercase,
            "sample_prompts": picked}


def read_card(path: str) -> dict:
    """A persona.json, checked: raises PersonaError("<path>: <problem>") on anything malformed."""
    import json

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CARD_BYTES + 1)
        if len(raw) > MAX_CARD_BYTES:
            raise PersonaError(path, f"larger than {MAX_CARD_BYTES >> 20} MiB: not a persona card (prepare writes "
                                     "a few hundred bytes)")
        card = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PersonaError(path, f"unreadable persona card ({getattr(e, 'strerror', None) or e})") from None
    except RecursionError:
        raise PersonaError(path, "unreadable persona card (nested too deeply)") from None
    if not isinstance(card, dict) or not isinstance(card.get("name"), str):
        raise PersonaError(path, "a persona card is a JSON object with a string \"name\"")
    if not isinstance(card.get("lowercase", False), bool) or not isinstance(card.get("description", ""), str):
        raise PersonaError(path, "\"lowercase\" must be true or false and \"description\" a string")
    prompts = card.get("sample_prompts", [])
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise PersonaError(path, "\"sample_prompts\" must be a list of strings")
    return {"name": card["name"], "description": card.get("description", ""),
            "lowercase": card.get("lowercase", False), "sample_prompts": prompts}


def _parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m guppy.persona",
        description="Check a persona file and report what it can make: distinct conversations, the expected share "
                    "of unique replies, each topic's counts, and what to fix before `guppy prepare`. Exit 0: it can "
                    "be prepared (warnings included); 1: `guppy prepare` would refuse it at these settings; "
                    "2: the file has a mistake (one line on stderr).")
    p.add_argument("file", nargs="?", help="persona TOML file (default: the shipped fish); with --starter, where "
                                           "to write the copy")
    p.add_argument("--starter", choices=shipped_personas(), metavar="NAME",
                   help=f"start from a shipped persona ({', '.join(shipped_personas())}): copy it to FILE (never "
                        "over an existing file), or check it as it is without FILE")
    p.add_argument("--samples", type=int, default=60_000, metavar="N", help="as for guppy prepare (default 60000)")
    p.add_argument("--eval-fraction", type=float, default=0.05, metavar="F",
                   help="as for guppy prepare (default 0.05)")
    return p


def _copy_starter(name: str, dest: str) -> str:
    import shutil

    if os.path.lexists(dest):
        raise PersonaError(dest, "already exists; choose another file name (--starter never overwrites)")
    try:
        shutil.copyfile(default_persona_path(name), dest)
    except OSError as e:
        raise PersonaError(dest, f"cannot write the copy ({e.strerror or e})") from None
    return dest


def main(argv=None):
    """python -m guppy.persona [--starter NAME] [--samples N] [--eval-fraction F] [FILE]: check a persona and print
    its report (guppy/persona_report.py) and a few samples. Exit 0 where it can be prepared, 1 where `guppy prepare`
    would refuse it (the reason on stderr, one line), 2 for a file with a mistake (one line)."""
    import sys

    from .persona_report import persona_report

    a = _parser().parse_args(argv)
    command = "python -m guppy.persona"
    if not 0.0 <= a.eval_fraction < 1.0 or a.samples < 2:
        print(f"{command}: error: --samples must be at least 2 and --eval-fraction in [0, 1), got {a.samples} and "
              f"{a.eval_fraction}", file=sys.stderr)
        sys.exit(2)
    try:
        path = a.file
        if a.starter:
            path = _copy_starter(a.starter, a.file) if a.file else default_persona_path(a.starter)
            if a.file:
                print(f"wrote {a.file}, a copy of the shipped {a.starter!r}: edit it, then check it again with "
                      f"{command} {a.file}\n")
        persona = load_persona(path)
        report = persona_report(persona, a.samples, a.eval_fraction)
    except PersonaError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        exit_interrupted(command)
    rng = random.Random(0)
    print(report.details, "", "samples:", sep="\n")
    for s in (sample_conversation(persona, rng) for _ in range(8)):
        print(f"  [{s['category']}] {s['input']!r} -> {s['output']!r}")
    if report.warnings:
        print("", *(f"warning: {w}" for w in report.warnings), sep="\n")
    if report.fatal:
        sys.stdout.flush()  # the refusal comes last, also where stdout is a pipe
        print(f"{command}: error: {printable(persona.path)}: guppy prepare would refuse it: {report.fatal}",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
