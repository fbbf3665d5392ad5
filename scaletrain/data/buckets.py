"""Aspect-ratio buckets: a set of (width, height) sizes per stage resolution.

Web images are rarely square; center-cropping every one to R x R throws away the sides of
wide images and the tops of tall ones (and teaches the model that subjects are cut off).
Bucketing (NovelAI 2022, SDXL) instead trains each image at the size of the bucket whose
aspect ratio is nearest its own. Every bucket keeps the stage's pixel budget (w x h <= R^2,
as close as the model's down-sampling factor allows), so a micro-batch that fits at R x R
fits in every bucket, and the FLOPs per image stay within a few percent of the square's.

The loader (``data.pipeline``) resizes each image to cover its bucket and center-crops it,
and emits batches whose images all come from one bucket.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_NUM_BUCKETS = 7


class BucketSpec(BaseModel):
    """``data.buckets``: off by default (every image is center-cropped to R x R)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    # Widest (and, inverted, tallest) aspect ratio width/height of a bucket.
    max_aspect: float = Field(2.0, ge=1.0)
    # Aspect ratios spaced evenly in log(w/h) over [1/max_aspect, max_aspect]; odd counts
    # include the square. None = 7 unless aspect_ratios is given.
    num_buckets: int | None = Field(None, ge=1)
    # Explicit aspect ratios (width / height) instead of num_buckets.
    aspect_ratios: list[float] | None = None

    @model_validator(mode="after")
    def _one_way(self) -> "BucketSpec":
        if self.num_buckets is not None and self.aspect_ratios is not None:
            raise ValueError("data.buckets sets both num_buckets and aspect_ratios; keep one of them")
        if self.aspect_ratios is not None:
            if not self.aspect_ratios:
                raise ValueError("data.buckets.aspect_ratios is empty; list width/height ratios, e.g. [0.5, 1.0, 2.0]")
            lo = 1.0 / self.max_aspect
            bad = [a for a in self.aspect_ratios if not lo * (1 - 1e-9) <= a <= self.max_aspect * (1 + 1e-9)]
            if bad:
                raise ValueError(f"data.buckets.aspect_ratios has {bad[0]} outside [1/max_aspect, max_aspect] = "
                                 f"[{lo:.4g}, {self.max_aspect:g}]; raise data.buckets.max_aspect or drop it")
        return self

    def ratios(self) -> list[float]:
        """The target aspect ratios (width / height), ascending."""
        if self.aspect_ratios is not None:
            return sorted(self.aspect_ratios)
        n = self.num_buckets or DEFAULT_NUM_BUCKETS
        if n == 1:
            return [1.0]
        top = math.log(self.max_aspect)
        return [math.exp(-top + 2 * top * i / (n - 1)) for i in range(n)]

    def sizes(self, resolution: int, factor: int) -> list[tuple[int, int]]:
        """The (width, height) buckets of a stage at ``resolution`` for a model whose inputs must
        divide by ``factor``; see ``bucket_sizes``."""
        return bucket_sizes(resolution, factor, self.ratios())


def _bucket_for_ratio(resolution: int, factor: int, ratio: float) -> tuple[int, int]:
    """The (w, h), both multiples of ``factor`` with w*h <= resolution^2, nearest ``ratio`` in
    log aspect (largest area on ties). w is tried at the multiples of factor around
    resolution*sqrt(ratio); h is then the largest multiple of factor within the budget. A tall
    ratio is the transpose of its wide inverse, so a generated set is symmetric."""
    if ratio < 1.0:
        w, h = _bucket_for_ratio(resolution, factor, 1.0 / ratio)
        return h, w
    budget = resolution * resolution
    ideal_w = resolution * math.sqrt(ratio)
    best: tuple[float, int, int, int] | None = None
    base = max(1, math.floor(ideal_w / factor))
    for k in (base - 1, base, base + 1, base + 2):
        w = k * factor
        if w < factor:
            continue
        h = (budget // w) // factor * factor
        if h < factor:
            continue
        key = (abs(math.log((w / h) / ratio)), -(w * h), w, h)
        if best is None or key < best:
            best = key
    if best is None:  # resolution < factor cannot happen for a validated stage; stay defined
        return factor, factor
    return best[2], best[3]


def bucket_sizes(resolution: int, factor: int, ratios: list[float]) -> list[tuple[int, int]]:
    """Distinct (width, height) buckets for ``ratios`` at pixel budget ``resolution``^2, sorted by
    aspect ratio. The square ratio gives exactly (resolution, resolution) for a resolution that
    divides by ``factor``. Coarse factors can map two ratios to one size; duplicates are dropped."""
    sizes = {_bucket_for_ratio(resolution, factor, r) for r in ratios}
    return sorted(sizes, key=lambda wh: (wh[0] / wh[1], wh[0]))


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> int:
    """Index of the bucket whose aspect ratio is nearest width/height in log space (so 2:1 and
    1:2 are equally far from 1:1); the first one on ties."""
    aspect = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - aspect))
