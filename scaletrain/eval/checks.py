"""The validate section: frames and resolution the preset takes, enough images for every rank,
local feature-extractor weights and validation shards.

Part of the recipe checks (``scaletrain/checks.py`` gathers them): ``recipe(cfg, ctx)`` checks
the recipe as data (and the paths it names when ``ctx.check_paths``); each failure is a
ValueError whose message is one line naming the key and the fix.
"""

from __future__ import annotations

from pathlib import Path

from scaletrain.config import CheckContext, RunConfig


def recipe(cfg: RunConfig, ctx: CheckContext) -> None:
    _check_validate(cfg, ctx.world_size, check_paths=ctx.check_paths)


def _check_validate(cfg: RunConfig, world: int, *, check_paths: bool) -> None:
    v = cfg.validate
    if not (v.every_steps or v.at_end):
        return
    from scaletrain.models.registry import get_preset

    preset = get_preset(cfg.model.preset)
    if v.frames is not None and not preset.video:
        raise ValueError(f"validate.frames={v.frames}: model.preset={preset.name!r} ({preset.family}) is an image family; "
                         "remove validate.frames")
    if v.frames is not None and (v.frames - 1) % preset.vae_frame_factor:
        n = v.frames - 1 - (v.frames - 1) % preset.vae_frame_factor
        raise ValueError(f"validate.frames={v.frames}: {preset.name!r}'s video VAE takes 1 + {preset.vae_frame_factor}k "
                         f"frames; use {n + 1} or {n + 1 + preset.vae_frame_factor}")

    f = get_preset(cfg.model.preset).downsample_factor
    if v.resolution is not None and v.resolution % f:
        raise ValueError(f"validate.resolution={v.resolution} is not divisible by {f}; pick a multiple of {f}")
    if v.num_images < world:
        raise ValueError(f"validate.num_images={v.num_images} is fewer than the {world} ranks; "
                         f"set validate.num_images>={world}")
    if v.feature_extractor == "inception" and not v.inception_weights:
        raise ValueError("validate.feature_extractor=inception needs validate.inception_weights=PATH "
                         "(a local weights file; nothing is downloaded), or use validate.feature_extractor=offline")
    if not check_paths:
        return
    if v.inception_weights and v.feature_extractor == "inception" and not Path(v.inception_weights).is_file():
        raise ValueError(f"validate.inception_weights={v.inception_weights!r} does not exist; "
                         "point it at a local InceptionV3 weights file")
    if v.safety_model not in (None, "tiny") and not (Path(v.safety_model) / "config.json").is_file():
        raise ValueError(f"validate.safety_model={v.safety_model!r} is not a local model folder with config.json; "
                         "point it at a save_pretrained image classifier (nothing is downloaded) or remove it")
    if v.shards is not None:
        from scaletrain.common.tars import expand_shards
        from scaletrain.data.pipeline import missing_local_shards

        missing = missing_local_shards(expand_shards(v.shards))
        if missing:
            raise ValueError(f"validate.shards: {missing[0]!r} does not exist; write shards with "
                             "`scaletrain data synth --out DIR --seed 1` or fix the path")
