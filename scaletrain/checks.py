"""The recipe checks, gathered in one place: what a launcher, the CLI and the tests call.

``config.py`` is the schema alone. Each component checks its own sections in its own
``checks.py`` through one small protocol: ``recipe(cfg, ctx)`` (the recipe as data, and the
paths it names when ``ctx.check_paths``) and, optionally, ``launch(cfg, ctx)`` (against what lies
on disk and on this host: start weights, precomputed-latent and video shards, the DeepSpeed
JSON). Each raises a ValueError whose message is one line; here it becomes a ConfigError.
``validate_config``/``load_config`` run the recipe checks; ``load_run_config`` (the launchers)
adds the launch checks and the start-up memory floor, before any process group exists.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from scaletrain.config import CheckContext, ConfigError, RunConfig, parse_config, read_recipe, world_size_from_env

# In this order: the model section first (model.preset=from_diffusers becomes the folder's
# preset, which every later check reads). Imported on first use: `import scaletrain.checks`
# must not load torch (`scaletrain --help`).
COMPONENTS = ("scaletrain.models.checks", "scaletrain.train.checks", "scaletrain.diffusion.checks",
              "scaletrain.eval.checks", "scaletrain.engines.checks", "scaletrain.data.checks",
              "scaletrain.checkpoint.checks")


def _run(phase: str, cfg: RunConfig, ctx: CheckContext) -> None:
    try:
        for name in COMPONENTS:
            check = getattr(importlib.import_module(name), phase, None)
            if check is not None:
                check(cfg, ctx)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate_config(data: dict, *, world_size: int | None = None, check_paths: bool = True) -> RunConfig:
    """A recipe (as data) through the schema and every component's recipe checks."""
    cfg = parse_config(data)
    world = world_size if world_size is not None else world_size_from_env()
    _run("recipe", cfg, CheckContext(world_size=world, check_paths=check_paths))
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None, *, world_size: int | None = None,
                check_paths: bool = True) -> RunConfig:
    """Read a YAML recipe, apply ``--set`` overrides, validate. Raises ConfigError (one line)."""
    return validate_config(read_recipe(path, overrides), world_size=world_size, check_paths=check_paths)


def check_launch(cfg: RunConfig, world_size: int | None = None) -> None:
    """Raise ConfigError (one line) when the recipe cannot start on what is on disk."""
    world = world_size if world_size is not None else world_size_from_env()
    _run("launch", cfg, CheckContext(world_size=world))
    try:
        from scaletrain.data.latents import check_precomputed
        from scaletrain.engines.checks import sizing_label

        check_startup_memory(cfg, world, sizing_label(cfg, world), check_precomputed(cfg) is not None)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_startup_memory(cfg: RunConfig, world: int, engine: str | None = None, precomputed: bool = False) -> None:
    """A preset that cannot fit this host (or one GPU) at the chosen sharding is one line now,
    before any rank allocates it: the sizing model's start-up floor per rank
    (``engines.spec.startup_floor_bytes``) times the ranks on this host, against the memory
    available; on a GPU, the floor per rank against the device's memory."""
    import os

    import psutil

    from scaletrain.engines.spec import startup_floor_bytes
    from scaletrain.models.facts import model_facts
    from scaletrain.engines.checks import sizing_label

    engine = engine or sizing_label(cfg, world)

    facts = model_facts(cfg.model.preset)
    per_rank = startup_floor_bytes(engine, facts, world, cfg.engine.precision,
                                   precomputed=precomputed)  # the host builds the frozen encoders whole
    on_device = startup_floor_bytes(engine, facts, world, cfg.engine.precision, precomputed=precomputed,
                                    frozen_encoders=cfg.model.frozen_encoders)
    here = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    available = psutil.virtual_memory().available
    what = (f"model.preset={cfg.model.preset!r} on {engine} x{world} needs at least {per_rank / 2**30:.1f} GiB per "
            f"rank at start-up ({facts.params / 1e6:.0f}M denoiser parameters, {facts.frozen / 1e6:.0f}M frozen)")
    fix = ("shard it over more ranks (engine.kind=fsdp, or DeepSpeed ZeRO-3), train on precomputed latents, "
           "shard the frozen encoders (model.frozen_encoders=shard), or use engine.precision=bf16 for them")
    if here * per_rank > available:
        raise ConfigError(f"{what}: {here} rank(s) on this host need {here * per_rank / 2**30:.1f} GiB, more than "
                          f"the {available / 2**30:.1f} GiB available; {fix}")
    import torch

    if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", None) != "":
        local = int(os.environ.get("LOCAL_RANK", 0)) % max(torch.cuda.device_count(), 1)
        total = torch.cuda.get_device_properties(local).total_memory
        if on_device > total:
            raise ConfigError(f"{what}: {on_device / 2**30:.1f} GiB on each GPU, more than one GPU's "
                              f"{total / 2**30:.1f} GiB; {fix}")


def load_run_config(path: str | Path, overrides: list[str] | None = None, *, world_size: int | None = None,
                    check_paths: bool = True) -> RunConfig:
    """``load_config`` plus, when ``check_paths``, the launch checks: what a launcher runs."""
    cfg = load_config(path, overrides, world_size=world_size, check_paths=check_paths)
    if check_paths:
        check_launch(cfg, world_size)
    return cfg
