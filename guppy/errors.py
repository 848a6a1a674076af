"""Mistakes a user can fix, and how the CLI says them: one line, no traceback.

`guppy.cli.main` is the one boundary: a GuppyError or an OSError (a path that is missing, unreadable, unwritable, on a
full or read-only disk) becomes `guppy <command>: error: <path or option>: <cause>` and exit 2. Any other exception is
a bug and keeps its traceback, so that it gets reported.
"""
import os
import re
import sys


class GuppyError(Exception):
    """Bad input: a missing file, a malformed dataset, an unknown preset, a device that is not there.
    str() is one line that starts with the path or the option at fault."""


class ConfigError(GuppyError, ValueError):
    """A model or training config with a value it cannot have (n_heads=0, a string d_model, a negative lr)."""


def os_error_line(e: OSError) -> str:
    """'<path>: <cause>' from an OSError, e.g. 'runs/fish/checkpoints: Permission denied'."""
    cause = e.strerror or str(e) or type(e).__name__
    paths = [os.fspath(p) for p in (e.filename, e.filename2) if p is not None]
    return f"{' -> '.join(printable(p) for p in paths)}: {cause}" if paths else cause


# What must never reach a terminal raw: C0 and C1 control characters and DEL (ESC starts the sequences that set the
# window title, clear the screen or write the clipboard (OSC 52); a CR or a newline forges lines), the bidirectional
# overrides (they reorder what is shown), and lone surrogates (undecodable bytes kept by Python; print() fails on them)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m) -> str:
    ch = m.group()
    return _ESCAPES.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def printable(text) -> str:
    """Text from a file or a model, safe to print: every control character shown as its escape, the way Python writes
    it (ESC as \\x1b, a newline as \\n), never raw, so that it cannot drive the terminal and is one line. A reply,
    a persona name and a path are each one line where guppy prints them (`guppy> reply`): a newline in one would start
    a line that looks like the next turn."""
    return _UNPRINTABLE.sub(_escape, str(text))


def one_line(text: str, paths=()) -> str:
    """A message squeezed onto one line (a library's multi-line error text) and safe to print. A path of `paths` (the
    command line's values) that holds control characters is shown escaped wherever the message names it (a newline in
    a path reads \\n, not a break); any other whitespace run becomes one space, any other control character its
    escape."""
    text = str(text)
    for p in paths:
        if isinstance(p, str) and p.strip() and _UNPRINTABLE.search(p):
            text = text.replace(p, printable(p))
    return printable(" ".join(text.split()))


def exit_interrupted(command: str):
    """Ctrl-C: say so on one line and exit 130, the code a shell gives a command Ctrl-C stopped.

    The `exec("")` is for CPython. A Ctrl-C that lands while a string `exec` runs (dataclasses and namedtuple build
    their methods that way, so any import may be inside one) marks the interrupt as unhandled even though it was
    caught here, and `python -m guppy` would then end by SIGINT (returncode -2) instead of exiting 130. Every string
    exec clears that mark as it starts, so an empty one makes the exit code the same every time.
    """
    print(f"{command}: interrupted", file=sys.stderr)
    exec("")
    sys.exit(130)
