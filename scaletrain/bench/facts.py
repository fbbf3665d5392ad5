"""What the sizing model knows of a link, below both halves of it (``sizing``: memory, the size
command; ``scaling``: step time at N GPUs), so that neither imports the other's callers. What
it knows of a preset is ``models/facts.py``; of an engine, its layout (``engines/spec.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass


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
