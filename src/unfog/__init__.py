"""unfog: a from-scratch, readable implementation of the diffusion-model stack."""

__version__ = "0.1.0"
