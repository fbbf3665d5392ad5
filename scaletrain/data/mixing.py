"""Weighted mixing of data sources and class-balanced sampling, as one mechanism.

The loader turns ``data.sources`` (each with a weight) and ``data.balance`` (a metadata field
whose classes are sampled uniformly or with given weights) into *leaves*: one
(source, class) pair each, with probability

    p(source s, class c) = w_s / sum(w) * b_c / sum(b over the classes of s)

Each leaf is its own infinite per-slot stream (the pipeline's epochs loop per leaf), so a
minority class simply starts its next epoch sooner than the majority: under balancing an
"epoch" of the mixture is no longer one pass over the data (see docs/data.md). Every sample
position picks its leaf with a hash of (seed, global sample position), so the sequence of
picks does not depend on the rank layout or on how many batches a resume skipped.

Why per-class streams rather than a shared reader with per-class queues: a 90/10 set drawn
50/50 consumes the majority class nine times slower than it arrives, so a shared reader's
majority queue would grow without bound or have to drop samples. Per-class streams read the
shards once per class (metadata only for the other classes' samples: images are decoded only
for the samples a stream keeps); pre-splitting very imbalanced sets into per-class shard sets
and mixing them as sources avoids even that.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from scaletrain.data.filters import FilterSpec


@dataclass(frozen=True)
class Source:
    """One weighted data source: its shards, its weight and its own metadata filters."""

    name: str
    shards: str | list[str] | tuple[str, ...]
    weight: float = 1.0
    filters: FilterSpec | None = None


@dataclass(frozen=True)
class Balance:
    """Sample the classes of metadata ``field`` with ``weights`` (None: uniform over the classes found)."""

    field: str
    weights: Mapping[str, float] | None = None


@dataclass(frozen=True)
class Leaf:
    source: int  # index into the source list
    label: str | None  # the class of balance.field this leaf draws, None without balancing
    prob: float


def class_value(meta: Mapping[str, Any], field: str) -> str | None:
    """The class of a sample as a string (metadata may hold ints, strings or bools)."""
    value = meta.get(field)
    if value is None or isinstance(value, (dict, list)):
        return None
    return str(value).lower() if isinstance(value, bool) else str(value)


def plan_leaves(sources: list[Source], balance: Balance | None, classes: list[list[str]]) -> list[Leaf]:
    """Leaves with their probabilities; ``classes[i]`` are source i's classes (ignored without balance)."""
    total = sum(s.weight for s in sources)
    leaves: list[Leaf] = []
    for i, source in enumerate(sources):
        p_source = source.weight / total
        if balance is None:
            leaves.append(Leaf(i, None, p_source))
            continue
        weights = dict(balance.weights) if balance.weights is not None else {c: 1.0 for c in classes[i]}
        norm = sum(weights.values())
        leaves.extend(Leaf(i, c, p_source * w / norm) for c, w in sorted(weights.items()))
    return leaves


def cumulative(probs: list[float]) -> list[float]:
    """Cumulative probabilities for ``pick_leaf``."""
    out, acc = [], 0.0
    for p in probs:
        acc += p
        out.append(acc)
    out[-1] = 1.0  # no leaf may be unreachable through float round-off
    return out


def pick_leaf(seed: int, position: int, cum: list[float]) -> int:
    """The leaf for global sample ``position``: a pure function of (seed, position).

    blake2b, not ``random``: ranks, workers and a resumed process must all agree on it.
    """
    digest = hashlib.blake2b(repr(("mix", seed, position)).encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2**64
    return min(bisect.bisect_right(cum, u), len(cum) - 1)
