"""What the sizing model knows of a preset and of a link, below both halves of it
(``sizing``: memory, the size command; ``scaling``: step time at N GPUs), so that neither
imports the other's callers."""

from __future__ import annotations

import functools
import math
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


def startup_floor_bytes(engine: str, facts: ModelFacts, world: int, precision: str = "fp32",
                        precomputed: bool = False, frozen_encoders: str = "replicate") -> float:
    """The least a rank holds when it reaches its first step (no activations, no Adam moments
    yet: torch's AdamW makes them at the first step): the frozen encoders in the run precision
    (none on precomputed latents), plus the denoiser as the engine keeps it at start-up (its
    layout's ``startup_bytes``, ``engines/spec.py``): FSDP2 its fp32 shard (meta-device init);
    DDP and ZeRO-1/2 the whole fp32 model (ZeRO-1/2 also the fp32 master partition); ZeRO-3
    (zero.Init) what DeepSpeed's stage-3 optimizer allocates in its constructor.
    ``frozen_encoders="shard"`` (model.frozen_encoders) holds 1/world of the encoders on the
    device; the host builds them whole first, so a host check passes "replicate".
    A floor, not a forecast: allocator slack and imports come on top (``benchmarks/
    startup_memory.py`` adds a measured baseline and compares)."""
    from scaletrain.engines.spec import layout

    frozen = 0.0 if precomputed else (2 if precision in ("bf16", "fp16") else 4) * facts.frozen
    frozen /= world if frozen_encoders == "shard" else 1
    return frozen + layout(engine).startup_bytes(facts, world, precision)
