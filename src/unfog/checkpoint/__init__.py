"""Reading and writing model files."""

from .io import load_safetensors, save_safetensors

__all__ = ["load_safetensors", "save_safetensors"]
