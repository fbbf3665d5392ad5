"""Validation and the sample grid as watchers of the training loop (hook points:
``common/hooks.py``): each owns its code and state and reads the trainer only for what it
runs on (the engine's module, the EMA, the frozen encoders, the current stage's objective, the
logger). The loop does not know what they do.

- ``ValidationWatcher``: the FID proxy and a validation grid every ``validate.every_steps`` and
  at the end (``eval/validate.py``), on the EMA weights when there is an EMA.
- ``SamplesWatcher``: the end-of-run sample grid (``sample.at_end``): RUN_DIR/samples.png (a video
  run's clips: RUN_DIR/samples.gif).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from scaletrain.common.hooks import StepOutcome, Watcher
from scaletrain.common.tars import expand_shards
from scaletrain.config import ConfigError, RunConfig
from scaletrain.models.registry import stage_frames, validation_frames


def default_shards(cfg: RunConfig) -> str | list[str]:
    """Validation's reference shards when validate.shards is unset: data.shards, or the first
    source's shards when data.sources replaces them."""
    sources = cfg.data.sources
    return sources[0].shards if sources else cfg.data.shards


def check_validation_reference(cfg: RunConfig) -> None:
    """Validation needs validate.num_images decodable images in its shards; count them at start
    (every rank reads the same prefix, so all fail together) rather than at the first
    validation days later. Raises ConfigError (one line)."""
    v = cfg.validate
    if not (v.every_steps or v.at_end):
        return
    from scaletrain.eval.validate import count_reference_images

    shards = expand_shards(v.shards or default_shards(cfg))
    frames = validation_frames(cfg)
    found = count_reference_images(shards, v.num_images, frames, cfg.validation_fps())
    if found < v.num_images:
        where = "validate.shards" if v.shards else "the training shards (validate.shards is unset)"
        what = f"{frames}-frame clips (or images)" if frames else "images"
        raise ConfigError(f"validate.num_images={v.num_images} but {where} hold only {found} decodable {what}; "
                          f"lower validate.num_images or point validate.shards at a larger set")


def _denoiser(trainer: Any):
    dtype, module = trainer.engine.input_dtype, trainer.engine.module

    def denoise(x, t, cond):
        return module(x.to(dtype), t, {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}).float()

    return denoise


def _weights(trainer: Any):
    """The EMA weights swapped in when there is an EMA (the raw weights otherwise), in eval mode."""
    ema = trainer.ema
    stack = contextlib.ExitStack()
    if ema is not None:
        stack.enter_context(ema.swapped())
    stack.enter_context(trainer.engine.eval_mode())
    return stack


class ValidationWatcher(Watcher):
    """FID proxy + validation grid every ``validate.every_steps`` and at the end (eval/validate.py)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.every, self.at_end_enabled = cfg.validate.every_steps, cfg.validate.at_end
        self.validator = None  # built at the first validation
        self.last_validated_step = -1

    def after_step(self, trainer: Any, outcome: StepOutcome) -> float:
        if self.every and outcome.step % self.every == 0 and not outcome.stop:
            return self.validate(trainer, outcome.resolution)
        return 0.0

    def at_end(self, trainer: Any) -> None:
        if self.at_end_enabled and self.last_validated_step != trainer.step:
            self.validate(trainer, trainer.cfg.train.stages[-1].resolution)

    def validate(self, trainer: Any, resolution: int) -> float:
        """Collective: FID and a sample grid on the EMA weights (raw weights without EMA); rank 0
        logs them. Returns the seconds it took. Training RNG streams are untouched."""
        from scaletrain.eval.validate import SamplingSpec, Validator, validation_record

        t0 = time.perf_counter()
        cfg, model, device, dist = trainer.cfg, trainer.model, trainer.device, trainer.dist
        v, frames = cfg.validate, validation_frames(cfg)
        if self.validator is None:
            sampling = SamplingSpec(
                encode_text=lambda captions: model.encode_text(captions, device),
                decode=model.decode, in_channels=model.preset.in_channels, latent_factor=model.preset.vae_factor,
                objective=trainer.objective, frames=frames, latent_frames=model.preset.latent_frames(max(frames, 1)),
                fps=cfg.validation_fps(),
            )
            self.validator = Validator(v, grid_prompts=list(cfg.sample.prompts), grid_seed=cfg.sample.seed,
                                       default_shards=default_shards(cfg), sampling=sampling,
                                       rank=dist.rank, world_size=dist.world_size, device=device)
        resolution = v.resolution or resolution
        self.validator.sampling.objective = trainer.objective  # the stage's (e.g. its flow shift)
        with _weights(trainer):
            grid = trainer.run_dir / "validation" / f"step-{trainer.step:06d}.png"
            value = self.validator.run(_denoiser(trainer), resolution, grid)
        seconds = time.perf_counter() - t0
        label, ema = self.validator.label, trainer.ema
        trainer.logger.log(validation_record(trainer.step, label, value, seconds, v.num_images, resolution,
                                             ema is not None, self.validator.metrics))
        what = f"{frames}-frame clips, per-frame" if frames > 1 else "images"
        extra = "".join(f", {k.removeprefix('validation/')}={x:.4f}" for k, x in self.validator.metrics.items()
                        if k.startswith("validation/temporal"))
        shown = grid.with_suffix(".gif") if frames > 1 else grid
        trainer.logger.event(f"validation at step {trainer.step}: {label}={value:.4f} ({v.num_images} {what} at "
                             f"{resolution}px, {'EMA' if ema else 'raw'} weights, {seconds:.1f}s){extra} -> {shown}")
        self.last_validated_step = trainer.step
        return seconds


class SamplesWatcher(Watcher):
    """The end-of-run sample grid (``sample.at_end``): RUN_DIR/samples.png (a video run's clips:
    RUN_DIR/samples.gif), from the EMA weights when there is an EMA; every rank runs the same
    forwards (sharded models)."""

    def at_end(self, trainer: Any) -> None:
        self.write_samples(trainer, trainer.run_dir / "samples.png")

    def write_samples(self, trainer: Any, path: Path) -> None:
        from scaletrain.eval.samples import generate_samples, save_image_grid, save_video_grid

        cfg, model, device = trainer.cfg, trainer.model, trainer.device
        s, last = cfg.sample, cfg.train.stages[-1]
        preset = model.preset
        frames = (s.frames or stage_frames(cfg, len(cfg.train.stages) - 1)) if preset.video else 0
        with _weights(trainer):
            images = generate_samples(
                _denoiser(trainer), lambda captions: model.encode_text(captions, device), model.decode,
                prompts=list(s.prompts), resolution=s.resolution or last.resolution, in_channels=preset.in_channels,
                latent_factor=preset.vae_factor,
                objective=trainer.objective,  # the current (at the end: the last) stage's
                num_inference_steps=s.steps, guidance_scale=s.guidance_scale, seed=s.seed, device=device,
                frames=preset.latent_frames(frames) if frames > 1 else 0,
            )
        if trainer.dist.is_main:
            if images.ndim == 5:
                path = save_video_grid(images, path.with_suffix(".gif"), fps=last.fps or 8.0, captions=list(s.prompts))
            else:
                save_image_grid(images, path, captions=list(s.prompts))
            trainer.logger.event(f"samples: {path}")
