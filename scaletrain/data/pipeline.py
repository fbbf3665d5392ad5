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

import bisect
import functools
import hashlib
import itertools
import json
import os
import random
import time
from collections import Counter
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scaletrain.common.tars import expand_shards, is_url, read_shard
from scaletrain.data.filters import FilterSpec, first_failing_rule
from scaletrain.data.mixing import Balance, Source, class_value, cumulative, pick_leaf, plan_leaves
from scaletrain.data.samples import IMAGE_EXTS, IMAGE_FORMATS, ImageTooLarge, decode_image, read_meta_caption
from scaletrain.data.video import VIDEO_EXTS, ClipSpec, VideoFpsTooLow, VideoTooShort, decode_video

# Kinds of bad data the loader counts (batch["issues"]) instead of raising; each named in the metrics.
ISSUES = ("bad_caption", "image_too_large", "member_too_large", "video_too_short", "video_low_fps")
_SPLITS = ("shard", "sample", "auto")


def check_pipe_shards(urls: list[str], allowed: bool, where: str = "data.shards") -> None:
    """``pipe:CMD`` URLs make webdataset run CMD in a shell: only when the recipe says so."""
    pipes = [u for u in urls if u.startswith("pipe:")]
    if pipes and not allowed:
        raise ValueError(f"{where}: {pipes[0]!r} runs a shell command to read the shard; set "
                         "data.allow_pipe_shards: true if you wrote that command, else use a path or an http(s) URL")


def missing_local_shards(urls: list[str]) -> list[str]:
    """Local shard paths that do not exist (URLs are skipped)."""
    local = [u.removeprefix("file:") for u in urls if not is_url(u)]
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
    # Metadata filters (data/filters.py), checked before the image is decoded; drops are
    # counted per rule in batch["filtered"], never raised.
    filters: FilterSpec | None = None
    # Weighted sources that replace `shards` when given, and class balancing (data/mixing.py).
    sources: tuple[Source, ...] = ()
    balance: Balance | None = None
    # Set by the loader on one (source, class) stream: keep only samples of this class.
    only_class: str | None = None
    stream_name: str = "data"  # how errors name this stream (config key, source, class)
    # Aspect-ratio buckets (width, height) for this resolution (data/buckets.py): each image
    # goes to the nearest-aspect bucket and batches hold one bucket. () = square R x R crops.
    buckets: tuple[tuple[int, int], ...] = ()
    # Shards written by `scaletrain data encode` (data/latents.py): batches carry "latents",
    # "latents" and "cond" (the conditioning fields) instead of "pixels"; a dropped caption takes
    # `empty_cond` (the encoded empty caption).
    precomputed: bool = False
    empty_cond: dict[str, torch.Tensor] | None = None
    pin_memory: bool = False  # page-locked batches, for non-blocking host-to-GPU copies
    # Per-slot positions ({str(worker): batch["position"] minus "slot"}) to continue from instead of
    # replaying the stage from its start (see _batches); skip_batches still counts from the start.
    resume: dict | None = None
    # Bad data, counted per kind in batch["issues"] (ISSUES) and never raised: a missing or
    # non-UTF-8 caption trains as "" (empty) or is dropped (skip); an image above max_image_pixels
    # (read from its header, before decoding) and a tar member above max_member_bytes (skipped
    # unread) drop their sample; pipe: shard URLs run a shell command and need allow_pipe_shards.
    bad_captions: str = "empty"
    max_image_pixels: int = 64_000_000
    max_member_bytes: int = 64 * 2**20
    allow_pipe_shards: bool = False
    # The PIL decoders an image member may reach (data/samples.py IMAGE_FORMATS + data.image_formats).
    image_formats: tuple[str, ...] = IMAGE_FORMATS
    # Video stages (data/video.py): frames > 0 makes every sample a (3, F, H, W) clip: a video
    # member (mp4, webm, ...) gives `frames` frames at `fps` (None: its own rate), an image a
    # 1-frame clip, batched apart (batches hold one shape), so images and videos train in one run.
    # A video too short for the clip, or below the stage's fps, drops its sample (counted).
    frames: int = 0
    fps: float | None = None

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
            (self.bad_captions in ("empty", "skip"), "bad_captions", self.bad_captions, "use 'empty' or 'skip'"),
            (self.frames >= 0, "frames", self.frames, "use 0 (images) or a positive frame count"),
            (self.fps is None or self.fps > 0, "fps", self.fps, "use a positive frame rate, or null for the video's own"),
        ]
        for ok, name, value, fix in checks:
            if not ok:
                raise ValueError(f"data.{name}={value!r} is invalid; {fix}")
        if self.precomputed and self.caption_dropout > 0 and self.empty_cond is None:
            raise ValueError("data.caption_dropout > 0 on precomputed shards needs their empty-caption embedding "
                             "(empty_caption.safetensors beside encoding.json); rerun `scaletrain data encode`")

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


# --------------------------------------------------------------- decoding


@dataclass(frozen=True)
class Dropped:
    """A sample the stream does not train on: ``rule`` is the filter rule it failed, or None
    when it belongs to another class's stream under data.balance (not counted anywhere);
    ``issue`` (one of ISSUES) when bad data dropped it."""

    rule: str | None
    issue: str | None = None


@dataclass(frozen=True)
class Lost:
    """A damaged shard's marker when its manifest says how many samples it lost: counted as that
    many corrupt samples (a plain corrupt sample is None, counted once)."""

    count: int


def caption_problem(raw: dict) -> str | None:
    """Why a raw sample's caption is unusable: "missing" (no .txt, no caption in its .json) or
    "invalid utf-8"; None when it is fine (an empty .txt is a caption, e.g. for unconditional data)."""
    if "txt" in raw:
        try:
            raw["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return "invalid utf-8"
        return None
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
    except (ValueError, UnicodeDecodeError):
        return "missing"
    return None if isinstance(meta, dict) and meta.get("caption") else "missing"


def _sample_class(meta: dict, spec: LoaderSpec, key: str) -> str:
    field = spec.balance.field
    value = class_value(meta, field)
    if value is None:
        raise ValueError(
            f"data.balance.field={field!r} is missing from the metadata of sample {key!r} "
            f"({spec.stream_name}); add it to every sample's .json, or balance on another field"
        )
    return value


def _select(meta: dict, caption: str, spec: LoaderSpec, key: str) -> Dropped | None:
    """Class routing, then metadata filters: each sample is counted by at most one stream."""
    if spec.only_class is not None and _sample_class(meta, spec, key) != spec.only_class:
        return Dropped(None)
    rule = first_failing_rule(meta, caption, spec.filters) if spec.filters is not None else None
    return Dropped(rule) if rule is not None else None


def _decode_sample(raw: dict, spec: LoaderSpec, epoch: int) -> dict | Dropped | None:
    """Decoded ``{"key", "caption", "pixels"}`` (precomputed shards: ``"latents"`` and ``"cond"``
    instead of ``"pixels"``; ``"issue"`` when bad data was trained around);
    ``Dropped`` when filtered out (before the image is decoded, which is the expensive part) or
    dropped for bad data; None when the sample is corrupt."""
    if raw.get("__issue__"):
        return Dropped(None, raw["__issue__"])
    if raw.get("__lost__", 1) > 1:  # a damaged shard's marker: the samples it lost, all corrupt
        return Lost(raw["__lost__"])
    if spec.precomputed:
        from scaletrain.data.latents import MEMBER

        payload = MEMBER if MEMBER in raw else None
    else:
        exts = IMAGE_EXTS + VIDEO_EXTS if spec.frames else IMAGE_EXTS
        payload = next((ext for ext in exts if ext in raw), None)
    parsed = None if raw.get("__corrupt__") or payload is None else read_meta_caption(raw)
    if parsed is None:
        return None
    meta, caption = parsed
    key = raw["__key__"]
    issue = "bad_caption" if caption_problem(raw) is not None else None
    if issue is not None:
        if spec.bad_captions == "skip":
            return Dropped(None, issue)
        caption = ""  # data.bad_captions=empty: train it unconditionally, counted
    dropped = _select(meta, caption, spec, key)  # outside the try: a missing balance field must raise
    if dropped is not None:
        return dropped
    drop_caption = caption_is_dropped(spec.seed, key, epoch, spec.caption_dropout)
    if spec.precomputed:
        from scaletrain.data.latents import read_sample

        tensors = read_sample(raw)
        if tensors is None:
            return None
        if drop_caption or issue is not None:
            tensors["cond"] = spec.empty_cond
        return {"key": key, "caption": "" if drop_caption else caption, "issue": issue, **tensors}
    try:
        if payload in VIDEO_EXTS:
            # the clip's start: drawn per (seed, key, epoch), the same on any rank layout
            rng = random.Random(_stable_int("clip", spec.seed, key, epoch))
            pixels = decode_video(raw[payload], ClipSpec(spec.frames, spec.fps), spec.resolution, rng, spec.buckets)
        else:
            pixels, geometry = decode_image(raw[payload], spec.resolution, spec.buckets, spec.max_image_pixels,
                                            geometry=True, formats=spec.image_formats)
            if spec.frames:
                pixels = pixels.unsqueeze(1)  # an image is a 1-frame clip
            else:
                return {"key": key, "pixels": pixels, "geometry": geometry, "caption": "" if drop_caption else caption,
                        "issue": issue}
    except ImageTooLarge:
        return Dropped(None, "image_too_large")
    except VideoTooShort:
        return Dropped(None, "video_too_short")
    except VideoFpsTooLow:
        return Dropped(None, "video_low_fps")
    except Exception:  # noqa: BLE001 - PIL / PyAV raise many types (SyntaxError, struct.error, av.error...) on bad bytes
        return None
    return {"key": key, "pixels": pixels, "caption": "" if drop_caption else caption, "issue": issue}


# The per-sample tensors a batch stacks; the first one present sets the batch's shape bucket.
# "geometry": an image's (original height, width, crop top, left), SDXL's micro-conditions.
_TENSOR_FIELDS = ("pixels", "latents", "geometry")


# -------------------------------------------------------------- splitting


def _raw_ref(raw: dict) -> list:
    """Where a raw sample can be read again: [shard url, byte offset], or a damaged shard's marker."""
    if raw.get("__corrupt__"):
        return ["#corrupt", raw["__key__"]]
    return [raw["__shard__"], raw["__pos__"]]


def _reread(ref: list, max_member_bytes: int | None) -> dict:
    if ref[0] == "#corrupt":
        return {"__key__": ref[1], "__corrupt__": True}
    raw = next(read_shard(ref[0], max_member_bytes, start=ref[1]))
    raw["__shard__"] = ref[0]
    return raw


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def owner_of(g: int, slots: int, remap: dict | None = None) -> int | None:
    """The slot that reads global sample ``g`` of a "sample"-split stream: ``g % slots``; after a
    resume at another slot count (data/reslot.py), ``remap`` = {"base": F, "exclude": [...]}: the
    samples before F and those listed were read under the old layout (owned by nobody now), and
    the others are dealt round-robin from F on, skipping the excluded."""
    if remap is None:
        return g % slots
    base, exclude = remap["base"], remap["exclude"]
    if g < base:
        return None
    i = bisect.bisect_left(exclude, g)
    if i < len(exclude) and exclude[i] == g:
        return None
    return (g - base - i) % slots


class _Remainder:
    """What a resume at another slot count hands a slot of a "shard"-split stream before its first
    epoch under the new layout (data/reslot.py): units, each ``["sample", url, offset, epoch]`` (one
    sample a shuffle buffer held) or ``["tail", url, last, epoch]`` (a shard from after the sample
    at byte offset ``last``, or from its start when ``last`` is None). Read in order, without a
    shuffle buffer; ``state()`` is the units left, the one being read cut at its last sample."""

    def __init__(self, units: list, max_member_bytes: int | None) -> None:
        self.units = [list(u) for u in units]
        self.max_member_bytes = max_member_bytes
        self._reader: Iterator[dict] | None = None

    def state(self) -> list:
        return [list(u) for u in self.units]

    def next_raw(self) -> tuple[dict, int] | None:
        """(raw sample, its epoch), or None when every unit is read."""
        while self.units:
            kind, url, pos, epoch = self.units[0]
            if kind == "sample":
                self.units.pop(0)
                return _reread([url, pos], self.max_member_bytes), epoch
            if pos == "end":  # past a damaged stretch: a tar cannot be read beyond it
                self.units.pop(0)
                continue
            if self._reader is None:
                self._reader = read_shard(url, self.max_member_bytes, start=pos)
                if pos is not None:
                    next(self._reader, None)  # the sample at ``pos`` was read before the state was taken
            raw = next(self._reader, None)
            if raw is None:
                self.units.pop(0)
                self._reader = None
                continue
            raw["__shard__"] = url
            self.units[0][2] = "end" if raw.get("__corrupt__") else raw["__pos__"]
            return raw, epoch
        return None


class _RawEpoch:
    """Raw samples of one epoch for slot (rank, worker), resumable without decoding anything:
    ``state()`` after any sample, and ``_RawEpoch(..., state=)`` continues from there by seeking
    in the shard (by the byte offset of the last sample read) and re-reading only the samples a
    shuffle buffer held (their offsets are in the state, with the shuffle RNG's state).

    Slot = worker * world_size + rank. "shard": shard i goes to slot i % slots (as
    ``wds.split_by_node`` then ``split_by_worker``), in an order shuffled per (seed, epoch, rank,
    worker) with a shuffle buffer. "sample": every slot reads the same stream, shuffled by (seed,
    epoch) only so all slots agree, and keeps index j iff (offset + j) % slots == slot: `offset`
    continues the index across epochs, so rank r's n-th sample is global sample n*world + r even
    when the dataset size is not a multiple of world_size. ``count`` is the number of samples
    of that (shuffled) stream consumed; at the end of the epoch it is the epoch's raw count.
    """

    def __init__(self, spec: LoaderSpec, shards: list[str], mode: str, epoch: int, worker: int, offset: int,
                 state: dict | None = None, remap: dict | None = None) -> None:
        self.spec, self.mode, self.offset, self.remap = spec, mode, offset, remap
        self.slots, self.slot = spec.num_slots, worker * spec.world_size + spec.rank
        shuffle = spec.shuffle_buffer > 0
        if mode == "shard":
            order = shards[self.slot::self.slots]
            rng = random.Random(_stable_int("shuffle", spec.seed, epoch, spec.rank, worker))
            if shuffle:
                rng.shuffle(order)
        else:
            order = list(shards)
            rng = random.Random(_stable_int("shuffle", spec.seed, epoch))
        self.order, self.rng = order, rng if shuffle else None
        self.count, self.pool, self.flushing = 0, [], False
        self.cursor: tuple[int, int | str | None] = (0, None)  # (shard index, offset of the last sample read)
        if state is not None:
            self.count, self.flushing = state["count"], state["flushing"]
            self.cursor = (state["cursor"][0], state["cursor"][1])
            self.pool = [_reread(ref, spec.max_member_bytes) for ref in state["pool"]]
            if self.rng is not None:
                version, internal, gauss = state["rng"]
                self.rng.setstate((version, tuple(internal), gauss))
        self._reader = self._read_from(self.cursor)

    def state(self) -> dict:
        return {"count": self.count, "flushing": self.flushing, "cursor": list(self.cursor),
                "pool": [_raw_ref(r) for r in self.pool],
                "rng": _rng_state(self.rng) if self.rng is not None else None}

    def _read_from(self, cursor: tuple[int, int | str | None]) -> Iterator[dict]:
        index, last = cursor
        while index < len(self.order):
            url = self.order[index]
            if last != "end":
                skip_first = last is not None  # the sample at ``last`` was read before the state was taken
                for raw in read_shard(url, self.spec.max_member_bytes, start=last):
                    if skip_first:
                        skip_first = False
                        continue
                    raw["__shard__"] = url
                    self.cursor = (index, "end" if raw.get("__corrupt__") else raw["__pos__"])
                    yield raw
            index, last = index + 1, None
            self.cursor = (index, None)

    def _next_shuffled(self) -> dict:
        if self.rng is None:
            return next(self._reader)
        # A shuffle buffer as webdataset's: fill, then emit a random element per sample read;
        # at the end shuffle what is left and emit it in order (popped from the reversed list).
        if not self.flushing:
            for raw in self._reader:
                self.pool.append(raw)
                if len(self.pool) >= self.spec.shuffle_buffer:
                    i = self.rng.randrange(len(self.pool))
                    self.pool[i], self.pool[-1] = self.pool[-1], self.pool[i]
                    return self.pool.pop()
            self.rng.shuffle(self.pool)
            self.pool.reverse()
            self.flushing = True
        if self.pool:
            return self.pool.pop()
        raise StopIteration

    def __iter__(self) -> "_RawEpoch":
        return self

    def __next__(self) -> dict:
        while True:
            raw = self._next_shuffled()
            self.count += 1
            if self.mode == "shard" or owner_of(self.offset + self.count - 1, self.slots, self.remap) == self.slot:
                return raw


def _epoch_raw(
    spec: LoaderSpec, shards: list[str], mode: str, epoch: int, worker: int, offset: int
) -> Generator[dict, None, int]:
    """Raw samples of one epoch for slot (rank, worker); returns the epoch's global raw count
    (see ``_RawEpoch``)."""
    raws = _RawEpoch(spec, shards, mode, epoch, worker, offset)
    yield from raws
    return raws.count


def _decoded_epoch(
    spec: LoaderSpec, shards: list[str], mode: str, epoch: int, worker: int, offset: int
) -> Generator[dict | Dropped | None, None, tuple[int, int, Counter]]:
    """Decoded samples (None = corrupt, Dropped = filtered) of one epoch; returns
    (global raw count, good count, filtered count per rule)."""
    raws = _RawEpoch(spec, shards, mode, epoch, worker, offset)
    good, filtered = 0, Counter()
    for raw in raws:
        item = _decode_sample(raw, spec, epoch)
        if isinstance(item, Dropped):
            if item.rule is not None:
                filtered[item.rule] += 1
        else:
            good += isinstance(item, dict)
        yield item
    return raws.count, good, filtered


class _LeafStream:
    """Infinite stream of decoded samples (None = corrupt, Dropped = filtered) for one slot of
    one leaf, epoch after epoch; ``state()`` / ``state=`` resume it exactly (``_RawEpoch``).
    Each decoded sample carries ``"__ref__"`` (where to re-read it, and its epoch) so a batch
    still being filled can be rebuilt at a resume."""

    def __init__(self, spec: LoaderSpec, shards: list[str], mode: str, worker: int, state: dict | None = None) -> None:
        self.spec, self.shards, self.mode, self.worker = spec, shards, mode, worker
        self.epoch, self.offset, self.good, self.filtered, self.short = 0, 0, 0, Counter(), Counter()
        raw_state, self.remap, self.remainder = None, None, None
        if state is not None:
            self.epoch, self.offset, self.good = state["epoch"], state["offset"], state["good"]
            self.filtered, raw_state = Counter(state["filtered"]), state["raw"]
            # After a resume at another slot count (data/reslot.py): "sample" mode deals the shared
            # stream by ``remap``; "shard" mode first reads the old layout's unread ``remainder``.
            self.remap = state.get("remap")
            if state.get("remainder"):
                self.remainder = _Remainder(state["remainder"], spec.max_member_bytes)
        self.raws = _RawEpoch(spec, shards, mode, self.epoch, worker, self.offset, raw_state, self.remap)

    def state(self) -> dict:
        out = {"epoch": self.epoch, "offset": self.offset, "good": self.good, "filtered": dict(self.filtered),
               "raw": self.raws.state()}
        if self.remap is not None:
            out["remap"] = self.remap
        if self.remainder is not None:
            out["remainder"] = self.remainder.state()
        return out

    def __iter__(self) -> "_LeafStream":
        return self

    def __next__(self) -> dict | Dropped | None:
        while True:
            if self.remainder is not None:
                got = self.remainder.next_raw()
                if got is None:
                    self.remainder = None
                    continue
                raw, epoch = got
            else:
                try:
                    raw = next(self.raws)
                except StopIteration:
                    self._next_epoch()
                    continue
                epoch = self.epoch
            item = _decode_sample(raw, self.spec, epoch)
            if isinstance(item, Dropped):
                if item.rule is not None:
                    self.filtered[item.rule] += 1
                if item.issue in ("video_too_short", "video_low_fps"):
                    self.short[item.issue] += 1
            elif isinstance(item, dict):
                self.good += epoch == self.epoch  # the empty-slot check counts this epoch's samples only
                item["__ref__"] = [*_raw_ref(raw), epoch]
            return item

    def _next_epoch(self) -> None:
        spec, mode, epoch = self.spec, self.mode, self.epoch
        if self.good == 0:
            # Without this an empty slot would spin forever and hang the job.
            where = (f"rank {spec.rank} worker {self.worker} got no decodable samples from {spec.stream_name} in "
                     f"epoch {epoch} (split={mode!r}, {len(self.shards)} shards, {spec.num_slots} slots)")
            filtered = self.filtered
            if sum(filtered.values()):
                rules = ", ".join(f"{rule}: {n}" for rule, n in sorted(filtered.items()) if n)
                raise RuntimeError(f"{where}: data.filters dropped all {sum(filtered.values())} it read "
                                   f"({rules}); loosen data.filters for this stream")
            if sum(self.short.values()):
                raise RuntimeError(f"{where}: every video it read is too short or below the frame rate for "
                                   f"{spec.frames} frames at {spec.fps or 'their own'} fps ({dict(self.short)}); "
                                   "lower the stage's frames or fps")
            if spec.only_class is not None:
                raise RuntimeError(f"{where}: no sample has {spec.balance.field}={spec.only_class!r}; "
                                   "fix data.balance.weights or write more shards")
            raise RuntimeError(f"{where}; check the shards or use fewer workers/ranks")
        self.offset += self.raws.count
        self.epoch += 1
        self.good, self.filtered, self.short = 0, Counter(), Counter()
        self.raws = _RawEpoch(spec, self.shards, mode, self.epoch, self.worker, self.offset, remap=self.remap)


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
        if isinstance(item, dict):
            yield item


@dataclass(frozen=True)
class Stream:
    """One (source, class) leaf of the mixture, resolved for reading (data/mixing.py)."""

    spec: LoaderSpec  # the leaf's own spec: its shards, filters and class
    shards: list[str]
    mode: str
    source: str
    label: str | None
    prob: float


@functools.lru_cache(maxsize=64)
def scan_classes(shards: tuple[str, ...], field: str, where: str) -> dict[str, int]:
    """Samples per class of metadata ``field`` over ``shards`` (one pass, images not decoded).

    Needed only for ``balance.mode=uniform`` without explicit weights; cached so the trainer
    and the loader, and a stage rebuilt at resume, share one scan."""
    counts: Counter = Counter()
    probe = LoaderSpec(shards=list(shards), resolution=1, micro_batch=1, balance=Balance(field), stream_name=where)
    for url in shards:
        for raw in read_shard(url):
            if raw.get("__corrupt__"):
                continue
            try:
                meta = json.loads(raw["json"]) if "json" in raw else {}
            except ValueError:
                continue  # corrupt metadata: the loader counts it as skipped
            if isinstance(meta, dict):
                counts[_sample_class(meta, probe, raw["__key__"])] += 1
    if not counts:
        raise ValueError(f"data.balance: {where} has no readable samples to find the classes of {field!r} in; "
                         "check the shards or list the classes in data.balance.weights")
    return dict(sorted(counts.items()))


def plan_streams(spec: LoaderSpec) -> list[Stream]:
    """The leaves this spec reads: one per source (and per class under ``spec.balance``)."""
    if spec.sources:
        sources = list(spec.sources)
        names = [f"data.sources {s.name!r}" for s in sources]
    else:
        sources = [Source("data", tuple(expand_shards(spec.shards)), 1.0, None)]
        names = ["data.shards"]
    shard_lists = [expand_shards(s.shards) for s in sources]
    classes: list[list[str]] = [[] for _ in sources]
    if spec.balance is not None and spec.balance.weights is None:
        classes = [list(scan_classes(tuple(sh), spec.balance.field, name)) for sh, name in zip(shard_lists, names)]
    streams = []
    for leaf in plan_leaves(sources, spec.balance, classes):
        src, shards = sources[leaf.source], shard_lists[leaf.source]
        name = names[leaf.source] + ("" if leaf.label is None else f" class {spec.balance.field}={leaf.label!r}")
        filters = src.filters if src.filters is not None else spec.filters
        leaf_spec = replace(spec, shards=shards, sources=(), filters=filters, only_class=leaf.label, stream_name=name)
        streams.append(Stream(leaf_spec, shards, resolve_split(leaf_spec, len(shards)), src.name, leaf.label,
                              leaf.prob))
    return streams


def _batches(spec: LoaderSpec, streams: list[Stream], worker_id: int) -> Iterator[dict]:
    """Whole micro-batches of one slot, each with ``"position"``: the slot's state right after
    it (``{"slot", "done", "state"}``), which ``LoaderSpec.resume`` takes back.

    The DataLoader takes its batch j from worker j % W, and this loader's batch j is the stage
    stream's batch ``skip_batches + j``; so worker ``worker_id`` plays slot (worker_id +
    skip_batches) % W, whose batches are the stream's batches b with b % W == slot. Without a
    resume position the slot replays from the stage start and drops its batches below
    ``skip_batches`` (decoded, then dropped: O(data seen)); with one it continues from its state
    (O(1): nothing before it is decoded) and drops only those between that state and
    ``skip_batches`` (a health rollback's stretch)."""
    workers = spec.workers_per_rank
    worker = (worker_id + spec.skip_batches) % workers
    resume = (spec.resume or {}).get(str(worker))
    done = resume["done"] if resume else 0
    to_skip = len(range(worker, spec.skip_batches, workers)) - done
    if to_skip < 0:
        raise ValueError(f"the resume position of slot {worker} ({done} batches) is past skip_batches="
                         f"{spec.skip_batches}; it belongs to a later point of this stage")
    state = resume["state"] if resume else None
    slots, slot = spec.num_slots, worker * spec.world_size + spec.rank
    leaves = [_LeafStream(st.spec, st.shards, st.mode, worker, state["leaves"][i] if state else None)
              for i, st in enumerate(streams)]
    cum = cumulative([st.prob for st in streams])
    # Samples waiting for their micro-batch, per image shape: one entry without buckets; with
    # buckets a batch is emitted when its bucket fills, so every batch holds one bucket. The
    # emission order depends only on the slot's stream, so skip_batches stays exact.
    pending: dict[tuple[int, ...], tuple[list[dict], list[int]]] = {}

    def add(item: dict, leaf: int) -> tuple[int, ...]:
        shape = tuple(item[next(f for f in _TENSOR_FIELDS if f in item)].shape)
        items, from_leaf = pending.setdefault(shape, ([], []))
        items.append(item)
        from_leaf.append(leaf)
        return shape

    start, decodes, first = 0, 0, True
    if state is not None:
        start = state["n"]
        for leaf, *ref in state["pending"]:  # a bucket still being filled: re-read and decode its samples
            item = _decode_sample(_reread(ref[:2], spec.max_member_bytes), streams[leaf].spec, ref[2])
            decodes += 1
            if not isinstance(item, dict):  # (a reslot may hand over a sample that no longer decodes)
                continue
            item["__ref__"] = ref
            add(item, leaf)
    skipped, filtered, issues = 0, Counter(), Counter()
    for n in itertools.count(start):
        # Slot s's n-th sample is global sample n * slots + s (as in split="sample"), so the leaf
        # picks are the same for any rank layout and for a resumed run.
        i = pick_leaf(spec.seed, n * slots + slot, cum) if len(streams) > 1 else 0
        while True:  # corrupt and filtered samples do not take a position
            item = next(leaves[i])
            decodes += 1
            if item is None:
                skipped += 1
            elif isinstance(item, Lost):
                skipped += item.count
            elif isinstance(item, Dropped):
                if item.rule is not None:
                    filtered[item.rule] += 1
                if item.issue is not None:
                    issues[item.issue] += 1
            else:
                break
        if item.get("issue"):  # bad data trained around (a caption replaced by "")
            issues[item["issue"]] += 1
        shape = add(item, i)
        items, from_leaf = pending[shape]
        if len(items) == spec.micro_batch:
            del pending[shape]
            done += 1
            if to_skip:
                to_skip -= 1
            else:
                fields = [f for f in _TENSOR_FIELDS if f in items[0]]
                batch = {f: torch.stack([it[f] for it in items]) for f in fields}
                if "cond" in items[0]:  # precomputed: each conditioning field stacked
                    batch["cond"] = {k: torch.stack([it["cond"][k] for it in items]) for k in items[0]["cond"]}
                batch.update(captions=[it["caption"] for it in items], keys=[it["key"] for it in items],
                             skipped=skipped, filtered=dict(filtered), issues=dict(issues),
                             sources=[streams[j].source for j in from_leaf])
                if spec.balance is not None:
                    batch["labels"] = [streams[j].label for j in from_leaf]
                if first:  # what reaching this slot's first batch cost: 0 on a resume that replays nothing
                    batch["decoded_before"], first = decodes - len(items), False
                batch["position"] = {"slot": worker, "done": done, "state": {
                    "n": n + 1, "leaves": [leaf.state() for leaf in leaves],
                    "pending": [[j, *it["__ref__"]] for its, js in pending.values() for it, j in zip(its, js)]}}
                yield batch
            skipped, filtered, issues = 0, Counter(), Counter()


class _SlotDataset(IterableDataset):
    """Per-worker infinite batch stream; DataLoader round-robins the workers."""

    def __init__(self, spec: LoaderSpec, streams: list[Stream]) -> None:
        self.spec, self.streams = spec, streams

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        return _batches(self.spec, self.streams, info.id if info else 0)


_NOT_IDENTITY = ("skip_batches", "resume", "pin_memory", "empty_cond", "allow_pipe_shards")


# The rank layout, which data/reslot.py carries a position across (the micro-batch too: which
# samples are read does not depend on how many go into one batch).
_LAYOUT = ("rank", "world_size", "num_workers", "micro_batch")


def loader_identity(spec: LoaderSpec, layout: bool = True) -> str:
    """A hash of everything that decides a slot's stream; a stored position is only used by a
    loader with the same identity (the same data, split, layout and batch size). ``layout=False``
    leaves out the rank layout (rank, world size, workers, micro-batch): a position of the same data at another
    layout is carried over by data/reslot.py."""
    from dataclasses import fields

    skip = _NOT_IDENTITY + (() if layout else _LAYOUT)
    parts = [(f.name, getattr(spec, f.name)) for f in fields(spec) if f.name not in skip
             and not (f.name in ("frames", "fps") and not getattr(spec, f.name))  # image stages: as before
             and not (f.name == "image_formats" and getattr(spec, f.name) == IMAGE_FORMATS)]
    return hashlib.blake2b(repr(parts).encode(), digest_size=12).hexdigest()


def build_loader(spec: LoaderSpec) -> Iterable[dict]:
    """Infinite iterable of whole micro-batches for ``spec.rank``.

    Batch: ``{"pixels": (B,3,R,R) (or (B,3,H,W) of one bucket) float32 in [-1,1], "captions": list[str],
    "keys": list[str], "skipped": int, "filtered": {rule: int}, "issues": {kind: int}, "sources": list[str],
    "position": {"slot", "done", "state"}}`` (the slot's resumable state after this batch: ``LoaderSpec.resume``)
    (+ ``"labels": list[str]`` under ``spec.balance``); sum "skipped" for the corrupt total
    and "filtered" for the samples data.filters dropped. Precomputed shards give ``"latents"``
    (B, 2C, h, w: posterior mean and logvar) and ``"cond"`` ({field: (B, ...)}: ``text_emb``,
    ``text_mask``, ``pooled``, ... as the preset's conditioner gives them) instead of ``"pixels"``.
    """
    streams = plan_streams(spec)
    for st in streams:
        check_pipe_shards(st.shards, spec.allow_pipe_shards, st.spec.stream_name)
    # batch_size=None: workers emit whole batches themselves, so "skipped" can
    # be attributed per batch and no batch ever mixes workers or comes out short.
    workers = spec.num_workers > 0
    return DataLoader(_SlotDataset(spec, streams), batch_size=None, num_workers=spec.num_workers,
                      pin_memory=spec.pin_memory, multiprocessing_context=worker_context() if workers else None,
                      worker_init_fn=functools.partial(exit_with_rank, os.getpid()) if workers else None)


def exit_with_rank(rank_pid: int, worker_id: int) -> None:
    """Loader worker start: leave when the rank that owns it is gone. A worker forked from the
    fork server is the server's child, so torch's own watchdog (the parent's pid) would keep it
    alive after a killed rank, and with it the server (and any pipe they inherited, e.g. a
    launcher's stdout). A zombie rank counts as gone."""
    import threading

    def alive() -> bool:
        try:
            with open(f"/proc/{rank_pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
        except OSError:  # no /proc: ask the kernel
            try:
                os.kill(rank_pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
            return True

    def watch() -> None:
        while alive():
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="scaletrain-rank-watch", daemon=True).start()


def worker_context():
    """Where loader workers come from: a fork server started from a fresh interpreter that has
    imported this module, not the rank itself. A worker forked from a rank would map the rank's
    whole host memory (a 1-rank unet-sd2 run's worker showed 12 GB resident beside the rank's
    17 GB, and the kernel killed the run); one forked from the server holds only the reader.
    ``warm_worker_context`` starts the server early, so its imports overlap the model build."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def warm_worker_context() -> None:
    """Start the loader workers' fork server now (it imports in its own process)."""
    from multiprocessing import forkserver

    worker_context()
    forkserver.ensure_running()
