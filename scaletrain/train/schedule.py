"""Per-stage learning rate: linear warm-up, then cosine (or constant) decay.

The schedule is a pure function of the step inside the stage, so it has no state of its
own to checkpoint: resuming needs only the step counter.
"""

from __future__ import annotations

import math


def lr_at(
    step: int,
    *,
    total_steps: int,
    base_lr: float,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
) -> float:
    """LR for optimizer step ``step`` (0-based) of a stage with ``total_steps`` steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = base_lr * min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
