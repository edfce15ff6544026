"""Closed-form oracles for the diffusion maths (Gaussian mixtures with exact denoisers)."""
