"""One training per run folder: an OS lock on RUN/.lock for as long as the training runs.

`fcntl.flock` is released by the kernel when the process ends, however it ends (kill -9 included), so a stale lock
cannot outlive its holder and there is nothing to clean up by hand. The file also holds who took the lock (pid, host,
start time), for the message the next process prints. A second `guppy train` into the same folder stops at once
(within PROBE_WAIT_S) with that message, before it reads or writes anything else there. `held_by` tells a reader
(chat, eval) whether a training holds the folder now.
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


class RunLock:
    """with RunLock(run_dir): ... holds RUN/.lock exclusively, creating run_dir if needed. If the body fails and the
    folder was created here and holds nothing but the lock, the folder is removed again (a failed start leaves no
    empty run behind)."""

    def __init__(self, run_dir: str, what: str = "a training"):
        self.run_dir, self.what, self.fd, self.created = run_dir, what, None, False

    def __enter__(self):
        if os.path.lexists(self.run_dir) and not os.path.isdir(self.run_dir):
            raise GuppyError(f"{self.run_dir}: exists and is not a folder; choose another --out")
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
