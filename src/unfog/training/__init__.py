"""Training: configs, data order, EMA, resumable state and the loop."""

from .config import TrainConfig, load_config
from .loop import Trainer, train

__all__ = ["TrainConfig", "Trainer", "load_config", "train"]
