"""Evaluation helpers: sample grids for validation."""

from scaletrain.eval.samples import generate_samples, save_image_grid

__all__ = ["generate_samples", "save_image_grid"]
