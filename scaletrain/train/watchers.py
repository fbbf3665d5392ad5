"""The training loop's own watchers (the hook points are ``common/hooks.py``): the EMA update and
the comm profiler's sampled steps. Validation and the sample grid are ``eval/watchers.py``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from scaletrain.common.hooks import StepOutcome, Watcher  # noqa: F401  (the loop's hook points)

if TYPE_CHECKING:
    from scaletrain.engines.base import StepStats
    from scaletrain.train.trainer import Trainer


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
