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

        check_precomputed(cfg)
        from scaletrain.data.video import check_video_shards

        check_video_shards(cfg)
        if cfg.engine.kind == "deepspeed":
            from scaletrain.engines.ds_config import fill_deepspeed_config, load_deepspeed_json

            raw = load_deepspeed_json(cfg.engine.deepspeed_config)
            for st in cfg.train.stages:
                fill_deepspeed_config(raw, cfg, micro_batch=st.micro_batch, grad_accum=st.grad_accum,
                                      world_size=world)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def load_run_config(path: str | Path, overrides: list[str] | None = None, *, world_size: int | None = None,
                    check_paths: bool = True) -> RunConfig:
    """``load_config`` plus, when ``check_paths``, the launch checks: what a launcher runs."""
    cfg = load_config(path, overrides, world_size=world_size, check_paths=check_paths)
    if check_paths:
        check_launch(cfg, world_size)
    return cfg
