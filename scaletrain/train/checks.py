"""The training loop's sections (train.stages, health, run.dir, checkpoint.dir) against each
other and the world size.

Part of the recipe checks (``scaletrain/checks.py`` gathers them): ``recipe(cfg, ctx)`` checks
the recipe as data (and the paths it names when ``ctx.check_paths``); each failure is a
ValueError whose message is one line naming the key and the fix.
"""

from __future__ import annotations

from pathlib import Path

from scaletrain.config import CheckContext, RunConfig


def recipe(cfg: RunConfig, ctx: CheckContext) -> None:
    _check_stage_lengths(cfg)
    _check_batch_identity(cfg, ctx.world_size)
    _check_health(cfg, ctx.world_size)
    if ctx.check_paths:
        _check_run_dir(cfg)


def _check_stage_lengths(cfg: RunConfig) -> None:
    for i, st in enumerate(cfg.train.stages):
        if (st.steps is None) == (st.images is None):
            given = "both" if st.steps is not None else "neither"
            raise ValueError(f"train.stages.{i} sets {given} of steps and images; give exactly one "
                             f"(e.g. train.stages.{i}.steps=1000 or train.stages.{i}.images=1000000)")


def _check_batch_identity(cfg: RunConfig, world: int) -> None:
    for i, st in enumerate(cfg.train.stages):
        if st.global_batch is None:
            continue
        dp = cfg.data_parallel_size(world)
        got = st.micro_batch * st.grad_accum * dp
        if got != st.global_batch:
            need = st.global_batch / (st.micro_batch * dp)
            fix = (
                f"set train.stages.{i}.grad_accum={int(need)}"
                if need == int(need) and need >= 1
                else f"make global_batch a multiple of micro_batch x world ({st.micro_batch * dp})"
            )
            replicas = (f"world size {world}" if dp == world else
                        f"{dp} data-parallel replicas (world size {world} / engine.context_parallel "
                        f"{cfg.engine.context_parallel})")
            raise ValueError(
                f"train.stages.{i}.global_batch={st.global_batch} but micro_batch {st.micro_batch} x "
                f"grad_accum {st.grad_accum} x {replicas} = {got}; {fix}"
            )


def _check_health(cfg: RunConfig, world: int) -> None:
    h = cfg.health
    if h.max_bad_in_window > h.window:
        raise ValueError(f"health.max_bad_in_window={h.max_bad_in_window} exceeds health.window={h.window}, "
                         f"so a rollback could never trigger; use at most {h.window}")
    for name in ("loss_spike_factor", "grad_spike_factor"):
        value = getattr(h, name)
        if 0 < value <= 1:
            raise ValueError(f"health.{name}={value} would flag ordinary steps (a factor of the EMA); "
                             f"use a value above 1, e.g. 3, or 0 to disable")
    if (h.inject_nan_steps or h.inject_spike_steps) and h.inject_nan_rank >= world:
        raise ValueError(f"health.inject_nan_rank={h.inject_nan_rank} but the world size is {world}; "
                         f"use a rank below {world}")
    if any(s < 1 for s in h.inject_nan_steps):
        raise ValueError(f"health.inject_nan_steps={h.inject_nan_steps} must hold steps >= 1")


def _check_run_dir(cfg: RunConfig) -> None:
    """run.dir (and checkpoint.dir) must be a folder this process can create and write, found
    before any model is built."""
    import os

    for key, value in (("run.dir", cfg.run.dir), ("checkpoint.dir", cfg.checkpoint.dir)):
        if value is None:
            continue
        path = Path(value)
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise ValueError(f"{key}={value!r}: {existing} exists and is not a folder; choose another {key}")
        if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"{key}={value!r}: {existing} is not writable by this user; choose another {key} or "
                             "fix its permissions")
