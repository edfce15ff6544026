"""Reading and writing model files."""

from .io import load_safetensors, load_state_dict, save_safetensors
from .pickle_reader import UnsafeCheckpointError, load_pickle_checkpoint

__all__ = [
    "UnsafeCheckpointError",
    "load_pickle_checkpoint",
    "load_safetensors",
    "load_state_dict",
    "save_safetensors",
]
