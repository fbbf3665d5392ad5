"""Start weights for post-training (the ``init`` config section): SFT, LoRA and DPO runs begin
from a pre-training checkpoint or an exported diffusers model, with a fresh optimizer, step
counter and LR schedule.

Where they can be read where they are kept, they are (``diffusers_source``: safetensors by
slices; ``checkpoint_source``: a DCP checkpoint loaded collectively into the shards); otherwise
every rank loads the full weights into its own copy of the denoiser before the engine shards
it, and the engine keeps only its part. Checkpoints are consolidated by ``checkpoint.export`` (DCP shards, or
DeepSpeed ZeRO partitions, read weights-only through ``common.safe_load``), and the EMA
replaces the raw weights when the checkpoint has one (``init.use_ema``). A run that already
has a checkpoint of its own never re-initialises: the relaunch resumes it (``own_checkpoint``),
even when the init source has since been deleted.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from scaletrain.checkpoint.manager import CheckpointInfo, latest_checkpoint
from scaletrain.config import InitSection, RunConfig
from scaletrain.models.pipeline_folder import check_pipeline, denoiser_of, is_pipeline_root


_LORA_SOURCE = ("{key}={src!r} is a LoRA run (base + adapters); start from its base model "
                "(`scaletrain ckpt export-lora {src} OUT --with-base`, then init.from_diffusers=OUT/base)")


def own_checkpoint(cfg: RunConfig) -> CheckpointInfo | None:
    """The run's own latest complete checkpoint when ``checkpoint.resume`` would load it."""
    if cfg.checkpoint.resume == "never":
        return None
    return latest_checkpoint(_own_dir(cfg))


def _own_dir(cfg: RunConfig) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.run.dir) / "checkpoints"


def check_init_source(cfg: RunConfig) -> None:
    """Config-time checks (one-line ValueErrors): the source is not this run's own checkpoints,
    exists, and was built for ``model.preset``. Skipped when the run resumes its own checkpoint."""
    init = cfg.init
    key = "init.from_checkpoint" if init.from_checkpoint else "init.from_diffusers"
    src = Path(init.source)
    own = _own_dir(cfg).resolve()
    if init.from_checkpoint and own in (src.resolve(), src.resolve() / "checkpoints", src.resolve().parent):
        raise ValueError(f"{key}={init.source!r} is this run's own checkpoint folder; give the post-training "
                         f"run its own run.dir (a relaunch resumes it without init)")
    if own_checkpoint(cfg) is not None:
        return  # the run resumes its own checkpoint; the source may be gone by now
    if not src.exists():
        raise ValueError(f"{key}={init.source!r} does not exist; point it at a scaletrain run folder "
                         f"(from_checkpoint) or a diffusers model or pipeline folder (from_diffusers)")
    if init.from_checkpoint:
        from scaletrain.checkpoint.export import resolve_checkpoint, trainer_state

        try:
            info = resolve_checkpoint(src)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        preset = info.meta.get("preset")
        if preset != cfg.model.preset:
            raise ValueError(f"{key}={init.source!r} holds a {preset!r} model but model.preset={cfg.model.preset!r}; "
                             f"set model.preset={preset}")
        if trainer_state(info).get("lora"):
            raise ValueError(_LORA_SOURCE.format(key=key, src=init.source))
    else:
        _check_diffusers_config(src, cfg.model.preset, key)
        if is_pipeline_root(src):
            _check_pipeline_objective(src, cfg, key)
    if cfg.dpo is not None:
        _check_reference_objective(src, cfg.diffusion.objective, key)


def _check_pipeline_objective(root: Path, cfg: RunConfig, key: str) -> None:
    """A pipeline's scheduler says what its denoiser predicts (SD-2.1-768: v_prediction, SD-2.1
    base: epsilon; flow-matching schedulers: a velocity along the straight path). Fine-tuning it
    with another target trains it away from what it knows, so refuse that before launch. Each
    objective says which schedulers it matches and which of its keys contradict one."""
    from scaletrain.common.safe_load import read_json
    from scaletrain.diffusion import objective_for_scheduler, objective_params

    sched = read_json(root / "scheduler" / "scheduler_config.json")
    found = objective_for_scheduler(sched)
    if found is None:
        raise ValueError(f"{key}={str(root)!r} samples with a {sched.get('_class_name')} that no objective matches "
                         f"(its scheduler_config.json); give a pipeline whose scheduler is a DDPM-family or "
                         f"flow-matching one")
    if cfg.diffusion.objective != found.name:
        raise ValueError(f"{key}={str(root)!r} samples with a {sched.get('_class_name')} ({found.name}); set "
                         f"diffusion.objective={found.name} to fine-tune it with its own objective")
    conflicts = found.conflicts(sched, objective_params(found.name, cfg.diffusion.params()))
    if conflicts:
        was = ", ".join(f"{name}={theirs!r}" for name, theirs, _ in conflicts)
        ours = ", ".join(f"diffusion.{name}={mine!r}" for name, _, mine in conflicts)
        fix = ", ".join(f"diffusion.{name}={theirs}" for name, theirs, _ in conflicts)
        raise ValueError(f"{key}={str(root)!r} was trained with {was} (its scheduler_config.json) but the recipe "
                         f"has {ours}; set {fix}")


def _check_reference_objective(src: Path, objective: str, key: str) -> None:
    """DPO compares the policy's and the frozen reference's errors under one objective: a
    reference trained with another (a DDPM model's noise prediction scored as a velocity) makes
    every preference margin meaningless, so refuse it before launch."""
    from scaletrain.checkpoint.export import source_objective

    trained = source_objective(src)
    if trained is not None and trained != objective:
        raise ValueError(f"{key}={str(src)!r} was trained with the {trained} objective but diffusion.objective="
                         f"{objective}; DPO's reference must share the objective: set diffusion.objective={trained}")


def _check_diffusers_config(folder: Path, preset_name: str, key: str) -> None:
    """The folder's config.json (a pipeline's: its denoiser component's) must describe the
    preset's network (class and every preset key)."""
    from scaletrain.models import build_denoiser_net, get_preset

    if is_pipeline_root(folder):
        folder = folder / check_pipeline(folder, key, whole=False)[0]
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{key}={str(folder)!r} has no config.json; give a folder written by "
                         f"`scaletrain ckpt export` or save_pretrained")
    saved = json.loads(config_file.read_text())
    preset = get_preset(preset_name)
    import torch

    with torch.device("meta"):
        cls_name = type(build_denoiser_net(preset)).__name__
    if saved.get("_class_name") != cls_name:
        raise ValueError(f"{key}={str(folder)!r} holds a {saved.get('_class_name')}, model.preset={preset_name!r} "
                         f"is a {cls_name}; pick the preset the model was exported from")
    for name, want in preset.denoiser_config.items():
        want = json.loads(json.dumps(want))  # tuples -> lists, as config.json stores them
        if name in saved and saved[name] != want:
            raise ValueError(f"{key}={str(folder)!r} was built with {name}={saved[name]!r}, model.preset="
                             f"{preset_name!r} has {want!r}; pick the preset the model was exported from")


def diffusers_source(init_cfg: InitSection):
    """``init.from_diffusers`` as a by-slices source (checkpoint/sources.py) when its weights are
    safetensors (one file or sharded), else None (a pickled .bin is read whole, weights-only).
    Returns (source, what, the run log's line)."""
    from scaletrain.checkpoint.sources import SafetensorsFolder

    if not init_cfg.from_diffusers:
        return None
    folder = Path(init_cfg.from_diffusers)
    pipeline = is_pipeline_root(folder)
    weights = folder / denoiser_of(folder, "init.from_diffusers")[0] if pipeline else folder
    if not SafetensorsFolder.has_weights(weights):
        return None
    what = f"init.from_diffusers={str(folder)!r}"
    note = f"init: diffusers {'pipeline' if pipeline else 'model'} {folder} (safetensors, each rank read what it keeps)"
    return SafetensorsFolder(weights), what, note


def checkpoint_source(init_cfg: InitSection, collective: bool):
    """``init.from_checkpoint`` as a collective DCP source (checkpoint/sources.py
    ``DCPCheckpoint``) for an engine that reads one into its shards (``collective``: FSDP2 and
    DDP, ``EngineSpec.reads_dcp_start_weights``) when the checkpoint is DCP's (an FSDP2 or DDP
    run's), else None (DeepSpeed partitions, or a ZeRO-3 run's flat EMA, are consolidated whole;
    so is any checkpoint under DeepSpeed, whose start-up reads on rank 0). Returns (source, what,
    the run log's line), like ``diffusers_source``."""
    from scaletrain.checkpoint.export import resolve_checkpoint, trainer_state
    from scaletrain.checkpoint.sources import DCPCheckpoint

    if not init_cfg.from_checkpoint or not collective:
        return None
    info = resolve_checkpoint(init_cfg.from_checkpoint)
    if trainer_state(info).get("lora") or not DCPCheckpoint.usable(info, init_cfg.use_ema):
        return None
    source = DCPCheckpoint(info.path, init_cfg.use_ema)
    weights = "EMA weights" if source.ema_dir is not None else "raw weights"
    note = (f"init: {weights} of {info.path} (step {info.step}, {info.meta.get('engine')}; DCP, each rank read "
            "what it keeps)")
    return source, f"init.from_checkpoint={init_cfg.from_checkpoint!r}", note


def load_init_weights(denoiser: nn.Module, init_cfg: InitSection, preset_name: str) -> str:
    """Load the start weights into ``denoiser`` (a ``models.Denoiser``, not yet wrapped by an
    engine, not yet adapted by LoRA); returns a one-line description for the run log."""
    from scaletrain.models.lora import has_lora_keys

    if init_cfg.from_checkpoint:
        from scaletrain.checkpoint.export import denoiser_state_dict, resolve_checkpoint, trainer_state

        info = resolve_checkpoint(init_cfg.from_checkpoint)
        state, which = denoiser_state_dict(info, use_ema=init_cfg.use_ema)
        if trainer_state(info).get("lora") or has_lora_keys(state):
            raise ValueError(_LORA_SOURCE.format(key="init.from_checkpoint", src=init_cfg.from_checkpoint))
        _load_strict(denoiser, state, f"init.from_checkpoint={init_cfg.from_checkpoint!r}", preset_name)
        weights = "EMA weights" if which == "ema" else "raw weights"
        return f"init: {weights} of {info.path} (step {info.step}, {info.meta.get('engine')})"
    from scaletrain.common.safe_load import CheckpointLoadError, weights_only_torch_load

    folder = Path(init_cfg.from_diffusers)
    # A pipeline folder: its denoiser component (unet/ or transformer/).
    sub = {"subfolder": denoiser_of(folder, "init.from_diffusers")[0]} if is_pipeline_root(folder) else {}
    # The diffusers class's own loader (local files only), then a strict copy into our net.
    # safetensors cannot carry code; a pickled .bin is forced weights-only like checkpoints.
    try:
        with weights_only_torch_load():
            loaded = type(denoiser.net).from_pretrained(folder, local_files_only=True, **sub)
    except Exception as e:  # diffusers re-raises a refused .bin as a generic OSError
        cause = e
        while cause is not None and not isinstance(cause, CheckpointLoadError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None
    _load_strict(denoiser.net, loaded.state_dict(), f"init.from_diffusers={str(folder)!r}", preset_name)
    return f"init: diffusers {'pipeline' if sub else 'model'} {folder}"


def _load_strict(module: nn.Module, state: dict, what: str, preset_name: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        first = (f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the model {tuple(own[wrong[0]].shape)}"
                 if wrong else f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}")
        raise ValueError(f"{what} does not fit model.preset={preset_name!r} ({first}); "
                         f"pick the preset it was trained with")
    module.load_state_dict(state, strict=True)
