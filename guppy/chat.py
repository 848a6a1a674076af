"""Talking to a trained guppy: one-shot replies, a REPL, and the held-out evaluation (loss + keyword hit rate)."""
from __future__ import annotations

import contextlib
import os
import sys

import torch

from .checkpoint import load_model, read_run_record
from .data import (IM_END_ID, IM_START_ID, eval_batches, file_sha256, load_split, load_tokenizer, read_jsonl,
                   read_meta)
from .errors import GuppyError, printable


NO_REPLY = "(no reply)"  # shown when the model ends its turn at once, instead of an empty line
# The REPL's commands: a line that starts with "/" is one of these, and never reaches the model.
REPL_COMMANDS = {"/help": "this list", "/quit": "leave (also /exit, or Ctrl-D)"}


def find_beside(checkpoint: str, name: str) -> str | None:
    """`name` in the checkpoint folder or the run folders above it (a run keeps tokenizer.json and persona.json
    beside its checkpoints/), else None."""
    d = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
    for _ in range(3):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            return p
        d = os.path.dirname(os.path.abspath(d))
    return None


def find_tokenizer(checkpoint: str, explicit: str | None = None) -> str:
    """--tokenizer, else tokenizer.json in the checkpoint folder or the run folders above it."""
    if explicit:
        return explicit
    found = find_beside(checkpoint, "tokenizer.json")
    if not found:
        raise GuppyError(f"{checkpoint}: no tokenizer.json beside this checkpoint; pass --tokenizer PATH")
    return found


def load_persona_card(checkpoint: str) -> dict:
    """persona.json beside the checkpoint (written by prepare, copied by train and export), else a plain default."""
    from .persona import read_card

    path = find_beside(checkpoint, "persona.json")
    return read_card(path) if path else {"name": "guppy", "description": "", "lowercase": False,
                                          "sample_prompts": []}


def encode_prompt_ids(tok, user: str) -> list[int]:
    """Token ids of `prompt_text(user)`, with the user's text unable to make control tokens: a typed
    "<|im_end|>" is encoded as the characters it is, so a user cannot forge a turn.

    The special tokens come from the template only; the text between them is encoded with special-token matching
    off. The tokenizer splits its input at special tokens and encodes the pieces independently, so for text that
    holds none this equals `tok.encode(prompt_text(user))`: the ids the model was trained on."""
    def enc(text):
        return tok.encode(text, add_special_tokens=False).ids

    before = tok.encode_special_tokens  # tokenizers >= 0.14: True encodes "<|im_end|>" as plain text
    tok.encode_special_tokens = True
    try:
        return [IM_START_ID, *enc(f"user\n{user}"), IM_END_ID, *enc("\n"), IM_START_ID, *enc("assistant\n")]
    finally:
        tok.encode_special_tokens = before


@contextlib.contextmanager
def one_cpu_thread(device: torch.device):
    """Decode on one CPU thread. A one-token step is too small to split: with torch's default of a thread per core,
    the threads' hand-offs cost more than the arithmetic, and on a busy machine far more (guppy-9m, 28 tokens on a
    loaded 2-core machine: 30 s with 2 threads, 1 s with 1)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_tokenizer(checkpoint: str, tokenizer_path: str, model_vocab: int, tok=None):
    """The tokenizer is the one the model was trained with: its sha256 equals the one the run recorded (where it
    recorded one: an original GuppyLM .pt does not), and it has no more tokens than the model's embedding."""
    recorded = ((read_run_record(checkpoint) or {}).get("data") or {}).get("tokenizer_sha256")
    if recorded and file_sha256(tokenizer_path) != recorded:
        raise GuppyError(f"{tokenizer_path}: not the tokenizer {checkpoint} was trained with (its sha256 differs from "
                         "the one the run recorded); use the run's tokenizer.json")
    vocab = (tok or load_tokenizer(tokenizer_path)).get_vocab_size()
    if vocab > model_vocab:
        raise GuppyError(f"{tokenizer_path}: has {vocab} tokens but the model at {checkpoint} has {model_vocab}; "
                         "it is not this model's tokenizer")


class Chat:
    """Replies from a checkpoint through PyTorch. `guppy.onnx_chat.OnnxChat` is the same with onnxruntime."""

    def __init__(self, checkpoint: str, device="cpu", tokenizer: str | None = None, temperature=0.7, top_k=50,
                 top_p=0.9, max_new_tokens=64, seed: int | None = None):
        self.device = torch.device(device)
        self.max_seq_len = self.load(checkpoint)
        tokenizer = find_tokenizer(checkpoint, tokenizer)
        self.tok = load_tokenizer(tokenizer)
        check_tokenizer(self.checkpoint, tokenizer, self.vocab_size, self.tok)
        self.persona = load_persona_card(checkpoint)
        self.temperature, self.top_k, self.top_p, self.max_new_tokens = temperature, top_k, top_p, max_new_tokens
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # the prompt may use what is left of the context after room for a reply
        self.max_prompt = self.max_seq_len - min(max_new_tokens, self.max_seq_len // 2)

    def load(self, checkpoint: str) -> int:
        """Load the model; return its context length."""
        self.model, self.checkpoint = load_model(checkpoint, device=self.device, ops="reference")
        self.model.eval()
        self.vocab_size = self.model.config.vocab_size
        return self.model.config.max_seq_len

    def generate(self, ids: list[int], use_cache: bool = True) -> list[int]:
        """The new token ids after the prompt `ids`, up to and including <|im_end|> if the model says it."""
        idx = torch.tensor([ids], device=self.device)
        with one_cpu_thread(self.device):
            out = self.model.generate(idx, self.max_new_tokens, self.temperature, self.top_k, self.top_p,
                                      stop_id=IM_END_ID, use_cache=use_cache, generator=self.generator)
        return out[0, len(ids):].tolist()

    def user_text(self, text: str) -> str:
        """What the model sees of a user's message: stripped, and lowercased if the persona says so."""
        text = text.strip()
        return text.lower() if self.persona.get("lowercase") else text

    def encode_prompt(self, text: str) -> tuple[list[int], bool]:
        """Token ids of the ChatML prompt; (ids, truncated). Too long a prompt loses its oldest tokens."""
        ids = encode_prompt_ids(self.tok, self.user_text(text))
        if len(ids) > self.max_prompt:
            return ids[-self.max_prompt:], True
        return ids, False

    def reply(self, text: str, use_cache: bool = True) -> str:
        """The model's reply ("" when it ends its turn at once, or for an empty message)."""
        if not text.strip():
            return ""
        ids, _ = self.encode_prompt(text)
        new = self.generate(ids, use_cache=use_cache)
        if IM_END_ID in new:
            new = new[:new.index(IM_END_ID)]
        return self.tok.decode(new).strip()

    def repl(self, input_fn=None, print_fn=print):
        if input_fn is None:
            input_fn = input
            if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 arrives with its bytes kept, to report it
                sys.stdin.reconfigure(errors="surrogateescape")
        # the name (persona.json) and the replies (a model) are printed escaped, never raw (errors.printable)
        print_fn(f"chatting with {printable(self.persona['name'])} (/help for commands, Ctrl-D or /quit to leave)")
        while True:
            try:
                text = input_fn("you> ")
            except (EOFError, KeyboardInterrupt):
                print_fn("")
                return
            except UnicodeDecodeError:
                print_fn("(that line is not UTF-8 text; skipped)")
                continue
            if any("\udc80" <= ch <= "\udcff" for ch in text):  # undecodable bytes, kept by surrogateescape
                print_fn("(that line is not UTF-8 text; skipped)")
                continue
            if text.strip().startswith("/"):  # a command, never a message
                if self.command(text.strip(), print_fn):
                    return
                continue
            if not text.strip():
                continue
            _, truncated = self.encode_prompt(text)
            if truncated:
                print_fn(f"(note: your message is longer than the context; only its last {self.max_prompt} tokens "
                         "are used)")
            print_fn(f"{printable(self.persona['name'])}> {printable(self.reply(text) or NO_REPLY)}")

    def command(self, line: str, print_fn=print) -> bool:
        """A REPL line that starts with "/" (REPL_COMMANDS): do it; True to leave."""
        name = line.split()[0].lower()
        if name in ("/quit", "/exit"):
            return True
        if name == "/help":
            for command, what in REPL_COMMANDS.items():
                print_fn(f"  {command:<8} {what}")
            print_fn(f"  anything else is a message to {printable(self.persona['name'])}; an empty line is skipped")
        else:
            print_fn(f"(unknown command {printable(name)}; /help lists the commands)")
        return False


def evaluate_checkpoint(checkpoint: str, data_dir: str, device="cpu", batch_size=32, per_category=2, seed=0,
                        log=print) -> dict:
    """Held-out loss on eval split, and the keyword hit rate of replies to held-out prompts of each category:
    overall, per topic (`topics`: {category: {name, hits, prompts}}), and the replies that missed (`misses`)."""
    from .train import evaluate

    chat = Chat(checkpoint, device=device, temperature=0.0, seed=seed)
    data_tokenizer = os.path.join(data_dir, "tokenizer.json")
    if os.path.isfile(data_tokenizer):  # the held-out token ids must be this model's
        check_tokenizer(chat.checkpoint, data_tokenizer, chat.model.config.vocab_size)
    split = load_split(data_dir, "eval")
    if int(split.tokens.max(initial=0)) >= chat.model.config.vocab_size:
        raise GuppyError(f"{data_dir}: its token ids go up to {int(split.tokens.max())}, beyond the model's vocab "
                         f"of {chat.model.config.vocab_size}; it was made with another tokenizer")
    keywords = read_meta(data_dir).get("category_keywords") or {}
    loss = evaluate(chat.model, eval_batches(split, batch_size, chat.model.config.max_seq_len), chat.device)
    result = {"checkpoint": chat.checkpoint, "eval_loss": loss, "eval_conversations": len(split)}
    if not keywords:
        log("note: this dataset has no category keywords (not made from a persona); skipping the keyword score")
        return result
    rows = read_jsonl(os.path.join(data_dir, "eval.jsonl"))
    picked, per = [], {}
    for r in rows:  # held-out prompts: these (input, output) pairs are absent from train
        if r["category"] in keywords and per.get(r["category"], 0) < per_category:
            per[r["category"]] = per.get(r["category"], 0) + 1
            picked.append(r)
    topics, samples, misses = {}, [], []
    for r in picked:
        reply = chat.reply(r["input"]).lower()
        hit = any(k.lower() in reply for k in keywords[r["category"]])
        topic = topics.setdefault(r["category"], {"name": r["category"], "hits": 0, "prompts": 0})
        topic["hits"] += hit
        topic["prompts"] += 1
        sample = {"prompt": r["input"], "reply": reply, "category": r["category"], "hit": hit}
        if len(samples) < 10:
            samples.append(sample)
        if not hit:
            misses.append(sample)
    hits = sum(t["hits"] for t in topics.values())
    result.update(keyword_hit_rate=hits / max(1, len(picked)), keyword_prompts=len(picked), topics=topics,
                  misses=misses, samples=samples)
    return result
