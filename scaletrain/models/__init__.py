"""Model presets (UNet and PixArt-DiT families), frozen encoders and per-family parallel plans."""

from scaletrain.models.registry import (
    PRESETS,
    Denoiser,
    DiffusionModel,
    ModelPreset,
    build_denoiser_net,
    build_model,
    count_params,
    EncoderSource,
    encoder_identity,
    frozen_dtype,
    vae_scaling,
    get_preset,
    parallel_units,
)

__all__ = [
    "PRESETS",
    "Denoiser",
    "DiffusionModel",
    "ModelPreset",
    "build_denoiser_net",
    "EncoderSource",
    "encoder_identity",
    "frozen_dtype",
    "vae_scaling",
    "build_model",
    "count_params",
    "get_preset",
    "parallel_units",
]
