"""DDPM (epsilon / v prediction, Min-SNR-gamma, noise offset) as an ``Objective``.

The tensor math lives in ``diffusion/objective.py``; this file adapts it to the seam and
samples with DDIM (eta = 0: deterministic, the same betas as training).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

if TYPE_CHECKING:
    from diffusers import DDIMScheduler

from scaletrain.diffusion import objective as ddpm_math
from scaletrain.diffusion.base import Objective, ObjectiveParams, Sampler, TrainingBatch, register


class DDPMParams(ObjectiveParams):
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    num_train_timesteps: int = Field(1000, gt=1)
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    noise_offset: float = Field(0.0, ge=0.0)
    min_snr_gamma: float | None = Field(5.0, ge=0.0)

    @model_validator(mode="after")
    def _betas(self) -> DDPMParams:
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ValueError(f"beta_start={self.beta_start}, beta_end={self.beta_end}: need 0 < beta_start < "
                             "beta_end < 1")
        return self


class _DDIM(Sampler):
    def __init__(self, scheduler: DDIMScheduler) -> None:
        self.scheduler = scheduler
        self.timesteps = scheduler.timesteps
        self.init_noise_sigma = float(scheduler.init_noise_sigma)

    def scale_model_input(self, x: Tensor, t: Tensor) -> Tensor:
        return self.scheduler.scale_model_input(x, t)

    def step(self, pred: Tensor, t: Tensor, x: Tensor) -> Tensor:
        return self.scheduler.step(pred, t, x, eta=0.0).prev_sample


@register
class DDPMObjective(Objective):
    name = "ddpm"
    Params = DDPMParams
    scheduler_class = "DDIMScheduler"

    def __init__(self, params: DDPMParams) -> None:
        super().__init__(params)
        self.config = ddpm_math.ObjectiveConfig(**params.model_dump())
        self.noise_scheduler = ddpm_math.build_noise_scheduler(self.config)

    def training_batch(self, x0: Tensor, keys: Sequence[str], *, step: int, seed: int) -> TrainingBatch:
        noisy, t, target = ddpm_math.prepare_training_batch(x0, keys, step=step, seed=seed,
                                                       scheduler=self.noise_scheduler, cfg=self.config)
        return TrainingBatch(noisy=noisy, timesteps=t, target=target, t=t)

    def errors(self, pred: Tensor, batch: TrainingBatch) -> Tensor:
        if pred.shape != batch.target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target {tuple(batch.target.shape)}")
        return F.mse_loss(pred.float(), batch.target.float(), reduction="none").flatten(1).mean(dim=1)

    def weights(self, batch: TrainingBatch) -> Tensor | None:
        if not self.config.snr_weighting:
            return None
        snr = ddpm_math.compute_snr(self.noise_scheduler.alphas_cumprod, batch.t)
        return ddpm_math.min_snr_weights(snr, self.config.min_snr_gamma, self.config.prediction_type)

    def sampler(self, num_inference_steps: int, device: torch.device, *, latent_shape: Sequence[int]) -> Sampler:
        from diffusers import DDIMScheduler  # diffusers loads in ~1.5 s: only when sampling

        scheduler = DDIMScheduler.from_config(self.scheduler_config())
        scheduler.set_timesteps(num_inference_steps, device=device)
        return _DDIM(scheduler)

    def scheduler_config(self) -> dict[str, Any]:
        config = {k: v for k, v in dict(self.noise_scheduler.config).items() if not k.startswith("_")}
        # steps_offset 1: the Stable Diffusion convention, which diffusers' SD pipelines impose on
        # any scheduler they load (so an exported pipeline samples exactly as scaletrain does)
        return {**config, "prediction_type": self.config.prediction_type, "steps_offset": 1}

    def describe(self) -> str:
        snr = f"min-SNR-{self.config.min_snr_gamma:g}" if self.config.snr_weighting else "no SNR weighting"
        return f"ddpm {self.config.prediction_type}, {snr}, noise offset {self.config.noise_offset:g}"
