"""The diffusion section and each stage's changes to it: the keys the selected objective reads
(flat, or in a subsection named after an objective), each subsection checked by its own
objective's ``Params``.

Part of the recipe checks (``scaletrain/checks.py`` gathers them): ``recipe(cfg, ctx)`` checks
the recipe as data (and the paths it names when ``ctx.check_paths``); each failure is a
ValueError whose message is one line naming the key and the fix.
"""

from __future__ import annotations

from typing import Any

from scaletrain.config import CheckContext, RunConfig
from scaletrain.diffusion.base import OBJECTIVES, objective_params


def recipe(cfg: RunConfig, ctx: CheckContext) -> None:
    objective_keys(cfg.diffusion.objective, dict(cfg.diffusion.model_extra or {}), "diffusion")
    for i in range(len(cfg.train.stages)):
        stage_objective_params(cfg, i)  # raises on a stage change the objective does not take


def stage_objective_params(cfg: RunConfig, index: int) -> dict[str, Any]:
    """Stage ``index``'s changes to the objective's keys (its noise_offset, its diffusion
    mapping), checked against the objective together with diffusion's own keys."""
    stage = cfg.train.stages[index]
    where = f"train.stages.{index}.diffusion"
    changes = objective_keys(cfg.diffusion.objective, dict(stage.diffusion or {}), where) if stage.diffusion else {}
    if stage.noise_offset is not None:
        changes.setdefault("noise_offset", stage.noise_offset)
    if changes:
        objective_params(cfg.diffusion.objective, {**cfg.diffusion.params(), **changes}, where=where)
    return changes


def objective_keys(objective: str, section: dict[str, Any], where: str) -> dict[str, Any]:
    """The keys ``objective`` reads from a diffusion mapping: its own subsection (``ddpm:
    {...}``, ``flow_matching: {...}``), then its flat keys over them (``--set diffusion.KEY=``). Every subsection is checked
    against its objective, the flat keys against ``objective``; one line names a bad key."""
    flat = {k: v for k, v in section.items() if k not in OBJECTIVES}
    for name in OBJECTIVES:
        sub = section.get(name)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise ValueError(f"{where}.{name} must be a mapping of {name}'s keys, got {sub!r}")
        objective_params(name, sub, where=f"{where}.{name}")
    merged = {**dict(section.get(objective) or {}), **flat}
    objective_params(objective, merged, where=where)
    return merged
