"""Reading and writing model files; loading the official checkpoints into unfog's models.

File I/O (`io`, `pickle_reader`) needs only torch and is imported eagerly; the loaders build SD
models and tokenizers, so they are imported on first use (PEP 562), keeping `checkpoint.io` light
for the pixel models and the training state.
"""

from importlib import import_module

from .io import load_safetensors, load_state_dict, save_safetensors
from .pickle_reader import UnsafeCheckpointError, load_pickle_checkpoint, load_pickle_object

_LAZY = {
    "Components": "components",
    "check_controlnet_family": "controlnet",
    "load_controlnet": "controlnet",
    "save_controlnet": "controlnet",
    "Embedding": "embeddings",
    "read_embedding": "embeddings",
    "FAMILIES": "detect",
    "Family": "detect",
    "detect_family": "detect",
    "get_family": "detect",
    "load_diffusers_folder": "diffusers_folder",
    "load_components": "loader",
    "split_components": "loader",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted([*_LAZY, "UnsafeCheckpointError", "load_pickle_checkpoint", "load_pickle_object", "load_safetensors",
                  "load_state_dict", "save_safetensors"])
