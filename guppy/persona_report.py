"""What a persona can make, before anything is sampled: `persona_report(persona, samples, eval_fraction)`.

`python -m guppy.persona FILE` prints it; `guppy prepare` logs its summary first and refuses a persona whose dataset
would be useless. Everything is computed from the templates, without sampling:

- Distinct conversations. A topic's input is one of its input templates with every placeholder filled, and likewise
  its output, drawn independently; so a topic makes (distinct inputs) x (distinct outputs) conversations, and the
  persona the sum over its topics. A side with at most EXACT_LIMIT fillings is enumerated and its distinct texts
  counted exactly (two fillings can give one text: a "" value, a value repeated in a list). A larger side is
  estimated by its number of fillings, the product of each placeholder's choices summed over templates: an upper
  bound, marked "~" in the report.
- Expected figures, as generate_dataset draws the samples: the held-out split first draws n_eval conversations,
  then train draws n_train more, redrawing any whose (input, output) pair is held out, and gives up after
  TRAIN_ATTEMPTS draws per train conversation. If something has probability p per draw, n draws miss it with
  chance (1 - p)^n. Train draws only among the pairs not held out (total probability `accept`, so p / accept each).
  Hence the expected train size; the expected distinct replies (a reply missing from the held-out split has none of
  its pairs held out: it is missing from both splits with chance (1 - p)^n_eval (1 - p/accept)^n_train; exact with
  no held-out split); and the expected share of held-out replies that also occur in train (pair by pair, pairs
  taken as independent). A probability is the topic's share of the weights, times 1/(templates), times 1/(choices)
  for every placeholder filled. Large sides are held as histograms of these probabilities (within a factor 1.0001
  they share a bin), so nothing is enumerated there. Against generate_dataset over 20 seeds, on a persona whose
  held-out split holds about half of the draws: within 0.01 (unique replies) and 0.03 (held-out replies in train);
  tests/test_persona.py.

The thresholds (why they matter):
- UNIQUE_REPLY_AIM: below it, most replies are repeats, and a model learns the replies by heart rather than the
  character. The shipped fish and the starter crab are far above it; GuppyLM's own generator was far below.
- SEEN_REPLY_LIMIT: the held-out split keeps (input, output) pairs out of train, but not replies. When most held-out
  replies also occur in train, held-out loss measures recall of seen replies, not how the model speaks as the
  character.
- Refusals (`fatal`): no training conversations after the held-out split, or fewer distinct conversations than the
  held-out split draws (it would hold nearly all of them, and train only repeats).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from .errors import printable

UNIQUE_REPLY_AIM = 0.5    # expected unique replies, over the persona and over each topic's own samples
SEEN_REPLY_LIMIT = 0.5    # expected share of held-out replies that also occur in train
EXACT_LIMIT = 20_000      # a side with at most this many fillings is enumerated (exact counts)
MAX_TOPIC_WARNINGS = 5    # thin topics named one by one; the rest are counted
TRAIN_ATTEMPTS = 50       # generate_dataset gives up after this many draws per train conversation
_BIN = 1e4                # histogram bins: round(ln p * _BIN)
# At most this many bins (neighbours merged beyond: _coarsen), so that the products stay small: a slot's values, a
# template's fillings, and a side (a topic's inputs or outputs). The shipped fish needs 10, 310 and 134; without the
# bound, a template of 50 placeholders whose slots list their values unevenly took minutes.
SLOT_BINS, TEMPLATE_BINS, SIDE_BINS = 64, 512, 256


# ----------------------------------------------------------------------------------------------------------------
# probability histograms: {bin: [outcomes, total probability]}

def _hist_add(h: dict, p: float, count, mass: float | None = None):
    entry = h.setdefault(round(math.log(p) * _BIN), [0, 0.0])
    entry[0] += count
    entry[1] += count * p if mass is None else mass


def _hist_merge(into: dict, h: dict, scale: float = 1.0) -> dict:
    for count, mass in h.values():
        _hist_add(into, mass * scale / count, count, mass * scale)
    return into


def _hist_product(a: dict, b: dict, limit: int = TEMPLATE_BINS) -> dict:
    """The histogram of (x, y) pairs drawn independently from a and b (at most `limit` bins)."""
    out = {}
    for ca, ma in a.values():
        for cb, mb in b.values():
            _hist_add(out, (ma / ca) * (mb / cb), ca * cb, ma * mb)
    return _coarsen(out, limit)


def _coarsen(h: dict, limit: int) -> dict:
    """h with at most `limit` bins: where it has more, bins of neighbouring probability are merged into `limit`
    equal spans of ln p (each merged bin then stands for its outcomes at their mean probability)."""
    if len(h) <= limit:
        return h
    lo, hi = min(h), max(h)
    out = {}
    for key, (count, mass) in h.items():
        entry = out.setdefault(int((key - lo) * (limit - 1) / (hi - lo)), [0, 0.0])
        entry[0] += count
        entry[1] += mass
    return out


def _chance_in(p: float, n: int) -> float:
    """1 - (1 - p)^n: the chance that n draws include an outcome of probability p."""
    return 1.0 if p >= 1.0 else -math.expm1(n * math.log1p(-p))


def expected_distinct(h: dict, n: int) -> float:
    """Expected number of distinct outcomes in n draws: sum over outcomes of 1 - (1 - p)^n."""
    return sum(count * _chance_in(mass / count, n) for count, mass in h.values())


def expected_repeat(h: dict, n: int) -> float:
    """The chance that one more draw repeats an outcome of n earlier ones: sum over outcomes of p (1 - (1 - p)^n)."""
    return sum(mass * _chance_in(mass / count, n) for count, mass in h.values())


# ----------------------------------------------------------------------------------------------------------------
# one side of a topic (its inputs or its outputs): fillings, distinct texts, probabilities
# A compiled template (guppy/persona.py) is a tuple of parts: literal str, or a list of choices (str or a nested
# tuple of parts whose slots are plain lists of str).

def _choices(slot: list) -> list[tuple]:
    """(choice, probability) of a slot's distinct values: a value listed twice is drawn twice as often."""
    seen = {}
    for c in slot:
        key = c if c.__class__ is str else repr(c)
        seen[key] = (c, seen.get(key, (c, 0.0))[1] + 1 / len(slot))
    return list(seen.values())


def _fillings(parts) -> int:
    n = 1
    for p in parts:
        if p.__class__ is not str:
            n *= sum(1 if c.__class__ is str else _fillings(c) for c, _ in _choices(p))
    return n


def _template_hist(parts) -> dict:
    h = {0: [1, 1.0]}
    for p in parts:
        if p.__class__ is str:
            continue
        slot = {}
        for c, q in _choices(p):
            if c.__class__ is str:
                _hist_add(slot, q, 1)
            else:
                _hist_merge(slot, _template_hist(c), q)
        h = _hist_product(h, _coarsen(slot, SLOT_BINS))
    return h


def _template_texts(parts) -> list[tuple[str, float]]:
    """Every filling of a template as (raw text, probability)."""
    options = []
    for p in parts:
        if p.__class__ is str:
            options.append([(p, 1.0)])
        else:
            options.append([(text, q / len(p)) for c in p
                            for text, q in ([(c, 1.0)] if c.__class__ is str else _template_texts(c))])
    out = []
    for combo in itertools.product(*options):
        prob = 1.0
        for _, q in combo:
            prob *= q
        out.append(("".join(t for t, _ in combo), prob))
    return out


@dataclass
class Side:
    templates: int
    distinct: int          # distinct texts (exact) or fillings (an upper bound)
    exact: bool
    hist: dict = field(repr=False)            # probabilities of its texts within the topic (sum 1)
    texts: dict | None = field(repr=False)    # text -> probability within the topic, when exact


def side_of(templates: list, lowercase: bool = False) -> Side:
    fillings = sum(_fillings(t) for t in templates)
    if fillings <= EXACT_LIMIT:
        texts = {}
        for t in templates:
            for raw, q in _template_texts(t):
                text = " ".join(raw.split())  # as _fill collapses whitespace
                text = text.lower() if lowercase else text
                texts[text] = texts.get(text, 0.0) + q / len(templates)
        hist = {}
        for q in texts.values():
            _hist_add(hist, q, 1)
        return Side(len(templates), len(texts), True, _coarsen(hist, SIDE_BINS), texts)
    hist = {}
    for t in templates:
        _hist_merge(hist, _template_hist(t), 1 / len(templates))
    return Side(len(templates), fillings, False, _coarsen(hist, SIDE_BINS), None)


# ----------------------------------------------------------------------------------------------------------------
# the figures

@dataclass
class TopicCounts:
    name: str
    weight: float
    share: float                  # of the samples
    inputs: Side
    outputs: Side
    output_slots: dict            # {slot}: its number of values, for each slot the topic's outputs use
    unique_replies: float         # expected, over this topic's own share of the samples (no held-out split)

    @property
    def conversations(self) -> int:
        return self.inputs.distinct * self.outputs.distinct


def _topics(persona, samples: int) -> list[TopicCounts]:
    total = sum(t.weight for t in persona.topics)
    out = []
    for t in persona.topics:
        share = t.weight / total
        ins, outs = side_of(t._inputs, persona.lowercase), side_of(t._outputs)
        slots = {name: len(t.slots.get(name) or persona.slots[name]) for name in t.output_slot_names()}
        n_t = max(1, round(samples * share))
        out.append(TopicCounts(t.name, t.weight, share, ins, outs, slots, expected_distinct(outs.hist, n_t) / n_t))
    return out


def _replies(topics: list[TopicCounts]) -> tuple[dict, int]:
    """The persona's replies: their probability histogram, and how many (exact texts merge across topics)."""
    texts, hist, distinct = {}, {}, 0
    for t in topics:
        if t.outputs.exact:
            for text, q in t.outputs.texts.items():
                texts[text] = texts.get(text, 0.0) + q * t.share
        else:
            _hist_merge(hist, t.outputs.hist, t.share)
            distinct += t.outputs.distinct
    for q in texts.values():
        _hist_add(hist, q, 1)
    return hist, distinct + len(texts)


def _replies_drawn(replies: dict, n_eval: int, n_train: int, accept: float) -> float:
    """Expected distinct replies in held-out + train. A reply of probability p is missing from the held-out split
    with chance (1 - p)^n_eval; then none of its pairs is held out, and train misses it with (1 - p/accept)^n_train."""
    total = 0.0
    for count, mass in replies.values():
        p = mass / count
        log_absent = n_eval * math.log1p(-p) if p < 1 else -math.inf
        if n_train:
            log_absent += n_train * math.log1p(-p / accept) if p < accept else -math.inf
        total += count * -math.expm1(log_absent)
    return total


def _log_train_misses(q: float, n_eval: int, n_train: int, accept: float) -> float:
    """ln P(train does not hold a pair of probability q): it is held out, or train's draws miss it."""
    held_in_train = math.exp(n_eval * math.log1p(-q)) * _chance_in(q / accept, n_train) if q < 1 else 0.0
    return math.log1p(-held_in_train) if held_in_train < 1 else -math.inf


def _held_out_seen(t: TopicCounts, n_eval: int, n_train: int, accept: float) -> float:
    """This topic's part of the chance that a held-out reply also occurs in train.

    A held-out draw (input i, reply r) has probability q = share * P(i) * P(r). Its reply occurs in train if another
    pair (i', r) stayed out of the held-out split, (1 - q')^n_eval, and train drew it: train's n_train draws are
    the pairs not held out, each with probability q' / accept. Pairs are taken as independent, and a reply that
    two topics share is counted in each separately."""
    if accept <= 0:
        return 0.0
    total = 0.0
    for cb, mb in t.outputs.hist.values():
        misses = [(ca, ma, _log_train_misses(t.share * (ma / ca) * (mb / cb), n_eval, n_train, accept))
                  for ca, ma in t.inputs.hist.values()]
        all_miss = sum(ca * m for ca, _, m in misses)
        for _, ma, m in misses:  # the held-out pair itself cannot be in train: its own term is left out
            total += t.share * ma * mb * (1.0 if all_miss == -math.inf else -math.expm1(all_miss - m))
    return total


# ----------------------------------------------------------------------------------------------------------------
# the report

@dataclass
class Report:
    """The figures of persona_report, and what to do about them.

    text: the report to print: `details` (the headline figures and a row per topic), then the refusal and the
    warnings. summary: the headline figures and the warnings (what `guppy prepare` logs; it raises the refusal).
    warnings: one line each, with its fix. fatal: one line, why `guppy prepare` refuses and the fix; None where it
    can prepare.
    """
    samples: int
    eval_fraction: float
    n_train: int
    n_eval: int
    topics: list[TopicCounts]
    conversations: int           # distinct conversations, summed over topics
    exact: bool                  # conversations counted exactly (else: an upper bound)
    replies: int                 # distinct replies
    replies_exact: bool
    unique_replies: float        # expected unique-reply fraction of the samples
    held_out_seen: float         # expected share of held-out replies that also occur in train
    held_out_cover: float        # expected share of train's draws whose pair is held out (and redrawn)
    expected_train: float        # expected train conversations generate_dataset manages to draw
    text: str = ""
    details: str = ""
    summary: str = ""
    warnings: list[str] = field(default_factory=list)
    fatal: str | None = None


def persona_report(persona, samples: int = 60_000, eval_fraction: float = 0.05) -> Report:
    """What `samples` conversations with `eval_fraction` held out would be, as generate_dataset draws them."""
    n_eval = round(samples * eval_fraction)
    n_train = samples - n_eval
    topics = _topics(persona, samples)
    replies, n_replies = _replies(topics)
    pairs = {}
    for t in topics:
        _hist_merge(pairs, _hist_product(t.inputs.hist, t.outputs.hist), t.share)
    cover = expected_repeat(pairs, n_eval)
    expected_train = min(n_train, TRAIN_ATTEMPTS * n_train * max(1 - cover, 0.0))
    drawn, n_drawn = max(1.0, n_eval + expected_train), round(expected_train)
    r = Report(samples, eval_fraction, n_train, n_eval, topics,
               conversations=sum(t.conversations for t in topics),
               exact=all(t.inputs.exact and t.outputs.exact for t in topics),
               replies=n_replies, replies_exact=all(t.outputs.exact for t in topics),
               unique_replies=_replies_drawn(replies, n_eval, n_drawn, 1 - cover) / drawn,
               held_out_seen=sum(_held_out_seen(t, n_eval, n_drawn, 1 - cover) for t in topics),
               held_out_cover=cover,
               expected_train=expected_train)
    thin = sorted((t for t in topics if t.unique_replies < UNIQUE_REPLY_AIM), key=lambda t: t.unique_replies)
    fix = (f"add outputs or slot values, first to {', '.join(repr(t.name) for t in thin[:3])}" if thin
           else "add topics, outputs and slot values")
    path = printable(persona.path)  # a newline in the file's name would break the report's lines
    r.fatal = _fatal(r, path, fix)
    r.warnings = _warnings(r, path, thin, fix)
    head = _headline(r, persona)
    tail = ([f"cannot be prepared: {r.fatal}"] if r.fatal else []) + [f"warning: {w}" for w in r.warnings]
    r.details = "\n".join(head + [""] + _table(r))
    r.text = "\n".join([r.details] + ([""] + tail if tail else []))
    r.summary = "\n".join(head + [f"warning: {w}" for w in r.warnings])
    return r


def _fatal(r: Report, path: str, fix: str) -> str | None:
    """Why `guppy prepare` refuses, with the fix; None where the dataset can be used."""
    settings = f"--samples {r.samples:,}, --eval-fraction {r.eval_fraction}"
    if r.n_train == 0:
        return f"{settings} leaves no training conversations; raise --samples or lower --eval-fraction"
    if r.conversations < r.n_eval:  # an upper bound where estimated: the refusal holds either way
        return (f"makes only {_amount(r.conversations, r.exact)} distinct conversations, fewer than the "
                f"{r.n_eval:,} that the held-out split draws ({settings}): it would hold nearly all of them and "
                f"leave train only repeats. Fix: {fix}, until it makes well over {r.n_eval:,} "
                f"(python -m guppy.persona {path} counts them per topic)")
    if r.expected_train < 1:
        return (f"leaves no training conversations after the held-out split ({settings}): ~{r.held_out_cover:.0%} "
                f"of its draws repeat a held-out conversation. Fix: {fix}")
    return None


def _warnings(r: Report, path: str, thin: list[TopicCounts], fix: str) -> list[str]:
    out = []
    if r.fatal is None and r.expected_train < r.n_train:
        out.append(f"train will be short, ~{r.expected_train:,.0f} of {r.n_train:,} conversations: "
                   f"~{r.held_out_cover:.1%} of its draws repeat a held-out conversation and are drawn again, "
                   f"{TRAIN_ATTEMPTS} draws per conversation at most. Fix: {fix}")
    if r.unique_replies < UNIQUE_REPLY_AIM:
        out.append(f"unique replies {_pct(r.unique_replies)} expected at --samples {r.samples:,} (aim: "
                   f"{UNIQUE_REPLY_AIM:.0%} or more): below that most replies are repeats, and a model learns them "
                   f"by heart instead of the character. Fix: {fix}")
    if r.n_eval and r.held_out_seen > SEEN_REPLY_LIMIT:
        out.append(f"{r.held_out_seen:.0%} of held-out replies are expected to occur in train too (aim: under "
                   f"{SEEN_REPLY_LIMIT:.0%}): held-out loss then measures recall of seen replies, not how the model "
                   f"speaks as the character. Fix: {fix}")
    out += [_topic_fix(t, r.samples * t.share) for t in thin[:MAX_TOPIC_WARNINGS]]
    if len(thin) > MAX_TOPIC_WARNINGS:
        out.append(f"... and {len(thin) - MAX_TOPIC_WARNINGS} more topics under {UNIQUE_REPLY_AIM:.0%} unique "
                   f"replies (python -m guppy.persona {path} lists every topic)")
    return out


def _topic_fix(t: TopicCounts, n_t: float) -> str:
    out = t.outputs
    s = "s" if out.templates != 1 else ""
    if not t.output_slots:
        what, fix = f"has {out.templates} output{s} and no slots", "add outputs or slot values"
    else:
        slots = ", ".join(f"{{{name}}} {n}" for name, n in t.output_slots.items())
        what = (f"can say only {_amount(out.distinct, out.exact)} different replies ({out.templates} output{s}; "
                f"values: {slots})")
        fix = "add outputs, or values to its slots"
    return f"topic {t.name!r} {what} for its ~{n_t:,.0f} samples ({_pct(t.unique_replies)} unique): {fix}"


def _amount(n, exact: bool) -> str:
    """12,345 where counted; ~12,345, ~3.4 million, ~1.2e+15 where estimated."""
    if exact or n < 1e6:
        return f"{'' if exact else '~'}{n:,}"
    if n >= 1e12:
        return f"~{n:.1e}"
    return f"~{n / 1e9:.1f} billion" if n >= 1e9 else f"~{n / 1e6:.1f} million"


def _pct(x: float) -> str:
    return f"{x:.1%}" if x >= 0.001 or x == 0 else f"{x:.3%}"


def _headline(r: Report, persona) -> list[str]:
    n = len(persona.topics)
    how = "counted exactly" if r.exact else "'~': estimated, at most this many"
    return [
        f"{printable(persona.path)}: {persona.name!r}, {n} topic{'s' if n != 1 else ''}; at --samples {r.samples:,} "
        f"and --eval-fraction {r.eval_fraction}: {r.n_train:,} train + {r.n_eval:,} held-out conversations",
        f"  distinct conversations             {_amount(r.conversations, r.exact):>14}   {how}",
        f"  distinct replies                   {_amount(r.replies, r.replies_exact):>14}",
        f"  unique replies, expected           {_pct(r.unique_replies):>14}   aim: {UNIQUE_REPLY_AIM:.0%} or more",
        f"  held-out replies also in train     {_pct(r.held_out_seen) if r.n_eval and not r.fatal else '-':>14}   "
        f"aim: under {SEEN_REPLY_LIMIT:.0%}",
    ]


def _table(r: Report) -> list[str]:
    width = max(12, *(len(printable(t.name)) for t in r.topics))
    rows = [f"  {'topic':<{width}}  {'weight':>6}  {'samples':>8}  {'inputs':>13}  {'outputs':>13}  "
            f"{'conversations':>15}  {'unique replies':>14}"]
    for t in r.topics:
        rows.append(f"  {printable(t.name):<{width}}  {t.weight:>6g}  {r.samples * t.share:>8,.0f}  "
                    f"{_amount(t.inputs.distinct, t.inputs.exact):>13}  "
                    f"{_amount(t.outputs.distinct, t.outputs.exact):>13}  "
                    f"{_amount(t.conversations, t.inputs.exact and t.outputs.exact):>15}  "
                    f"{_pct(t.unique_replies):>14}")
    return rows
