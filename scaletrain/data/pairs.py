"""Preference-pair shards -> infinite stream of whole micro-batches of (chosen, rejected) pairs.

A pair is ``KEY.chosen.jpg`` + ``KEY.rejected.jpg`` + ``KEY.txt`` (+ ``KEY.json``): webdataset
keys end at the first dot of the file name, so the image extensions are ``chosen.jpg`` and
``rejected.jpg`` (any of ``samples.IMAGE_EXTS``). The splitting across ranks and workers,
the resume skip, metadata filters and the per-key caption dropout are the pre-training pipeline's
(``pipeline._epoch_raw``, ``LoaderSpec``): only decoding and collation differ, so a pair loader
has the same guarantees (every rank yields batches forever; a batch's content does not depend
on the rank layout; ``skip_batches`` resumes exactly).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scaletrain.common.tars import expand_shards
from scaletrain.data.filters import first_failing_rule
from scaletrain.data.pipeline import Dropped, LoaderSpec, _epoch_raw, caption_is_dropped, resolve_split
from scaletrain.data.samples import IMAGE_EXTS, decode_image, read_meta_caption

SIDES = ("chosen", "rejected")


def _image_ext(raw: dict, side: str) -> str | None:
    return next((f"{side}.{ext}" for ext in IMAGE_EXTS if f"{side}.{ext}" in raw), None)


def decode_pair(raw: dict, spec: LoaderSpec, epoch: int) -> dict | Dropped | None:
    """``{"key", "chosen", "rejected", "caption"}``; ``Dropped`` when ``spec.filters`` rejects its
    metadata (checked before decoding); None when either image is missing or corrupt."""
    exts = [_image_ext(raw, side) for side in SIDES]
    parsed = None if raw.get("__corrupt__") or None in exts else read_meta_caption(raw)
    if parsed is None:
        return None
    meta, caption = parsed
    rule = first_failing_rule(meta, caption, spec.filters) if spec.filters is not None else None
    if rule is not None:
        return Dropped(rule)
    try:
        images = [decode_image(raw[ext], spec.resolution, formats=spec.image_formats) for ext in exts]
    except Exception:  # noqa: BLE001 - PIL raises many types on bad bytes; one bad pair must not stop a run
        return None
    key = raw["__key__"]
    if caption_is_dropped(spec.seed, key, epoch, spec.caption_dropout):
        caption = ""
    return {"key": key, "chosen": images[0], "rejected": images[1], "caption": caption}


def _slot_pairs(spec: LoaderSpec, shards: list[str], mode: str, worker: int) -> Iterator[dict | Dropped | None]:
    """Infinite stream of decoded pairs (None = corrupt, Dropped = filtered) for one slot; ``pipeline._slot_items``
    with the pair decoder (the epoch offset keeps split="sample" continuous across epochs)."""
    offset = 0
    for epoch in itertools.count():
        raw_stream, good = _epoch_raw(spec, shards, mode, epoch, worker, offset), 0
        while True:
            try:
                raw = next(raw_stream)
            except StopIteration as stop:  # the generator returns the epoch's global raw count
                offset += stop.value
                break
            item = decode_pair(raw, spec, epoch)
            good += isinstance(item, dict)
            yield item
        if good == 0:  # an empty slot would otherwise spin forever and hang the job
            raise RuntimeError(f"rank {spec.rank} worker {worker} got no decodable preference pairs in epoch "
                               f"{epoch} ({len(shards)} shards); each sample needs KEY.chosen.jpg and "
                               "KEY.rejected.jpg (or .png/.webp), and data.filters must keep some")


def _pair_batches(spec: LoaderSpec, shards: list[str], mode: str, worker: int) -> Iterator[dict]:
    to_skip = len(range(worker, spec.skip_batches, spec.workers_per_rank))  # as pipeline._batches
    items: list[dict] = []
    skipped, filtered = 0, Counter()
    for item in _slot_pairs(spec, shards, mode, worker):
        if item is None:
            skipped += 1
            continue
        if isinstance(item, Dropped):
            filtered[item.rule] += 1
            continue
        items.append(item)
        if len(items) == spec.micro_batch:
            if to_skip:
                to_skip -= 1
            else:
                yield {
                    "pixels_chosen": torch.stack([it["chosen"] for it in items]),
                    "pixels_rejected": torch.stack([it["rejected"] for it in items]),
                    "captions": [it["caption"] for it in items],
                    "keys": [it["key"] for it in items],
                    "skipped": skipped,
                    "filtered": dict(filtered),  # per data.filters rule, as the pre-training loader
                }
            items, skipped, filtered = [], 0, Counter()


class _PairDataset(IterableDataset):
    def __init__(self, spec: LoaderSpec, shards: list[str], mode: str) -> None:
        self.spec, self.shards, self.mode = spec, shards, mode

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        return _pair_batches(self.spec, self.shards, self.mode, info.id if info else 0)


def build_pair_loader(spec: LoaderSpec) -> Iterable[dict]:
    """Infinite iterable of whole micro-batches of pairs for ``spec.rank``.

    Batch: ``{"pixels_chosen", "pixels_rejected": (B,3,R,R) float32 in [-1,1], "captions":
    list[str], "keys": list[str], "skipped": int, "filtered": {rule: int}}``.
    """
    shards = expand_shards(spec.shards)
    mode = resolve_split(spec, len(shards))
    return DataLoader(_PairDataset(spec, shards, mode), batch_size=None, num_workers=spec.num_workers)
