"""Realised data composition: samples per source and per class, and filter drops per rule.

The loader tags every sample with its source (and class under data.balance) and counts what
data.filters dropped (``batch["sources"]``, ``batch["labels"]``, ``batch["filtered"]``). The
trainer adds each micro-batch here, sums the step's counts over ranks in the collective it
already makes, and logs the stage's cumulative fractions (``source_frac/NAME``,
``class_frac/CLASS``). The counts are trainer state in the checkpoint, so a resumed run's
fractions continue the uninterrupted run's instead of restarting from zero.
"""

from __future__ import annotations

from collections import Counter

from scaletrain.data.filters import RULES
from scaletrain.data.pipeline import ISSUES


class DataCounts:
    def __init__(self) -> None:
        self.sources: list[str] = []  # this stage's source names (logged when mixing is on)
        self.classes: list[str] = []  # this stage's classes (logged when balancing is on)
        self.log_sources = False
        self.stage: Counter = Counter()  # cumulative over the current stage, all ranks
        self.filtered_total: Counter = Counter()  # whole run, per rule, all ranks
        self.issues_total: Counter = Counter()  # whole run, per kind of bad data (pipeline.ISSUES)
        self.step_filtered = 0
        self.step_issues: dict[str, int] = {}
        self._local: Counter = Counter()

    @property
    def keys(self) -> list[str]:
        """The fixed order of the all-reduced vector: the same on every rank (from the config
        and the deterministic class scan), never from what a rank happened to see."""
        return ([f"filtered/{r}" for r in RULES] + [f"issue/{i}" for i in ISSUES]
                + [f"source/{s}" for s in self.sources] + [f"class/{c}" for c in self.classes])

    def begin_stage(self, sources: list[str], classes: list[str], *, log_sources: bool, fresh: bool) -> None:
        """A stage (re)starts: ``fresh`` from its first step (counts reset), else mid-stage after a
        resume or rollback (the restored counts continue)."""
        self.sources, self.classes, self.log_sources = list(sources), list(classes), log_sources
        if fresh:
            self.stage = Counter()
        self._local = Counter()

    def add_batch(self, batch: dict) -> None:
        self._local.update(f"source/{s}" for s in batch.get("sources", ()))
        self._local.update(f"class/{c}" for c in batch.get("labels", ()) or ())
        self._local.update({f"filtered/{r}": n for r, n in (batch.get("filtered") or {}).items()})
        self._local.update({f"issue/{i}": n for i, n in (batch.get("issues") or {}).items()})

    def local_vector(self) -> list[float]:
        vec = [float(self._local.get(k, 0)) for k in self.keys]
        self._local = Counter()
        return vec

    def commit(self, reduced: list[float]) -> None:
        """Add one step's counts, already summed over ranks (same order as ``keys``)."""
        step = {k: int(v) for k, v in zip(self.keys, reduced) if v}
        self.step_filtered = sum(v for k, v in step.items() if k.startswith("filtered/"))
        self.filtered_total.update({k.removeprefix("filtered/"): v for k, v in step.items()
                                    if k.startswith("filtered/")})
        self.step_issues = {k.removeprefix("issue/"): v for k, v in step.items() if k.startswith("issue/")}
        self.issues_total.update(self.step_issues)
        self.stage.update({k: v for k, v in step.items() if not k.startswith(("filtered/", "issue/"))})

    def _fractions(self, prefix: str, names: list[str], label: str) -> dict:
        counts = {n: self.stage.get(f"{prefix}/{n}", 0) for n in names}
        total = sum(counts.values()) or 1
        out = {f"{label}_count/{n}": c for n, c in counts.items()}
        out.update({f"{label}_frac/{n}": c / total for n, c in counts.items()})
        return out

    def record(self) -> dict:
        """This step's metrics fields: filter drops, and the stage's realised fractions so far."""
        out: dict = {"filtered_samples": self.step_filtered}
        out.update({f"data_issues/{k}": v for k, v in self.step_issues.items()})  # only kinds seen this step
        if self.log_sources:
            out.update(self._fractions("source", self.sources, "source"))
        if self.classes:
            out.update(self._fractions("class", self.classes, "class"))
        return out

    def stage_summary(self) -> dict:
        """For summary.json's per-stage entry: samples per source and class trained on."""
        out = {}
        if self.log_sources:
            out["sources"] = {s: self.stage.get(f"source/{s}", 0) for s in self.sources}
        if self.classes:
            out["classes"] = {c: self.stage.get(f"class/{c}", 0) for c in self.classes}
        return out

    def state_dict(self) -> dict:
        return {"stage": dict(self.stage), "filtered_total": dict(self.filtered_total),
                "issues_total": dict(self.issues_total)}

    def load_state_dict(self, state: dict) -> None:
        self.stage = Counter(state.get("stage", {}))
        self.filtered_total = Counter(state.get("filtered_total", {}))
        self.issues_total = Counter(state.get("issues_total", {}))
