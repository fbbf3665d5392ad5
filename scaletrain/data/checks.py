"""The data section: each stage's effective shards and sources (a stage's data override applied)
and, with paths, that every shard exists and no ``pipe:`` URL runs unasked; at launch, shards
written by ``data encode`` against the recipe's encoders and video shards against their stage.

Part of the recipe checks (``scaletrain/checks.py`` gathers them): ``recipe(cfg, ctx)`` checks
the recipe as data (and the paths it names when ``ctx.check_paths``), and ``launch(cfg, ctx)`` what lies on disk; each failure is a
ValueError whose message is one line naming the key and the fix.
"""

from __future__ import annotations

from scaletrain.config import CheckContext, RunConfig


def recipe(cfg: RunConfig, ctx: CheckContext) -> None:
    from scaletrain.data.samples import image_formats

    image_formats(cfg.data.image_formats)  # one line for a format that is not allow-listed
    for i in range(len(cfg.train.stages)):
        cfg.stage_data(i)  # raises on a bad per-stage data override
    if ctx.check_paths:
        _check_shards(cfg)


def launch(cfg: RunConfig, ctx: CheckContext) -> None:
    from scaletrain.data.latents import check_precomputed
    from scaletrain.data.video import check_video_shards

    check_precomputed(cfg)
    check_video_shards(cfg)


def _check_shards(cfg: RunConfig) -> None:
    """Every stage's effective shards (data.shards, data.sources, stage overrides) exist; a folder
    written by `scaletrain data encode` stands for its subfolder at the stage's resolution."""
    from scaletrain.common.tars import expand_shards
    from scaletrain.data.latents import resolve_shards
    from scaletrain.data.pipeline import check_pipe_shards, missing_local_shards

    if cfg.validate.shards is not None:
        check_pipe_shards(expand_shards(cfg.validate.shards), cfg.data.allow_pipe_shards, "validate.shards")
    for i, stage in enumerate(cfg.train.stages):
        for key, shards in cfg.stage_shard_sets(i):
            raw = [shards] if isinstance(shards, str) else list(shards)
            check_pipe_shards([str(x) for x in raw], cfg.data.allow_pipe_shards, key)
            try:
                urls, _ = resolve_shards(shards, stage.resolution, key)
            except ValueError as e:
                if "matched no .tar" not in str(e):
                    raise
                raise ValueError(f"{key}: shards={shards!r} matched no .tar files; point it at .tar files") from None
            missing = missing_local_shards(urls)
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise ValueError(f"{key}: {missing[0]!r}{more} does not exist; write shards with "
                                 "`scaletrain data synth --out DIR` or fix the path")
