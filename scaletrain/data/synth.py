"""Synthetic captioned shards in the img2dataset / LAION layout.

Each sample is ``KEY.jpg`` (or ``.png``) + ``KEY.txt`` (caption) + ``KEY.json``
(img2dataset-like metadata plus synthetic quality scores that the curation
filters read). Images are one or two coloured shapes at named positions, so the
caption is exactly derivable from the pixels: a tiny text-to-image model can
learn the mapping in minutes, which makes end-to-end tests meaningful.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
    "black": (20, 20, 20),
    "cyan": (20, 200, 210),
}
# (x, y) centre as a fraction of the image side, and the caption phrase.
POSITIONS: dict[str, tuple[float, float, str]] = {
    "left": (0.25, 0.5, "on the left"),
    "right": (0.75, 0.5, "on the right"),
    "top": (0.5, 0.25, "at the top"),
    "bottom": (0.5, 0.75, "at the bottom"),
    "center": (0.5, 0.5, "in the center"),
}
_FORMATS = ("jpg", "png")
VIDEO_FORMATS = ("mp4", "webm")
# Motions of ``--video`` clips: direction the shape moves in, as (dx, dy) per clip length.
MOTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
}


def write_tar_shard(path: str | Path, samples: list[dict[str, bytes | str]]) -> None:
    """Write ``samples`` (each ``{"__key__": KEY, EXT: bytes, ...}``) to a tar.

    Hand-written instead of ``webdataset.TarWriter`` because TarWriter stamps the
    current time into every member, so two runs would never be byte-identical.
    """
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = str(sample["__key__"])
            for ext, payload in sample.items():
                if ext == "__key__":
                    continue
                data = payload.encode("utf-8") if isinstance(payload, str) else payload
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, fill: tuple[int, int, int]
) -> None:
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def image_size(resolution: int, aspect_ratio: float | None) -> tuple[int, int]:
    """(width, height) of a synthetic image: square, or the shorter side ``resolution`` and the
    longer one stretched to ``aspect_ratio`` = width / height."""
    if aspect_ratio is None or aspect_ratio == 1.0:
        return resolution, resolution
    if aspect_ratio > 1.0:
        return round(resolution * aspect_ratio), resolution
    return resolution, round(resolution / aspect_ratio)


def make_synthetic_sample(
    index: int, seed: int, resolution: int, image_format: str = "jpg", label: str | None = None,
    aspect_ratio: float | None = None,
) -> dict[str, bytes | str]:
    """One sample ``{"__key__", EXT, "txt", "json"}`` ready for ``write_tar_shard``; ``label``
    (for class-balancing tests) goes into the metadata as ``"label"``. ``aspect_ratio`` (width /
    height) makes a non-square image; shapes keep their positions as fractions of each side,
    so the caption still describes it."""
    # One RNG per (seed, index): a sample's content does not depend on how many
    # samples share its shard, so re-sharding the same seed gives the same data.
    rng = np.random.default_rng([seed, index])
    num_objects = 1 if rng.random() < 0.7 else 2
    positions = rng.choice(list(POSITIONS), size=num_objects, replace=False)
    objects = [
        {"shape": str(rng.choice(SHAPES)), "color": str(rng.choice(list(COLORS))), "position": str(p)}
        for p in positions
    ]
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    width, height = image_size(resolution, aspect_ratio)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    half = min(width, height) * (0.2 if num_objects == 1 else 0.11)  # two shapes must not touch
    for obj in objects:
        fx, fy, _ = POSITIONS[obj["position"]]
        _draw_shape(draw, obj["shape"], fx * width, fy * height, half, COLORS[obj["color"]])
    caption = " and ".join(
        f"{_article(o['color'])} {o['color']} {o['shape']} {POSITIONS[o['position']][2]}" for o in objects
    )

    buf = io.BytesIO()
    if image_format == "jpg":
        image.save(buf, format="JPEG", quality=90)
    else:
        image.save(buf, format="PNG")
    key = f"{index:09d}"
    meta = {
        "key": key,
        "url": f"synthetic://seed{seed}/{key}",
        "caption": caption,
        "status": "success",
        "error_message": None,
        "width": width,
        "height": height,
        "original_width": width,
        "original_height": height,
        **objects[0],
        "objects": objects,
        # Quality scores in LAION's ranges so curation filters have something to cut.
        "aesthetic": round(float(rng.uniform(4.0, 7.0)), 4),
        "punsafe": round(float(rng.uniform(0.0, 0.2)), 4),
        "pwatermark": round(float(rng.uniform(0.0, 0.5)), 4),
    }
    if label is not None:  # only when asked, so unlabelled shards stay byte-identical
        meta["label"] = label
    meta_json = json.dumps(meta, sort_keys=True)
    return {"__key__": key, image_format: buf.getvalue(), "txt": caption, "json": meta_json}


def make_synthetic_video_sample(index: int, seed: int, resolution: int, frames: int, fps: int,
                                video_format: str = "mp4") -> dict[str, bytes | str]:
    """One clip ``{"__key__", "mp4"|"webm", "txt", "json"}``: a coloured shape crossing the frame
    at constant speed, captioned with how it moves ("a red circle moving left"). The caption is
    exactly derivable from the frames, and the direction only from several of them, so a video
    model has to use the time axis to learn it."""
    from scaletrain.data.video import encode_video

    rng = np.random.default_rng([seed, index, 0x7D])
    shape, color = str(rng.choice(SHAPES)), str(rng.choice(list(COLORS)))
    motion = str(rng.choice(list(MOTIONS)))
    dx, dy = MOTIONS[motion]
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    half = resolution * 0.15
    travel = resolution * 0.5  # from 1/4 to 3/4 of the side over the clip
    imgs = []
    for f in range(frames):
        t = f / max(frames - 1, 1) - 0.5
        img = Image.new("RGB", (resolution, resolution), background)
        _draw_shape(ImageDraw.Draw(img), shape, resolution / 2 + dx * travel * t, resolution / 2 + dy * travel * t,
                    half, COLORS[color])
        imgs.append(img)
    caption = f"{_article(color)} {color} {shape} moving {motion}"
    key = f"{index:09d}"
    meta = {
        "key": key, "url": f"synthetic://seed{seed}/{key}", "caption": caption, "status": "success",
        "error_message": None, "width": resolution, "height": resolution, "original_width": resolution,
        "original_height": resolution, "shape": shape, "color": color, "motion": motion,
        # the video fields video2dataset writes
        "fps": fps, "frames": frames, "duration": frames / fps,
        "aesthetic": round(float(rng.uniform(4.0, 7.0)), 4), "punsafe": round(float(rng.uniform(0.0, 0.2)), 4),
        "pwatermark": round(float(rng.uniform(0.0, 0.5)), 4),
    }
    return {"__key__": key, video_format: encode_video(imgs, fps, video_format), "txt": caption,
            "json": json.dumps(meta, sort_keys=True)}


def write_synthetic_video_shards(out_dir: str | Path, *, num_samples: int, samples_per_shard: int, resolution: int,
                                 frames: int = 16, fps: int = 8, seed: int = 0, video_format: str = "mp4") -> list[str]:
    """``scaletrain data synth --video``: shards of moving-shape clips plus ``manifest.json``."""
    _check_args(num_samples, samples_per_shard, resolution, "jpg")
    if resolution % 2:
        raise ValueError(f"resolution={resolution} must be even for yuv420p video; e.g. 64")
    if frames < 2 or fps < 1:
        raise ValueError(f"frames={frames}, fps={fps}: a video needs frames >= 2 and fps >= 1, e.g. 16 and 8")
    if video_format not in VIDEO_FORMATS:
        raise ValueError(f"video_format={video_format!r} is not supported; use one of {VIDEO_FORMATS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for shard_idx, start in enumerate(range(0, num_samples, samples_per_shard)):
        path = out / f"shard-{shard_idx:06d}.tar"
        write_tar_shard(path, [make_synthetic_video_sample(i, seed, resolution, frames, fps, video_format)
                               for i in range(start, min(start + samples_per_shard, num_samples))])
        shards.append(str(path))
    manifest = {"num_samples": num_samples, "samples_per_shard": samples_per_shard,
                "shards": [Path(s).name for s in shards], "resolution": resolution, "seed": seed,
                "video_format": video_format, "frames": frames, "fps": fps}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return shards


def _check_args(num_samples: int, samples_per_shard: int, resolution: int, image_format: str,
                aspect_ratios: list[float] | None = None) -> None:
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1; pass a positive sample count")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1; e.g. 1000 as img2dataset does")
    if resolution < 8:
        raise ValueError(f"resolution={resolution} is too small to draw shapes; use >= 8 (e.g. 64)")
    if image_format not in _FORMATS:
        raise ValueError(f"image_format={image_format!r} is not supported; use one of {_FORMATS}")
    if aspect_ratios is not None and (not aspect_ratios or any(not 0.1 <= a <= 10 for a in aspect_ratios)):
        raise ValueError(f"aspect_ratios={aspect_ratios} must be a non-empty list of width/height ratios "
                         "in [0.1, 10], e.g. 1.0 1.5 0.667")


def synthetic_labels(num_samples: int, ratios: dict[str, float], seed: int) -> list[str]:
    """Class of each sample index: exactly round(ratio * n) per class (largest remainders),
    in an order shuffled by ``seed`` so every shard holds a mix. Tests recount from this."""
    if not ratios or any(not (r > 0) for r in ratios.values()):
        raise ValueError(f"labels={ratios!r} needs class=ratio pairs with ratios > 0, e.g. cat=0.9,dog=0.1")
    total = sum(ratios.values())
    exact = {c: num_samples * r / total for c, r in ratios.items()}
    counts = {c: int(v) for c, v in exact.items()}
    for c in sorted(exact, key=lambda c: counts[c] - exact[c])[: num_samples - sum(counts.values())]:
        counts[c] += 1
    pool = [c for c in ratios for _ in range(counts[c])]
    order = np.random.default_rng([seed, 0x1ABE1]).permutation(num_samples)
    return [pool[j] for j in order]


def write_synthetic_shards(
    out_dir: str | Path,
    *,
    num_samples: int,
    samples_per_shard: int,
    resolution: int,
    seed: int = 0,
    image_format: str = "jpg",
    labels: dict[str, float] | None = None,
    aspect_ratios: list[float] | None = None,
) -> list[str]:
    """Write ``out_dir/shard-000000.tar, ...`` plus ``manifest.json``; return the shard paths.

    Deterministic: the same arguments give byte-identical tars. ``labels`` (class -> ratio)
    adds a ``"label"`` metadata field with exactly those proportions (``synthetic_labels``).
    ``aspect_ratios`` (width / height) makes sample i non-square with ratio
    ``aspect_ratios[i % len]`` (shorter side = ``resolution``); None keeps every image square.
    """
    _check_args(num_samples, samples_per_shard, resolution, image_format, aspect_ratios)
    classes = synthetic_labels(num_samples, labels, seed) if labels is not None else [None] * num_samples
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[str] = []
    for shard_idx, start in enumerate(range(0, num_samples, samples_per_shard)):
        stop = min(start + samples_per_shard, num_samples)
        path = out / f"shard-{shard_idx:06d}.tar"
        samples = [make_synthetic_sample(i, seed, resolution, image_format, classes[i],
                                         aspect_ratios[i % len(aspect_ratios)] if aspect_ratios else None)
                   for i in range(start, stop)]
        write_tar_shard(path, samples)
        shards.append(str(path))
    manifest = {
        "num_samples": num_samples,
        "samples_per_shard": samples_per_shard,
        "shards": [Path(s).name for s in shards],
        "resolution": resolution,
        "seed": seed,
        "image_format": image_format,
    }
    if labels is not None:
        manifest["labels"] = {c: classes.count(c) for c in labels}
    if aspect_ratios:  # only when given, so the default manifest stays byte-identical
        manifest["aspect_ratios"] = list(aspect_ratios)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return shards


def parse_labels(text: str) -> dict[str, float]:
    """``"cat=0.9,dog=0.1"`` -> {"cat": 0.9, "dog": 0.1} (the --labels flag)."""
    out: dict[str, float] = {}
    for part in text.split(","):
        name, _, ratio = part.partition("=")
        try:
            out[name.strip()] = float(ratio)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--labels {text!r}: write CLASS=RATIO pairs, e.g. cat=0.9,dog=0.1") from None
        if not name.strip() or not out[name.strip()] > 0:
            raise argparse.ArgumentTypeError(f"--labels {text!r}: each class needs a name and a ratio > 0")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m scaletrain.data.synth --out DIR ...``; mirrors ``scaletrain data synth``."""
    parser = argparse.ArgumentParser(description="Write synthetic captioned webdataset shards.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=_FORMATS, default="jpg")
    parser.add_argument("--labels", type=parse_labels, default=None, metavar="CLASS=RATIO,...",
                        help="add a metadata 'label' with these proportions, e.g. cat=0.9,dog=0.1")
    parser.add_argument("--aspect-ratios", type=float, nargs="+", default=None, metavar="W/H",
                        help="width/height ratios cycled over the samples, e.g. 1.0 1.5 0.667 (default: square)")
    parser.add_argument("--video", action="store_true",
                        help="write clips of a shape moving left/right/up/down (KEY.mp4), captioned with the motion")
    parser.add_argument("--frames", type=int, default=16, help="--video: frames per clip (default 16)")
    parser.add_argument("--fps", type=int, default=8, help="--video: frame rate (default 8)")
    parser.add_argument("--video-format", choices=VIDEO_FORMATS, default="mp4")
    args = parser.parse_args(argv)
    if args.video:
        write_synthetic_video_shards(args.out, num_samples=args.num_samples, samples_per_shard=args.per_shard,
                                     resolution=args.resolution, frames=args.frames, fps=args.fps, seed=args.seed,
                                     video_format=args.video_format)
        return 0
    write_synthetic_shards(
        args.out,
        num_samples=args.num_samples,
        samples_per_shard=args.per_shard,
        resolution=args.resolution,
        seed=args.seed,
        image_format=args.format,
        labels=args.labels,
        aspect_ratios=args.aspect_ratios,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
