"""The diffusion training objective as pure tensor math.

Everything random is drawn from explicit per-sample generators so that a sample's
noise and timestep depend only on (seed, step, sample key), never on the rank,
micro-batch or position it lands in. That makes runs comparable across world sizes
and engines (FSDP2 vs DeepSpeed) and lets a resumed run replay the exact stream.

Prediction types live in two small tables (`_TARGETS`, `_MIN_SNR_DENOMINATORS`):
adding a new target (e.g. rectified flow) means adding entries there plus its own
timestep sampler and inference scheduler, not rewriting the loss.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

TargetFn = Callable[["DDPMScheduler", Tensor, Tensor, Tensor], Tensor]


def _epsilon_target(scheduler: DDPMScheduler, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    return noise


def _velocity_target(scheduler: DDPMScheduler, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    # v = sqrt(ab) * eps - sqrt(1 - ab) * x0 (Salimans & Ho 2022). Computed in float32:
    # diffusers casts alphas_cumprod to the sample dtype, and sqrt(1 - ab) near t=0 is
    # badly resolved in bf16.
    return scheduler.get_velocity(x0.float(), noise.float(), t).to(x0.dtype)


_TARGETS: dict[str, TargetFn] = {
    "epsilon": _epsilon_target,
    "v_prediction": _velocity_target,
}

# Min-SNR-gamma (Hang et al. 2023) expressed per target: the loss weight is
# min(snr, gamma) / denominator(snr). For eps the denominator is snr; for v it is
# snr + 1, because the v-loss already equals (snr + 1) times the x0-loss.
_MIN_SNR_DENOMINATORS: dict[str, Callable[[Tensor], Tensor]] = {
    "epsilon": lambda snr: snr,
    "v_prediction": lambda snr: snr + 1.0,
}

PREDICTION_TYPES: tuple[str, ...] = tuple(_TARGETS)


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in _TARGETS:
        raise ValueError(
            f"diffusion.prediction_type={prediction_type!r} is not supported; "
            f"use one of {list(PREDICTION_TYPES)}"
        )


@dataclass(frozen=True)
class ObjectiveConfig:
    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    noise_offset: float = 0.0
    min_snr_gamma: float | None = 5.0

    def __post_init__(self) -> None:
        _check_prediction_type(self.prediction_type)
        if self.num_train_timesteps < 1:
            raise ValueError(
                f"diffusion.num_train_timesteps={self.num_train_timesteps} must be >= 1"
            )
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ValueError(
                f"diffusion.beta_start={self.beta_start}, diffusion.beta_end={self.beta_end}: "
                "need 0 < beta_start < beta_end < 1"
            )
        if self.noise_offset < 0.0:
            raise ValueError(f"diffusion.noise_offset={self.noise_offset} must be >= 0")
        if self.min_snr_gamma is not None and self.min_snr_gamma < 0.0:
            raise ValueError(
                f"diffusion.min_snr_gamma={self.min_snr_gamma} must be > 0, or null/0 to disable"
            )

    @property
    def snr_weighting(self) -> bool:
        return bool(self.min_snr_gamma)


def build_noise_scheduler(cfg: ObjectiveConfig) -> DDPMScheduler:
    from diffusers import DDPMScheduler  # lazy: `import scaletrain.diffusion` must not load diffusers

    # clip_sample=False: latents are not bounded to [-1, 1], and the inference
    # scheduler is built from this config, so clipping here would leak into sampling.
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
    )


def compute_snr(alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t), in float32, on timesteps.device."""
    ab = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]
    return ab / (1.0 - ab)


def min_snr_weights(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), as in diffusers' train_text_to_image."""
    _check_prediction_type(prediction_type)
    snr = snr.float()
    return torch.clamp(snr, max=gamma) / _MIN_SNR_DENOMINATORS[prediction_type](snr)


def per_sample_generators(seed: int, step: int, keys: Sequence[str]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from a stable hash of (seed, step, key).

    hashlib rather than hash(): Python salts str hashes per process, so ranks would disagree.
    """
    gens = []
    for key in keys:
        digest = hashlib.sha256(f"{seed}\x1f{step}\x1f{key}".encode()).digest()
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        gens.append(gen)
    return gens


def posterior_generators(seed: int, step: int, keys: Sequence[str]) -> list[torch.Generator]:
    """Per-sample generators for the VAE posterior draw: keyed like the diffusion noise but a
    separate stream, so the online path (VAE every step) and the precomputed one (stored mean
    and logvar) draw the same latents, on any rank layout."""
    return per_sample_generators(seed, step, [f"posterior\x1f{key}" for key in keys])


def _check_batch(shape: Sequence[int], generators: Sequence[torch.Generator]) -> None:
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")


def sample_noise(
    shape: Sequence[int], *, noise_offset: float, generators: Sequence[torch.Generator]
) -> Tensor:
    """Gaussian noise (float32, CPU) drawn sample by sample from its own generator.

    noise_offset > 0 adds offset * N(0, 1) per (sample, channel) (Guttenberg 2023), which
    lets the model learn to shift the mean brightness of an image.
    """
    _check_batch(shape, generators)
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
    return torch.cat(
        [torch.randint(0, num_train_timesteps, (1,), generator=gen) for gen in generators]
    )


def add_noise(scheduler: DDPMScheduler, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    # float32 for the same reason as _velocity_target: sqrt(alpha_bar) in bf16 loses digits.
    return scheduler.add_noise(x0.float(), noise.float(), t).to(x0.dtype)


def training_target(
    scheduler: DDPMScheduler, x0: Tensor, noise: Tensor, t: Tensor, prediction_type: str
) -> Tensor:
    _check_prediction_type(prediction_type)
    return _TARGETS[prediction_type](scheduler, x0, noise, t)


def diffusion_loss(
    pred: Tensor, target: Tensor, timesteps: Tensor, scheduler: DDPMScheduler, cfg: ObjectiveConfig
) -> tuple[Tensor, Tensor]:
    """(mean weighted MSE, per-sample weighted MSE of shape (B,)), both float32."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target {tuple(target.shape)}")
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none")
    per_sample = per_sample.flatten(1).mean(dim=1)
    if cfg.snr_weighting:
        snr = compute_snr(scheduler.alphas_cumprod, timesteps.to(per_sample.device))
        per_sample = per_sample * min_snr_weights(snr, cfg.min_snr_gamma, cfg.prediction_type)
    return per_sample.mean(), per_sample


def prepare_training_batch(
    x0: Tensor,
    keys: Sequence[str],
    *,
    step: int,
    seed: int,
    scheduler: DDPMScheduler,
    cfg: ObjectiveConfig,
) -> tuple[Tensor, Tensor, Tensor]:
    """(noisy input, timesteps, target) for clean latents x0 with one key per sample.

    Randomness is drawn on CPU and then moved, so results do not depend on the device.
    Timesteps are drawn before the noise so they do not depend on the latent shape or
    on noise_offset.
    """
    gens = per_sample_generators(seed, step, keys)
    _check_batch(x0.shape, gens)
    t = sample_timesteps(cfg.num_train_timesteps, gens).to(x0.device)
    noise = sample_noise(x0.shape, noise_offset=cfg.noise_offset, generators=gens)
    noise = noise.to(device=x0.device, dtype=x0.dtype)
    noisy = add_noise(scheduler, x0, noise, t)
    return noisy, t, training_target(scheduler, x0, noise, t, cfg.prediction_type)
