"""Checkpoint cadence as a component of the loop: when the loop saves (``every_steps``,
``every_minutes``, stage ends, a stop) it calls ``save``; a failed save is reported and either
skipped or turned into a clean stop (``checkpoint.on_save_error``); the last good checkpoint is
what a health rollback returns to. The manager (``checkpoint/manager.py``) does the writing."""

from __future__ import annotations

import sys
from typing import Any

from scaletrain.checkpoint.manager import CheckpointSaveError, latest_checkpoint
from scaletrain.train.health import HealthStop, weights_fingerprint


class CheckpointCadence:
    def __init__(self, ckpt: Any) -> None:
        self.ckpt = ckpt
        self.good_step: int | None = None  # the checkpoint a rollback returns to
        self.failures = 0  # checkpoints that could not be written (reported, the run went on)

    def save(self, trainer: Any) -> None:
        """Collective: the trainer's state and this rank's stream position, at trainer.step."""
        stream = trainer.stream
        rank_state = {"data_position": stream.stored_position(trainer.stage_index)}
        # A pending async write commits (or fails, reported with its own step) before this save.
        self._records(trainer, self.ckpt.finalize)
        if self._records(trainer, lambda: self.ckpt.save(trainer.step, trainer.state_dict(), rank_state)):
            self.good_step = trainer.step  # skipped steps leave weights untouched: still good
            if trainer.cfg.health.enabled:  # what a rollback to this checkpoint must bring back
                trainer.logger.log({"step": trainer.step,
                                    "checkpoint_weights_fingerprint": weights_fingerprint(trainer.engine, trainer.device)})

    def finalize(self, trainer: Any) -> None:
        """Commit a pending async checkpoint (its failure is handled like a failed save)."""
        self._records(trainer, self.ckpt.finalize)

    def _records(self, trainer: Any, fn) -> bool:
        """Run a collective save/finalize and log its records; a failed save (CheckpointSaveError,
        agreed on every rank) is reported and either skipped or turned into a clean stop."""
        try:
            records = fn()
        except CheckpointSaveError as e:  # agreed: raised on every rank together, .partial removed
            self.failures += 1
            last = latest_checkpoint(self.ckpt.dir)  # an async save counted good may be the one lost
            self.good_step = last.step if last is not None else None
            failed = e.step if e.step is not None else trainer.step
            trainer.logger.log({"step": trainer.step, "checkpoint_failed_step": failed})
            if trainer.cfg.checkpoint.on_save_error == "stop":
                raise HealthStop(f"{e}; stopping (checkpoint.on_save_error=stop): resume from the last complete "
                                 "checkpoint once there is room") from None
            if trainer.dist.is_main:
                print(f"scaletrain: {e}; training continues (checkpoint.on_save_error=continue), the next save "
                      "tries again", file=sys.stderr, flush=True)
            return False
        for record in records:
            trainer.logger.log({"step": trainer.step, **record})
        return True
