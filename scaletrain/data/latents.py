"""Precomputed latents: ``scaletrain data encode`` and the shards it writes.

Real-size training spends most of a step in the frozen VAE and text encoder when they run
online (SD-2 at 256 px: the VAE encoder alone costs about as much as the UNet's forward).
``data encode`` runs them once: for every image sample it stores the VAE posterior's mean and
log-variance (so training still draws a fresh posterior sample per step, keyed by (seed, step,
key) like the diffusion noise, and the online and precomputed paths give the same latents) and
the text conditioner's outputs (every tensor the family conditions on: caption states, mask,
pooled vector), keeping the key, the caption and the ``.json`` metadata byte
for byte (filters, mixing, class balancing and provenance read them as before).

Layout of ``OUT`` (one folder per resolution, so a curriculum points every stage at ``OUT``)::

    OUT/256px/encoding.json              what encoded it (preset, encoder identity, resolution,
                                         buckets, VAE scaling, dtype); written first
    OUT/256px/empty_caption.safetensors  the "" embedding, for caption dropout
    OUT/256px/<input shard name>.tar     KEY.latents.safetensors (mean, logvar, geometry: the
                                         image's original height, width and crop top, left; the
                                         conditioning as cond.<field>: cond.text_emb, cond.text_mask,
                                         cond.pooled, ...) + KEY.txt + KEY.json + other non-image members
    OUT/256px/manifest.json              written last: samples, corrupt, complete

A shard is written to ``NAME.tar.partial`` and renamed when complete, so an interrupted run
resumes from the shards it finished (a rerun skips them). Everything is read back with
safetensors and JSON: nothing in a shard can run code. Why not webdataset's ``.pth``/``.npy``
decoders: the first is a pickle, and one safetensors member keeps a sample's tensors together
with their dtypes.

Under torchrun each rank encodes input shards i mod world (its share) in parallel, with a
progress bar on rank 0; rank 0 writes the manifest after a gather.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from scaletrain.common.ranks import barrier, rank_world
from scaletrain.common.tars import TarWriter, batched, expand_shards, is_url, read_shard
from scaletrain.data.samples import IMAGE_EXTS, decode_image, image_formats, read_meta_caption

if TYPE_CHECKING:
    from scaletrain.config import RunConfig

FORMAT = "scaletrain-latents"
VERSION = 2  # 2: the conditioning as cond.<field> (several encoders' outputs); 1: text_emb, text_mask
ENCODING_FILE = "encoding.json"
EMPTY_CAPTION_FILE = "empty_caption.safetensors"
MANIFEST_FILE = "manifest.json"
MEMBER = "latents.safetensors"  # the per-sample member: KEY.latents.safetensors


def resolution_folder(root: str | Path, resolution: int) -> Path:
    return Path(root) / f"{resolution}px"


@dataclass(frozen=True)
class Encoding:
    """One encoded folder's ``encoding.json``."""

    folder: Path
    info: dict[str, Any]

    @property
    def resolution(self) -> int:
        return int(self.info["resolution"])

    @property
    def scaling(self) -> tuple[float, float]:
        return float(self.info["scaling_factor"]), float(self.info["shift_factor"])

    def empty_caption(self) -> dict[str, Tensor]:
        """The conditioning of the empty caption (per-sample shapes, masks long)."""
        from scaletrain.common.safe_load import read_safetensors

        return _cond_of(read_safetensors(self.folder / EMPTY_CAPTION_FILE))


def read_encoding(folder: Path) -> Encoding | None:
    """The folder's encoding, None when it holds no ``encoding.json`` (raw image shards)."""
    from scaletrain.common.safe_load import CheckpointLoadError, read_json

    path = folder / ENCODING_FILE
    if not path.is_file():
        return None
    try:
        info = read_json(path)
    except CheckpointLoadError as e:
        raise ValueError(f"{e}; rerun `scaletrain data encode` for this folder") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{path} is not a scaletrain latents encoding; rerun `scaletrain data encode`")
    if info.get("version") != VERSION:
        raise ValueError(f"{path} has format version {info.get('version')!r}, this scaletrain reads {VERSION}; "
                         "re-encode with `scaletrain data encode`")
    return Encoding(folder, info)


def resolve_shards(shards: str | list[str], resolution: int, where: str) -> tuple[list[str], Encoding | None]:
    """Shard urls of a data entry for a stage at ``resolution`` and their encoding (None: images).

    A folder holding ``<resolution>px/encoding.json`` (what ``data encode --out`` writes) stands
    for that subfolder, so one ``data.shards: OUT`` serves every stage of a curriculum. Mixed
    precomputed and raw shards, or folders encoded differently, are a one-line error."""
    items = [shards] if isinstance(shards, (str, Path)) else list(shards)
    mapped = []
    for item in items:
        sub = resolution_folder(str(item), resolution)
        mapped.append(str(sub) if not is_url(str(item)) and (sub / ENCODING_FILE).is_file() else str(item))
    urls = expand_shards(mapped)
    folders: dict[Path, Encoding | None] = {}
    for url in urls:
        folder = Path(url.removeprefix("file:")).parent
        if not is_url(url) and folder not in folders:
            folders[folder] = read_encoding(folder)
    encoded = {f: e for f, e in folders.items() if e is not None}
    raw = [f for f, e in folders.items() if e is None] + [u for u in urls if is_url(u)]
    if encoded and raw:
        raise ValueError(f"{where} mixes precomputed latents ({next(iter(encoded))}) and image shards ({raw[0]}); "
                         "encode all of them with `scaletrain data encode`, or point it at images only")
    if not encoded:
        return urls, None
    first = next(iter(encoded.values()))
    for enc in encoded.values():
        if _comparable(enc.info) != _comparable(first.info):
            raise ValueError(f"{where}: {enc.folder} and {first.folder} were encoded differently "
                             f"({_difference(enc.info, first.info)}); re-encode one of them to match")
    return urls, first


def _comparable(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k not in ("source_shards",)}


def _difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if k != "source_shards" and a.get(k) != b.get(k)]
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:3])


def encoding_info(cfg: "RunConfig", resolution: int) -> dict[str, Any]:
    """What a recipe's encoders produce at ``resolution``: compared with a folder's encoding.json."""
    from scaletrain.models.registry import EncoderSource, encoder_identity, frozen_dtype, get_preset, vae_scaling

    preset = get_preset(cfg.model.preset)
    source = EncoderSource(cfg.model.text_encoder_path, cfg.model.vae_path, cfg.run.seed,
                           frozen_dtype(cfg.engine.precision))
    factor, shift = vae_scaling(_vae_config(preset, cfg.model.vae_path)) if preset.latent else (None, None)
    buckets = cfg.data.buckets.sizes(resolution, preset.downsample_factor) if cfg.data.buckets.enabled else []
    return {
        "format": FORMAT, "version": VERSION, "preset": preset.name,
        **encoder_identity(preset, source),
        "resolution": resolution, "buckets": [list(b) for b in buckets],
        "latent_channels": preset.in_channels, "vae_factor": preset.vae_factor,
        "scaling_factor": factor, "shift_factor": shift,
        "max_text_len": preset.max_text_len, "text_dim": preset.conditioner.text_width,
        "conditioning": {k: list(v) for k, v in preset.conditioner.fields().items()},
    }


def _vae_config(preset, vae_path: str | None) -> dict[str, Any]:
    """The VAE's config without building it: the preset's, or a local folder's config.json."""
    if vae_path is None:
        return dict(preset.vae_config)
    from scaletrain.common.safe_load import CheckpointLoadError, read_json

    for sub in ("vae", "."):
        path = Path(vae_path) / sub / "config.json"
        if path.is_file():
            try:
                return read_json(path)
            except CheckpointLoadError as e:
                raise ValueError(str(e)) from None
    raise ValueError(f"model.vae_path={vae_path!r} holds no config.json (nor vae/config.json); "
                     "give a folder saved with save_pretrained")


# Keys whose disagreement means "another encoder": the recipe must match them exactly.
_MUST_MATCH = ("preset", "text_encoder", "vae", "latent_channels", "vae_factor", "scaling_factor", "shift_factor",
               "max_text_len", "text_dim")


def check_encoding(enc: Encoding, cfg: "RunConfig", resolution: int, where: str) -> None:
    if not (enc.folder / MANIFEST_FILE).is_file():
        raise ValueError(f"{where}: {enc.folder} is not completely encoded (no {MANIFEST_FILE}); rerun the same "
                         "`scaletrain data encode` command, it resumes from the shards it finished")
    want = encoding_info(cfg, resolution)
    got = enc.info
    if got.get("resolution") != resolution or got.get("buckets") != want["buckets"]:
        have = f"resolution {got.get('resolution')}" + (f" with buckets {got.get('buckets')}" if got.get("buckets")
                                                       else "")
        need = f"{resolution}" + (" with data.buckets" if want["buckets"] else "")
        raise ValueError(f"{where}: {enc.folder} was encoded at {have} but this stage trains at {need}; encode at "
                         f"this resolution with `scaletrain data encode --resolution {resolution}` (same data.buckets)")
    for key in _MUST_MATCH:
        if got.get(key) != want[key]:
            raise ValueError(f"{where}: {enc.folder} was encoded with {key}={got.get(key)!r} but this recipe has "
                             f"{want[key]!r} (model.preset, model.text_encoder_path, model.vae_path, run.seed); "
                             "encode with this recipe, or train with the recipe that encoded it")


def check_precomputed(cfg: "RunConfig") -> Encoding | None:
    """Decide, before any process group starts, whether the recipe trains on precomputed latents:
    every stage's shards must agree, match the recipe's encoders and resolution, and the flags
    that need images must be off. Returns stage 0's encoding (for its scaling), or None."""
    found: list[tuple[str, Encoding | None]] = []
    for i, stage in enumerate(cfg.train.stages):
        for where, shards in cfg.stage_shard_sets(i):
            try:
                _, enc = resolve_shards(shards, stage.resolution, where)
            except ValueError as e:
                if "matched no .tar" in str(e):
                    raise ValueError(f"{where}: shards={shards!r} matched no .tar files at {stage.resolution}px; "
                                     "point it at .tar files or an encoded folder") from None
                raise
            if enc is not None:
                check_encoding(enc, cfg, stage.resolution, where)
            found.append((where, enc))
    encoded = [w for w, e in found if e is not None]
    raw = [w for w, e in found if e is None]
    flag = cfg.data.precomputed
    if encoded and raw:
        raise ValueError(f"{encoded[0]} holds precomputed latents but {raw[0]} holds images; encode every "
                         "stage's data with `scaletrain data encode`, or none")
    if flag is True and raw:
        raise ValueError(f"data.precomputed is true but {raw[0]} holds image shards; encode them with "
                         "`scaletrain data encode --config RECIPE --out DIR` and point data.shards at DIR")
    if flag is False and encoded:
        raise ValueError(f"data.precomputed is false but {encoded[0]} holds precomputed latents; point it at the "
                         "image shards, or set data.precomputed: true")
    if not encoded:
        return None
    if cfg.dpo is not None:
        raise ValueError("dpo trains on image pairs; data.precomputed is not supported there yet: point "
                         "data.shards at the preference-pair image shards")
    v = cfg.validate
    if (v.every_steps or v.at_end) and v.shards is None:
        raise ValueError("validate.shards must name image shards when training on precomputed latents (FID "
                         "compares against real images); set validate.shards, or turn validation off")
    return found[0][1]


# ----------------------------------------------------------------------------- reading


COND = "cond."  # member tensor names of the conditioning fields


def _cond_of(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The conditioning fields of a stored member (integer masks as long)."""
    return {k.removeprefix(COND): v if v.is_floating_point() else v.long()
            for k, v in tensors.items() if k.startswith(COND)}


def _member(cond: dict[str, Tensor], **tensors: Tensor) -> bytes:
    return save_safetensors_bytes({**{k: v.contiguous() for k, v in tensors.items()},
                                   **{COND + k: v.contiguous() for k, v in cond.items()}})


def read_sample(raw: dict[str, Any]) -> dict[str, Any] | None:
    """An encoded sample: ``latents`` (mean and logvar along channels) and ``cond`` (the
    conditioning fields), or None when the member is missing or damaged (counted as corrupt,
    like an undecodable image)."""
    if MEMBER not in raw:
        return None
    try:
        t = load_safetensors_bytes(raw[MEMBER])
        cond = _cond_of(t)
        if "text_emb" not in cond:
            return None
        out = {"latents": torch.cat([t["mean"], t["logvar"]]), "cond": cond}
        if "geometry" in t:  # the image's original size and crop (SDXL's micro-conditions)
            out["geometry"] = t["geometry"].long()
        return out
    except Exception:  # noqa: BLE001 - safetensors raises several types on bad bytes
        return None


# ----------------------------------------------------------------------------- encoding


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@dataclass
class _Counts:
    samples: int = 0
    corrupt: int = 0
    shards_written: int = 0
    shards_resumed: int = 0


class Encoder:
    """The recipe's frozen encoders on one device, encoding batches of raw samples."""

    def __init__(self, cfg: "RunConfig", device: torch.device) -> None:
        from scaletrain.models.registry import EncoderSource, build_encoders, frozen_dtype, get_preset

        self.preset = get_preset(cfg.model.preset)
        if not self.preset.latent:
            raise ValueError(f"model.preset={self.preset.name!r} trains in pixel space; data encode is for latent "
                             "presets (unet-tiny-latent, unet-sd2, pixart-xl-2, ...)")
        self.dtype = frozen_dtype(cfg.engine.precision)
        source = EncoderSource(cfg.model.text_encoder_path, cfg.model.vae_path, cfg.run.seed, self.dtype)
        self.text, self.vae = build_encoders(self.preset, source)
        for encoder, _ in self.text:
            encoder.to(device)
        self.vae.to(device)
        self.device = device
        self.formats = image_formats(cfg.data.image_formats)

    @torch.no_grad()
    def text_outputs(self, captions: list[str]) -> dict[str, Tensor]:
        """The conditioner's outputs on the host: floating fields in the encoders' dtype, masks uint8."""
        cond = self.preset.conditioner.encode(self.text, captions, self.device)
        return {k: (v.to(self.dtype) if v.is_floating_point() else v.to(torch.uint8)).cpu() for k, v in cond.items()}

    @torch.no_grad()
    def posterior(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        d = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return d.mean.cpu(), d.logvar.cpu()

    def encode_batch(self, raws: list[dict[str, Any]], resolution: int,
                     buckets: tuple[tuple[int, int], ...]) -> tuple[list[dict[str, Any]], int]:
        """(encoded raw samples in input order, corrupt count) of one batch."""
        kept: list[tuple[dict[str, Any], str, Tensor, Tensor]] = []
        corrupt = 0
        for raw in raws:
            ext = next((e for e in IMAGE_EXTS if e in raw), None)
            parsed = None if raw.get("__corrupt__") or ext is None else read_meta_caption(raw)
            if parsed is None:
                corrupt += 1
                continue
            try:
                pixels, geometry = decode_image(raw[ext], resolution, buckets, geometry=True, formats=self.formats)
            except Exception:  # noqa: BLE001 - PIL raises many types on bad bytes
                corrupt += 1
                continue
            kept.append((raw, parsed[1], pixels, geometry))
        if not kept:
            return [], corrupt
        cond = self.text_outputs([caption for _, caption, _, _ in kept])
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, (_, _, px, _) in enumerate(kept):
            by_shape.setdefault(tuple(px.shape), []).append(i)
        posterior: dict[int, tuple[Tensor, Tensor]] = {}
        for idx in by_shape.values():  # one VAE call per bucket shape
            mean, logvar = self.posterior(torch.stack([kept[i][2] for i in idx]))
            for j, i in enumerate(idx):
                posterior[i] = (mean[j], logvar[j])
        out = []
        for i, (raw, _, _, geometry) in enumerate(kept):
            mean, logvar = posterior[i]
            member = _member({k: v[i] for k, v in cond.items()}, mean=mean, logvar=logvar, geometry=geometry)
            sample = {k: v for k, v in raw.items() if k not in IMAGE_EXTS}
            sample[MEMBER] = member
            out.append(sample)
        return out, corrupt


def encode_dataset(cfg: "RunConfig", shards: str | list[str], out: str | Path, resolutions: list[int], *,
                   batch_size: int = 32, device: torch.device | None = None, progress: bool = True) -> dict[str, Any]:
    """Collective under a process group: encode ``shards`` at each resolution into ``out/<R>px``.
    Resumable: finished shards are kept and skipped. Returns the summary (on every rank)."""
    rank, world = rank_world()
    device = device or torch.device("cpu")
    urls = expand_shards(shards)
    done = next((u for u in urls if not is_url(u) and (Path(u).parent / ENCODING_FILE).is_file()), None)
    if done is not None:
        raise ValueError(f"--shards: {done} is already encoded (encoding.json beside it); give image shards")
    names = [Path(u.removeprefix("file:")).name for u in urls]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"--shards has two shards named {dup!r}; output shards keep their input names, so "
                         "encode each folder into its own --out")
    if batch_size < 1:
        raise ValueError(f"--batch-size={batch_size} must be >= 1")
    infos = {r: {**encoding_info(cfg, r), "source_shards": urls} for r in resolutions}
    # Check every folder before encoding anything (rank 0 decides; the others wait for it).
    for r in resolutions:
        folder = resolution_folder(out, r)
        existing = read_encoding(folder) if folder.is_dir() else None
        if existing is not None and _comparable(existing.info) != _comparable(infos[r]):
            raise ValueError(f"--out: {folder} holds latents encoded differently "
                             f"({_difference(existing.info, infos[r])}); choose a new --out")
    encoder = Encoder(cfg, device)
    summary: dict[str, Any] = {"out": str(out), "world_size": world, "resolutions": {}}
    for r in resolutions:
        folder = resolution_folder(out, r)
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            _write_json(folder / ENCODING_FILE, infos[r])
            empty = encoder.text_outputs([""])
            tmp = folder / (EMPTY_CAPTION_FILE + ".partial")
            tmp.write_bytes(_member({k: v[0] for k, v in empty.items()}))
            os.replace(tmp, folder / EMPTY_CAPTION_FILE)
        barrier(world)
        buckets = tuple(tuple(b) for b in infos[r]["buckets"])
        counts = _Counts()
        mine = list(range(rank, len(urls), world))
        bar = _progress(len(mine), f"encode {r}px", enabled=progress and rank == 0)
        for i in mine:
            target = folder / names[i]
            if target.is_file():
                counts.shards_resumed += 1
                bar.update(1)
                continue
            partial = folder / (names[i] + ".partial")
            writer = TarWriter(partial)
            for raws in batched(read_shard(urls[i]), batch_size):
                encoded, bad = encoder.encode_batch(raws, r, buckets)
                counts.corrupt += bad
                for sample in encoded:
                    writer.write(sample)
            writer.close()
            counts.samples += writer.count
            with open(partial, "rb") as f:
                os.fsync(f.fileno())
            os.replace(partial, target)  # complete: a rerun keeps it
            counts.shards_written += 1
            bar.update(1)
        bar.close()
        gathered: list[Any] = [None] * world
        if world > 1:
            dist.all_gather_object(gathered, counts)
        else:
            gathered = [counts]
        total = _Counts(*(sum(getattr(c, f) for c in gathered) for f in ("samples", "corrupt", "shards_written",
                                                                            "shards_resumed")))
        entry = {"folder": str(folder), "shards": len(urls), "samples_written": total.samples,
                 "corrupt": total.corrupt, "shards_written": total.shards_written,
                 "shards_resumed": total.shards_resumed}
        if rank == 0:
            _write_json(folder / MANIFEST_FILE, {"complete": True, "shards": names, **entry})
        summary["resolutions"][r] = entry
        barrier(world)
    return summary


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="shard", disable=not enabled, file=sys.stderr)
