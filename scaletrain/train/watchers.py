"""What hangs off the training loop: small watchers with one interface.

``Trainer.run_stage`` is the loop (batches, forward/backward, the agreed health verdict,
optimizer step, counters, log, checkpoint); everything else that must happen at a point of a
step is a ``Watcher``: the EMA update, the comm profiler's sampled steps, validation and the
sample grid. Every hook is optional and runs on every rank, in the trainer's list order, so a
watcher may run collectives (validation samples on all ranks). Modelled on composer's
callbacks and torchtitan's components: the loop does not know what its watchers do.

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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scaletrain.engines.base import StepStats
    from scaletrain.train.trainer import Trainer


@dataclass(frozen=True)
class StepOutcome:
    step: int  # the step just taken (1-based)
    stage_index: int
    resolution: int
    stats: "StepStats"
    stop: bool  # the run stops after this step (SIGTERM or run.stop_at_step)
    stage_end: bool


class Watcher:
    def before_step(self, trainer: "Trainer", step: int) -> None:
        pass

    def after_update(self, trainer: "Trainer", stats: "StepStats") -> None:
        pass

    def after_timing(self, trainer: "Trainer") -> None:
        pass

    def after_step(self, trainer: "Trainer", outcome: StepOutcome) -> float:
        return 0.0

    def at_end(self, trainer: "Trainer") -> None:
        pass


class CommProfileWatcher(Watcher):
    """Every ``engine.comm_profile_every``-th step runs under torch.profiler (train/comm_profile.py);
    the step's record gets its compute / exposed-communication split."""

    def __init__(self, profiler) -> None:
        self.profiler = profiler

    def before_step(self, trainer: "Trainer", step: int) -> None:
        self.profiler.start(step)

    def after_timing(self, trainer: "Trainer") -> None:
        self.profiler.stop()


class EMAWatcher(Watcher):
    """The sharded EMA follows every optimizer step that was taken (local shards, no collective)."""

    def __init__(self, ema) -> None:
        self.ema = ema

    def after_update(self, trainer: "Trainer", stats: "StepStats") -> None:
        if not stats.skipped:
            self.ema.maybe_update(trainer.step + 1)


class ValidationWatcher(Watcher):
    """FID proxy + sample grid every ``validate.every_steps`` and at the end (eval/validate.py)."""

    def __init__(self, every: int, at_end: bool) -> None:
        self.every, self.at_end_enabled = every, at_end

    def after_step(self, trainer: "Trainer", outcome: StepOutcome) -> float:
        if self.every and outcome.step % self.every == 0 and not outcome.stop:
            return trainer.validate(outcome.resolution)
        return 0.0

    def at_end(self, trainer: "Trainer") -> None:
        if self.at_end_enabled and trainer.last_validated_step != trainer.step:
            trainer.validate(trainer.cfg.train.stages[-1].resolution)


class SamplesWatcher(Watcher):
    """The end-of-run sample grid (``sample.at_end``): RUN_DIR/samples.png (a video run's clips:
    RUN_DIR/samples.gif)."""

    def at_end(self, trainer: "Trainer") -> None:
        trainer.write_samples(trainer.run_dir / "samples.png")
