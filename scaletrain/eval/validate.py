"""Distributed validation: FID against real images from the validation shards, plus a sample grid.

The work is split across ranks and every rank runs the same collectives:

- reference set: the first ``validate.num_images`` decodable samples of ``validate.shards``
  (in shard order, no shuffle, no caption dropout). Rank r takes the r-th of world
  contiguous blocks; their features go into the FID's reference statistics
  once per run and resolution (torchmetrics keeps them across ``reset()``).
- generated set: rank r samples its block's captions with seeds ``validate.seed + i`` for
  global image index i, so the set is the same at any world size and batch size. Every rank
  generates the same number of images (the short last block is padded, the padding dropped),
  because a sharded denoiser (FSDP2, ZeRO-3) all-gathers weights in every forward.
- ``FrechetInceptionDistance.compute()`` all-reduces the feature sums: the value is the same
  on every rank; rank 0 logs it under the extractor's label (``fid_offline-gridorient`` or
  ``fid_inception-v3``, never a bare "fid").

Validation must leave training bit-identical: sampling and features draw only from explicit
generators, and ``preserve_rng`` snapshots and restores every global RNG around the whole pass
anyway (a VAE that samples, or a module left in train mode, would otherwise shift them).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from scaletrain.common.tars import expand_shards
from scaletrain.data.pipeline import LoaderSpec, iter_epoch_samples
from scaletrain.diffusion import Objective
from scaletrain.distributed import all_reduce_sum
from scaletrain.eval.fid import build_feature_extractor, build_fid
from scaletrain.eval.samples import generate_samples, save_image_grid, save_video_grid

Denoiser = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]


@contextlib.contextmanager
def preserve_rng(device: torch.device) -> Iterator[None]:
    """Restore torch (CPU and this CUDA device), Python and NumPy global RNG states on exit."""
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def rank_block(num_images: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """(start, stop, per_rank): rank's contiguous share of ``num_images`` (sizes differ by at
    most one, none empty when num_images >= world_size); every rank generates ``per_rank``
    images so the sharded forwards line up."""
    start, stop = rank * num_images // world_size, (rank + 1) * num_images // world_size
    return start, stop, math.ceil(num_images / world_size)


def read_reference(shards: list[str], resolution: int, num_images: int, start: int, stop: int,
                   frames: int = 0, fps: float | None = None) -> tuple[Tensor | list[Tensor], list[str]]:
    """Pixels of images [start, stop) at ``resolution`` and the captions of all ``num_images``.
    ``frames`` > 0 (video presets): a list of clips (3, F, H, W), F = ``frames`` for videos and 1
    for images in the shards.

    Every rank reads the same prefix of the stream (sample split over one slot) so the
    global index of an image does not depend on the world size.
    """
    spec = LoaderSpec(shards=shards, resolution=resolution, micro_batch=1, num_workers=0, split="sample",
                      frames=frames, fps=fps)
    items = list(itertools.islice(iter_epoch_samples(spec), num_images))
    if len(items) < num_images:
        raise ValueError(
            f"validate.num_images={num_images} but validate.shards hold only {len(items)} decodable "
            f"{'clips' if frames else 'images'}; lower validate.num_images or add shards"
        )
    mine = [it["pixels"] for it in items[start:stop]]
    return (mine if frames else torch.stack(mine)), [it["caption"] for it in items]


def frames_of(clips: Tensor | list[Tensor]) -> Tensor:
    """Every frame of (B, 3, F, H, W) clips (or a list of (3, F, H, W)) as (sum F, 3, H, W) images."""
    seq = list(clips) if isinstance(clips, list) else list(clips.unbind(0))
    return torch.cat([c.transpose(0, 1) for c in seq]) if seq else torch.empty(0)


@torch.no_grad()
def temporal_sums(clips: Tensor | list[Tensor], extractor: Callable[[Tensor], Tensor]) -> tuple[float, int]:
    """(sum, count) over consecutive frame pairs of the cosine similarity of their features (1:
    the clip does not change; lower: it flickers or jumps), for clips of at least 2 frames."""
    total, count = 0.0, 0
    for clip in (list(clips) if isinstance(clips, list) else clips.unbind(0)):
        if clip.shape[1] < 2:
            continue
        f = extractor(clip.transpose(0, 1)).float().flatten(1)
        total += float(torch.nn.functional.cosine_similarity(f[:-1], f[1:], dim=1).sum())
        count += f.shape[0] - 1
    return total, count


def count_reference_images(shards: list[str], num_images: int, frames: int = 0, fps: float | None = None) -> int:
    """How many of the ``num_images`` reference images ``read_reference`` would find: decodable
    images of the same stream, counted up to ``num_images``. Decodability does not depend on
    the resolution, so a tiny one keeps this start-up check cheap."""
    spec = LoaderSpec(shards=shards, resolution=8, micro_batch=1, num_workers=0, split="sample",
                      frames=frames, fps=fps)
    return sum(1 for _ in itertools.islice(iter_epoch_samples(spec), num_images))


@dataclass
class SamplingSpec:
    """What ``generate_samples`` needs besides prompts, seeds and resolution."""

    encode_text: Callable[[list[str]], dict[str, Tensor]]  # captions -> conditioning (models/text.py)
    decode: Callable[[Tensor], Tensor]
    in_channels: int
    latent_factor: int
    objective: Objective  # samples with its sampler; the trainer sets the current stage's
    frames: int = 0  # video presets: frames per validation clip (0: images)
    latent_frames: int = 0  # what the denoiser sees for them (a video VAE's latent frames)
    fps: float | None = None  # the validation clips' frame rate (reference sampling, GIF speed)


class Validator:
    """Holds the extractor and the per-resolution reference statistics for one run."""

    def __init__(self, vcfg, *, grid_prompts: list[str], grid_seed: int, default_shards, sampling: SamplingSpec,
                 rank: int, world_size: int, device: torch.device) -> None:
        self.cfg, self.sampling = vcfg, sampling
        self.grid_prompts, self.grid_seed = list(grid_prompts), grid_seed
        self.shards = expand_shards(vcfg.shards or default_shards)
        self.rank, self.world_size, self.device = rank, world_size, device
        self.extractor = build_feature_extractor(vcfg.feature_extractor, vcfg.inception_weights).to(device).eval()
        self.label: str = self.extractor.label
        self._fids: dict[int, Any] = {}
        self._captions: dict[int, list[str]] = {}
        self._ref_temporal: dict[int, tuple[float, int]] = {}  # video: this rank's reference (sum, count)
        # Optional NSFW gate on the generated images (scaletrain/curate/safety.py), the last check
        # before a model ships; its rate goes into the validation record via `metrics`.
        self.safety = None
        if getattr(vcfg, "safety_model", None):
            from scaletrain.curate.safety import build_safety_classifier

            self.safety = build_safety_classifier(vcfg.safety_model, nsfw_labels=vcfg.safety_nsfw_labels,
                                                  option="validate.safety_model", device=device)
        self.metrics: dict[str, float] = {}  # extra metrics of the last run(), e.g. validation/nsfw_flagged_rate

    def _reference(self, resolution: int):
        """The FID metric for ``resolution`` with this rank's reference features already in it."""
        if resolution not in self._fids:
            start, stop, _ = rank_block(self.cfg.num_images, self.rank, self.world_size)
            s = self.sampling
            pixels, captions = read_reference(self.shards, resolution, self.cfg.num_images, start, stop,
                                              s.frames, s.fps)
            fid = build_fid(self.extractor, self.device)
            if s.frames:  # per-frame FID: every frame of every reference clip
                self._ref_temporal[resolution] = temporal_sums([p.to(self.device) for p in pixels], self.extractor)
                pixels = frames_of(pixels)
            for chunk in pixels.split(self.cfg.batch_size):
                fid.update(chunk.to(self.device), real=True)
            self._fids[resolution], self._captions[resolution] = fid, captions
        return self._fids[resolution], self._captions[resolution]

    def _generate(self, denoise: Denoiser, prompts: list[str], seed: int, resolution: int) -> Tensor:
        s = self.sampling
        return generate_samples(
            denoise, s.encode_text, s.decode, prompts=prompts, resolution=resolution,
            in_channels=s.in_channels, latent_factor=s.latent_factor,
            objective=s.objective, num_inference_steps=self.cfg.steps, guidance_scale=self.cfg.guidance_scale,
            seed=seed, device=self.device, frames=s.latent_frames if s.frames > 1 else 0,
        )

    def run(self, denoise: Denoiser, resolution: int, grid_path: Path | None) -> float:
        """Collective: FID of freshly generated images vs the reference set; writes the grid
        on rank 0 when ``grid_path`` is given. Returns the FID (same on every rank)."""
        with preserve_rng(self.device):
            fid, captions = self._reference(resolution)
            num = self.cfg.num_images
            start, stop, per = rank_block(num, self.rank, self.world_size)
            fid.reset()  # generated statistics only; reset_real_features=False keeps the reference
            flagged, temporal = 0, [0.0, 0]
            for lo in range(0, per, self.cfg.batch_size):
                hi = min(lo + self.cfg.batch_size, per)
                # Global indices past the end are padding: any caption works, the images are dropped.
                prompts = [captions[(start + j) % num] for j in range(lo, hi)]
                images = self._generate(denoise, prompts, self.cfg.seed + start + lo, resolution)
                keep = min(hi, stop - start) - lo
                if keep > 0:
                    kept = images[:keep]
                    if kept.ndim == 5:  # clips: per-frame FID, and their consecutive frames' similarity
                        t_sum, t_count = temporal_sums(kept, self.extractor)
                        temporal = [temporal[0] + t_sum, temporal[1] + t_count]
                        kept = frames_of(kept)
                    fid.update(kept, real=False)
                    flagged += self._count_flagged(kept)
            value = float(fid.compute())
            self.metrics = {}
            if self.safety is not None:  # every rank has the same config, so all join this collective
                total = all_reduce_sum([float(flagged)], self.device)[0]
                self.metrics["validation/nsfw_flagged_rate"] = total / num
            if self.sampling.frames > 1:  # every rank joins: the same config everywhere
                ref = self._ref_temporal.get(resolution, (0.0, 0))
                g_sum, g_n, r_sum, r_n = all_reduce_sum([temporal[0], float(temporal[1]), ref[0], float(ref[1])],
                                                        self.device)
                self.metrics["validation/temporal_consistency"] = g_sum / g_n if g_n else float("nan")
                if r_n:  # the same figure on the reference clips, for scale
                    self.metrics["validation/temporal_consistency_ref"] = r_sum / r_n
            if grid_path is not None:
                grid = self._generate(denoise, self.grid_prompts, self.grid_seed, resolution)
                if self.rank == 0:
                    if grid.ndim == 5:
                        save_video_grid(grid, grid_path.with_suffix(".gif"), fps=self.sampling.fps or 8.0,
                                        captions=self.grid_prompts)
                    else:
                        save_image_grid(grid, grid_path, captions=self.grid_prompts)
        return value

    def _count_flagged(self, images: Tensor) -> int:
        """Generated images (in [-1, 1]) the safety classifier flags (p(nsfw) > validate.safety_threshold)."""
        if self.safety is None:
            return 0
        from scaletrain.curate.models import tensor_to_pil

        return sum(p > self.cfg.safety_threshold for p in self.safety.score(tensor_to_pil(images)))


def validation_record(step: int, label: str, value: float, seconds: float, images: int, resolution: int,
                      ema: bool, extra: Mapping[str, float] | None = None) -> dict:
    """The metrics.jsonl record of one validation (rank 0 writes it); ``extra`` = ``Validator.metrics``."""
    return {"step": step, "validation": True, label: value, "val_seconds": seconds, "val_images": images,
            "val_resolution": resolution, "val_ema": ema, **(extra or {})}

