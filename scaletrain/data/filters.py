"""Metadata filters over web image-text samples (the img2dataset / LAION ``key.json`` fields).

One rule set serves both places that filter: on the fly in the training loader
(``data.filters``, per stage) and offline in ``scaletrain curate``, which writes a new shard
set and a kept/dropped report. Rules are checked in the order of ``RULES`` and a sample is
attributed to the first rule it fails, so a report's per-rule counts add up to the dropped
total.

Missing metadata fails the rule that needs it (a sample without an ``aesthetic`` score is not
known to be aesthetic); a filter that is not set never looks at its field.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Rule name -> (FilterSpec field, metadata keys tried in order, comparison).
RULES: tuple[str, ...] = (
    "aesthetic",
    "punsafe",
    "pwatermark",
    "original_width",
    "original_height",
    "caption_min_chars",
    "caption_max_chars",
)


class FilterSpec(BaseModel):
    """Thresholds; None = rule off. Bounds are inclusive (aesthetic >= x keeps x)."""

    model_config = ConfigDict(extra="forbid")

    min_aesthetic: float | None = None  # LAION aesthetic predictor score (about 1-10)
    max_punsafe: float | None = Field(None, ge=0.0, le=1.0)  # LAION NSFW probability
    max_pwatermark: float | None = Field(None, ge=0.0, le=1.0)  # LAION watermark probability
    # Size of the image before img2dataset resized it (original_*), else the stored size.
    min_original_width: int | None = Field(None, ge=1)
    min_original_height: int | None = Field(None, ge=1)
    min_caption_chars: int | None = Field(None, ge=0)
    max_caption_chars: int | None = Field(None, ge=1)

    @property
    def active(self) -> bool:
        return any(v is not None for v in self.model_dump().values())

    def active_rules(self) -> list[str]:
        fields = dict(zip(RULES, _FIELDS))
        return [rule for rule in RULES if getattr(self, fields[rule]) is not None]


_FIELDS = ("min_aesthetic", "max_punsafe", "max_pwatermark", "min_original_width", "min_original_height",
           "min_caption_chars", "max_caption_chars")


def _number(meta: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = meta.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def first_failing_rule(meta: dict[str, Any], caption: str, spec: FilterSpec) -> str | None:
    """The first rule of ``RULES`` that the sample fails, or None when it is kept."""
    checks = (
        ("aesthetic", spec.min_aesthetic, ("aesthetic", "AESTHETIC_SCORE", "aesthetic_score"), True),
        ("punsafe", spec.max_punsafe, ("punsafe",), False),
        ("pwatermark", spec.max_pwatermark, ("pwatermark",), False),
        ("original_width", spec.min_original_width, ("original_width", "width"), True),
        ("original_height", spec.min_original_height, ("original_height", "height"), True),
    )
    for rule, bound, keys, is_min in checks:
        if bound is None:
            continue
        value = _number(meta, *keys)
        if value is None or (value < bound if is_min else value > bound):
            return rule
    n = len(caption.strip())
    if spec.min_caption_chars is not None and n < spec.min_caption_chars:
        return "caption_min_chars"
    if spec.max_caption_chars is not None and n > spec.max_caption_chars:
        return "caption_max_chars"
    return None
