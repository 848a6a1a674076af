"""Mistakes a user can fix, and how the CLI says them: one line, no traceback.

`guppy.cli.main` is the one boundary: a GuppyError or an OSError (a path that is missing, unreadable, unwritable, on a
full or read-only disk) becomes `guppy <command>: error: <path or option>: <cause>` and exit 2. Any other exception is
a bug and keeps its traceback, so that it gets reported.
"""
import os
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
    return f"{' -> '.join(map(str, paths))}: {cause}" if paths else cause


def one_line(text: str) -> str:
    """A message squeezed onto one line (a library's multi-line error text, a path holding a newline)."""
    return " ".join(str(text).split())


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
