"""guppy: a tiny fish-persona language model trained from scratch in minutes, and the kernels that make it fast."""
from .config import ModelConfig, TrainConfig
from .model import GuppyLM

__version__ = "0.1.0"
__all__ = ["GuppyLM", "ModelConfig", "TrainConfig", "__version__"]
