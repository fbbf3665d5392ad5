"""Training objectives behind one seam (``base.Objective``), one file each in ``objectives/``
(DDPM, flow matching), found there by name; layout-invariant randomness in ``seeding``; the
Diffusion-DPO loss over any objective in ``dpo``."""

from scaletrain.diffusion import objectives  # noqa: F401  (registers every objective in objectives/)
from scaletrain.diffusion.base import (
    OBJECTIVES,
    Objective,
    TrainingBatch,
    build_objective,
    objective_for_scheduler,
    objective_params,
)

__all__ = ["OBJECTIVES", "Objective", "TrainingBatch", "build_objective", "objective_for_scheduler",
           "objective_params"]
