"""The objective seam: what a training objective must provide, and the registry of them.

An objective turns clean latents into one training example per sample (model input, the
timestep the model sees, the target), scores a prediction (its loss weighting included) and
builds the sampler that inverts it. The trainer, DPO, the bench cell, validation and the
sample grid call only this interface; no scheduler class appears in their signatures.

Adding an objective takes one file: subclass ``Objective``, give it a ``Params`` model (its
``diffusion.*`` keys, validated once with the recipe), say which diffusers schedulers it
matches (``matches``: how a published pipeline's scheduler names its objective) and decorate
it with ``@register``; put the file in ``scaletrain/diffusion/objectives/`` (found there by
name) or import it from a test.

Randomness stays layout-invariant: every draw comes from per-sample generators seeded from
(seed, step, sample key) (``seeding.per_sample_generators``), never from the rank or the
micro-batch a sample lands in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor


@dataclass
class TrainingBatch:
    noisy: Tensor  # the model input
    timesteps: Tensor  # what the model is conditioned on (B,)
    target: Tensor  # what it should predict
    t: Tensor  # the objective's own per-sample time (DDPM: integer step; flow: sigma in [0, 1])


class Sampler(ABC):
    """One inference schedule: ``timesteps`` to visit, and one update per visit."""

    timesteps: Tensor
    init_noise_sigma: float = 1.0

    def scale_model_input(self, x: Tensor, t: Tensor) -> Tensor:
        return x

    @abstractmethod
    def step(self, pred: Tensor, t: Tensor, x: Tensor) -> Tensor: ...


class ObjectiveParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Objective(ABC):
    name: ClassVar[str]
    Params: ClassVar[type[ObjectiveParams]]
    # diffusers pipelines name the scheduler class they sample with (export, model cards)
    scheduler_class: ClassVar[str]

    def __init__(self, params: ObjectiveParams) -> None:
        self.params = params

    @classmethod
    def matches(cls, scheduler_config: dict[str, Any]) -> bool:
        """Whether a diffusers scheduler config (a pipeline's ``scheduler/scheduler_config.json``)
        samples a model trained with this objective. An objective no diffusers scheduler samples
        matches none."""
        return False

    @classmethod
    def schedule_from(cls, scheduler_config: dict[str, Any]) -> dict[str, Any]:
        """The training keys of this objective's ``Params`` that a scheduler it ``matches`` fixes
        (its noise schedule, prediction target, shift), as the recipe would spell them: what a
        fine-tuning run takes from a pipeline folder where the recipe does not set them."""
        return {}

    @classmethod
    def conflicts(cls, scheduler_config: dict[str, Any], params: ObjectiveParams) -> list[tuple[str, Any, Any]]:
        """(key, the scheduler's value, the recipe's value) for every training key of ``params``
        that contradicts a scheduler this objective ``matches``; empty when they agree."""
        ours = params.model_dump()
        return [(k, v, ours[k]) for k, v in cls.schedule_from(scheduler_config).items() if ours.get(k) != v]

    def for_stage(self, overrides: dict[str, Any] | None) -> Objective:
        """This objective with a curriculum stage's overrides (e.g. its noise offset or shift)."""
        if not overrides:
            return self
        return type(self)(self.params.model_copy(update=overrides))

    @abstractmethod
    def training_batch(self, x0: Tensor, keys: Sequence[str], *, step: int, seed: int) -> TrainingBatch: ...

    @abstractmethod
    def errors(self, pred: Tensor, batch: TrainingBatch) -> Tensor:
        """Per-sample squared error of a prediction (B,), float32, before any loss weighting."""

    @abstractmethod
    def weights(self, batch: TrainingBatch) -> Tensor | None:
        """Per-sample loss weights (B,), or None for uniform."""

    def loss(self, pred: Tensor, batch: TrainingBatch) -> tuple[Tensor, Tensor]:
        """(mean weighted loss, per-sample weighted loss (B,)), float32."""
        per_sample = self.errors(pred, batch)
        w = self.weights(batch)
        if w is not None:
            per_sample = per_sample * w.to(per_sample.device)
        return per_sample.mean(), per_sample

    @abstractmethod
    def sampler(self, num_inference_steps: int, device: torch.device, *, latent_shape: Sequence[int]) -> Sampler: ...

    @abstractmethod
    def scheduler_config(self) -> dict[str, Any]:
        """The diffusers scheduler config that samples this model (``scheduler_class``)."""

    def describe(self) -> str:
        """A few words for the stage-start log line."""
        return self.name


OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    OBJECTIVES[cls.name] = cls
    return cls


def _known() -> str:
    return ", ".join(sorted(OBJECTIVES))


def objective_params(name: str, values: dict[str, Any], where: str = "diffusion") -> ObjectiveParams:
    """Validate an objective's keys; a bad one raises ValueError with one line naming it."""
    if name not in OBJECTIVES:
        raise ValueError(f"{where}.objective={name!r} is unknown; choose one of: {_known()}")
    cls = OBJECTIVES[name]
    try:
        return cls.Params(**values)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            fields = ", ".join(cls.Params.model_fields)
            raise ValueError(f"{where}.{key} is not a key of the {name} objective (its keys: {fields}); "
                             "remove it or change diffusion.objective") from None
        if err["type"] == "value_error":
            raise ValueError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None
        raise ValueError(f"{where}.{key}={err.get('input')!r}: {err['msg']}") from None


def objective_for_scheduler(scheduler_config: dict[str, Any]) -> type[Objective] | None:
    """The registered objective whose ``matches`` accepts a diffusers scheduler config, or None."""
    found = [cls for cls in OBJECTIVES.values() if cls.matches(scheduler_config)]
    return found[0] if len(found) == 1 else None


def build_objective(name: str, values: dict[str, Any]) -> Objective:
    return OBJECTIVES[name](objective_params(name, values))
