"""Data: the persona dataset on disk, the ChatML tokenizer, token arrays, and the two ways of batching them.

`prepare()` writes, into one folder:
    train.jsonl, eval.jsonl     GuppyLM's dataset format: {"input", "output", "category"} per line (a multi-turn
                                conversation as {"messages", "category"})
    tokenizer.json              byte-level BPE (HF tokenizers), <pad>=0 <|im_start|>=1 <|im_end|>=2
    persona.json                the character's name, description, lowercase option, sample prompts (not --from-jsonl)
    {split}.tokens.npy          every conversation's token ids, concatenated (uint16)
    {split}.offsets.npy         conversation c is tokens[offsets[c]:offsets[c+1]] (int64)
    {split}.prompt_len.npy      how many of its tokens are the prompt: the user turn, after any earlier turns
                                (for assistant-only loss)
    meta.json                   counts, unique-reply fraction, per-category keywords, seed
Training reads only the arrays: it never re-tokenizes.

A conversation is `<|im_start|>user\\n{input}<|im_end|>\\n<|im_start|>assistant\\n{output}<|im_end|>`; the model learns
to predict each next token. `prepare --from-jsonl` reads a dataset in any of three formats, one per line:
    {"input", "output", "category"}           GuppyLM's, and what prepare writes
    {"text": "<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n...<|im_end|>", "category"}
                                              ChatML text (GuppyLM's data/train.jsonl)
    {"messages": [{"role", "content"}, ...]}  OpenAI / Hugging Face chat fine-tuning (GuppyLM's train_openai.jsonl)
A ChatML text or a message list is one conversation: at most one leading system message, then user and assistant
turns in turn, ending with the assistant's reply. The turns before the last user message (a system message
included) are kept as ChatML turns in front of it, `<|im_start|>{role}\\n{content}<|im_end|>\\n` each, the layout of the
transformers chat template of `guppy export --format hf`; with --loss-on assistant, all of that and the
last user turn are the prompt and only the final reply carries loss (a conversation has one prompt length).
Batches come in two modes:
    pad     GuppyLM's: a batch of conversations padded to its longest; pads carry no loss.
    packed  fixed (B, max_seq_len) rows filled with whole conversations. Segment ids keep conversations from attending
            to each other, positions restart at 0 for each one, and only real tokens carry loss. No padding waste.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from .errors import GuppyError, one_line
from .runlock import RunLock, refuse_foreign

PAD, IM_START, IM_END = "<pad>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]
PAD_ID, IM_START_ID, IM_END_ID = 0, 1, 2
IGNORE = -100  # target id that carries no loss (F.cross_entropy's default ignore_index)
DATA_FILES = ("train.jsonl", "eval.jsonl", "tokenizer.json", "meta.json")
ARRAY_FILES = tuple(f"{split}.{kind}.npy" for split in ("train", "eval")
                    for kind in ("tokens", "offsets", "prompt_len"))
# A model sees max_seq_len tokens (128 for guppy-9m: a few hundred characters), so a longer conversation is cut in
# training anyway. The bound keeps one pasted blob from stalling prepare: BPE training is quadratic in the length of
# a word, and a 5 MB one-word line had not finished after 150 s.
MAX_CONVERSATION_CHARS = 10_000
MAX_LINE_BYTES = 16 << 20  # a .jsonl line read at most: far above any conversation within the bound (/dev/zero ends)


def prompt_text(user: str, context=()) -> str:
    """The user turn and the opening of the assistant turn: what the model sees before it answers. `context`: the
    earlier turns of a multi-turn conversation ({"role", "content"} dicts), written before it."""
    earlier = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in context)
    return f"{earlier}{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n"


def reply_text(assistant: str) -> str:
    return f"{assistant}{IM_END}"


def control_token_in(texts: dict[str, str]) -> tuple[str, str] | None:
    """(label, token): the first of guppy's special tokens written out in one of a conversation's texts ({label:
    text}: a row's "input" and "output", or a multi-turn conversation's turns), else None. Training text holds them
    only where the template puts them: the tokenizer would turn a written "<|im_end|>" into the real token and end
    the turn there, while chat encodes the same characters typed by a user as text."""
    return next(((label, t) for label, text in texts.items() for t in SPECIAL_TOKENS if t in text), None)


def row_texts(row: dict) -> dict[str, str]:
    """A row's texts for control_token_in, labelled as the row names them."""
    return {'"input"': row["input"], '"output"': row["output"]}


# --------------------------------------------------------------------------------------------------------------------
# jsonl
# --------------------------------------------------------------------------------------------------------------------
def read_jsonl(path: str) -> list[dict]:
    rows = []
    try:
        f = open(path, "rb")  # bytes, decoded line by line, so that a bad line is reported with its number
    except IsADirectoryError:
        raise GuppyError(f"{path}: is a folder, expected a .jsonl file") from None
    except FileNotFoundError:
        raise GuppyError(f"{path}: no such file") from None
    with f:
        for n, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
            if len(raw) > MAX_LINE_BYTES:  # read no further: a file with no line ends (/dev/zero) is not a dataset
                raise GuppyError(f"{path}: line {n}: longer than {MAX_LINE_BYTES >> 20} MiB; a conversation may hold "
                                 f"{MAX_CONVERSATION_CHARS:,} characters")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise GuppyError(f"{path}: line {n}: not UTF-8 text (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise GuppyError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
            try:
                row = conversation_row(row)
            except ValueError as e:
                raise GuppyError(f"{path}: line {n}: {e}") from None
            length = len(row["input"]) + len(row["output"]) + sum(len(m["content"]) for m in row.get("context", ()))
            if length > MAX_CONVERSATION_CHARS:
                raise GuppyError(f"{path}: line {n}: a conversation of {length:,} characters; the limit is "
                                 f"{MAX_CONVERSATION_CHARS:,} (a model sees a few hundred)")
            rows.append(row)
    if not rows:
        raise GuppyError(f"{path}: no conversations in it")
    return rows


JSONL_FORMATS = ('{"input", "output", "category"}, {"text": "<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant'
                 '\\n...<|im_end|>"} (ChatML) or {"messages": [{"role", "content"}, ...]}')
# a turn: its role, then content up to the first control token of the turn markers, which must be its <|im_end|>
_TURN = re.compile(r"<\|im_start\|>([^\n]*)\n((?:(?!<\|im_(?:start|end)\|>).)*)<\|im_end\|>(\n|$)", re.S)


def chatml_messages(text: str) -> list[dict]:
    """The turns of a ChatML conversation (`<|im_start|>{role}\\n{content}<|im_end|>`, a newline between turns;
    trailing whitespace allowed) as {"role", "content"} dicts. ValueError when the text is not that."""
    text, messages, pos = text.rstrip(), [], 0
    while pos < len(text):
        m = _TURN.match(text, pos)
        if not m:
            raise ValueError('"text" is not a ChatML conversation (<|im_start|>user\\n...<|im_end|>\\n<|im_start|>'
                             f"assistant\\n...<|im_end|>): it breaks off at character {pos + 1}")
        messages.append({"role": m[1], "content": m[2]})
        pos = m.end()
    return messages


def conversation_row(obj) -> dict:
    """One dataset line, in any of the three formats, as a row {"input", "output", "category"}; a multi-turn
    conversation's earlier turns go in "context" ({"role", "content"} dicts). ValueError: why it is none of them."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, one of: {JSONL_FORMATS}")
    category = str(obj.get("category", "unknown"))
    if isinstance(obj.get("input"), str) and isinstance(obj.get("output"), str):
        found = control_token_in(row_texts(obj))
        if found:
            raise ValueError(f"{found[0]} contains {found[1]}, one of guppy's control tokens, which only the chat "
                             "template may place; remove it from the text")
        return {"input": obj["input"], "output": obj["output"], "category": category}
    if "messages" in obj:
        messages, where = obj["messages"], '"messages"'
        if not (isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                    and isinstance(m.get("content"), str) for m in messages)):
            raise ValueError('"messages" must be a list of {"role": ..., "content": ...} objects with string values')
    elif isinstance(obj.get("text"), str):
        messages, where = chatml_messages(obj["text"]), '"text"'
    else:
        raise ValueError(f"fits none of the formats: {JSONL_FORMATS}")
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[:1] == ["system"] else roles
    if not turns or turns != ["user", "assistant"] * (len(turns) // 2):
        raise ValueError(f"{where} has the turns {', '.join(roles) or 'none'}; expected user, assistant, user, ..., "
                         "ending with the assistant's reply, after at most one system message")
    found = control_token_in({f"{where}: turn {i + 1} ({m['role']})": m["content"] for i, m in enumerate(messages)})
    if found:
        raise ValueError(f"{found[0]} contains {found[1]}, one of guppy's control tokens, which only the chat "
                         "template may place; remove it from the text")
    row = {"input": messages[-2]["content"], "output": messages[-1]["content"], "category": category}
    if len(messages) > 2:
        row["context"] = [{"role": m["role"], "content": m["content"]} for m in messages[:-2]]
    return row


def write_jsonl(path: str, rows: list[dict]):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            if row.get("context"):  # multi-turn: the messages format, which read_jsonl reads back as it was
                row = {"messages": [*row["context"], {"role": "user", "content": row["input"]},
                                    {"role": "assistant", "content": row["output"]}], "category": row["category"]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------
def train_tokenizer(texts, vocab_size: int = 4096):
    """Byte-level BPE with the three special tokens at ids 0, 1, 2. Every byte is in the alphabet, so nothing is UNK."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str):
    from tokenizers import Tokenizer

    if not os.path.isfile(path):
        raise GuppyError(f"{path}: no tokenizer there (run `guppy prepare` first)")
    with open(path, "rb"):  # an unreadable file is an OSError with its cause, not "not a tokenizer"
        pass
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot parse
        raise GuppyError(f"{path}: not a tokenizer file ({one_line(e)[:200]})") from None
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise GuppyError(f"{path}: special token {name} must have id {i}, has {tok.token_to_id(name)}")
    return tok


def encode_conversations(tok, rows: list[dict]):
    """-> (tokens uint16, offsets int64 (n+1,), prompt_len int32 (n,)). Prompt and reply are encoded separately,
    exactly as chat encodes a prompt and then generates, so training and inference see the same token boundaries."""
    prompts = tok.encode_batch([prompt_text(r["input"], r.get("context", ())) for r in rows], add_special_tokens=False)
    replies = tok.encode_batch([reply_text(r["output"]) for r in rows], add_special_tokens=False)
    ids = [p.ids + r.ids for p, r in zip(prompts, replies)]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.fromiter((t for x in ids for t in x), dtype=np.uint16, count=int(offsets[-1]))
    prompt_len = np.fromiter((len(p.ids) for p in prompts), dtype=np.int32, count=len(ids))
    return tokens, offsets, prompt_len


# --------------------------------------------------------------------------------------------------------------------
# What a run records about its data
# --------------------------------------------------------------------------------------------------------------------
def file_sha256(*paths) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def fingerprint(data_dir: str) -> dict:
    """sha256 of the folder's tokenizer.json and of its train token arrays. A run records it; --resume, chat and eval
    check it, so that a model never meets token ids from another tokenizer, nor a resume another dataset."""
    tok = os.path.join(data_dir, "tokenizer.json")
    return {"tokenizer_sha256": file_sha256(tok) if os.path.isfile(tok) else None,
            "train_sha256": file_sha256(*(os.path.join(data_dir, f) for f in ARRAY_FILES[:3]))}


def read_meta(data_dir: str) -> dict:
    """meta.json of a data folder ({} when it has none)."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        raw = f.read()
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GuppyError(f"{path}: damaged, not valid JSON ({one_line(e)}); "
                         "run `guppy prepare --force` again") from None
    if not isinstance(meta, dict):
        raise GuppyError(f"{path}: damaged, expected a JSON object; run `guppy prepare --force` again")
    return meta


# --------------------------------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------------------------------
def split_jsonl(rows: list[dict], eval_fraction: float, seed: int):
    """Split an existing dataset so that no eval (input, output) pair also occurs in train."""
    rng = np.random.default_rng(seed)
    pairs = sorted({(r["input"], r["output"]) for r in rows})
    order = rng.permutation(len(pairs))
    n_eval = max(1, round(len(pairs) * eval_fraction)) if eval_fraction > 0 else 0
    eval_pairs = {pairs[i] for i in order[:n_eval]}
    train = [r for r in rows if (r["input"], r["output"]) not in eval_pairs]
    seen, evals = set(), []
    for r in rows:  # one copy of each held-out pair
        key = (r["input"], r["output"])
        if key in eval_pairs and key not in seen:
            seen.add(key)
            evals.append(r)
    return train, evals


def unique_reply_fraction(rows: list[dict]) -> float:
    return len({r["output"] for r in rows}) / max(1, len(rows))


def _prepare_into(tmp, samples, persona_path, seed, eval_fraction, from_jsonl, vocab_size) -> dict:
    """Generate (or read), split, train the tokenizer and write every file of a dataset into the folder tmp."""
    from . import persona as persona_lib

    t0 = time.time()
    keywords = {}
    if from_jsonl:
        rows = read_jsonl(from_jsonl)
        train_rows, eval_rows = split_jsonl(rows, eval_fraction, seed)
        source = {"from_jsonl": os.path.abspath(from_jsonl)}
        if not train_rows:
            raise GuppyError(f"{from_jsonl}: the held-out split took all {len(eval_rows)} distinct (input, output) "
                             f"pairs (--eval-fraction {eval_fraction}), leaving none to train on; add conversations "
                             "or lower --eval-fraction")
    else:
        persona = persona_lib.load_persona(persona_path)
        train_rows, eval_rows, stats = persona_lib.generate_dataset(persona, samples, seed, eval_fraction)
        for row in train_rows + eval_rows:
            found = control_token_in(row_texts(row))
            if found:
                raise GuppyError(f"{persona.path}: topic {row['category']!r} wrote {found[1]}, one of guppy's control "
                                 f"tokens, which only the chat template may place ({row['input']!r} -> "
                                 f"{row['output']!r}); remove it from the persona's text")
        keywords = {t.name: list(t.keywords) for t in persona.topics}
        source = {"persona": persona.name, "persona_path": str(persona.path), "generator": stats}
        if not train_rows:  # the report above refuses what it expects to end here; this is the unlucky draw
            raise GuppyError(f"{persona.path}: no training conversations left after the held-out split took "
                             f"{len(eval_rows)} (--samples {samples}, --eval-fraction {eval_fraction}); "
                             f"`python -m guppy.persona {persona.path}` says what to add")
    t_gen = time.time() - t0

    tok = train_tokenizer((prompt_text(r["input"], r.get("context", ())) + reply_text(r["output"]) for r in train_rows),
                          vocab_size)
    t_tok = time.time() - t0 - t_gen

    write_jsonl(os.path.join(tmp, "train.jsonl"), train_rows)
    write_jsonl(os.path.join(tmp, "eval.jsonl"), eval_rows)
    with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:  # as tok.save() writes it, but a
        f.write(tok.to_str(pretty=True))  # full disk is an OSError with its path (tokenizers raises a bare Exception)
    if not from_jsonl:  # who the model is, for chat, the export and the browser page (guppy/persona.py)
        with open(os.path.join(tmp, persona_lib.CARD_FILE), "w", encoding="utf-8") as f:
            json.dump(persona_lib.persona_card(persona), f, indent=2, ensure_ascii=False)
    lengths = {}
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        if not rows:
            continue
        tokens, offsets, prompt_len = encode_conversations(tok, rows)
        np.save(os.path.join(tmp, f"{split}.tokens.npy"), tokens)
        np.save(os.path.join(tmp, f"{split}.offsets.npy"), offsets)
        np.save(os.path.join(tmp, f"{split}.prompt_len.npy"), prompt_len)
        lengths[split] = np.diff(offsets)
    tl = lengths["train"]
    train_pairs = {(r["input"], r["output"]) for r in train_rows}
    meta = {
        "n_train": len(train_rows), "n_eval": len(eval_rows), "seed": seed, "eval_fraction": eval_fraction,
        "vocab_size": tok.get_vocab_size(), "special_tokens": SPECIAL_TOKENS,
        "unique_reply_fraction": round(unique_reply_fraction(train_rows + eval_rows), 4),
        "eval_pairs_in_train": sum((r["input"], r["output"]) in train_pairs for r in eval_rows),
        "tokens_per_conversation": {"mean": round(float(tl.mean()), 2), "median": float(np.median(tl)),
                                    "p95": float(np.percentile(tl, 95)), "max": int(tl.max())},
        "category_keywords": keywords, "source": source,
        "seconds": {"generate": round(t_gen, 2), "tokenizer": round(t_tok, 2), "total": round(time.time() - t0, 2)},
    }
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def prepare(out_dir: str, samples: int = 60_000, persona_path=None, seed: int = 1337, eval_fraction: float = 0.05,
            from_jsonl: str | None = None, vocab_size: int = 4096, force: bool = False, log=print) -> dict:
    """Write the dataset, tokenizer and token arrays into out_dir. Returns meta.json's contents.

    Everything is written into a temporary folder beside out_dir and moved into place at the end, so a failure
    leaves an existing dataset untouched; an existing dataset is only replaced with force=True. A folder that holds a
    training run or an export is refused, force or not, and out_dir is locked while prepare works
    (guppy/runlock.py): a second prepare into it is refused in one line, not left to replace the first one's dataset.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise GuppyError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    if samples < 2 and from_jsonl is None:
        raise GuppyError(f"--samples must be at least 2, got {samples}")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise GuppyError(f"{out_dir}: exists and is not a folder; choose another --out")
    refuse_foreign(out_dir, "a prepare")  # a run's or an export's folder is never a dataset's, --force or not
    _dataset_in(out_dir, force)  # before the lock too: a refused prepare leaves the folder as it was
    with RunLock(out_dir, "a prepare"):
        return _prepare_locked(out_dir, samples, persona_path, seed, eval_fraction, from_jsonl, vocab_size, log,
                               present=_dataset_in(out_dir, force))  # again: a prepare may have finished meanwhile


def _dataset_in(out_dir: str, force: bool) -> list[str]:
    """What out_dir holds; raises where that is a dataset and force is not given."""
    present = os.listdir(out_dir) if os.path.isdir(out_dir) else []  # unreadable: PermissionError, said as such
    existing = [f for f in DATA_FILES if f in present]
    if existing and not force:
        raise GuppyError(f"{out_dir}: already holds a dataset ({', '.join(existing)}); pass --force to replace it")
    return present


def _prepare_locked(out_dir, samples, persona_path, seed, eval_fraction, from_jsonl, vocab_size, log, present) -> dict:
    """prepare()'s work, with out_dir locked: check the persona, write the dataset aside, move it into place."""
    if from_jsonl is None:  # what the persona can make, before anything is written; a useless dataset is refused
        from .persona import PersonaError, load_persona
        from .persona_report import persona_report
        persona = load_persona(persona_path)
        report = persona_report(persona, samples, eval_fraction)
        log(report.summary)
        if report.fatal:  # the options are at fault where no train is left at all, else the persona
            raise GuppyError(report.fatal) if report.n_train == 0 else PersonaError(persona.path, report.fatal)

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    try:  # first: an unwritable --out fails before the work, not after it
        tmp = tempfile.mkdtemp(prefix=".guppy-prepare-", dir=parent)
    except OSError as e:
        raise GuppyError(f"{parent}: cannot write the dataset here ({e.strerror})") from None
    try:
        meta = _prepare_into(tmp, samples, persona_path, seed, eval_fraction, from_jsonl, vocab_size)
        os.makedirs(out_dir, exist_ok=True)
        written = os.listdir(tmp)
        for name in written:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        for name in set(DATA_FILES + ARRAY_FILES + ("persona.json",)) & (set(present) - set(written)):
            os.remove(os.path.join(out_dir, name))  # what the new dataset lacks: eval arrays, a persona card
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"prepared {meta['n_train']:,} train + {meta['n_eval']:,} eval conversations in {out_dir} "
        f"({meta['seconds']['total']:.1f} s): vocab {meta['vocab_size']}, "
        f"{meta['tokens_per_conversation']['mean']:.1f} tokens/conversation, "
        f"unique replies {meta['unique_reply_fraction']:.1%}")
    return meta


# --------------------------------------------------------------------------------------------------------------------
# Loading and batching
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Split:
    """The conversations of one split as flat arrays; conversation c is tokens[offsets[c]:offsets[c+1]]."""
    tokens: np.ndarray
    offsets: np.ndarray
    prompt_len: np.ndarray

    def __len__(self):
        return len(self.offsets) - 1

    def conversation(self, c: int) -> np.ndarray:
        return self.tokens[self.offsets[c]:self.offsets[c + 1]]


def load_split(data_dir: str, split: str) -> Split:
    if not os.path.isdir(data_dir):
        raise GuppyError(f"{data_dir}: no such data folder (run `guppy prepare --out {data_dir}` first)")
    present = os.listdir(data_dir)  # a folder we may not read says so (PermissionError), rather than "missing"
    paths = [os.path.join(data_dir, f"{split}.{kind}.npy") for kind in ("tokens", "offsets", "prompt_len")]
    missing = [os.path.basename(p) for p in paths if os.path.basename(p) not in present]
    if missing:
        raise GuppyError(f"{data_dir}: missing {', '.join(missing)} (run `guppy prepare --out {data_dir}`)")
    for p in paths:
        with open(p, "rb"):  # an unreadable file is an OSError with its cause
            pass
    try:
        tokens, offsets, prompt_len = (np.load(p, allow_pickle=False) for p in paths)
    except Exception as e:  # numpy's errors for a damaged .npy are of many types; none is a bug of ours
        raise GuppyError(f"{data_dir}: cannot read the {split} token arrays ({one_line(e)})") from None
    if len(offsets) < 2 or offsets[-1] != len(tokens) or len(prompt_len) != len(offsets) - 1:
        raise GuppyError(f"{data_dir}: the {split} token arrays are empty or inconsistent; run `guppy prepare` again")
    return Split(tokens, offsets, prompt_len)


@dataclass
class Batch:
    idx: torch.Tensor                          # (B, T) input token ids
    targets: torch.Tensor                      # (B, T) next-token ids, IGNORE where no loss is taken
    segment_ids: torch.Tensor | None = None    # (B, T) packed mode: which conversation each token belongs to
    positions: torch.Tensor | None = None      # (B, T) packed mode: position within its conversation
    n_conversations: int = 0                   # whole conversations in the batch (counted on the host)

    def to(self, device, non_blocking=False):
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(move(self.idx), move(self.targets), move(self.segment_ids), move(self.positions),
                     self.n_conversations)

    def n_targets(self) -> int:
        """Tokens that carry loss. Counted with numpy on a host batch: no aten op, so nothing a sync counter (or a
        GPU) sees; a batch already on a device is counted there (a host sync)."""
        if self.targets.device.type == "cpu":
            return int(np.count_nonzero(self.targets.numpy() != IGNORE))
        return int((self.targets != IGNORE).sum())


def conversation_targets(conv: np.ndarray, prompt_len: int, assistant_only: bool) -> np.ndarray:
    """Next-token targets of one conversation laid out at its own positions (len(conv)); the last has none."""
    targets = np.full(len(conv), IGNORE, dtype=np.int64)
    targets[:-1] = conv[1:]
    if assistant_only:  # predict only the reply: positions before the last prompt token carry no loss
        targets[:max(0, prompt_len - 1)] = IGNORE
    return targets


class Batcher:
    """Deterministic batches over a split, resumable from (epoch, cursor).

    Each epoch visits the conversations in a permutation drawn from (seed, epoch). Under DDP, rank r of w walks
    every w-th conversation of that permutation, starting at r: the ranks see disjoint data, and each builds only its
    own batches.

    A packed batch must cost far less than the GPU step it feeds (a T4 step of 32 x 128 is ~15 ms, and the host has
    ~1 ms for all its work): the first-fit placement is a loop over Python ints (lengths known up front), and the
    tokens, targets, segment ids and positions are then written by a handful of numpy gathers over the whole batch.
    The permutation is drawn once per epoch (drawing it for every conversation placed made a batch 177 ms).
    With pin_memory the tensors are allocated in page-locked memory, so `Batch.to(cuda, non_blocking=True)` is an
    asynchronous copy that never makes the host wait (torch's caching host allocator keeps a buffer until its copy
    is done).
    """

    def __init__(self, split: Split, batch_size: int, max_seq_len: int, mode: str = "pad", assistant_only=False,
                 seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1, pin_memory: bool = False,
                 curriculum: float = 0.0):
        if mode not in ("pad", "packed"):
            raise GuppyError(f"unknown batch mode {mode!r}; choose pad or packed")
        self.split, self.batch_size, self.max_seq_len, self.mode = split, batch_size, max_seq_len, mode
        self.assistant_only, self.seed, self.shuffle = assistant_only, seed, shuffle
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        self.curriculum = curriculum  # TrainConfig.curriculum: see _permutation
        self.epoch, self.cursor = 0, 0
        self._orders: dict[int, list[int]] = {}  # epoch -> this rank's conversations in order (current, next)
        lengths = np.diff(split.offsets)
        self.n_truncated = int((lengths > max_seq_len).sum())  # a conversation is cut to max_seq_len tokens
        self._lengths = np.minimum(lengths, max_seq_len).tolist()  # tokens each conversation takes in a row

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict):
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

    def _permutation(self, epoch: int) -> list[int]:
        """This rank's conversations of `epoch`, in order: drawn once per epoch (and kept for the next epoch's first
        peek), as a list because the packer reads it one Python int at a time.
        With a curriculum c > 0, epoch 0's first round(c·n) conversations are the same ones, sorted by length,
        shortest first (stable: equal lengths keep their drawn order); the rest of epoch 0 and every later epoch are
        as drawn. A sequence-length warm-up: short conversations first, several to a packed row. Derived from (seed,
        epoch) alone, before the ranks take their share, so every rank agrees and a resume is exact."""
        if epoch not in self._orders:
            n = len(self.split)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            head = round(self.curriculum * n) if epoch == 0 else 0
            if head:
                lengths = np.asarray(self._lengths)[order[:head]]
                order = np.concatenate([order[:head][np.argsort(lengths, kind="stable")], order[head:]])
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = order[self.rank::self.world_size].tolist()
        return self._orders[epoch]

    def _next_conversation(self) -> int:
        order = self._permutation(self.epoch)
        if self.cursor >= len(order):
            self.epoch, self.cursor = self.epoch + 1, 0
            order = self._permutation(self.epoch)
        self.cursor += 1
        return order[self.cursor - 1]

    def _conv(self, c):
        conv = self.split.conversation(c)[:self.max_seq_len].astype(np.int64)
        return conv, conversation_targets(conv, int(self.split.prompt_len[c]), self.assistant_only)

    def _empty(self, shape, dtype, fill):
        """A (possibly page-locked) tensor and a numpy view of it to write into."""
        t = torch.full(shape, fill, dtype=dtype, pin_memory=self.pin_memory)
        return t, t.numpy()

    def _pad_batch(self) -> Batch:
        convs = [self._conv(self._next_conversation()) for _ in range(self.batch_size)]
        # GuppyLM's layout: x = ids[:-1], y = ids[1:]; the final token has no target, so rows have length L-1.
        T = max(len(c) for c, _ in convs) - 1
        T = max(T, 1)
        idx, idx_np = self._empty((len(convs), T), torch.int64, PAD_ID)
        targets, targets_np = self._empty((len(convs), T), torch.int64, IGNORE)
        for i, (conv, tgt) in enumerate(convs):
            n = min(len(conv) - 1, T)
            idx_np[i, :n], targets_np[i, :n] = conv[:n], tgt[:n]
        return Batch(idx, targets, n_conversations=len(convs))

    def _place_packed(self):
        """First fit: each conversation, in data order, goes into the first row with room for it; the batch ends at
        the first conversation that fits in no row (it opens the next batch). -> (conversations, their rows, their
        start columns, their segment numbers within their rows, each row's segment count), all Python lists.
        A plain loop over ints (~100 conversations a batch): numpy per conversation would cost more than it saves."""
        T, lengths = self.max_seq_len, self._lengths
        fill, n_segments = [0] * self.batch_size, [0] * self.batch_size
        open_rows = list(range(self.batch_size))  # rows that may still take a conversation, in order
        convs, rows, starts, segments = [], [], [], []
        order = self._permutation(self.epoch)
        while True:
            if self.cursor < len(order):
                c = order[self.cursor]
            else:  # the epoch ends here: its next conversation is the next epoch's first
                c = self._permutation(self.epoch + 1)[0]
            n = lengths[c]
            for r in open_rows:
                if fill[r] + n <= T:
                    break
            else:
                return convs, rows, starts, segments, n_segments
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
                order = self._permutation(self.epoch)
            self.cursor += 1
            convs.append(c)
            rows.append(r)
            starts.append(fill[r])
            segments.append(n_segments[r])
            fill[r] += n
            n_segments[r] += 1
            if fill[r] == T:
                open_rows.remove(r)

    def _packed_batch(self) -> Batch:
        B, T = self.batch_size, self.max_seq_len
        convs, rows, starts, segments, n_segments = self._place_packed()
        cs = np.array(convs, dtype=np.int64)
        lens = np.array([self._lengths[c] for c in convs], dtype=np.int64)
        first = np.cumsum(lens) - lens                        # each conversation's first slot in the flat list
        within = np.arange(int(lens.sum())) - np.repeat(first, lens)   # position of every token in its conversation
        src = np.repeat(self.split.offsets[cs], lens) + within         # where it is in split.tokens
        dst = np.repeat(np.array(rows, dtype=np.int64) * T + np.array(starts, dtype=np.int64), lens) + within
        last = within == np.repeat(lens - 1, lens)            # a conversation's last token predicts nothing

        idx, idx_np = self._empty((B, T), torch.int64, PAD_ID)
        targets, targets_np = self._empty((B, T), torch.int64, IGNORE)
        segment_ids, seg_np = self._empty((B, T), torch.int32, 0)
        positions, pos_np = self._empty((B, T), torch.int64, 0)
        tokens = self.split.tokens
        idx_np.reshape(-1)[dst] = tokens[src]
        next_ids = tokens[np.minimum(src + 1, len(tokens) - 1)].astype(np.int64)
        no_loss = last
        if self.assistant_only:  # predict only the reply: positions before the last prompt token carry no loss
            no_loss = no_loss | (within < np.repeat(np.maximum(0, self.split.prompt_len[cs].astype(np.int64) - 1),
                                                    lens))
        targets_np.reshape(-1)[dst] = np.where(no_loss, IGNORE, next_ids)
        pos_np.reshape(-1)[dst] = within
        seg_np[:] = np.array(n_segments, dtype=np.int32)[:, None]  # a row's unused tail is its own segment, so it
        seg_np.reshape(-1)[dst] = np.repeat(np.array(segments, dtype=np.int32), lens)  # attends only to itself
        return Batch(idx, targets, segment_ids, positions, n_conversations=len(convs))

    def next_batch(self) -> Batch:
        return self._pad_batch() if self.mode == "pad" else self._packed_batch()


def eval_batches(split: Split, batch_size: int, max_seq_len: int, max_batches: int = 0, assistant_only=False):
    """The held-out set in a fixed order, as pad batches: the same conversations for every run and every mode."""
    batcher = Batcher(split, batch_size, max_seq_len, "pad", assistant_only, shuffle=False)
    n = -(-len(split) // batch_size)
    if max_batches:
        n = min(n, max_batches)
    batches = []
    for _ in range(n):
        remaining = len(split) - batcher.cursor
        batcher.batch_size = min(batch_size, remaining)
        batches.append(batcher.next_batch())
    return batches
