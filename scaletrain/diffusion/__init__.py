"""Training objectives behind one seam (``base.Objective``): DDPM (``ddpm.py``, its tensor math
in ``objective.py``) and flow matching (``flow.py``), each registered by importing its file."""

from scaletrain.diffusion import ddpm, flow  # noqa: F401  (register the built-in objectives)
from scaletrain.diffusion.base import OBJECTIVES, Objective, TrainingBatch, build_objective, objective_params
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
    "OBJECTIVES",
    "Objective",
    "TrainingBatch",
    "build_objective",
    "objective_params",
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
