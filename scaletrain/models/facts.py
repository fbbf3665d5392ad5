"""What the sizing model and the launch checks know of a preset, counted on the meta device (no
memory, any size): trainable and frozen parameters and the units the engines shard by."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelFacts:
    preset: str
    params: int  # trainable denoiser
    frozen: int  # text encoder + VAE
    largest_unit: int  # largest FSDP unit (parallel plan)
    fsdp_units: int  # units + root
    largest_module: int  # largest module owning parameters directly (ZeRO-3 gathers per module)
    param_modules: int  # modules owning parameters (ZeRO-3 collectives per pass)


@functools.lru_cache(maxsize=None)
def model_facts(preset: str) -> ModelFacts:
    """Parameter counts from a meta-device build (no memory, any size)."""
    from scaletrain.models import build_model, parallel_units

    with torch.device("meta"):
        m = build_model(preset)
    den = m.denoiser
    units = [sum(p.numel() for p in u.parameters()) for u in parallel_units(den)]
    total = sum(p.numel() for p in den.parameters())
    own = [sum(p.numel() for p in mod.parameters(recurse=False)) for mod in den.modules()]
    own = [n for n in own if n]
    frozen = sum(p.numel() for mod in m.frozen_modules() for p in mod.parameters())
    return ModelFacts(preset, total, frozen, max(units + [total - sum(units)]), len(units) + 1, max(own), len(own))
