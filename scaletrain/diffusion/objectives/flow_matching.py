"""Flow matching (rectified flow) as SD3 and Flux train it, as an ``Objective``.

- Path: x_t = (1 - sigma) * x_0 + sigma * eps; the model predicts the velocity eps - x_0 and
  is conditioned on sigma * 1000 (the timestep diffusers' SD3/Flux pipelines pass).
- sigma: u from a logit-normal density (SD3's default), uniform, or SD3's "mode" density
  (``diffusers.training_utils.compute_density_for_timestep_sampling``, drawn sample by sample
  from the per-sample generators), then shifted towards noise: the static shift
  sigma = s * u / (1 + (s - 1) * u) (SD3), or Flux's dynamic one from the token count,
  mu = linear in tokens from ``base_shift`` at 256 to ``max_shift`` at 4096 tokens and
  sigma = e^mu / (e^mu + 1/u - 1). Tokens are latent pixels / 4 (the 2 x 2 patches SD3 and
  Flux use), so a higher-resolution stage shifts further towards noise.
- Loss: MSE on the velocity, optionally weighted per sample (``weighting``: SD3's sigma_sqrt
  or cosmap, ``compute_loss_weighting_for_sd3``).
- Sampling: diffusers' ``FlowMatchEulerDiscreteScheduler`` with the same shift settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

if TYPE_CHECKING:
    from diffusers import FlowMatchEulerDiscreteScheduler

from scaletrain.diffusion.base import Objective, ObjectiveParams, Sampler, TrainingBatch, register
from scaletrain.diffusion.seeding import per_sample_generators

NUM_TRAIN_TIMESTEPS = 1000  # the model sees sigma * 1000, as in diffusers' SD3 and Flux
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096  # Flux's dynamic-shift anchors (tokens)


class FlowParams(ObjectiveParams):
    timestep_sampling: Literal["logit_normal", "uniform", "mode"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0.0)
    mode_scale: float = 1.29
    shift: float = Field(1.0, gt=0.0)  # SD3 trains at 3.0 at 1024 px
    dynamic_shift: bool = False  # Flux: shift from the token count instead
    base_shift: float = 0.5
    max_shift: float = 1.15
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"

    @model_validator(mode="after")
    def _one_shift(self) -> FlowParams:
        if self.dynamic_shift and self.shift != 1.0:
            raise ValueError(f"shift={self.shift} and dynamic_shift=true both set the shift; keep one")
        return self


def tokens(latent_shape: Sequence[int]) -> int:
    h, w = latent_shape[-2], latent_shape[-1]
    return max(1, (h * w) // 4)


class _Euler(Sampler):
    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler) -> None:
        self.scheduler = scheduler
        self.timesteps = scheduler.timesteps

    def step(self, pred: Tensor, t: Tensor, x: Tensor) -> Tensor:
        return self.scheduler.step(pred, t, x).prev_sample


@register
class FlowMatchingObjective(Objective):
    name = "flow_matching"
    Params = FlowParams
    scheduler_class = "FlowMatchEulerDiscreteScheduler"

    @classmethod
    def matches(cls, scheduler_config: dict[str, Any]) -> bool:
        # SD3/FLUX ship FlowMatchEulerDiscreteScheduler; Wan 2.1 ships UniPC with flow sigmas
        return ("FlowMatch" in str(scheduler_config.get("_class_name", ""))
                or scheduler_config.get("prediction_type") == "flow_prediction"
                or bool(scheduler_config.get("use_flow_sigmas")))

    @classmethod
    def schedule_from(cls, scheduler_config: dict[str, Any]) -> dict[str, Any]:
        """FlowMatch Euler (SD3: a static shift; FLUX: the dynamic shift and its anchors) or
        UniPC with flow sigmas (Wan: ``flow_shift``)."""
        c = scheduler_config
        if c.get("use_flow_sigmas"):
            return {"shift": float(c.get("flow_shift", 1.0)), "dynamic_shift": False}
        if c.get("use_dynamic_shifting"):
            return {"dynamic_shift": True, "shift": 1.0, "base_shift": float(c.get("base_shift", 0.5)),
                    "max_shift": float(c.get("max_shift", 1.15))}
        return {"shift": float(c.get("shift", 1.0)), "dynamic_shift": False}

    def mu(self, latent_shape: Sequence[int]) -> float:
        p = self.params
        slope = (p.max_shift - p.base_shift) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
        return p.base_shift + slope * (tokens(latent_shape) - BASE_SEQ_LEN)

    def shift_sigmas(self, u: Tensor, latent_shape: Sequence[int]) -> Tensor:
        p = self.params
        if p.dynamic_shift:
            e = math.exp(self.mu(latent_shape))
            return e / (e + (1.0 / u - 1.0))
        return p.shift * u / (1.0 + (p.shift - 1.0) * u)

    def training_batch(self, x0: Tensor, keys: Sequence[str], *, step: int, seed: int) -> TrainingBatch:
        p = self.params
        gens = per_sample_generators(seed, step, keys)
        if len(gens) != x0.shape[0]:
            raise ValueError(f"got {len(keys)} keys for a batch of {x0.shape[0]}")
        # sigma first, then the noise (as DDPM draws its timestep first): sigma does not depend
        # on the latent shape's element count.
        from diffusers.training_utils import compute_density_for_timestep_sampling  # lazy: see sampler()

        u = torch.cat([compute_density_for_timestep_sampling(p.timestep_sampling, 1, p.logit_mean, p.logit_std,
                                                             p.mode_scale, generator=g) for g in gens])
        # keep sigma inside (0, 1): 1/u and the sigma_sqrt weight are finite
        sigma = self.shift_sigmas(u.clamp(1e-5, 1.0 - 1e-5), x0.shape).float()
        noise = torch.stack([torch.randn(tuple(x0.shape[1:]), generator=g) for g in gens])
        noise = noise.to(device=x0.device, dtype=torch.float32)
        s = sigma.to(x0.device).view(-1, *([1] * (x0.dim() - 1)))
        x = x0.float()
        noisy = ((1.0 - s) * x + s * noise).to(x0.dtype)
        target = (noise - x).to(x0.dtype)
        return TrainingBatch(noisy=noisy, timesteps=(sigma * NUM_TRAIN_TIMESTEPS).to(x0.device), target=target,
                             t=sigma.to(x0.device))

    def errors(self, pred: Tensor, batch: TrainingBatch) -> Tensor:
        if pred.shape != batch.target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target {tuple(batch.target.shape)}")
        return F.mse_loss(pred.float(), batch.target.float(), reduction="none").flatten(1).mean(dim=1)

    def weights(self, batch: TrainingBatch) -> Tensor | None:
        if self.params.weighting == "none":
            return None
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.params.weighting, batch.t.float())

    def sampler(self, num_inference_steps: int, device: torch.device, *, latent_shape: Sequence[int]) -> Sampler:
        # diffusers (~1.5 s to import) only where its code runs: validating a recipe needs none of it.
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config())
        if self.params.dynamic_shift:
            # FluxPipeline's steps: sigmas evenly spaced from 1 down to 1/n, then shifted by mu
            # (the scheduler's own spacing ends at 1/1000 instead), so an exported FLUX pipeline
            # samples what the run's sample grids show.
            n = num_inference_steps
            sigmas = [1.0 - i * (1.0 - 1.0 / n) / max(n - 1, 1) for i in range(n)]
            scheduler.set_timesteps(sigmas=sigmas, device=device, mu=self.mu(latent_shape))
        else:
            scheduler.set_timesteps(num_inference_steps, device=device)
        return _Euler(scheduler)

    def scheduler_config(self) -> dict[str, Any]:
        p = self.params
        return {"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "shift": p.shift, "use_dynamic_shifting": p.dynamic_shift,
                "base_shift": p.base_shift, "max_shift": p.max_shift, "base_image_seq_len": BASE_SEQ_LEN,
                "max_image_seq_len": MAX_SEQ_LEN}

    def describe(self) -> str:
        p = self.params
        shift = "dynamic shift" if p.dynamic_shift else f"shift {p.shift:g}"
        return f"flow matching, {p.timestep_sampling} timesteps, {shift}, weighting {p.weighting}"
