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
    schedule_from_pipeline(cfg)  # first: a pipeline folder's schedule fills what the recipe leaves unset
    objective_keys(cfg.diffusion.objective, dict(cfg.diffusion.model_extra or {}), "diffusion")
    for i in range(len(cfg.train.stages)):
        stage_objective_params(cfg, i)  # raises on a stage change the objective does not take


def schedule_from_pipeline(cfg: RunConfig) -> dict[str, Any]:
    """Fine-tuning a diffusers pipeline folder (``init.from_diffusers`` = a root with
    ``scheduler/scheduler_config.json``): the objective its scheduler implies and the schedule
    keys it fixes (``Objective.schedule_from``: SD's prediction type and betas, SD3's shift,
    FLUX's dynamic shift, Wan's flow shift) become the recipe's wherever the recipe does not set
    them. What the recipe does set stays; a contradiction is refused at launch, every key at
    once (``checkpoint/init.py``). Returns what was taken (for the run log)."""
    from pathlib import Path

    from scaletrain.common.safe_load import read_json
    from scaletrain.diffusion.base import objective_for_scheduler

    root = cfg.init.from_diffusers
    sched_file = Path(root) / "scheduler" / "scheduler_config.json" if root else None
    if sched_file is None or not (Path(root) / "model_index.json").is_file() or not sched_file.is_file():
        return {}
    try:
        sched = read_json(sched_file)
    except ValueError:
        return {}  # unreadable: the pipeline checks name it
    found = objective_for_scheduler(sched)
    if found is None:
        return {}  # refused at launch with the scheduler's class named
    taken: dict[str, Any] = {}
    if "objective" not in cfg.diffusion.model_fields_set:
        cfg.diffusion.objective = taken["objective"] = found.name
    if cfg.diffusion.objective != found.name:
        return taken  # the recipe chose another objective: refused at launch, naming the folder's
    given = set(objective_keys(found.name, dict(cfg.diffusion.model_extra or {}), "diffusion"))
    for key, value in found.schedule_from(sched).items():
        if key not in given:
            setattr(cfg.diffusion, key, value)
            taken[key] = value
    return taken


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
