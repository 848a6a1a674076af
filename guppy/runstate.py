"""Where a run stands: finished, stopped before its last step, or training now; and how to go on with it.

The commands that read a run say what they found: `guppy chat` and `guppy eval` on an unfinished run name the step
they loaded in one line (unfinished_note); a training that stops early prints the command that continues it
(resume_command); a training without CUDA that will take hours says so once it has timed its first steps
(long_run_note). `make demo` asks `python -m guppy.runstate RUN` whether to train, resume or only chat.

"Finished" is the run's own record: the checkpoint latest.json names is at its recipe's max_steps (state.json's
train_config), and no training holds the run folder (guppy/runlock.py).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass

from . import checkpoint as ckpt_lib
from .config import DEFAULT_CPU_PRESET
from .errors import GuppyError
from .runlock import held_by

LONG_RUN_S = 3600  # a training without CUDA projected to take longer than this gets long_run_note's line


@dataclass
class RunState:
    step: int | None        # the step of the checkpoint latest.json names (None: latest.json cannot be read)
    max_steps: int | None   # where that checkpoint's recipe ends (None: it records no recipe)
    training: str | None    # who is training in the run now ("a training (pid 123 on host, since ...)"), else None

    @property
    def finished(self) -> bool:
        return self.training is None and self.step is not None and self.max_steps is not None \
            and self.step >= self.max_steps

    @property
    def unfinished(self) -> bool:
        """Training now, or stopped before max_steps (False where it cannot be told)."""
        return self.training is not None or (self.step is not None and self.max_steps is not None
                                             and self.step < self.max_steps)

    def describe(self) -> str:
        """'stopped at step 839 of 1,500', 'training now (...), saved through step 600 of 1,500', 'finished ...'."""
        where = (f"step {self.step:,} of {self.max_steps:,}" if self.step is not None and self.max_steps is not None
                 else f"step {self.step:,}" if self.step is not None else "a step its latest.json does not say")
        if self.training:
            return f"training now ({self.training}), saved through {where}"
        return f"finished at {where}" if self.finished else f"stopped at {where}"


def run_state(run_dir: str) -> RunState | None:
    """The state of the run in run_dir; None when run_dir is no run folder (a checkpoint folder, a GuppyLM .pt file,
    an export, a path that is not there)."""
    try:
        if not ckpt_lib.run_contents(run_dir):
            return None
    except OSError:
        return None
    step = max_steps = None
    try:
        pointer = ckpt_lib.read_pointer(run_dir, "latest")
        if pointer is not None:
            step = pointer["step"]
            max_steps = ckpt_lib.read_train_config(os.path.join(run_dir, pointer["checkpoint"])).max_steps
    except (GuppyError, OSError):  # damaged, or a checkpoint without a recipe: what is known is kept
        pass
    return RunState(step, max_steps, held_by(run_dir))


def checkpoint_step(ckpt: str) -> int | None:
    """N of a checkpoint folder checkpoints/step-N."""
    m = re.fullmatch(r"step-(\d+)", os.path.basename(os.path.normpath(ckpt)))
    return int(m.group(1)) if m else None


def unfinished_note(path: str, loaded: str, doing: str = "chatting with") -> str | None:
    """chat's and eval's one line when `path` (what --checkpoint named) is a run that is not finished: which step they
    loaded, and how far the run is. None for a finished run, or for a checkpoint folder or file named directly."""
    state = run_state(path)
    if state is None or not state.unfinished:
        return None
    step = checkpoint_step(loaded)
    what = f"step {step:,} of {path}" if step is not None else path
    go_on = "" if state.training else f"; `guppy train --data DATA --out {shlex.quote(path)} --resume` continues it"
    return f"note: {doing} {what}, a run that is not finished ({state.describe()}{go_on})"


def guppy_command() -> str:
    """How to run guppy in this shell: `guppy` when it is on PATH, else this Python with -m (e.g. make demo's .venv,
    not activated), its path relative to here when it lies below."""
    if shutil.which("guppy"):
        return "guppy"
    rel = os.path.relpath(sys.executable)
    return f"{shlex.quote(sys.executable if rel.startswith('..') else rel)} -m guppy"


def resume_command(data_dir: str, out_dir: str, device: str = "auto", stop_at_step: int | None = None) -> str:
    """The command that continues a run, as a stopped training prints it. It names only what the run does not record
    itself: the data and run folders, a device that was named, and a --stop-at-step not yet reached (the recipe,
    preset and ops are the run's own; see the resume rule in guppy/train.py)."""
    words = ["train", "--data", data_dir, "--out", out_dir, "--resume"]
    if device != "auto":
        words += ["--device", device]
    if stop_at_step is not None:
        words += ["--stop-at-step", str(stop_at_step)]
    return " ".join([guppy_command(), *map(shlex.quote, words)])


def long_run_note(device_type: str, preset: str | None, steps_to_go: int, s_per_step: float) -> str | None:
    """One line for a training without CUDA that will take more than LONG_RUN_S, from its first timed steps: the time
    per step, the time to go, and the preset made for such a machine (guppy-9m on a 2-core CPU: ~9 hours)."""
    eta = steps_to_go * s_per_step
    if device_type == "cuda" or eta < LONG_RUN_S or preset == DEFAULT_CPU_PRESET:
        return None
    return (f"note: at {s_per_step:.2f} s/step on this {device_type}, the {steps_to_go:,} steps to go take about "
            f"{eta / 3600:.1f} h; --preset {DEFAULT_CPU_PRESET} trains a fish here in minutes (Ctrl-C saves, "
            "--resume continues)")


def main(argv=None):
    """`python -m guppy.runstate RUN`: one line, `none` (no run there), `finished at step N of N`, or how far it
    is (`stopped at ...`, `training now ...`). make demo trains, chats or resumes by it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 1:
        print("usage: python -m guppy.runstate RUN", file=sys.stderr)
        sys.exit(2)
    state = run_state(argv[0])
    print("none" if state is None else state.describe())


if __name__ == "__main__":
    main()
