"""One writer per folder: an OS lock on DIR/.lock while a training (a run folder) or a prepare (a data folder) works.

`fcntl.flock` is released by the kernel when the process ends, however it ends (kill -9 included), so a stale lock
cannot outlive its holder and there is nothing to clean up by hand. The file also holds who took the lock (what,
pid, host, start time), for the message the next process prints. A second `guppy train` into the same run folder, or
a second `guppy prepare` into the same data folder (or a training into a folder a prepare is writing), stops at once
(within PROBE_WAIT_S) with that message, before it reads or writes anything else there. `held_by` tells a reader
(chat, eval) whether a training holds the folder now.

The lock also refuses a folder that holds another kind of guppy output, before it creates anything there: a
training's --out is never a prepared dataset or an export (it would overwrite their tokenizer.json, and the
dataset's tokenizer would no longer match its token arrays), and a prepare's --out is never a run or an export
(`folder_kind`, `refuse_foreign`).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time

from .errors import GuppyError

LOCK_NAME = ".lock"
PROBE_WAIT_S = 0.5  # how long a training that finds the lock taken waits before it is refused (see held_by)


# What each kind of guppy folder holds that no other kind does (guppy/data.py, guppy/train.py, guppy/checkpoint.py,
# guppy/export_folder.py): one table, read by train and prepare (refuse_foreign) and by export (inspect_target).
# A run also keeps tokenizer.json and persona.json, copies of its data's, so those two tell nothing.
KINDS = {
    "a prepared dataset": ("meta.json", "train.jsonl", "eval.jsonl", "train.tokens.npy", "train.offsets.npy",
                           "train.prompt_len.npy", "eval.tokens.npy", "eval.offsets.npy", "eval.prompt_len.npy"),
    "a training run": ("checkpoints", "latest.json", "best.json", "metrics.jsonl"),
    "a checkpoint": ("state.json", "state.safetensors"),  # RUN/checkpoints/step-N/; its model files are an HF export's
    "an export": (".guppy-export.json", "model.onnx", "index.html"),
}  # in this order: a dataset or a run with a model.onnx copied into it is still a dataset or a run
EXPORT_KIND = "an export"
OWN_KIND = {"a training": "a training run", "a prepare": "a prepared dataset"}


def folder_kind(path: str) -> tuple[str, list[str]] | None:
    """(kind, the files that say so) for a folder holding guppy output of a KINDS kind, else None (new, empty, or
    anything else). An unreadable folder raises PermissionError (said as such by the CLI)."""
    if not os.path.isdir(path):
        return None
    present = set(os.listdir(path))
    for kind, names in KINDS.items():
        found = [n for n in names if n in present]
        if found:
            return kind, found
    return None


def refuse_foreign(path: str, what: str):
    """Raise GuppyError where `what` ("a training", "a prepare") would write into a folder of another kind."""
    found = folder_kind(path)
    if found and found[0] != OWN_KIND.get(what):
        kind, names = found
        raise GuppyError(f"{path}: holds {kind} ({', '.join(names[:3])}), which {what} would overwrite; choose "
                         "another --out")


class RunLock:
    """with RunLock(run_dir, what): ... holds DIR/.lock exclusively, creating run_dir if needed; `what` ("a training",
    "a prepare") is who holds it, as the next process's message says ("in use by a prepare (pid ...)"). A folder that
    holds another kind of output (refuse_foreign) is refused before anything is created, and checked again once the
    lock is held. If the body fails and the folder was created here and holds nothing but the lock, the folder is
    removed again (a failed start leaves no empty folder behind)."""

    def __init__(self, run_dir: str, what: str = "a training"):
        self.run_dir, self.what, self.fd, self.created = run_dir, what, None, False

    def __enter__(self):
        if os.path.lexists(self.run_dir) and not os.path.isdir(self.run_dir):
            raise GuppyError(f"{self.run_dir}: exists and is not a folder; choose another --out")
        refuse_foreign(self.run_dir, self.what)
        self.created = not os.path.exists(self.run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        path = os.path.join(self.run_dir, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + PROBE_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:  # perhaps only a reader's probe (held_by): it lets go at once
                    time.sleep(0.01)
                    continue
                os.close(fd)
                raise GuppyError(f"{self.run_dir}: in use by {holder(path)}; wait for it to end, or choose "
                                 "another --out") from None
        try:  # again, now that no guppy writer can be at work here: one may have finished just before
            refuse_foreign(self.run_dir, self.what)
        except GuppyError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd
        return self

    def __exit__(self, exc_type, exc, tb):
        os.close(self.fd)  # closing the descriptor releases the lock
        self.fd = None
        if exc_type is not None and self.created and os.listdir(self.run_dir) == [LOCK_NAME]:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return False


def held_by(run_dir: str) -> str | None:
    """Who is training in run_dir now ("a training (pid 123 on host, since ...)"), or None when no one is. For
    `guppy chat`/`eval`, which read a run and never lock it: a shared lock taken and dropped at once fails while a
    training holds the exclusive one. A training that starts in that instant waits for it (RunLock's PROBE_WAIT_S)
    rather than being refused."""
    path = os.path.join(run_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file: no training ever ran here (or it cannot be read: nothing to tell)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return holder(path)
    except OSError:  # a filesystem without flock
        return None
    finally:
        os.close(fd)  # closing releases the shared lock, if it was taken


def holder(path: str) -> str:
    """'a training (pid 123 on host, since 2026-11-26 15:30:00)', from what the lock file says."""
    try:
        with open(path) as f:
            h = json.load(f)
        return f"{h['what']} (pid {h['pid']} on {h['host']}, since {h['since']})"
    except (OSError, ValueError, KeyError, TypeError):  # written a moment ago, or by another version
        return "another process"
