"""Turn a checkpoint into a diffusers model folder, and list a run's checkpoints.

Export consolidates on one process (the one place a full gather is what the user asked
for): DCP shards via ``dcp_to_torch_save`` then ``torch.load(weights_only=True)``;
the EMA (``<ckpt>/ema/``, DCP on every engine) the same way, exported instead of the raw
weights when present; DeepSpeed ZeRO partitions via DeepSpeed's ``zero_to_fp32`` reader,
weights-only (checkpoint.safe_load). The result is written
with ``save_pretrained`` (safetensors), loadable by the diffusers class alone.
"""

from __future__ import annotations

import tempfile
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
    """Full (unsharded) model state of a checkpoint, with the Denoiser's key names."""
    engine_dir = info.path / "engine"
    if info.meta.get("engine") == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from scaletrain.checkpoint.safe_load import weights_only_torch_load

        with weights_only_torch_load():  # DeepSpeed's reader would unpickle anything
            return get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag="zero")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        from scaletrain.checkpoint.safe_load import weights_only_torch_load

        with weights_only_torch_load():
            dcp_to_torch_save(str(engine_dir), str(out))
        return torch.load(out, weights_only=True, map_location="cpu")["model"]


def ema_state_dict(info: CheckpointInfo) -> dict[str, torch.Tensor] | None:
    """The checkpoint's EMA as full tensors keyed like the Denoiser's parameters, or None
    when it has none. Shapes are as saved: flat under ZeRO-3 (the caller reshapes)."""
    ema_dir = info.path / "ema"
    if not ema_dir.is_dir():
        return None
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    # DCP -> one file without a process group, like the model above.
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ema.pt"
        from scaletrain.checkpoint.safe_load import weights_only_torch_load

        with weights_only_torch_load():
            dcp_to_torch_save(str(ema_dir), str(out))
        return torch.load(out, weights_only=True, map_location="cpu")["params"]


def export_diffusers(src: str | Path, out: str | Path, *, use_ema: bool = True) -> tuple[Path, str]:
    """Write the checkpoint's network with ``save_pretrained``: the EMA weights when the
    checkpoint holds an EMA (and ``use_ema``), the raw weights otherwise. Returns the folder
    and which weights went into it ("ema" or "raw")."""
    from scaletrain.models import build_denoiser_net

    info = resolve_checkpoint(src)
    preset = info.meta.get("preset")
    if not preset:
        raise ValueError(f"{info.path}/meta.json names no model preset; cannot rebuild the network")
    state = consolidated_state_dict(info)  # buffers (and any frozen params) come from here
    ema = ema_state_dict(info) if use_ema else None
    if ema is not None:
        for name, value in ema.items():
            if name not in state or state[name].numel() != value.numel():
                raise ValueError(f"{info.path}/ema: {name!r} does not match the model's parameters")
            state[name] = value.reshape(state[name].shape)
    net_state = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    net = build_denoiser_net(preset)
    net.load_state_dict(net_state, strict=True)
    out = Path(out)
    net.save_pretrained(out, safe_serialization=True)
    return out, "ema" if ema is not None else "raw"


def format_listing(ckpt_dir: Path) -> str:
    rows = ["step      stage  engine     world  size_MB  status    path"]
    for c in list_checkpoints(ckpt_dir):
        m = c.meta
        rows.append(f"{c.step:<9} {str(m.get('stage', '-')):<6} {str(m.get('engine', '-')):<10} "
                    f"{str(m.get('world_size', '-')):<6} {c.size_bytes / 2**20:<8.2f} "
                    f"{'complete' if c.complete else 'partial':<9} {c.path}")
    return "\n".join(rows)
