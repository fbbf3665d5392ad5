"""The engine section: each engine checks its own knobs (its ``EngineSpec`` in its own module,
``engines/spec.py``) against the world size and this machine; at launch, what it reads from
disk (the DeepSpeed JSON filled for every stage).

Part of the recipe checks (``scaletrain/checks.py`` gathers them): ``recipe(cfg, ctx)`` checks
the recipe as data (and the paths it names when ``ctx.check_paths``), and ``launch(cfg, ctx)`` what lies on disk; each failure is a
ValueError whose message is one line naming the key and the fix.
"""

from __future__ import annotations

import importlib.util

from scaletrain.config import CheckContext, RunConfig
from scaletrain.engines.spec import ENGINE_SPECS, engine_spec


def recipe(cfg: RunConfig, ctx: CheckContext) -> None:
    if cfg.engine.precision == "fp8":
        check_fp8(cfg)
    engine_spec(cfg.engine.kind).check_recipe(cfg, ctx.world_size)


def check_fp8(cfg: RunConfig) -> None:
    """engine.precision=fp8 (engines/fp8.py): an engine that trains it, torchao, and fp8 tensor
    cores where there is CUDA (without CUDA, torchao emulates)."""
    from scaletrain.engines.fp8 import device_problem

    kind = cfg.engine.kind
    if not engine_spec(kind).trains_fp8:
        able = "/".join(k for k, s in ENGINE_SPECS.items() if s.trains_fp8)
        raise ValueError(f"engine.precision=fp8 is not wired into engine.kind={kind} (torchao's float8 Linear layers "
                         f"train under engine.kind={able} only); use engine.kind={able}, or engine.precision=bf16 "
                         f"with {kind}")
    if importlib.util.find_spec("torchao") is None:
        raise ValueError("engine.precision=fp8 needs torchao, which is not installed; "
                         "pip install 'torchao>=0.18,<0.19' (or use engine.precision=bf16)")
    problem = device_problem()
    if problem is not None:
        raise ValueError(f"engine.precision=fp8 needs fp8 tensor cores: {problem}; "
                         f"use engine.precision=bf16 on this GPU")


def launch(cfg: RunConfig, ctx: CheckContext) -> None:
    engine_spec(cfg.engine.kind).check_launch(cfg, ctx.world_size)


def sizing_label(cfg: RunConfig, world: int) -> str:
    """The engine as ``scaletrain size`` names it: fsdp, ddp, or zero1/2/3 from the DeepSpeed JSON."""
    return engine_spec(cfg.engine.kind).sizing_label(cfg, world)


def config_notes(cfg: RunConfig, world: int) -> list[str]:
    """What ``scaletrain config check`` prints after the YAML: what the engine filled in."""
    return engine_spec(cfg.engine.kind).config_notes(cfg, world)
