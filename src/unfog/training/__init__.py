"""Training: configs, the loop and its trainers (pixel U-Net, autoencoder, text-to-image)."""

from .config import TrainConfig, load_config
from .loop import make_trainer, train
from .pixel import PixelTrainer

__all__ = ["PixelTrainer", "TrainConfig", "load_config", "make_trainer", "train"]
