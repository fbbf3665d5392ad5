"""One training step's diffusion math, shared by the trainer and the benchmark cell, and the
``TrainingLoss`` seam through which the trainer runs a micro-batch.

``model_inputs`` turns a loader batch into (x0 in the denoiser's space, the conditioning dict):
the precomputed posterior and text outputs when the batch has them, else the frozen encoders;
a latent preset draws its posterior sample from per-key generators on both paths, so the two
paths give the same x0. ``forward_backward`` is one micro-batch: the objective's training
batch, the engine's forward inside ``micro_step``, the objective's loss, ``engine.backward``.
The trainer adds its health-guard hooks through ``on_loss``, the bench cell its phase timers
through ``mark``; neither re-implements the step. (``examples/reference_loop.py`` is the
hand-written baseline the trainer is tested against, so it shares none of this on purpose.)

``TrainingLoss`` is what the trainer calls per micro-batch: ``DenoisingLoss`` (pre-training,
SFT, LoRA: ``forward_backward`` above) or a preference loss (``train/dpo.py``). A loss may
keep per-step sums that ride the trainer's one all-reduce a step and come back as metrics,
say how many pre-training images of compute one of its samples costs (throughput and MFU),
and add to the run summary. Together with an optional batch builder (``BatchRequest`` ->
batches, e.g. DPO's preference pairs) it is the whole of what a post-training method adds to
the loop: no Trainer subclass, no hooks to override.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from scaletrain.config import RunConfig
from scaletrain.diffusion.base import Objective
from scaletrain.diffusion.seeding import posterior_generators


def model_inputs(model, batch: dict, device: torch.device, *, seed: int, step: int,
                 scaling: tuple[float, float] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """(x0 float32, conditioning: float fields float32, masks long) on ``device``. ``model`` is a
    ``models.DiffusionModel``; ``scaling`` is the precomputed shards' (scaling_factor, shift_factor)."""
    gens = posterior_generators(seed, step, batch["keys"]) if model.preset.latent else None
    if "latents" in batch:
        mean, logvar = batch["latents"].to(device, non_blocking=True).chunk(2, dim=1)
        x0 = model.latents_from_posterior(mean, logvar, gens, scaling=scaling)
        cond = {k: v.to(device, non_blocking=True) for k, v in batch["cond"].items()}
        cond = {k: v.float() if v.is_floating_point() else v.long() for k, v in cond.items()}
    else:
        x0 = model.encode_images(batch["pixels"].to(device, non_blocking=True), gens)
        cond = model.encode_text(batch["captions"], device)
    if "geometry" in batch:  # each image's original size and crop: SDXL micro-conditions on them
        cond["geometry"] = batch["geometry"].to(device, non_blocking=True)
    return x0, cond


def cast_cond(cond: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """The conditioning's floating fields in the engine's input dtype (masks stay integer)."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}


def forward_backward(engine, objective: Objective, x0: Tensor, cond: dict[str, Tensor],
                     keys: Sequence[str], *, step: int, seed: int, is_last: bool,
                     on_loss: Callable[[Tensor], Tensor] | None = None,
                     mark: Callable[[str], None] | None = None) -> Tensor:
    """One micro-batch through ``engine`` (an ``engines.Engine``); returns the loss, detached
    (0-dim, no host sync). ``on_loss`` may replace the loss before backward (test hooks);
    ``mark(phase)`` is called after "encode", "forward" and "backward"."""
    tb = objective.training_batch(x0, keys, step=step, seed=seed)
    if mark:
        mark("encode")
    dtype = engine.input_dtype
    with engine.micro_step(is_last=is_last):
        pred = engine.module(tb.noisy.to(dtype), tb.timesteps, cast_cond(cond, dtype))
        loss, _ = objective.loss(pred.float(), tb)
        if on_loss is not None:
            loss = on_loss(loss)
        if mark:
            mark("forward")
        engine.backward(loss)
        if mark:
            mark("backward")
    return loss.detach()


class TrainingLoss:
    """One micro-batch's forward and backward as the trainer sees it; subclasses set ``name``
    and implement ``__call__``. The defaults are a loss with no metrics of its own."""

    name = "loss"
    images_per_sample = 1.0  # a sample's training FLOPs in pre-training images (throughput, MFU)

    def __call__(self, engine, objective: Objective, batch: dict, *, step: int, seed: int, is_last: bool,
                 on_loss: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Forward and backward of ``batch`` through ``engine`` under ``objective`` (the stage's);
        returns the loss, detached. ``on_loss`` may replace the loss before backward (test hooks)."""
        raise NotImplementedError

    def describe(self) -> str | None:
        """A line for the run log at start (None: nothing to say)."""
        return None

    def local_sums(self) -> list[float]:
        """This rank's sums over the step's micro-batches (then reset), summed over ranks in the
        trainer's one all-reduce a step. Called on every rank at every step; same length always."""
        return []

    def metrics(self, sums: list[float]) -> dict:
        """Fields for the step's record from the global ``local_sums``."""
        return {}

    def summary(self) -> dict:
        return {}

    def close(self) -> None:
        """Drop what holds the device mesh (a sharded reference) before the process group goes."""


class DenoisingLoss(TrainingLoss):
    """The objective's denoising loss on ``inputs(batch)`` = (x0, conditioning)."""

    name = "denoising"

    def __init__(self, inputs: Callable[[dict], tuple[Tensor, dict[str, Tensor]]]) -> None:
        self.inputs = inputs

    def __call__(self, engine, objective: Objective, batch: dict, *, step: int, seed: int, is_last: bool,
                 on_loss: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        x0, cond = self.inputs(batch)
        return forward_backward(engine, objective, x0, cond, batch["keys"], step=step, seed=seed,
                                is_last=is_last, on_loss=on_loss)


@dataclass(frozen=True)
class LossContext:
    """What a loss factory gets once the engine exists (a frozen reference needs
    ``engine.prepare_frozen``)."""

    cfg: RunConfig
    model: object  # models.DiffusionModel: frozen encoders and the preset
    engine: object  # engines.Engine
    device: torch.device


@dataclass(frozen=True)
class BatchRequest:
    """A stage's batch stream, as the trainer asks a batch builder for it."""

    cfg: RunConfig
    stage_index: int
    rank: int
    world_size: int
    resolution: int
    micro_batch: int
    skip: int  # micro-batches per rank already consumed (resume, rollback)
    fresh: bool = True  # the stage starts at its first step (its data counters start from zero)


LossFactory = Callable[[LossContext], TrainingLoss]
BatchBuilder = Callable[[BatchRequest], Iterator[dict]]


# ----------------------------------------------------------------------------- the loop's records


@dataclass
class StagePlan:
    """One stage at this launch: where it starts, how long it runs, its data and LR schedule."""

    start: int  # step_in_stage the loop starts from (resume)
    steps: int
    batches: Iterator[dict]
    global_batch: int
    lr: Callable[[int], float]  # step_in_stage -> LR before the health guard's scale
    images: int = 0  # trained at this launch (the stage's img/s)


@dataclass
class MicroBatches:
    """This rank's side of one optimizer step."""

    loss_sum: float | torch.Tensor = 0.0
    local_loss: float = 0.0
    wait: float = 0.0
    skipped: int = 0
    keys: list[str] = field(default_factory=list)


@dataclass
class Agreed:
    """The step's figures after the one all-reduce: the same on every rank."""

    loss: float
    wait: float
    norm: float
    skipped: int
    sigterm: bool
    minutes_due: bool
    objective_sums: list[float]
