"""Training: configs, the loop and its trainers (pixel U-Net, autoencoder, text-to-image)."""

from .config import TrainConfig, load_config
from .loop import Trainer, make_trainer, train

__all__ = ["TrainConfig", "Trainer", "load_config", "make_trainer", "train"]
