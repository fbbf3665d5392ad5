"""Training-health guard: agreed skips of bad steps, rollback after repeated ones, a quarantine log.

The trainer feeds ``check`` the step's all-reduced loss and the engine's global pre-clip grad
norm (``Engine.grad_norm``), both the same on every rank, so every rank reaches the same
verdict without an extra collective. A bad step (non-finite, or a spike over the EMA of good
steps) is skipped by the engine (``Engine.skip_step``: no optimizer update); bad values never
enter the EMAs. ``max_bad_in_window`` bad steps within ``window`` steps ask for a rollback to
the last checkpoint with the LR scaled by ``lr_factor``; past ``max_rollbacks`` the run stops.

Public threads this answers: NaN losses at scale handled by "just resume" by hand
(ColossalAI#6239, Open-Sora-Plan#333).
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from scaletrain.config import HealthSection
from scaletrain.distributed import all_reduce_sum
from scaletrain.train.metrics import LossEMA


class HealthStop(RuntimeError):
    """The guard gave up (rollbacks exhausted, or nothing to roll back to); message is one line."""


@dataclass(frozen=True)
class Verdict:
    bad: bool
    reason: str = ""  # why the step is bad, e.g. "loss=nan is not finite"
    rollback: bool = False  # this bad step completes max_bad_in_window within the window


class HealthGuard:
    def __init__(self, cfg: HealthSection) -> None:
        self.cfg = cfg  # the `health` config section
        self.loss_ema, self.grad_ema = LossEMA(cfg.ema_decay), LossEMA(cfg.ema_decay)
        self._bad: deque[int] = deque()  # attempts (see Trainer.attempt) of recent bad steps
        self.bad_steps = 0
        self.rollbacks = 0
        self.lr_scale = 1.0
        # Stage index -> extra loader micro-batches to skip past (the stretches rolled back over).
        self.data_skip: dict[int, int] = {}

    def check(self, attempt: int, loss: float, grad_norm: float) -> Verdict:
        """Judge one step from values every rank shares; updates the EMAs only with good steps."""
        reasons = []
        for name, value, ema, factor in (("loss", loss, self.loss_ema, self.cfg.loss_spike_factor),
                                         ("grad_norm", grad_norm, self.grad_ema, self.cfg.grad_spike_factor)):
            if not math.isfinite(value):
                reasons.append(f"{name}={value} is not finite")
            elif factor and ema.count >= self.cfg.min_steps and value > factor * ema.get():
                reasons.append(f"{name}={value:.4g} > {factor:g} x its EMA {ema.get():.4g}")
        if not reasons:
            self.loss_ema.update(loss)
            self.grad_ema.update(grad_norm)
            return Verdict(False)
        self.bad_steps += 1
        self._bad.append(attempt)
        while self._bad[0] <= attempt - self.cfg.window:
            self._bad.popleft()
        return Verdict(True, "; ".join(reasons), rollback=len(self._bad) >= self.cfg.max_bad_in_window)

    @property
    def can_roll_back(self) -> bool:
        return self.rollbacks < self.cfg.max_rollbacks

    def begin_rollback(self, stage: int, skip_batches: int) -> None:
        """Scale the LR down and move stage ``stage``'s data past ``skip_batches`` more
        micro-batches, so the re-run steps see new data instead of the bad stretch."""
        self.rollbacks += 1
        self.lr_scale *= self.cfg.lr_factor
        self.data_skip[stage] = self.data_skip.get(stage, 0) + skip_batches
        self._bad.clear()

    def inject_spike(self, attempt: int, rank: int) -> bool:
        """Test hook (health.inject_spike_steps): multiply this rank's loss by 1000 at this step."""
        return rank == self.cfg.inject_nan_rank and attempt in self.cfg.inject_spike_steps

    def inject_nan(self, attempt: int, rank: int) -> bool:
        """Test hook (health.inject_nan_steps): poison this rank's loss at this step."""
        return rank == self.cfg.inject_nan_rank and attempt in self.cfg.inject_nan_steps

    def state_dict(self) -> dict:
        return {"lr_scale": self.lr_scale, "rollbacks": self.rollbacks, "bad_steps": self.bad_steps,
                "data_skip": {str(k): v for k, v in self.data_skip.items()},
                "loss_ema": [self.loss_ema.value, self.loss_ema.count],
                "grad_ema": [self.grad_ema.value, self.grad_ema.count]}

    def load_state_dict(self, state: dict) -> None:
        self.lr_scale, self.rollbacks, self.bad_steps = state["lr_scale"], state["rollbacks"], state["bad_steps"]
        self.data_skip = {int(k): v for k, v in state["data_skip"].items()}
        self.loss_ema.value, self.loss_ema.count = state["loss_ema"]
        self.grad_ema.value, self.grad_ema.count = state["grad_ema"]


def quarantine(path: Path, record: dict, *, keys: list[str], loss: float, rank: int, is_main: bool) -> None:
    """Collective: gather every rank's batch keys and local loss to rank 0, which appends one
    line per rank to ``path``. A bad step is rare, so all_gather_object's pickling is fine."""
    mine = {"rank": rank, "keys": list(keys), "loss": loss}
    gathered = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
    if is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            for part in gathered:
                f.write(json.dumps({**record, **part}) + "\n")


def poison(loss: torch.Tensor) -> torch.Tensor:
    """NaN with the loss's graph attached, so backward fills every gradient with NaN."""
    return loss * float("nan")


class Rollback:
    """The health guard's response to a bad step, as a component of the loop: quarantine the
    step's batch keys and, when the window is full, roll back to the last good checkpoint
    (``checkpointing.CheckpointCadence.good_step``) with a scaled LR and the stretch of data that
    went bad skipped."""

    def on_bad_step(self, trainer, index: int, stage, verdict, norm: float, keys: list[str], local_loss: float) -> bool:
        """Collective (every rank has the same verdict). True when the loop must restart from a
        checkpoint."""
        path = trainer.run_dir / "quarantine.jsonl"
        quarantine(path, {"step": trainer.step, "attempt": trainer.attempt, "stage": index, "reason": verdict.reason,
                          "grad_norm": norm}, keys=keys, loss=local_loss, rank=trainer.dist.rank,
                   is_main=trainer.dist.is_main)
        trainer.logger.event(f"health: step {trainer.step} skipped on every rank ({verdict.reason}); "
                             f"its batch keys are in {path}")
        if not verdict.rollback:
            return False
        h, guard = trainer.cfg.health, trainer.health
        why = (f"{h.max_bad_in_window} bad steps within {h.window} at step {trainer.step}; check {path} for the "
               f"batches and lower optim.lr (LR scale now {guard.lr_scale:g})")
        if not guard.can_roll_back:
            raise HealthStop(f"health guard stopped the run after {guard.rollbacks} rollback(s) "
                             f"(health.max_rollbacks={h.max_rollbacks}): {why}")
        trainer.checkpoints.finalize(trainer)  # a pending async save is the newest good state
        if trainer.checkpoints.good_step is None:
            raise HealthStop(f"health guard found no checkpoint to roll back to: {why}; "
                             f"set checkpoint.every_steps")
        self.rollback(trainer, index, stage)
        return True

    def rollback(self, trainer, index: int, stage) -> None:
        """Collective: reload the last good checkpoint (weights, optimizer, EMA, RNG, counters),
        keep the guard's live counters, scale the LR by health.lr_factor, and make stage
        ``index``'s stream skip every micro-batch consumed since that checkpoint, so the re-run
        steps see new data rather than the batches that went bad."""
        guard = trainer.health
        from_step, consumed = trainer.step, trainer.step_in_stage
        live = guard.state_dict()
        before = weights_fingerprint(trainer.engine, trainer.device)
        state = trainer.ckpt.load_step(trainer.checkpoints.good_step)
        trainer.restore(state)
        after = weights_fingerprint(trainer.engine, trainer.device)
        guard.load_state_dict(live)
        back = state["step_in_stage"] if state["stage"] == index else 0
        skip = (consumed - back) * stage.grad_accum
        guard.begin_rollback(index, skip)
        trainer.logger.log({"step": from_step, "rollback": True, "to_step": trainer.step, "lr_scale": guard.lr_scale,
                            "skipped_micro_batches": skip, "stage": index,
                            "weights_fingerprint_before": before, "weights_fingerprint_after": after})
        trainer.logger.event(f"health: rollback {guard.rollbacks} from step {from_step} to the checkpoint at "
                             f"step {trainer.step}; LR scale {guard.lr_scale:g}; stage {index}'s data moves on "
                             f"past {skip} micro-batches per rank")


def weights_fingerprint(engine, device: torch.device) -> float:
    """Collective: sum over every rank's parameter shards of sum(w^2 + w) in float64. Changes with
    any update, and is equal after loading the same weights on the same layout; the rollback
    record shows both, so a rollback that did not really reload is visible."""
    total = torch.zeros((), dtype=torch.float64)
    for shard in engine.local_param_shards():
        x = shard.local.detach().to("cpu", torch.float64)
        total += (x * x + x).sum()
    return all_reduce_sum([float(total)], device)[0]
