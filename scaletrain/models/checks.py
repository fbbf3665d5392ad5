"""The model section against its preset: a pipeline folder's preset resolved, resolutions and
frames the preset takes, the shapes context parallelism splits, the parallel units the memory
levers act on, LoRA's target layers (the denoiser built on the meta device: shapes only).

Part of the recipe checks (``scaletrain/checks.py`` gathers them): ``recipe(cfg, ctx)`` checks
the recipe as data (and the paths it names when ``ctx.check_paths``); each failure is a
ValueError whose message is one line naming the key and the fix.
"""

from __future__ import annotations

from pathlib import Path

from scaletrain.config import CheckContext, RunConfig
from scaletrain.models.registry import stage_buckets, stage_frames, validation_frames


def recipe(cfg: RunConfig, ctx: CheckContext) -> None:
    _resolve_pipeline_preset(cfg)  # first: model.preset=from_diffusers becomes the folder's preset
    _check_preset_and_resolutions(cfg)
    _check_context_parallel(cfg, ctx.world_size)
    _check_levers(cfg)
    _check_lora(cfg)


def _resolve_pipeline_preset(cfg: RunConfig) -> None:
    """``init.from_diffusers`` = a pipeline root: its text encoder and VAE are the run's frozen
    encoders unless model.*_path says otherwise, and ``model.preset: from_diffusers`` becomes the
    preset read from its configs (``models/pipeline_folder.py``; named by the folder, so a
    relaunch, a resume and ``ckpt export`` rebuild the same one)."""
    from scaletrain.models.pipeline_folder import KEYWORD, is_pipeline_root, text_encoders

    root = cfg.init.from_diffusers
    if cfg.model.preset == KEYWORD:
        if not root:
            raise ValueError("model.preset=from_diffusers builds the model from a diffusers pipeline folder; set "
                             "init.from_diffusers=FOLDER (the folder with model_index.json)")
        if not is_pipeline_root(root):
            raise ValueError(f"model.preset=from_diffusers needs init.from_diffusers to be a diffusers pipeline folder "
                             f"(with model_index.json); {root!r} is not one")
        from scaletrain.models.pipeline_folder import register_pipeline_preset

        cfg.model.preset = register_pipeline_preset(root, what="init.from_diffusers").name
    if is_pipeline_root(root):
        # The folder's text encoders are the run's when they are the ones the preset's
        # conditioner runs (SDXL's two, SD3's three, ...), as its VAE is when it holds one; a
        # folder with other encoders than the preset's keeps the preset's.
        from scaletrain.models.registry import get_preset

        slots = sorted(s.component for s in get_preset(cfg.model.preset).conditioner.slots)
        if cfg.model.text_encoder_path is None and text_encoders(root) == slots:
            cfg.model.text_encoder_path = str(Path(root).resolve())
        if cfg.model.vae_path is None and (Path(root) / "vae").is_dir():
            cfg.model.vae_path = str(Path(root).resolve())


def _check_preset_and_resolutions(cfg: RunConfig) -> None:
    from scaletrain.models.registry import get_preset

    preset = get_preset(cfg.model.preset)  # raises a ValueError naming model.preset
    f = preset.downsample_factor
    for i, st in enumerate(cfg.train.stages):
        if st.resolution % f:
            lo, hi = (st.resolution // f) * f, (st.resolution // f + 1) * f
            alt = f"{lo} or {hi}" if lo > 0 else f"{hi}"
            raise ValueError(
                f"train.stages.{i}.resolution={st.resolution} is not divisible by {f}, the "
                f"down-sampling factor of model.preset={preset.name!r}; use {alt}"
            )
    for i, st in enumerate(cfg.train.stages):
        where = f"train.stages.{i}"
        if st.frames is not None and not preset.video:
            raise ValueError(f"{where}.frames={st.frames}: model.preset={preset.name!r} ({preset.family}) is an image "
                             "family; remove frames or choose a video preset (e.g. wan-tiny)")
        if st.fps is not None and st.frames is None:
            raise ValueError(f"{where}.fps={st.fps:g} is set without frames; set {where}.frames too")
        if st.frames is not None and (st.frames - 1) % preset.vae_frame_factor:
            n = st.frames - 1 - (st.frames - 1) % preset.vae_frame_factor
            raise ValueError(f"{where}.frames={st.frames}: {preset.name!r}'s video VAE takes 1 + "
                             f"{preset.vae_frame_factor}k frames; use {n + 1} or {n + 1 + preset.vae_frame_factor}")
    if cfg.sample.resolution is not None and cfg.sample.resolution % f:
        raise ValueError(f"sample.resolution={cfg.sample.resolution} is not divisible by {f}; pick a multiple of {f}")
    top = preset.max_resolution  # e.g. an MMDiT's position-embedding grid
    if top is None:
        return
    sides = [(f"train.stages.{i}.resolution", st.resolution) for i, st in enumerate(cfg.train.stages)]
    sides += [(f"data.buckets (stage {i}, largest side)", max(max(b) for b in stage_buckets(cfg, i)))
              for i in range(len(cfg.train.stages)) if stage_buckets(cfg, i)]
    sides += [(k, v) for k, v in (("sample.resolution", cfg.sample.resolution),
                                  ("validate.resolution", cfg.validate.resolution)) if v is not None]
    for key, side in sides:
        if side > top:
            raise ValueError(f"{key}: {side} px is larger than {top} px, the largest image model.preset="
                             f"{preset.name!r} takes (its position-embedding grid); use at most {top} px")


def _frames_text(frames: int) -> str:
    return "" if not frames else f", {frames} frame{'s' if frames != 1 else ''}"


def _check_context_parallel(cfg: RunConfig, world: int) -> None:
    """engine.context_parallel: K divides the world, and every shape the run feeds the denoiser
    (each stage, its buckets and frames, the sample clips) has a token count and a head count
    that K divides (models/context_parallel.py); one line before launch otherwise."""
    k = cfg.engine.context_parallel
    if k == 1:
        return
    if world % k:
        raise ValueError(f"engine.context_parallel={k} does not divide the world size {world}; use a divisor of "
                         f"{world} (ranks r..r+K-1 form one context group)")
    from scaletrain.models.context_parallel import check_context_parallel
    from scaletrain.models.registry import get_preset

    preset = get_preset(cfg.model.preset)
    shapes = []
    for i, st in enumerate(cfg.train.stages):
        frames = stage_frames(cfg, i)
        sizes = [(h, w) for w, h in stage_buckets(cfg, i)] or [(st.resolution, st.resolution)]
        shapes += [(f"train.stages.{i} ({h}x{w} px{_frames_text(frames)})",
                    preset.tokens(h, w, frames)) for h, w in sizes]
    v = cfg.validate
    if v.every_steps or v.at_end:
        frames = validation_frames(cfg)
        sides = [v.resolution] if v.resolution else sorted({st.resolution for st in cfg.train.stages})
        shapes += [(f"validation ({side} px{_frames_text(frames)})", preset.tokens(side, side, frames)) for side in sides]
    if cfg.sample.at_end:
        side = cfg.sample.resolution or cfg.train.stages[-1].resolution
        frames = (cfg.sample.frames or stage_frames(cfg, len(cfg.train.stages) - 1)) if preset.video else 0
        shapes.append((f"the end-of-run samples ({side} px{_frames_text(frames)})",
                       preset.tokens(side, side, frames)))
    check_context_parallel(preset, k, shapes)


def _check_levers(cfg: RunConfig) -> None:
    """model.activation_checkpointing / model.compile act on the family's parallel units: the
    preset must have some, and a selective setting must select at least one (meta-device build)."""
    m = cfg.model
    if m.activation_checkpointing == "none" and not m.compile:
        return
    import torch

    from scaletrain.models.parallelize import checkpointed_units
    from scaletrain.models.registry import Denoiser, build_denoiser_net, get_preset, parallel_units

    preset = get_preset(m.preset)
    with torch.device("meta"):
        units = parallel_units(Denoiser(build_denoiser_net(preset), preset.family, use_text_mask=False))
    levers = "model.activation_checkpointing and model.compile"
    if not units:
        raise ValueError(f"model.preset={preset.name!r} (family {preset.family}) has no parallel units for {levers} "
                         "to act on; set model.activation_checkpointing=none and model.compile=false")
    picked = checkpointed_units(units, m.activation_checkpointing, m.activation_checkpointing_every,
                                m.activation_checkpointing_selective)
    if (m.activation_checkpointing == "selective" and m.activation_checkpointing_selective == "attention"
            and len(picked) == len(units)):
        # A UNet knob: there it spares the ResNet-only blocks; in a transformer every block holds
        # attention, so it would silently be full checkpointing.
        raise ValueError(f"model.activation_checkpointing_selective=attention picks every unit of model.preset="
                         f"{preset.name!r} (each {preset.family} block holds attention): that is full checkpointing; "
                         "set model.activation_checkpointing=full, or activation_checkpointing_selective=every")
    if m.activation_checkpointing == "selective" and not picked:
        what = ("no unit holds attention" if m.activation_checkpointing_selective == "attention" else
                f"activation_checkpointing_every={m.activation_checkpointing_every} but it has {len(units)} units")
        raise ValueError(f"model.activation_checkpointing=selective selects no unit of model.preset={preset.name!r} "
                         f"({what}); use full, a smaller activation_checkpointing_every, or none")


def _check_lora(cfg: RunConfig) -> None:
    """Configured lora.target_modules must name layers of the preset (built on the meta device)."""
    if not cfg.lora.enabled or cfg.lora.target_modules is None:
        return
    import torch

    from scaletrain.models.lora import matching_modules
    from scaletrain.models.registry import build_denoiser_net

    with torch.device("meta"):  # shapes only: no memory, no init time
        net = build_denoiser_net(cfg.model.preset)
    if not matching_modules(net, cfg.lora.target_modules):
        raise ValueError(f"lora.target_modules={cfg.lora.target_modules} matches no Linear/Conv2d layer of "
                         f"model.preset={cfg.model.preset!r}; use suffixes such as to_q, to_k, to_v, to_out.0")
