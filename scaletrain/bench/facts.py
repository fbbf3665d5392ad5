"""What the sizing model knows of a preset and of a link, below both halves of it
(``sizing``: memory, the size command; ``scaling``: step time at N GPUs), so that neither
imports the other's callers."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP bucket_cap_mb default
DS_BUCKET_ELEMS = 50_000_000  # reduce_bucket_size in ds_configs/*.json


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
    frozen = sum(p.numel() for mod in (m.text_encoder, m.vae) if mod is not None for p in mod.parameters())
    return ModelFacts(preset, total, frozen, max(units + [total - sum(units)]), len(units) + 1, max(own), len(own))


@dataclass
class CommModel:
    """Per-collective latency (s) and bus bandwidth (bytes/s); ``source`` says measured or given."""

    latency: dict[str, float]
    busbw: dict[str, float]
    source: str
    overlap: float = 0.0  # fraction of communication hidden behind compute
    # From a sweep: per op, (message size, bus bandwidth near that size / ``busbw``), so that a
    # collective is costed at the bandwidth the sweep measured for messages of its size (see
    # ``bw``); None for a link given as two numbers. Relative, so scaling ``busbw`` (calibration
    # from a measured point) scales the whole curve.
    curve: dict[str, list[tuple[float, float]]] | None = None

    def bw(self, op: str, size: float | None = None) -> float:
        """Bus bandwidth for one ``op`` call on a ``size``-byte buffer (nccl-tests' size): the
        sweep's curve at that size (log-size interpolation, flat beyond its ends), else ``busbw``."""
        pts = (self.curve or {}).get(op)
        if not pts or size is None:
            return self.busbw[op]
        if size <= pts[0][0]:
            return self.busbw[op] * pts[0][1]
        for (s0, r0), (s1, r1) in zip(pts, pts[1:]):
            if size <= s1:
                f = math.log(size / s0) / math.log(s1 / s0)
                return self.busbw[op] * (r0 + f * (r1 - r0))
        return self.busbw[op] * pts[-1][1]

    def time(self, op: str, nbytes: float, world: int) -> float:
        if world <= 1:
            return 0.0
        factor = 2 * (world - 1) / world if op == "all_reduce" else (world - 1) / world
        return self.latency[op] + nbytes * factor / self.busbw[op]
