"""The hook points of one optimizer step, which the training loop calls on its watchers.

``Trainer.run_stage`` (train/trainer.py) is the loop; what must happen at a point of a step is a
``Watcher`` (the EMA update and the comm profiler's sampled steps in ``train/watchers.py``,
validation and the sample grid in ``eval/watchers.py``). Every hook is optional and runs on
every rank, in the trainer's list order, so a watcher may run collectives. Modelled on
composer's callbacks and torchtitan's components: the loop does not know what its watchers do.
Here, at the bottom, so that watchers of any layer implement it without importing the loop.

Hook points of one optimizer step, in order:
  before_step(trainer, step)      before the step's clock starts (step = the step being taken)
  after_update(trainer, stats)    after the optimizer (or the skipped step), inside the timed step
  after_timing(trainer)           the step's wall time is taken; before it is logged
  after_step(trainer, outcome)    after logging and any checkpoint; returns seconds it spent
                                  that the stage's img/s must not count (e.g. validation)
and once a completed run has trained its last stage:
  at_end(trainer)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StepOutcome:
    step: int  # the step just taken (1-based)
    stage_index: int
    resolution: int
    stats: Any  # engines.base.StepStats
    stop: bool  # the run stops after this step (SIGTERM or run.stop_at_step)
    stage_end: bool


class Watcher:
    def before_step(self, trainer: Any, step: int) -> None:
        pass

    def after_update(self, trainer: Any, stats: Any) -> None:
        pass

    def after_timing(self, trainer: Any) -> None:
        pass

    def after_step(self, trainer: Any, outcome: StepOutcome) -> float:
        return 0.0

    def at_end(self, trainer: Any) -> None:
        pass
