"""The `guppy` command: prepare, train, chat, eval, export, serve, info, targets, build-ext.

Mistakes a user can make (a missing or unreadable folder, a malformed persona, a bad option value, a full disk, no
CUDA) print one line, `guppy <command>: error: <path or option>: <cause>`, and exit 2, without a traceback: main() is
that one boundary. Ctrl-C exits 130 (during training, after saving a checkpoint). Any other exception is a bug and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys

from .errors import GuppyError, exit_interrupted, one_line, os_error_line, printable

# TrainConfig fields that `guppy train` sets from an option of the same name
TRAIN_OPTIONS = ("max_steps", "batch_size", "lr", "batch_mode", "loss_on", "eval_every", "save_every", "log_every",
                 "eval_batches", "seed")
RESUME_HELP = ("continue the run in --out exactly where it stopped, with its own model, recipe and data. A resume may "
               "change how far and how often (--max-steps, --stop-at-step, --eval-every, --save-every, --log-every, "
               "--eval-batches), where and how it runs (--device, --ops, --compile, --quiet), and the peak learning "
               "rate --lr (the rest of the schedule follows it). It refuses what would change the data order or the "
               "meaning of the run (--batch-size, --batch-mode, --loss-on, --seed, --decay-all, --preset, and --data "
               "with another tokenizer or train data) unless the value is the run's own")


def cmd_prepare(a):
    from .data import prepare
    prepare(a.out, samples=a.samples, persona_path=a.persona, seed=a.seed, eval_fraction=a.eval_fraction,
            from_jsonl=a.from_jsonl, vocab_size=a.vocab_size, force=a.force)


def default_preset(device: str) -> str:
    """The preset of a `guppy train` given no --preset: GuppyLM's guppy-9m on a CUDA GPU, cpu-demo without CUDA
    (a CPU, Apple's MPS), said in one line.

    Why not guppy-9m everywhere: it is GuppyLM's 10,000-step GPU recipe, about 9 hours on a laptop's CPU (a newcomer
    following the README saw an ETA of 8:58:41), while someone who types the README's `guppy train` with no options
    expects a fish that talks in minutes, which cpu-demo is. Starting the 9-hour run and printing a hint would leave
    them to find the hint, stop the run and start again; so the small preset is picked, the line says so and how to
    get the other (an explicit --preset guppy-9m still runs, and times itself: guppy.runstate.long_run_note). It is
    the rule `make demo` applied before the CLI did (guppy-9m if CUDA, else cpu-demo), so the demo trains as before."""
    from .config import DEFAULT_CPU_PRESET, DEFAULT_PRESET
    from .train import resolve_device
    dev = resolve_device(device)
    if dev.type == "cuda":
        return DEFAULT_PRESET
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for all ranks
        print(f"no --preset given: training {DEFAULT_CPU_PRESET}, the preset for a machine without CUDA "
              f"({DEFAULT_PRESET}, the GPU default, takes hours on a {dev.type}; --preset {DEFAULT_PRESET} trains "
              "it anyway)")
    return DEFAULT_CPU_PRESET


def cmd_train(a):
    from .config import preset
    from .train import run_recipe, train
    given = {k: getattr(a, k) for k in TRAIN_OPTIONS if getattr(a, k) is not None}
    given.update({k: True for k in ("decay_all", "compile") if getattr(a, k)})
    if a.resume:  # the run's own model and recipe; train() applies the resume rule to the options given here
        name, model_cfg, cfg = a.preset, None, run_recipe(a.out)
    else:
        name = a.preset or default_preset(a.device)
        model_cfg, cfg = preset(name)
    cfg = dataclasses.replace(cfg, **given)
    if a.ops:
        from .ops import get_ops
        try:
            get_ops(a.ops)
        except ImportError as e:
            raise GuppyError(f"--ops {a.ops} is not available here: {e}") from None
    train(a.data, a.out, model_cfg, cfg, device=a.device, resume=a.resume, stop_at_step=a.stop_at_step,
          progress=not a.quiet, ops=a.ops, preset=name)


def cmd_chat(a):
    from .chat import NO_REPLY, Chat
    from .train import resolve_device
    from .onnx_chat import OnnxChat, is_onnx_export
    for text in a.prompt or ():
        if not _is_utf8(text):
            raise GuppyError("--prompt: not UTF-8 text")
    cls, device = Chat, a.device
    if is_onnx_export(a.checkpoint):  # an export folder or .onnx file: onnxruntime, on the CPU
        cls, device = OnnxChat, "cpu"
    chat = cls(a.checkpoint, device=resolve_device(device), tokenizer=a.tokenizer, temperature=a.temperature,
               top_k=a.top_k, top_p=a.top_p, max_new_tokens=a.max_new_tokens, seed=a.seed)
    _say_if_unfinished(a.checkpoint, chat.checkpoint, "chatting with")
    if a.prompt is not None:
        for text in a.prompt:
            if not text.strip():
                print("(empty prompt: nothing to answer)")
                continue
            _, truncated = chat.encode_prompt(text)
            if truncated:
                print(f"(note: prompt truncated to its last {chat.max_prompt} tokens)", file=sys.stderr)
            reply = chat.reply(text) or NO_REPLY
            # the reply and the name come from files (a model, persona.json): escaped, never raw (errors.printable)
            name, reply = printable(chat.persona['name']), printable(reply)
            print(f"you> {printable(text)}\n{name}> {reply}" if len(a.prompt) > 1 else reply)
    else:
        chat.repl()


def cmd_eval(a):
    from .chat import evaluate_checkpoint
    from .train import resolve_device
    if a.json:  # before the evaluation, so that its result is not lost to a folder that is not there
        folder = os.path.dirname(os.path.abspath(a.json))
        if not os.path.isdir(folder):
            raise GuppyError(f"--json {a.json}: no folder {folder} to write it in")
        if not os.access(folder, os.W_OK):
            raise GuppyError(f"--json {a.json}: cannot write in {folder} (permission denied or read-only)")
    r = evaluate_checkpoint(a.checkpoint, a.data, device=resolve_device(a.device))
    _say_if_unfinished(a.checkpoint, r["checkpoint"], "evaluating")
    print(f"held-out loss: {r['eval_loss']:.4f} over {r['eval_conversations']} conversations")
    if "keyword_hit_rate" in r:
        topics = r["topics"]
        print(f"keyword hit rate: {r['keyword_hit_rate']:.1%} over {r['keyword_prompts']} held-out prompts, "
              f"{len(topics)} topics")
        missed = sorted((t for t in topics.values() if t["hits"] < t["prompts"]),
                        key=lambda t: (t["hits"] / t["prompts"], t["name"]))
        if missed:
            listed = ", ".join(f"{printable(t['name'])} {t['hits']}/{t['prompts']}"
                               for t in missed[:EVAL_TOPICS_SHOWN])
            more = f", and {len(missed) - EVAL_TOPICS_SHOWN} more" if len(missed) > EVAL_TOPICS_SHOWN else ""
            print(f"topics that missed ({len(missed)} of {len(topics)}; hits/prompts): {listed}{more}")
        else:
            print("every topic's prompts got a reply with one of its keywords")
        for s in (r["misses"] or r["samples"])[:5]:  # what a miss looks like (else a few hits)
            print(f"  [{printable(s['category'])}] {s['prompt']!r} -> {s['reply']!r}")  # repr escapes too
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)


EVAL_TOPICS_SHOWN = 12  # guppy eval names this many of the topics that missed, the worst first


def _say_if_unfinished(path: str, loaded: str, doing: str):
    """One line on stderr when --checkpoint is a run that is training or stopped early: the step loaded."""
    from .runstate import unfinished_note
    note = unfinished_note(path, loaded, doing)
    if note:
        print(note, file=sys.stderr)


def cmd_export(a):
    from .export import export
    export(a.checkpoint, a.out, quantize=a.quantize, data_dir=a.data, runtime_dir=a.runtime_dir,
           persona_path=a.persona, force=a.force, license=a.license, format=a.format,
           dataset=a.dataset)


def cmd_serve(a):
    from .serve import serve
    serve(a.dir, a.port, a.host)


def _port(text: str) -> int:
    """argparse type of --port: 0 (any free port) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, got {port}")
    return port


def cmd_info(a):
    from .info import info
    print(info())


def cmd_build_ext(a):
    try:
        from . import csrc
        build = csrc.build
    except (ImportError, AttributeError) as e:
        raise GuppyError(f"the CUDA C++ extension is not part of this install ({e})") from None
    try:
        build(device=a.device, verbose=a.verbose)
    except RuntimeError as e:  # no GPU, no toolkit, or a compiler error: say it in one line
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        hint = " (guppy build-ext --device cpu builds the host emulation)" if a.device == "cuda" else ""
        raise GuppyError(f"could not build the {a.device} extension: {lines[-1] if lines else e}{hint}") from None


# --------------------------------------------------------------------------------------------------------------------
# Option values: checked by the parser, so that a bad one ends there in one line
# --------------------------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line (argparse prints its usage block first; --help still shows it)
        print(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _number(kind, lo=None, hi=None, lo_open=False, hi_open=False, what=""):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        bad = (kind is float and not math.isfinite(v)) or (lo is not None and (v <= lo if lo_open else v < lo)) \
            or (hi is not None and (v >= hi if hi_open else v > hi))
        if bad:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return v
    return parse


positive_int = _number(int, lo=1, what="a positive integer")
non_negative_int = _number(int, lo=0, what="an integer >= 0")
positive_float = _number(float, lo=0, lo_open=True, what="a finite number > 0")
non_negative_float = _number(float, lo=0, what="a finite number >= 0")
probability = _number(float, lo=0, hi=1, what="a number in [0, 1]")
fraction = _number(float, lo=0, hi=1, hi_open=True, what="a number in [0, 1)")


def preset_name(text: str) -> str:
    from .config import PRESETS
    if text not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown preset {text!r}; choose one of: {', '.join(PRESETS)}")
    return text


def _is_utf8(text: str) -> bool:
    """False for text that came from bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def build_parser():
    from .config import DEFAULT_CPU_PRESET, DEFAULT_PRESET, PRESETS
    from .ops import IMPLEMENTATIONS
    p = _Parser(prog="guppy", description="A tiny fish-persona language model, and its kernels.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prepare", help="generate (or import) the dataset, train the tokenizer, write token arrays")
    s.add_argument("--out", required=True, help="data folder to write")
    s.add_argument("--samples", type=positive_int, default=60_000)
    s.add_argument("--persona", help="persona TOML file (default: the shipped fish)")
    s.add_argument("--seed", type=non_negative_int, default=1337)
    s.add_argument("--eval-fraction", type=fraction, default=0.05)
    s.add_argument("--from-jsonl", help="use an existing .jsonl dataset instead: {input, output, category} rows, "
                                        "ChatML {text, category} rows, or {messages: [{role, content}, ...]} rows")
    s.add_argument("--vocab-size", type=positive_int, default=4096)
    s.add_argument("--force", action="store_true", help="replace a dataset already in --out")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("train", help="train a model on a prepared data folder")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True, help="run folder for checkpoints and metrics.jsonl")
    s.add_argument("--preset", type=preset_name,
                   help=f"one of: {', '.join(PRESETS)} (default {DEFAULT_PRESET} on a CUDA GPU, "
                        f"{DEFAULT_CPU_PRESET} without CUDA; with --resume, the run's own)")
    s.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    s.add_argument("--resume", action="store_true", help=RESUME_HELP)
    s.add_argument("--max-steps", type=positive_int)
    s.add_argument("--stop-at-step", type=positive_int,
                   help="save and stop at this step, keeping the max-steps schedule")
    s.add_argument("--batch-size", type=positive_int)
    s.add_argument("--lr", type=positive_float, help="peak learning rate")
    s.add_argument("--batch-mode", choices=["pad", "packed"])
    s.add_argument("--loss-on", choices=["all", "assistant"])
    s.add_argument("--ops", choices=list(IMPLEMENTATIONS), help="op implementations (guppy info says what each is)")
    s.add_argument("--eval-every", type=positive_int)
    s.add_argument("--eval-batches", type=non_negative_int, help="held-out batches per eval (0: all of them)")
    s.add_argument("--save-every", type=positive_int)
    s.add_argument("--log-every", type=positive_int)
    s.add_argument("--seed", type=non_negative_int)
    s.add_argument("--decay-all", action="store_true", help="GuppyLM's weight decay on every parameter")
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("chat", help="talk to a trained guppy (REPL, or one shot with --prompt)")
    s.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder, GuppyLM .pt file, an "
                                                        "export folder / .onnx file (runs on onnxruntime), or a "
                                                        "transformers folder (guppy export --format hf)")
    s.add_argument("--prompt", action="append", help="answer this and exit (repeatable)")
    s.add_argument("--tokenizer", help="tokenizer.json (default: found beside the checkpoint)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--temperature", type=non_negative_float, default=0.7, help="0: greedy")
    s.add_argument("--top-k", type=non_negative_int, default=50, help="0: off")
    s.add_argument("--top-p", type=probability, default=0.9, help="0 or 1: off")
    s.add_argument("--max-new-tokens", type=positive_int, default=64)
    s.add_argument("--seed", type=non_negative_int)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("eval", help="held-out loss and keyword hit rate of a checkpoint")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", help="also write the result here")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("export", help="ONNX model (KV cache, optional uint8), tokenizer, model card and the "
                                      "browser chat page, in one folder")
    s.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder, or GuppyLM .pt file")
    s.add_argument("--out", required=True, help="folder to write (new or empty; --force replaces an export)")
    s.add_argument("--format", choices=["onnx", "hf"], default="onnx",
                   help="onnx (default): the ONNX model and the browser page; hf: a transformers GPT-2 folder "
                        "(AutoModelForCausalLM.from_pretrained; pip install 'guppy[hf]')")
    s.add_argument("--quantize", choices=["none", "uint8"], default="none",
                   help="uint8: onnxruntime dynamic quantization of the weights (~4x smaller)")
    s.add_argument("--data", help="prepared data folder: also report the held-out loss of PyTorch and each ONNX file")
    s.add_argument("--runtime-dir", help="onnxruntime-web for the page: the .tgz `npm pack onnxruntime-web@1.30.0` "
                                         "writes (or the folder it unpacks to), copied into the folder so the page "
                                         "works offline; default: a pinned CDN")
    s.add_argument("--license", default="mit", help="the model card's license (a Hugging Face id: mit, apache-2.0, "
                                                    "cc-by-4.0, ...)")
    s.add_argument("--dataset", help="the Hugging Face id (OWNER/NAME) of the dataset it was trained on, for the "
                                     "model card's `datasets:`")
    s.add_argument("--persona", help="persona TOML for persona.json (default: the run's own persona.json)")
    s.add_argument("--force", action="store_true", help="replace the files of an earlier export in --out (the "
                                                        "folder's other files are kept)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("serve", help="serve an export folder's chat page on 127.0.0.1")
    s.add_argument("dir", help="the folder `guppy export` wrote (or its model.onnx)")
    s.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 lets everyone on the "
                        "network read the folder)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("info", help="versions, device, and which op implementations are available")
    s.set_defaults(func=cmd_info)

    sub.add_parser("targets", help="cross-compile every kernel for sm_75/80/90 and check it fits "
                                   "(guppy targets --help)")

    s = sub.add_parser("build-ext", help="build the CUDA C++ extension ahead of time")
    s.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu builds the host emulation")
    s.add_argument("--verbose", action="store_true")
    s.set_defaults(func=cmd_build_ext)
    return p


COMMANDS = ("prepare", "train", "chat", "eval", "export", "serve", "info", "targets", "build-ext")


def _quiet_torch_cuda_probe():
    """torch.utils.cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..." when it is imported on a machine
    with nvcc and no GPU. guppy says what that means in its own words (build-ext's one-line error, `guppy info`), so
    that record is dropped rather than printed above them."""
    logging.getLogger("torch.utils.cpp_extension").addFilter(
        lambda record: "No CUDA runtime is found" not in record.getMessage())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    _quiet_torch_cuda_probe()
    # The command's name before parsing: building the parser imports torch (the --ops choices), and a Ctrl-C there
    # is still "guppy chat: interrupted". A name parse_args would refuse is not used.
    command = f"guppy {argv[0]}" if argv[:1] and argv[0] in COMMANDS else "guppy"
    try:
        if argv[:1] == ["targets"]:  # its options belong to guppy.targets, which parses them itself
            from . import targets
            sys.exit(targets.main(argv[1:]))
        args = build_parser().parse_args(argv)
        command = f"guppy {args.command}"
        args.func(args)
    except KeyboardInterrupt:
        exit_interrupted(command)
    except GuppyError as e:
        print(f"{command}: error: {one_line(e, argv)}", file=sys.stderr)  # a newline in a path reads \n
        sys.exit(2)
    except OSError as e:  # a path the user gave: missing, unreadable, unwritable, a full or read-only disk
        print(f"{command}: error: {one_line(os_error_line(e), argv)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
