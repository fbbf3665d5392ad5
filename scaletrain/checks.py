"""Launch checks: the recipe against what lies outside the config tree, run once before any
process group exists.

``config.load_config`` validates the recipe as data (types, ranges, cross-field rules, the
preset's shapes); it imports no checkpoint or engine module. What needs those runs here, in
one step the launchers and the CLI call (``load_run_config``): the post-training start weights
(``init.*``: present, built for the preset, and for DPO trained with the same objective),
precomputed-latent shards against the recipe's encoders, a video stage's fps against its shards,
and the DeepSpeed JSON filled for every stage. Each failure is one line (``ConfigError``).
"""

from __future__ import annotations

from pathlib import Path

from scaletrain.config import ConfigError, RunConfig, load_config, world_size_from_env


def check_launch(cfg: RunConfig, world_size: int | None = None) -> None:
    """Raise ConfigError (one line) when the recipe cannot start on what is on disk."""
    world = world_size if world_size is not None else world_size_from_env()
    try:
        if cfg.init.source is not None:
            from scaletrain.checkpoint.init import check_init_source

            check_init_source(cfg)
        from scaletrain.data.latents import check_precomputed

        precomputed = check_precomputed(cfg) is not None
        from scaletrain.data.video import check_video_shards

        check_video_shards(cfg)
        stage = None
        if cfg.engine.kind == "deepspeed":
            from scaletrain.engines.ds_config import fill_deepspeed_config, load_deepspeed_json

            raw = load_deepspeed_json(cfg.engine.deepspeed_config)
            for st in cfg.train.stages:
                filled = fill_deepspeed_config(raw, cfg, micro_batch=st.micro_batch, grad_accum=st.grad_accum,
                                               world_size=world)
                stage = int(filled.get("zero_optimization", {}).get("stage", 0))
        check_startup_memory(cfg, world, stage, precomputed)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_startup_memory(cfg: RunConfig, world: int, zero_stage: int | None = None, precomputed: bool = False) -> None:
    """A preset that cannot fit this host (or one GPU) at the chosen sharding is one line now,
    before any rank allocates it: the sizing model's start-up floor per rank
    (``bench.sizing.startup_floor_bytes``) times the ranks on this host, against the memory
    available; on a GPU, the floor per rank against the device's memory."""
    import os

    import psutil

    from scaletrain.bench.sizing import model_facts, startup_floor_bytes

    engine = cfg.engine.kind if cfg.engine.kind != "deepspeed" else f"zero{zero_stage or 3}"
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
