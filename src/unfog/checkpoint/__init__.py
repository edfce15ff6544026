"""Reading and writing model files; loading the official checkpoints into unfog's models."""

from .components import Components
from .detect import FAMILIES, Family, detect_family, get_family
from .diffusers_folder import load_diffusers_folder
from .io import load_safetensors, load_state_dict, save_safetensors
from .loader import load_components, split_components
from .pickle_reader import UnsafeCheckpointError, load_pickle_checkpoint

__all__ = [
    "FAMILIES",
    "Components",
    "Family",
    "UnsafeCheckpointError",
    "detect_family",
    "get_family",
    "load_components",
    "load_diffusers_folder",
    "load_pickle_checkpoint",
    "load_safetensors",
    "load_state_dict",
    "save_safetensors",
    "split_components",
]
