"""DDPM (epsilon / v prediction, Min-SNR-gamma, noise offset) as an ``Objective``: its training
math and its sampler in one file.

- Schedule: diffusers' ``DDPMScheduler`` betas (scaled-linear 0.00085..0.012 over 1000 steps by
  default, as Stable Diffusion), without sample clipping (latents are not bounded to [-1, 1],
  and the sampler is built from the same config).
- Draws: per sample, from its own generator (``seeding.per_sample_generators``): the timestep
  first, then the noise, then the per-channel noise offset (Guttenberg 2023), so the timestep
  depends neither on the latent shape nor on the offset.
- Target: epsilon, or v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022), in float32.
- Loss weights: Min-SNR-gamma (Hang et al. 2023), min(snr, gamma) / snr for epsilon and
  / (snr + 1) for v, as diffusers' train_text_to_image.
- Sampling: DDIM with eta = 0 (deterministic, the same betas as training).
- Published pipelines: any diffusers scheduler with a beta schedule and an epsilon or v
  target (DDPM, DDIM, PNDM, Euler, DPM-Solver, ...) samples a DDPM-trained model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

if TYPE_CHECKING:
    from diffusers import DDIMScheduler, DDPMScheduler

from scaletrain.diffusion.base import Objective, ObjectiveParams, Sampler, TrainingBatch, register
from scaletrain.diffusion.seeding import per_sample_generators

# Min-SNR-gamma per target: the weight is min(snr, gamma) / denominator(snr). For eps the
# denominator is snr; for v it is snr + 1, because the v-loss already equals (snr + 1) times the
# x0-loss.
_MIN_SNR_DENOMINATORS: dict[str, Callable[[Tensor], Tensor]] = {
    "epsilon": lambda snr: snr,
    "v_prediction": lambda snr: snr + 1.0,
}
PREDICTION_TYPES: tuple[str, ...] = tuple(_MIN_SNR_DENOMINATORS)
# The scheduler keys that say what a published DDPM-family model was trained with.
_SCHEDULE_KEYS = ("prediction_type", "beta_schedule", "num_train_timesteps", "beta_start", "beta_end")


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


def compute_snr(alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t), in float32, on timesteps.device."""
    ab = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]
    return ab / (1.0 - ab)


def min_snr_weights(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), as in diffusers' train_text_to_image."""
    if prediction_type not in _MIN_SNR_DENOMINATORS:
        raise ValueError(f"prediction_type={prediction_type!r} is not supported; use one of {list(PREDICTION_TYPES)}")
    snr = snr.float()
    return torch.clamp(snr, max=gamma) / _MIN_SNR_DENOMINATORS[prediction_type](snr)


def sample_noise(shape: Sequence[int], *, noise_offset: float, generators: Sequence[torch.Generator]) -> Tensor:
    """Gaussian noise (float32, CPU) drawn sample by sample from its own generator; noise_offset
    > 0 adds offset * N(0, 1) per (sample, channel), which lets the model shift an image's mean
    brightness."""
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")
    per_sample = tuple(shape[1:])
    channel_shape = (per_sample[0],) + (1,) * (len(per_sample) - 1)
    rows = []
    for gen in generators:
        noise = torch.randn(per_sample, generator=gen)
        if noise_offset:
            noise = noise + noise_offset * torch.randn(channel_shape, generator=gen)
        rows.append(noise)
    return torch.stack(rows)


def sample_timesteps(num_train_timesteps: int, generators: Sequence[torch.Generator]) -> Tensor:
    """Uniform integer timesteps in [0, num_train_timesteps), int64 on CPU."""
    return torch.cat([torch.randint(0, num_train_timesteps, (1,), generator=gen) for gen in generators])


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
        from diffusers import DDPMScheduler  # lazy: validating a recipe must not load diffusers

        self.noise_scheduler: DDPMScheduler = DDPMScheduler(
            num_train_timesteps=params.num_train_timesteps, beta_schedule=params.beta_schedule,
            beta_start=params.beta_start, beta_end=params.beta_end, prediction_type=params.prediction_type,
            clip_sample=False)

    @property
    def snr_weighting(self) -> bool:
        return bool(self.params.min_snr_gamma)

    @classmethod
    def matches(cls, scheduler_config: dict[str, Any]) -> bool:
        if "FlowMatch" in str(scheduler_config.get("_class_name", "")) or scheduler_config.get("use_flow_sigmas"):
            return False
        return ("beta_schedule" in scheduler_config
                and scheduler_config.get("prediction_type", "epsilon") in PREDICTION_TYPES)

    @classmethod
    def schedule_from(cls, scheduler_config: dict[str, Any]) -> dict[str, Any]:
        out = {k: scheduler_config[k] for k in _SCHEDULE_KEYS if scheduler_config.get(k) is not None}
        if scheduler_config.get("beta_schedule") == "squaredcos_cap_v2":  # the cosine schedule has no start and end
            out.pop("beta_start", None)
            out.pop("beta_end", None)
        return out

    def training_batch(self, x0: Tensor, keys: Sequence[str], *, step: int, seed: int) -> TrainingBatch:
        p, sched = self.params, self.noise_scheduler
        gens = per_sample_generators(seed, step, keys)
        if len(gens) != x0.shape[0]:
            raise ValueError(f"got {len(gens)} keys for a batch of {x0.shape[0]}")
        # drawn on CPU, then moved: the result does not depend on the device
        t = sample_timesteps(p.num_train_timesteps, gens).to(x0.device)
        noise = sample_noise(x0.shape, noise_offset=p.noise_offset, generators=gens)
        noise = noise.to(device=x0.device, dtype=x0.dtype)
        # float32: diffusers casts alphas_cumprod to the sample dtype, and sqrt(alpha_bar) and
        # sqrt(1 - alpha_bar) near t = 0 are badly resolved in bf16
        noisy = sched.add_noise(x0.float(), noise.float(), t).to(x0.dtype)
        if p.prediction_type == "v_prediction":
            target = sched.get_velocity(x0.float(), noise.float(), t).to(x0.dtype)
        else:
            target = noise
        return TrainingBatch(noisy=noisy, timesteps=t, target=target, t=t)

    def errors(self, pred: Tensor, batch: TrainingBatch) -> Tensor:
        if pred.shape != batch.target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target {tuple(batch.target.shape)}")
        return F.mse_loss(pred.float(), batch.target.float(), reduction="none").flatten(1).mean(dim=1)

    def weights(self, batch: TrainingBatch) -> Tensor | None:
        if not self.snr_weighting:
            return None
        snr = compute_snr(self.noise_scheduler.alphas_cumprod, batch.t)
        return min_snr_weights(snr, self.params.min_snr_gamma, self.params.prediction_type)

    def sampler(self, num_inference_steps: int, device: torch.device, *, latent_shape: Sequence[int]) -> Sampler:
        from diffusers import DDIMScheduler  # diffusers loads in ~1.5 s: only when sampling

        scheduler = DDIMScheduler.from_config(self.scheduler_config())
        scheduler.set_timesteps(num_inference_steps, device=device)
        return _DDIM(scheduler)

    def scheduler_config(self) -> dict[str, Any]:
        config = {k: v for k, v in dict(self.noise_scheduler.config).items() if not k.startswith("_")}
        # steps_offset 1: the Stable Diffusion convention, which diffusers' SD pipelines impose on
        # any scheduler they load (so an exported pipeline samples exactly as scaletrain does)
        return {**config, "prediction_type": self.params.prediction_type, "steps_offset": 1}

    def describe(self) -> str:
        p = self.params
        snr = f"min-SNR-{p.min_snr_gamma:g}" if self.snr_weighting else "no SNR weighting"
        return f"ddpm {p.prediction_type}, {snr}, noise offset {p.noise_offset:g}"
