"""Per-stage settings of the curriculum that the loop resolves at each stage start.

A stage's length is ``steps`` or ``images`` (``RunConfig.stage_steps`` does the rounding:
ceil(images / global batch)). A run resumed at another global batch (say a new world size
without adjusting grad_accum) re-plans an images-length stage from the images it has still
to see, so the stage keeps its promise of ``images`` images; a steps-length stage keeps its
steps. The objective is diffusion's, with the stage's changes (its noise offset, its
``diffusion`` keys) applied.
"""

from __future__ import annotations

import math

from scaletrain.config import ConfigError, RunConfig
from scaletrain.diffusion import Objective
from scaletrain.diffusion.checks import stage_objective_params


def planned_stage_steps(cfg: RunConfig, index: int, world_size: int, *, steps_done: int = 0,
                        images_done: int = 0) -> int:
    """Total steps of stage ``index`` when this launch starts ``steps_done`` steps (and
    ``images_done`` images) into it.

    Fresh stage: ``cfg.stage_steps``. Resumed images-length stage: steps_done + ceil(images
    left / this launch's global batch), equal to the fresh count when the global batch is
    unchanged. Raises ConfigError when the recipe now gives the stage no steps left (a
    shortened stage would otherwise never end).
    """
    stage = cfg.train.stages[index]
    if steps_done == 0:
        return cfg.stage_steps(index, world_size)
    if stage.images is None:
        total = stage.steps
    else:
        left = max(stage.images - images_done, 0)
        total = steps_done + math.ceil(left / cfg.stage_global_batch(index, world_size))
    if total <= steps_done:
        length = f"images={stage.images}" if stage.images is not None else f"steps={stage.steps}"
        raise ConfigError(f"train.stages.{index}.{length} but the checkpoint is already {steps_done} steps "
                          f"({images_done} images) into that stage; lengthen it or set checkpoint.resume=never")
    return total


def stage_length_text(cfg: RunConfig, index: int, world_size: int, steps: int, *, steps_done: int = 0,
                      images_done: int = 0) -> str:
    """How a stage's length was resolved, for the stage-start log line."""
    stage = cfg.train.stages[index]
    if stage.images is None:
        return f"{steps} steps"
    gb = cfg.stage_global_batch(index, world_size)
    if steps_done and steps != cfg.stage_steps(index, world_size):  # re-planned at another global batch
        left = stage.images - images_done
        return (f"{steps} steps (images={stage.images}: {steps_done} steps done with {images_done} images, "
                f"{steps - steps_done} more at global batch {gb} for the {left} left, rounded up)")
    return (f"{steps} steps (images={stage.images} / global batch {gb}, rounded up: "
            f"{math.ceil(stage.images / gb) * gb} images at a fresh start)")


def stage_objective(base: Objective, cfg: RunConfig, index: int) -> Objective:
    """The objective of stage ``index``: ``base`` with the stage's changes, if it has any."""
    return base.for_stage(stage_objective_params(cfg, index))


def planned_total_steps(cfg: RunConfig, world: int, *, step: int, stage_index: int, step_in_stage: int,
                        stage_images_seen: int | None) -> int:
    """Steps of the whole run at this launch: those before the current stage, plus the current
    and later stages' planned steps (``planned_stage_steps``; images-length stages depend on the
    world size)."""
    stages = cfg.train.stages
    if stage_index >= len(stages):
        return step
    gb = cfg.stage_global_batch(stage_index, world)
    images_done = stage_images_seen if stage_images_seen is not None else step_in_stage * gb
    current = planned_stage_steps(cfg, stage_index, world, steps_done=step_in_stage, images_done=images_done)
    later = sum(cfg.stage_steps(i, world) for i in range(stage_index + 1, len(stages)))
    return step - step_in_stage + current + later
