"""The engine section: each engine checks its own knobs (its ``EngineSpec`` in its own module,
``engines/spec.py``) against the world size and this machine; at launch, what it reads from
disk (the DeepSpeed JSON filled for every stage).

Part of the recipe checks (``scaletrain/checks.py`` gathers them): ``recipe(cfg, ctx)`` checks
the recipe as data (and the paths it names when ``ctx.check_paths``), and ``launch(cfg, ctx)`` what lies on disk; each failure is a
ValueError whose message is one line naming the key and the fix.
"""

from __future__ import annotations

from scaletrain.config import CheckContext, RunConfig
from scaletrain.engines.spec import engine_spec


def recipe(cfg: RunConfig, ctx: CheckContext) -> None:
    engine_spec(cfg.engine.kind).check_recipe(cfg, ctx.world_size)


def launch(cfg: RunConfig, ctx: CheckContext) -> None:
    engine_spec(cfg.engine.kind).check_launch(cfg, ctx.world_size)


def sizing_label(cfg: RunConfig, world: int) -> str:
    """The engine as ``scaletrain size`` names it: fsdp, ddp, or zero1/2/3 from the DeepSpeed JSON."""
    return engine_spec(cfg.engine.kind).sizing_label(cfg, world)


def config_notes(cfg: RunConfig, world: int) -> list[str]:
    """What ``scaletrain config check`` prints after the YAML: what the engine filled in."""
    return engine_spec(cfg.engine.kind).config_notes(cfg, world)
