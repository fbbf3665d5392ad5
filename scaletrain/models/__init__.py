"""Model presets (UNet and PixArt-DiT families), frozen encoders and per-family parallel plans."""

from scaletrain.models.registry import (
    PRESETS,
    Denoiser,
    DiffusionModel,
    ModelPreset,
    build_denoiser_net,
    build_model,
    count_params,
    frozen_dtype,
    get_preset,
    parallel_units,
)

__all__ = [
    "PRESETS",
    "Denoiser",
    "DiffusionModel",
    "ModelPreset",
    "build_denoiser_net",
    "frozen_dtype",
    "build_model",
    "count_params",
    "get_preset",
    "parallel_units",
]
