"""Mistakes a user can fix, and how the CLI says them: one line, no traceback.

`guppy.cli.main` is the one boundary: a GuppyError or an OSError (a path that is missing, unreadable, unwritable, on a
full or read-only disk) becomes `guppy <command>: error: <path or option>: <cause>` and exit 2. Any other exception is
a bug and keeps its traceback, so that it gets reported.
"""
import os


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
