"""Turn a checkpoint into a diffusers model folder, and list a run's checkpoints.

Export consolidates on one process (the one place a full gather is what the user asked
for): DCP shards read whole in this process with the restricted readers of
``common.safe_load`` (no process group, no temporary file); the EMA (``<ckpt>/ema/``, DCP
on every engine) the same way, exported instead of the raw weights when present; DeepSpeed
ZeRO partitions scanned weights-only, then read by DeepSpeed's ``zero_to_fp32`` reader under
the weights-only guard. The result is written
with ``save_pretrained`` (safetensors), loadable by the diffusers class alone. A LoRA run's
checkpoint (full model: frozen base + adapters) exports its adapter instead (``export_lora``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from scaletrain.checkpoint.manager import CheckpointInfo, latest_checkpoint, list_checkpoints


def resolve_checkpoint(src: str | Path) -> CheckpointInfo:
    """A run folder (its latest complete checkpoint), a checkpoints folder, or one checkpoint."""
    p = Path(src)
    for ckpt_dir in (p / "checkpoints", p):
        info = latest_checkpoint(ckpt_dir)
        if info is not None:
            return info
    matches = [c for c in list_checkpoints(p.parent) if c.path == p]
    if matches and matches[0].complete:
        return matches[0]
    if matches:
        raise ValueError(f"{src} is a partial checkpoint (a save that never committed); export a complete one")
    raise ValueError(f"{src}: no complete checkpoint found; pass a run folder or a checkpoints/step-N folder")


def consolidated_state_dict(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """Full (unsharded) model state of a checkpoint, with the Denoiser's key names; its files'
    recorded checksums verified first (one line naming a file that changed)."""
    from scaletrain.checkpoint.manager import verify_checksums
    from scaletrain.common.safe_load import check_torch_files, load_dcp_full, weights_only_torch_load

    verify_checksums(info)
    engine_dir = info.path / "engine"
    if info.engine_format == "zero":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        check_torch_files(sorted((engine_dir / "zero").glob("*.pt")))  # one line naming a refused file
        with weights_only_torch_load():  # DeepSpeed's reader would unpickle anything
            return get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag="zero")
    return load_dcp_full(engine_dir)["model"]


def ema_state_dict(info: CheckpointInfo) -> dict[str, torch.Tensor] | None:
    """The checkpoint's EMA as full tensors keyed like the Denoiser's parameters, or None
    when it has none. Shapes are as saved: flat under ZeRO-3 (the caller reshapes)."""
    ema_dir = info.path / "ema"
    if not ema_dir.is_dir():
        return None
    from scaletrain.common.safe_load import load_dcp_full

    return load_dcp_full(ema_dir)["params"]  # without a process group, like the model above


def export_diffusers(src: str | Path, out: str | Path, *, use_ema: bool = True) -> tuple[Path, str, str | None]:
    """Write the checkpoint's network with ``save_pretrained``: the EMA weights when the
    checkpoint holds an EMA (and ``use_ema``), the raw weights otherwise; and, in
    ``OUT/scheduler``, the diffusers scheduler its objective samples with (flow matching:
    ``FlowMatchEulerDiscreteScheduler`` with the run's shift; DDPM: ``DDIMScheduler`` with its
    schedule and prediction type). Returns the folder, which weights went into it ("ema" or
    "raw") and the scheduler's class name (None for a checkpoint older than the record)."""
    from scaletrain.models import build_denoiser_net

    from scaletrain.models.lora import has_lora_keys

    info = resolve_checkpoint(src)
    preset = checkpoint_preset(info)
    state, which = denoiser_state_dict(info, use_ema=use_ema)
    if trainer_state(info).get("lora") or has_lora_keys(state):
        raise ValueError(f"{info.path} holds LoRA adapters; export them with `scaletrain ckpt export-lora "
                         f"{src} OUT` (add --with-base for the base model)")
    objective = checkpoint_objective(info)
    net_state = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    net = build_denoiser_net(preset)
    net.load_state_dict(net_state, strict=True)
    out = Path(out)
    net.save_pretrained(out, safe_serialization=True)
    if objective is None:
        return out, which, None
    import diffusers

    scheduler = getattr(diffusers, objective.scheduler_class).from_config(objective.scheduler_config())
    scheduler.save_pretrained(out / SCHEDULER_DIR)
    return out, which, objective.scheduler_class


SCHEDULER_DIR = "scheduler"  # beside the model's config.json, as in a pipeline folder


def export_pipeline(src: str | Path, out: str | Path, *, use_ema: bool = True) -> tuple[Path, str, str]:
    """Write a whole diffusers pipeline folder (``model_index.json``, the trained denoiser, the
    run's frozen VAE, text encoder and tokenizer, the objective's scheduler) that
    ``DiffusionPipeline.from_pretrained`` loads and samples from with no scaletrain import.
    The frozen parts are rebuilt as the run built them (its ``model.text_encoder_path`` /
    ``model.vae_path`` folders, else the random init from its seed), in fp32; the tokenizer
    pads to the preset's text length. Returns (folder, "ema" | "raw", pipeline class)."""
    from scaletrain.models import build_denoiser_net, build_model, get_preset
    from scaletrain.models.registry import get_family

    info = resolve_checkpoint(src)
    preset = get_preset(checkpoint_preset(info))
    family = get_family(preset.family)
    problem = family.pipeline_problem(preset)
    if problem is not None:
        raise ValueError(f"--pipeline: {preset.name} is a {family.name} model: {problem}")
    if not preset.latent:
        raise ValueError(f"--pipeline: {preset.name} runs in pixel space (no VAE), which no diffusers text-to-image "
                         "pipeline does; export the denoiser alone (without --pipeline) or train a latent preset")
    state = trainer_state(info)
    encoders, objective = state.get("encoders"), checkpoint_objective(info)
    if encoders is None or objective is None:
        raise ValueError(f"--pipeline: {info.path} predates the record of its objective and frozen encoders in the "
                         "trainer state; export the denoiser alone (without --pipeline)")
    weights, which = denoiser_state_dict(info, use_ema=use_ema)
    from scaletrain.models.lora import has_lora_keys

    if state.get("lora") or has_lora_keys(weights):
        raise ValueError(f"{info.path} holds LoRA adapters; export them with `scaletrain ckpt export-lora {src} OUT "
                         "--with-base`")
    net = build_denoiser_net(preset)
    net.load_state_dict({k.removeprefix("net."): v for k, v in weights.items() if k.startswith("net.")}, strict=True)
    model = build_model(preset, text_encoder_path=encoders["text_encoder_path"], vae_path=encoders["vae_path"],
                        encoder_seed=encoders["seed"])
    out = Path(out)
    return out, which, write_pipeline(model, net, objective, out)


def write_pipeline(model, net, objective, out: Path) -> str:
    """Save ``model``'s frozen parts (every text encoder and tokenizer of its conditioner, in their
    pipeline components, the VAE), ``net`` as its denoiser and ``objective``'s scheduler as the
    family's (or conditioner's) diffusers pipeline; returns the pipeline class."""
    import diffusers

    from scaletrain.models.registry import get_family

    preset = model.preset
    family = get_family(preset.family)
    text: dict = {}
    for slot, encoder, tokenizer in zip(preset.conditioner.slots, model.text_encoders, model.tokenizers):
        tokenizer.model_max_length = slot.max_len  # pipelines pad prompts to this, as training did
        text.update({slot.component: encoder, slot.tokenizer: tokenizer})
    scheduler = getattr(diffusers, objective.scheduler_class).from_config(objective.scheduler_config())
    pipeline = family.pipeline_for(preset)
    pipe = getattr(diffusers, pipeline)(vae=model.vae, scheduler=scheduler, **text, **{family.pipeline_denoiser: net},
                                        **family.pipeline_extras.get(pipeline, {}))
    pipe.save_pretrained(out, safe_serialization=True)
    return pipeline


def checkpoint_objective(info: CheckpointInfo):
    """The objective (``diffusion.Objective``, with the last stage's keys) a checkpoint was
    trained with, or None when its trainer state predates the record."""
    from scaletrain.diffusion import build_objective

    record = trainer_state(info).get("objective")
    if not record:
        return None
    return build_objective(record["name"], record["params"])


def source_objective(source: str | Path) -> str | None:
    """Name of the objective a post-training source was trained with: from a checkpoint's
    trainer state, or from an exported folder's scheduler (the objective that matches it); None when the source does not say."""
    from scaletrain.common.safe_load import read_json
    from scaletrain.diffusion import objective_for_scheduler

    from scaletrain.models.pipeline_folder import is_pipeline_root

    p = Path(source)
    scheduler_file = p / SCHEDULER_DIR / "scheduler_config.json"
    if (p / "config.json").is_file() or is_pipeline_root(p):
        if not scheduler_file.is_file():
            return None
        found = objective_for_scheduler(read_json(scheduler_file))
        return found.name if found is not None else None
    record = trainer_state(resolve_checkpoint(p)).get("objective")
    return record["name"] if record else None


def checkpoint_preset(info: CheckpointInfo) -> str:
    preset = info.meta.get("preset")
    if not preset:
        raise ValueError(f"{info.path}/meta.json names no model preset; cannot rebuild the network")
    return preset


def trainer_state(info: CheckpointInfo) -> dict:
    from scaletrain.common.safe_load import read_json

    f = info.path / "trainer_state.json"
    return read_json(f) if f.is_file() else {}


def denoiser_state_dict(info: CheckpointInfo, *, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """The Denoiser's full state dict from a checkpoint, with the EMA's values in place of the
    trained parameters it covers (all of them; under LoRA the adapters) when ``use_ema`` and
    the checkpoint holds one. Returns it and which weights it holds ("ema" or "raw")."""
    state = consolidated_state_dict(info)  # buffers (and any frozen params) come from here
    ema = ema_state_dict(info) if use_ema else None
    if ema is not None:
        for name, value in ema.items():
            if name not in state or state[name].numel() != value.numel():
                raise ValueError(f"{info.path}/ema: {name!r} does not match the model's parameters")
            state[name] = value.reshape(state[name].shape)
    return state, "ema" if ema is not None else "raw"


def export_lora(src: str | Path, out: str | Path, *, use_ema: bool = True,
                with_base: bool = False) -> tuple[Path, str, str]:
    """Write a LoRA run's adapter in the layout its family's loader reads; returns the folder,
    the weights ("ema"/"raw") and the layout written.

    The layout is the family's (``ModelFamily.export_lora``): diffusers' LoRA file where
    diffusers has a loader for the family (UNet, MMDiT), else peft's own ``adapter_config.json``
    + ``adapter_model.safetensors`` (PixArt DiT). ``with_base`` also writes the
    frozen base network to ``OUT/base`` (save_pretrained), the model the adapter belongs to.
    """
    from peft.utils import get_peft_model_state_dict

    from scaletrain.config import LoraSection
    from scaletrain.models import build_denoiser_net, get_preset
    from scaletrain.models.family import get_family
    from scaletrain.models.lora import ADAPTER, build_lora_config, inject_lora

    info = resolve_checkpoint(src)
    preset = get_preset(checkpoint_preset(info))
    lora = trainer_state(info).get("lora")
    if not lora:
        raise ValueError(f"{info.path} holds no LoRA adapters (not a lora.enabled run); "
                         f"use `scaletrain ckpt export {src} OUT`")
    lora_cfg = LoraSection(**lora)
    state, which = denoiser_state_dict(info, use_ema=use_ema)
    net = build_denoiser_net(preset)
    inject_lora(net, preset.family, lora_cfg)
    # Strict: every base and adapter tensor of the checkpoint has its place, nothing is missing.
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}, strict=True)
    out = Path(out)
    config = build_lora_config(lora_cfg, preset.family)
    layers = get_peft_model_state_dict(net, adapter_name=ADAPTER)  # peft keys, adapter name dropped
    base = build_denoiser_net(preset)
    base.load_state_dict(base_state_dict(state), strict=True)
    if with_base:
        base.save_pretrained(out / "base", safe_serialization=True)
    layout = get_family(preset.family).export_lora(out, base, layers, config)
    return out, which, layout


def base_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The bare network's state from an adapted Denoiser's: adapters dropped, peft's
    ``base_layer`` names folded back (``to_q.base_layer.weight`` -> ``to_q.weight``)."""
    from scaletrain.models.lora import is_lora_key

    return {k.removeprefix("net.").replace(".base_layer.", "."): v for k, v in state.items()
            if k.startswith("net.") and not is_lora_key(k)}


def format_listing(ckpt_dir: Path) -> str:
    rows = ["step      stage  engine     world  size_MB  status    path"]
    for c in list_checkpoints(ckpt_dir):
        m = c.meta
        rows.append(f"{c.step:<9} {str(m.get('stage', '-')):<6} {str(m.get('engine', '-')):<10} "
                    f"{str(m.get('world_size', '-')):<6} {c.size_bytes / 2**20:<8.2f} "
                    f"{'complete' if c.complete else 'unreadable' if c.error else 'partial':<9} {c.path}")
    return "\n".join(rows)
