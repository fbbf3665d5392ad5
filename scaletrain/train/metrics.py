"""Training metrics sinks: console progress bar, JSONL, wandb (offline by default).

Only rank 0 writes; other ranks get a logger whose calls do nothing, so the loop never
asks which rank it is on.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class LossEMA:
    """Bias-corrected exponential moving average (Adam-style correction), for loss and grad norm."""

    def __init__(self, decay: float) -> None:
        self.decay, self.value, self.count = decay, 0.0, 0

    def update(self, x: float) -> float:
        if not math.isfinite(x):
            return self.get()
        self.count += 1
        self.value = self.decay * self.value + (1 - self.decay) * x
        return self.get()

    def get(self) -> float:
        return self.value / (1 - self.decay**self.count) if self.count else float("nan")


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, wandb_mode: str, project: str, config: dict,
                 total_steps: int, progress: bool, run_name: str | None = None) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            # offline needs no login and no network; `wandb sync` uploads later if wanted.
            self._wandb = wandb.init(project=project, name=run_name, dir=str(run_dir), mode=wandb_mode,
                                     config=config, reinit="finish_previous")
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def progress(self, n: int, postfix: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix(postfix, refresh=False)

    def event(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
