"""Layout-invariant randomness: one CPU generator per sample, seeded from (seed, step, sample
key), so a sample's noise, timestep and VAE posterior draw never depend on the rank, the
micro-batch or the position it lands in. Runs then compare across world sizes and engines, and
a resumed run replays the exact stream. Every objective draws through these."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def per_sample_generators(seed: int, step: int, keys: Sequence[str]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from a stable hash of (seed, step, key).

    hashlib rather than hash(): Python salts str hashes per process, so ranks would disagree.
    """
    gens = []
    for key in keys:
        digest = hashlib.sha256(f"{seed}\x1f{step}\x1f{key}".encode()).digest()
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        gens.append(gen)
    return gens


def posterior_generators(seed: int, step: int, keys: Sequence[str]) -> list[torch.Generator]:
    """Per-sample generators for the VAE posterior draw: keyed like the diffusion noise but a
    separate stream, so the online path (VAE every step) and the precomputed one (stored mean
    and logvar) draw the same latents, on any rank layout."""
    return per_sample_generators(seed, step, [f"posterior\x1f{key}" for key in keys])
