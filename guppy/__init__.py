"""guppy: a tiny fish-persona language model trained from scratch in minutes, and the kernels that make it fast."""
from .config import ModelConfig, TrainConfig

__version__ = "0.1.0"
__all__ = ["GuppyLM", "ModelConfig", "TrainConfig", "__version__"]


def __getattr__(name):
    # GuppyLM imports torch (seconds). Loaded on first use, so that `guppy` starts without it and a Ctrl-C while torch
    # loads lands inside the CLI's error boundary (one line, exit 130), not in a package import.
    if name == "GuppyLM":
        from .model import GuppyLM
        return GuppyLM
    raise AttributeError(f"module 'guppy' has no attribute {name!r}")
