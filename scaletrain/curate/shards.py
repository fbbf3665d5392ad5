"""Rewrite a shard set through curation stages: stream, batch, score/filter, write, report.

Every ``scaletrain curate`` command is this loop with different stages. It runs as one
process or under torchrun: rank r takes input shards r, r+world, ... and writes its own
output shards into ``OUT.partial``; rank 0 gathers the counts, renames the shards to a
contiguous ``shard-000000.tar ...`` in input order, writes ``manifest.json``,
``report.json`` and ``report.md``, and renames ``OUT.partial`` to ``OUT`` (atomic: a reader
never sees a half-written set). Output tars use fixed member metadata (mtime 0, mode 644,
as ``data.synth.write_tar_shard``; ``common.tars.TarWriter``), so the same input and settings
give byte-identical shards.

Counting: every input sample ends in exactly one of kept / dropped[rule] / corrupt, so the
report adds up (input = kept + dropped_total + corrupt).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist
from PIL import Image

from scaletrain.common.ranks import barrier, rank_world
from scaletrain.common.tars import TarWriter, batched, expand_shards, read_shard
from scaletrain.data.filters import FilterSpec, first_failing_rule
from scaletrain.data.samples import IMAGE_EXTS, open_image, read_meta_caption

CORRUPT = "corrupt"


@dataclass
class Sample:
    """One raw webdataset sample with its metadata and caption parsed; stages edit ``meta``/``caption``."""

    raw: dict[str, Any]
    meta: dict[str, Any]
    caption: str
    image_ext: str
    _image: Image.Image | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return str(self.raw["__key__"])

    def image(self) -> Image.Image:
        """Decoded RGB image (cached); raises on undecodable bytes."""
        if self._image is None:
            with open_image(self.raw[self.image_ext]) as img:
                self._image = img.convert("RGB")
        return self._image

    def to_raw(self) -> dict[str, Any]:
        """The sample to write: original members, with ``txt`` and ``json`` replaced."""
        out = dict(self.raw)
        out["txt"] = self.caption.encode("utf-8")
        out["json"] = json.dumps(self.meta, sort_keys=True).encode("utf-8")
        return out


def parse_sample(raw: dict[str, Any]) -> Sample | None:
    """A ``Sample``, or None when the tar was damaged, there is no image, or the json is not an object."""
    image_ext = next((ext for ext in IMAGE_EXTS if ext in raw), None)
    parsed = None if raw.get("__corrupt__") or image_ext is None else read_meta_caption(raw)
    if parsed is None:
        return None
    meta, caption = parsed
    return Sample(raw=raw, meta=meta, caption=caption, image_ext=image_ext)


class Stage(Protocol):
    """A curation step over a batch. ``__call__`` may edit each sample's meta/caption and returns,
    per sample, None (keep) or the name of the rule that drops it (one of ``rules``)."""

    name: str
    rules: tuple[str, ...]
    needs_image: bool
    counters: dict[str, float]  # summed over ranks into the report

    def __call__(self, batch: list[Sample]) -> list[str | None]: ...

    def describe(self, counters: dict[str, float]) -> dict[str, Any]:
        """Report entry from the counters summed over ranks."""
        ...


class MetadataFilter:
    """``data.filters`` rules (scaletrain/data/filters.py) as a stage; runs last, so it sees
    scores that earlier stages wrote (``aesthetic``, ``safety_nsfw``)."""

    name = "filter"
    needs_image = False

    def __init__(self, spec: FilterSpec) -> None:
        self.spec = spec
        self.rules = tuple(spec.active_rules())
        self.counters: dict[str, float] = {}

    def __call__(self, batch: list[Sample]) -> list[str | None]:
        return [first_failing_rule(s.meta, s.caption, self.spec) for s in batch]

    def describe(self, counters: dict[str, float]) -> dict[str, Any]:
        return {"spec": self.spec.model_dump(exclude_none=True)}


@dataclass
class _RankResult:
    """What one rank reports to rank 0."""

    written: list[tuple[int, int, str, int]] = field(default_factory=list)  # (input idx, chunk, file, samples)
    input_samples: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    counters: dict[str, dict[str, float]] = field(default_factory=dict)


def _run_batch(raws: list[dict[str, Any]], stages: Sequence[Stage], result: _RankResult) -> list[Sample]:
    """Kept samples of one batch, in input order; counts every drop once."""
    alive: list[Sample] = []
    for raw in raws:
        sample = parse_sample(raw)
        if sample is None:
            result.dropped[CORRUPT] = result.dropped.get(CORRUPT, 0) + 1
        else:
            alive.append(sample)
    for stage in stages:
        if stage.needs_image:
            decodable = []
            for s in alive:
                try:
                    s.image()
                    decodable.append(s)
                except Exception:  # noqa: BLE001 - PIL raises many types on bad bytes
                    result.dropped[CORRUPT] = result.dropped.get(CORRUPT, 0) + 1
            alive = decodable
        if not alive:
            break
        reasons = stage(alive)
        for s, reason in zip(alive, reasons, strict=True):
            if reason is not None:
                result.dropped[reason] = result.dropped.get(reason, 0) + 1
        alive = [s for s, reason in zip(alive, reasons) if reason is None]
    return alive


def _rewrite_rank(shards: list[str], partial: Path, stages: Sequence[Stage], rank: int, world: int,
                  batch_size: int, per_shard: int | None) -> _RankResult:
    """Process this rank's shards (r, r+world, ...) into ``partial``."""
    result = _RankResult()
    out: TarWriter | None = None
    chunk = 0

    def close(idx: int) -> None:
        nonlocal out
        if out is not None:
            out.close()
            if out.count:
                result.written.append((idx, chunk, out.path.name, out.count))
            else:
                out.path.unlink()  # an empty shard would make a loader slot find no samples
            out = None

    last_idx = rank
    for idx in range(rank, len(shards), world):
        if per_shard is None:
            chunk = 0
        for raws in batched(read_shard(shards[idx]), batch_size):
            result.input_samples += len(raws)
            for sample in _run_batch(raws, stages, result):
                if out is None:
                    out = TarWriter(partial / f"part-{rank:05d}-{idx:06d}-{chunk:05d}.tar")
                out.write(sample.to_raw())
                result.kept += 1
                if per_shard is not None and out.count == per_shard:
                    close(idx)
                    chunk += 1
        if per_shard is None:
            close(idx)
        last_idx = idx
    close(last_idx)  # per_shard: this rank's last (short) shard
    result.counters = {s.name: dict(s.counters) for s in stages}
    return result


def _merge(results: list[_RankResult]) -> _RankResult:
    total = _RankResult()
    for r in results:
        total.written += r.written
        total.input_samples += r.input_samples
        total.kept += r.kept
        for k, v in r.dropped.items():
            total.dropped[k] = total.dropped.get(k, 0) + v
        for name, counters in r.counters.items():
            merged = total.counters.setdefault(name, {})
            for k, v in counters.items():
                merged[k] = merged.get(k, 0) + v
    total.written.sort(key=lambda w: (w[0], w[1]))
    return total


def rewrite_shards(shards: str | list[str], out_dir: str | Path, stages: Sequence[Stage], *, command: str,
                   batch_size: int = 32, per_shard: int | None = None, overwrite: bool = False,
                   settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Collective when a process group is up: curate ``shards`` into ``out_dir``; returns the report
    (on every rank). Raises ValueError (one line) for a bad output path or size."""
    rank, world = rank_world()
    urls = expand_shards(shards)
    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")
    if per_shard is not None and per_shard < 1:
        raise ValueError(f"--per-shard={per_shard} must be >= 1 (samples per output shard), or leave it out")
    if batch_size < 1:
        raise ValueError(f"--batch-size={batch_size} must be >= 1")
    if out.exists() and not overwrite:
        raise ValueError(f"--out={out} already exists; choose a new folder or pass --overwrite")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # a previous crashed run's leftovers
        partial.mkdir(parents=True)
    barrier(world)
    mine = _rewrite_rank(urls, partial, stages, rank, world, batch_size, per_shard)
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    total = _merge(gathered)
    report = _report(command, urls, out, total, stages, world, settings or {})
    if rank == 0:
        _commit(partial, out, total, report, overwrite)
    barrier(world)
    return report


def _report(command: str, urls: list[str], out: Path, total: _RankResult, stages: Sequence[Stage], world: int,
            settings: dict[str, Any]) -> dict[str, Any]:
    rules = [r for s in stages for r in s.rules]
    dropped = {r: total.dropped.get(r, 0) for r in rules}
    corrupt = total.dropped.get(CORRUPT, 0)
    return {
        "command": command,
        "input": {"shards": len(urls), "samples": total.input_samples},
        "kept": total.kept,
        "dropped": dropped,
        "dropped_total": sum(dropped.values()),
        "corrupt": corrupt,
        "kept_fraction": total.kept / total.input_samples if total.input_samples else 0.0,
        "stages": {s.name: s.describe(total.counters.get(s.name, {})) for s in stages},
        "settings": settings,
        "output": {"dir": str(out), "shards": [f"shard-{i:06d}.tar" for i in range(len(total.written))]},
        "world_size": world,
    }


def _commit(partial: Path, out: Path, total: _RankResult, report: dict[str, Any], overwrite: bool) -> None:
    """Rank 0: contiguous shard names, manifest and reports, then the atomic rename."""
    for i, (_, _, name, _) in enumerate(total.written):
        (partial / name).rename(partial / f"shard-{i:06d}.tar")
    manifest = {"num_samples": total.kept, "shards": report["output"]["shards"],
                "samples_per_shard": [n for *_, n in total.written], "curated_by": report["command"]}
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (partial / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (partial / "report.md").write_text(format_report(report))
    if out.exists() and overwrite:
        shutil.rmtree(out)
    partial.rename(out)


def format_report(report: dict[str, Any]) -> str:
    """Markdown: the counts table, then one line per stage."""
    n = report["input"]["samples"]

    def pct(k: int) -> str:
        return f"{100 * k / n:.1f}%" if n else "-"

    lines = [f"# scaletrain curate {report['command']}", "",
             f"{report['input']['shards']} input shards -> {len(report['output']['shards'])} output shards "
             f"in `{report['output']['dir']}` ({report['world_size']} rank(s))", "",
             "| outcome | samples | share |", "|---|---:|---:|",
             f"| input | {n} | 100% |", f"| kept | {report['kept']} | {pct(report['kept'])} |"]
    lines += [f"| dropped: {rule} | {k} | {pct(k)} |" for rule, k in report["dropped"].items()]
    lines += [f"| corrupt | {report['corrupt']} | {pct(report['corrupt'])} |", ""]
    for name, info in report["stages"].items():
        lines.append(f"- **{name}**: " + ", ".join(f"{k}={_fmt(v)}" for k, v in info.items()))
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
