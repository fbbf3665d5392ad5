"""Diffusion objective: noise schedule, targets, Min-SNR weighting, per-sample RNG."""

from scaletrain.diffusion.objective import (
    PREDICTION_TYPES,
    ObjectiveConfig,
    add_noise,
    build_noise_scheduler,
    compute_snr,
    diffusion_loss,
    min_snr_weights,
    per_sample_generators,
    prepare_training_batch,
    sample_noise,
    sample_timesteps,
    training_target,
)

__all__ = [
    "PREDICTION_TYPES",
    "ObjectiveConfig",
    "add_noise",
    "build_noise_scheduler",
    "compute_snr",
    "diffusion_loss",
    "min_snr_weights",
    "per_sample_generators",
    "prepare_training_batch",
    "sample_noise",
    "sample_timesteps",
    "training_target",
]
