"""Webdataset training pipeline: shards -> infinite stream of whole micro-batches.

Why the splitting is hand-written instead of ``wds.split_by_node`` /
``wds.split_by_worker``: those split *shards* only, so fewer shards than
(ranks x workers) raises "No samples found" and uneven shards give ranks uneven
sample counts. A step-based trainer needs every rank to produce batches
forever, and the trainer's tests need a batch layout that does not depend on
the world size. So we split per slot (rank, worker) by shard when there are
enough shards, else by sample index, and loop epochs forever on every slot.

Totals of corrupt samples are obtained by summing ``batch["skipped"]``.
"""

from __future__ import annotations

import glob
import hashlib
import io
import itertools
import json
import random
import re
import tarfile
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import gopen

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_URL_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://", "gcs://")
_SPLITS = ("shard", "sample", "auto")
# Same key/extension rule as webdataset: key = path up to the first dot of the basename.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def _is_url(path: str) -> bool:
    return path.startswith(_URL_PREFIXES)


def expand_shards(shards: str | Path | list[str]) -> list[str]:
    """Flatten paths, brace patterns, globs, directories (all ``*.tar``) and URLs."""
    items = [shards] if isinstance(shards, (str, Path)) else list(shards)
    out: list[str] = []
    for item in items:
        for path in braceexpand(str(item)):
            if _is_url(path):
                out.append(path)  # remote: existence is the streamer's business
            elif Path(path).is_dir():
                out.extend(sorted(str(p) for p in Path(path).glob("*.tar")))
            elif any(ch in path for ch in "*?["):
                out.extend(sorted(glob.glob(path)))
            else:
                out.append(path)
    if not out:
        raise ValueError(
            f"data.shards={shards!r} matched no .tar files; pass a path, a brace pattern like "
            "'data/shard-{000000..000007}.tar', or a directory holding *.tar"
        )
    return out


def missing_local_shards(urls: list[str]) -> list[str]:
    """Local shard paths that do not exist (URLs are skipped)."""
    local = [u.removeprefix("file:") for u in urls if not _is_url(u)]
    return [p for p in local if not Path(p).is_file()]


@dataclass
class LoaderSpec:
    shards: list[str]
    resolution: int
    micro_batch: int
    caption_dropout: float = 0.0  # prob. of replacing the caption with "" (classifier-free guidance)
    num_workers: int = 1
    shuffle_buffer: int = 0  # 0 = no shuffling (deterministic order)
    seed: int = 0
    split: str = "auto"  # "shard" | "sample" | "auto"
    rank: int = 0
    world_size: int = 1
    # Resume: loader batches already consumed from this (deterministic) stream. Skipped batches
    # are decoded but not returned, so the position is exact even with corrupt samples in it.
    skip_batches: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.resolution >= 1, "resolution", self.resolution, "use a positive size such as 256"),
            (self.micro_batch >= 1, "micro_batch", self.micro_batch, "use a positive batch size"),
            (0.0 <= self.caption_dropout <= 1.0, "caption_dropout", self.caption_dropout,
             "use a probability in [0, 1], e.g. 0.1"),
            (self.num_workers >= 0, "num_workers", self.num_workers, "use 0 (main process) or more"),
            (self.shuffle_buffer >= 0, "shuffle_buffer", self.shuffle_buffer, "use 0 to disable shuffling"),
            (self.split in _SPLITS, "split", self.split, f"use one of {_SPLITS}"),
            (self.world_size >= 1, "world_size", self.world_size, "use >= 1"),
            (self.skip_batches >= 0, "skip_batches", self.skip_batches, "use >= 0"),
            (0 <= self.rank < self.world_size, "rank", self.rank,
             f"use 0 <= rank < world_size={self.world_size}"),
        ]
        for ok, name, value, fix in checks:
            if not ok:
                raise ValueError(f"data.{name}={value!r} is invalid; {fix}")

    @property
    def workers_per_rank(self) -> int:
        return max(self.num_workers, 1)  # num_workers=0 loads in the main process: one slot

    @property
    def num_slots(self) -> int:
        return self.world_size * self.workers_per_rank


def resolve_split(spec: LoaderSpec, num_shards: int) -> str:
    """Return "shard" or "sample" for ``spec`` reading ``num_shards`` shards."""
    slots = spec.num_slots
    if spec.split == "shard" and num_shards < slots:
        raise ValueError(
            f"data.split='shard' needs >= world_size*num_workers={slots} shards but got {num_shards}; "
            "use split='sample' or 'auto', fewer workers, or write more shards"
        )
    if spec.split == "auto":
        return "shard" if num_shards >= slots else "sample"
    return spec.split


def _stable_int(*parts: object) -> int:
    # hash() is salted per process; workers and ranks must agree, so use blake2b.
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def caption_is_dropped(seed: int, key: str, epoch: int, p: float) -> bool:
    """Deterministic per (seed, key, epoch), so independent of the rank layout."""
    return p > 0 and _stable_int("caption_dropout", seed, key, epoch) / 2**64 < p


# ---------------------------------------------------------------- reading


def _read_shard(url: str) -> Iterator[dict]:
    """Raw samples ``{"__key__", ext: bytes}`` grouped by key, streamed.

    A truncated/corrupt tar yields the complete samples before the damage plus
    one ``{"__corrupt__"}`` marker instead of raising: one bad shard must not
    kill a week-long run. (A tar cut exactly at a header boundary looks like a
    normal end of archive to tarfile and cannot be detected.)
    """
    stream = gopen(url)
    current: dict | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                match = _KEY_EXT.match(member.name)
                if not member.isfile() or match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                current = current or {"__key__": key}
                # Stream-mode tarfile returns short data on truncation instead of raising.
                current[ext] = tar.extractfile(member).read()
                if len(current[ext]) != member.size:
                    raise tarfile.ReadError(f"{member.name} truncated")
    except (tarfile.TarError, EOFError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        current = {"__key__": f"{url}#corrupt", "__corrupt__": True}  # drops the partial sample
    finally:
        stream.close()
    if current is not None:
        yield current


def _shuffled(samples: Iterable[dict], buffer: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle-buffer: memory-bounded shuffle of a stream (as in webdataset)."""
    pool: list[dict] = []
    for sample in samples:
        pool.append(sample)
        if len(pool) >= buffer:
            i = rng.randrange(len(pool))
            pool[i], pool[-1] = pool[-1], pool[i]
            yield pool.pop()
    rng.shuffle(pool)
    yield from pool


# --------------------------------------------------------------- decoding


def decode_image(data: bytes, resolution: int) -> torch.Tensor:
    """Bytes -> float32 (3, R, R) in [-1, 1]: shorter side to R (bicubic), center crop."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        # PIL widens the bicubic kernel when downscaling, i.e. it antialiases.
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def _decode_sample(raw: dict, spec: LoaderSpec, epoch: int) -> dict | None:
    """Decoded ``{"key", "pixels", "caption"}``, or None when the sample is corrupt."""
    image_ext = next((ext for ext in IMAGE_EXTS if ext in raw), None)
    if raw.get("__corrupt__") or image_ext is None:
        return None
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
        if not isinstance(meta, dict):
            return None
        pixels = decode_image(raw[image_ext], spec.resolution)
        if "txt" in raw:
            caption = raw["txt"].decode("utf-8", errors="replace").strip()
        else:
            caption = str(meta.get("caption") or "")  # missing caption -> "" (still trainable)
    except Exception:  # noqa: BLE001 - PIL raises many types (SyntaxError, struct.error...) on bad bytes
        return None
    key = raw["__key__"]
    if caption_is_dropped(spec.seed, key, epoch, spec.caption_dropout):
        caption = ""
    return {"key": key, "pixels": pixels, "caption": caption}


# -------------------------------------------------------------- splitting


def _epoch_raw(
    spec: LoaderSpec, shards: list[str], mode: str, epoch: int, worker: int, offset: int
) -> Generator[dict, None, int]:
    """Raw samples of one epoch for slot (rank, worker); returns the epoch's global raw count.

    Slot = worker * world_size + rank, so shard i goes to rank i % world_size
    (same as ``wds.split_by_node`` then ``split_by_worker``).
    """
    slots, slot = spec.num_slots, worker * spec.world_size + spec.rank
    if mode == "shard":
        mine = shards[slot::slots]
        rng = random.Random(_stable_int("shuffle", spec.seed, epoch, spec.rank, worker))
        if spec.shuffle_buffer > 0:
            rng.shuffle(mine)
        stream = itertools.chain.from_iterable(_read_shard(s) for s in mine)
        if spec.shuffle_buffer > 0:
            stream = _shuffled(stream, spec.shuffle_buffer, rng)
        count = 0
        for raw in stream:
            count += 1
            yield raw
        return count
    # "sample": every slot reads the same stream; the shuffle is seeded by
    # (seed, epoch) only so all slots agree on it and then keep index j iff
    # j % slots == slot. `offset` continues the index across epochs, which keeps
    # rank r's n-th sample == global sample n*world + r even when the dataset
    # size is not a multiple of world_size.
    stream = itertools.chain.from_iterable(_read_shard(s) for s in shards)
    if spec.shuffle_buffer > 0:
        rng = random.Random(_stable_int("shuffle", spec.seed, epoch))
        stream = _shuffled(stream, spec.shuffle_buffer, rng)
    count = 0
    for count, raw in enumerate(stream, start=1):
        if (offset + count - 1) % slots == slot:
            yield raw
    return count


def _decoded_epoch(
    spec: LoaderSpec, shards: list[str], mode: str, epoch: int, worker: int, offset: int
) -> Generator[dict | None, None, tuple[int, int]]:
    """Decoded samples (None = corrupt) of one epoch; returns (global raw count, good count)."""
    raw_stream = _epoch_raw(spec, shards, mode, epoch, worker, offset)
    good = 0
    while True:
        try:
            raw = next(raw_stream)
        except StopIteration as stop:  # the generator's return value is the raw count
            return stop.value, good
        item = _decode_sample(raw, spec, epoch)
        good += item is not None
        yield item


def _slot_items(spec: LoaderSpec, shards: list[str], mode: str, worker: int) -> Iterator[dict | None]:
    """Infinite stream of decoded samples (None = corrupt) for one slot."""
    offset = 0
    for epoch in itertools.count():
        raw_count, good = yield from _decoded_epoch(spec, shards, mode, epoch, worker, offset)
        offset += raw_count
        if good == 0:
            # Without this an empty slot would spin forever and hang the job.
            raise RuntimeError(
                f"rank {spec.rank} worker {worker} got no decodable samples in epoch {epoch} "
                f"(split={mode!r}, {len(shards)} shards, {spec.num_slots} slots); "
                "check the shards or use fewer workers/ranks"
            )


def iter_epoch_samples(
    spec: LoaderSpec, epoch: int = 0, worker: int = 0, *, offset: int = 0
) -> Iterator[dict]:
    """Decoded samples ``{"key", "pixels", "caption"}`` that slot (spec.rank, worker) sees in ``epoch``.

    Exactly what the loader uses; corrupt samples are dropped. For split="sample"
    epochs after the first pass ``offset = epoch * dataset_size`` to match the loader.
    """
    shards = expand_shards(spec.shards)
    mode = resolve_split(spec, len(shards))
    for item in _decoded_epoch(spec, shards, mode, epoch, worker, offset):
        if item is not None:
            yield item


def _batches(spec: LoaderSpec, shards: list[str], mode: str, worker: int) -> Iterator[dict]:
    # The DataLoader takes batch i from worker i % W, so of the first skip_batches batches
    # this worker produced len(range(worker, skip_batches, W)).
    to_skip = len(range(worker, spec.skip_batches, spec.workers_per_rank))
    pixels: list[torch.Tensor] = []
    captions: list[str] = []
    keys: list[str] = []
    skipped = 0
    for item in _slot_items(spec, shards, mode, worker):
        if item is None:
            skipped += 1
            continue
        pixels.append(item["pixels"])
        captions.append(item["caption"])
        keys.append(item["key"])
        if len(keys) == spec.micro_batch:
            if to_skip:
                to_skip -= 1
            else:
                yield {"pixels": torch.stack(pixels), "captions": captions, "keys": keys, "skipped": skipped}
            pixels, captions, keys, skipped = [], [], [], 0


class _SlotDataset(IterableDataset):
    """Per-worker infinite batch stream; DataLoader round-robins the workers."""

    def __init__(self, spec: LoaderSpec, shards: list[str], mode: str) -> None:
        self.spec, self.shards, self.mode = spec, shards, mode

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        return _batches(self.spec, self.shards, self.mode, info.id if info else 0)


def build_loader(spec: LoaderSpec) -> Iterable[dict]:
    """Infinite iterable of whole micro-batches for ``spec.rank``.

    Batch: ``{"pixels": (B,3,R,R) float32 in [-1,1], "captions": list[str],
    "keys": list[str], "skipped": int}``; sum "skipped" for the corrupt total.
    """
    shards = expand_shards(spec.shards)
    mode = resolve_split(spec, len(shards))
    # batch_size=None: workers emit whole batches themselves, so "skipped" can
    # be attributed per batch and no batch ever mixes workers or comes out short.
    return DataLoader(_SlotDataset(spec, shards, mode), batch_size=None, num_workers=spec.num_workers)
