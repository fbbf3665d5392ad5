"""The image stream as a batch builder, beside DPO's ``pair_batches`` (``train/dpo.py``): the
stage's images, clips or precomputed latents from its shards or weighted sources, with its
filters, class balance and buckets (``data/pipeline.py``), resumed from the stream position a
checkpoint stored for this rank.

The trainer asks it for a stage's batches with a ``BatchRequest`` like any batch builder; the
stream keeps what a checkpoint stores of it (``position``: per loader slot, how far this rank
read; ``identity``: which stream that was) and what a resume hands back (``resume_from``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Iterator

from scaletrain.data.latents import resolve_shards
from scaletrain.data.mixing import Balance, Source
from scaletrain.data.pipeline import LoaderSpec, build_loader, loader_identity, plan_streams
from scaletrain.data.samples import image_formats
from scaletrain.models.registry import stage_frames
from scaletrain.train.step import BatchRequest


class ImageStream:
    def __init__(self, *, preset: Any, encoding: Any, device: Any, logger: Any, data_counts: Any) -> None:
        self.preset, self.encoding, self.device = preset, encoding, device
        self.logger, self.data_counts = logger, data_counts
        self.position: dict = {}  # this rank's stream position per loader slot (batch["position"])
        self.identity: str | None = None
        self.data_identity: str | None = None  # the same without the rank layout (data/reslot.py)
        self.workers = 1  # loader slots per rank
        self.data_rank, self.data_world = 0, 1  # this rank's place among the data-parallel ranks
        self.resume_from: dict | None = None  # the checkpoint's position for this rank (restore)
        # At another world size: every old rank's position ([data_position of rank r]) and the old
        # world size, to re-split the stream (restore)
        self.reslot_from: tuple[list, int] | None = None
        self.decoded_before = 0  # samples decoded before each slot's first batch, not in it (this rank)

    def record(self, batch: dict) -> None:
        """Take a batch's stream position (the loader adds it to each batch)."""
        pos = batch.pop("position", None)
        if pos is not None:
            self.position[str(pos["slot"])] = {"done": pos["done"], "state": pos["state"]}
        self.decoded_before += batch.pop("decoded_before", 0)

    def stored_position(self, stage_index: int) -> dict:
        """What a checkpoint stores of this rank's stream (``restore`` hands it back)."""
        return {"stage": stage_index, "identity": self.identity, "data_identity": self.data_identity,
                "workers": self.workers, "data_rank": self.data_rank, "data_world": self.data_world,
                "slots": self.position}

    def _reslot(self, spec: LoaderSpec, index: int, olds: list) -> tuple[dict | None, str, int | None]:
        """At another process world size: (this rank's resume positions, why none, the old
        data-parallel world size when re-split). Ranks of one context-parallel group read the
        same data (one data rank): the positions are taken per data rank. The same data layout
        continues from its own position; another one is re-split (data/reslot.py)."""
        from scaletrain.data.reslot import ReslotError, reslot

        if not olds or any(not p for p in olds):
            return None, "the checkpoint stored no stream position for some of its ranks", None
        if any(p.get("stage") != index for p in olds):
            return None, "the checkpoint's positions belong to another stage", None
        if any(p.get("data_identity") != self.data_identity for p in olds):
            return None, "the data, split or batch differ from the checkpoint's", None
        old_world = olds[0]["data_world"]
        by_rank = {p["data_rank"]: p for p in olds}
        if sorted(by_rank) != list(range(old_world)):
            return None, "the checkpoint's data ranks are incomplete", None
        own = by_rank.get(spec.rank)
        if old_world == spec.world_size and own is not None and own["identity"] == self.identity:
            return own["slots"], "", None  # the same data layout (e.g. only the context-parallel degree changed)
        try:
            positions = [by_rank[r]["slots"] for r in range(old_world)]
            return reslot(positions, old_world, olds[0]["workers"], spec, plan_streams(spec)), "", old_world
        except ReslotError as e:
            return None, str(e), None

    def __call__(self, req: BatchRequest) -> Iterator[dict]:
        cfg, index, d = req.cfg, req.stage_index, req.cfg.data
        spec = LoaderSpec(
            resolution=req.resolution, micro_batch=req.micro_batch,
            caption_dropout=d.caption_dropout, num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer,
            seed=cfg.run.seed, split=d.split, rank=req.rank, world_size=req.world_size,
            skip_batches=req.skip, **stage_data_fields(cfg, index, req.resolution),
            frames=stage_frames(cfg, index), fps=cfg.train.stages[index].fps,
            buckets=tuple(d.buckets.sizes(req.resolution, self.preset.downsample_factor) if d.buckets.enabled else ()),
            precomputed=self.encoding is not None, pin_memory=self.device.type == "cuda",
            bad_captions=d.bad_captions, max_image_pixels=d.max_image_pixels, max_member_bytes=d.max_member_bytes,
            allow_pipe_shards=d.allow_pipe_shards, image_formats=image_formats(d.image_formats),
            empty_cond=self.encoding.empty_caption() if self.encoding is not None else None,
        )
        # Resume from the stream position the checkpoint stored for this rank (O(1): nothing read
        # before it is decoded), when it belongs to this stage and the same stream; else replay.
        self.identity, self.data_identity = loader_identity(spec), loader_identity(spec, layout=False)
        self.workers, self.decoded_before = spec.workers_per_rank, 0
        self.data_rank, self.data_world = req.rank, req.world_size
        position, self.resume_from = self.resume_from, None
        olds, self.reslot_from = self.reslot_from, None
        usable = bool(position) and position.get("stage") == index and position.get("identity") == self.identity
        resume = position["slots"] if usable else None
        if req.skip:
            why = ("the checkpoint stored none for this rank" if not position else
                   "the data, split, batch or layout differ from the checkpoint's")
            if not usable and olds is not None:
                resume, why, old_world = self._reslot(spec, index, olds)
                usable = resume is not None and old_world is None
                if old_world is not None:
                    self.logger.event(f"data: stage {index} continues at its checkpointed stream position, re-split "
                                      f"from {old_world} to {req.world_size} data-parallel ranks ({req.skip} "
                                      "micro-batches per rank in; none replayed)")
            if usable:
                self.logger.event(f"data: stage {index} continues at its checkpointed stream position "
                                  f"({req.skip} micro-batches per rank in; none replayed)")
            if resume is None:
                self.logger.event(f"data: stage {index} replays {req.skip} micro-batches per rank to resume ({why})")
        # A slot that yields no batch before the next checkpoint keeps the position it resumed from.
        self.position = json.loads(json.dumps(resume or {}))
        loader = build_loader(replace(spec, resume=resume))
        # Name the counters of this stage's sources and classes (the same on every rank); reset
        # them at a stage's first step, keep the checkpointed counts on a mid-stage restart.
        streams = plan_streams(spec)  # the class scan is cached: the loader just ran it
        self.data_counts.begin_stage(list(dict.fromkeys(s.source for s in streams)),
                                     sorted({s.label for s in streams if s.label is not None}),
                                     log_sources=bool(spec.sources), fresh=req.fresh)
        return iter(loader)


def stage_data_fields(cfg: Any, index: int, resolution: int) -> dict:
    """LoaderSpec fields for stage ``index``'s data: shards or weighted sources, filters and class
    balance (data.* with the stage's override, config.RunConfig.stage_data); an encoded folder
    stands for its subfolder at ``resolution`` (data/latents.py)."""
    eff = cfg.stage_data(index)
    b = eff.balance

    def urls(shards, where: str) -> list[str]:
        return resolve_shards(shards, resolution, where)[0]

    return {
        "shards": urls(eff.shards, "data.shards") if eff.sources is None else [],
        "sources": tuple(Source(s.name, tuple(urls(s.shards, f"data.sources {s.name!r}")), s.weight, s.filters)
                         for s in eff.sources or ()),
        "filters": eff.filters,
        "balance": None if b is None else Balance(b.field, b.weights if b.mode == "weights" else None),
    }
