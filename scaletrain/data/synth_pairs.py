"""Synthetic preference pairs: one caption, a "chosen" image that follows it, a "rejected" one
that breaks it.

Each sample is ``KEY.chosen.EXT`` + ``KEY.rejected.EXT`` + ``KEY.txt`` + ``KEY.json`` (the
webdataset multi-extension layout: the key ends at the first dot of the file name). The rule
is simple enough for a tiny model to pick up in a minute: the caption names one shape, its
colour and its position; the chosen image draws exactly that, the rejected image draws the
same shape on the same background with either the wrong colour or the wrong position. So
"chosen" is decidable from the caption alone, which is what a DPO test needs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Drawing and tar writing are synth.py's, so pairs look exactly like the pre-training shards.
from scaletrain.data.synth import COLORS, POSITIONS, SHAPES, _article, _check_args, _draw_shape, write_tar_shard

RULES = ("wrong_color", "wrong_position")


def _render(obj: dict[str, str], background: tuple[int, int, int], resolution: int, image_format: str) -> bytes:
    image = Image.new("RGB", (resolution, resolution), background)
    fx, fy, _ = POSITIONS[obj["position"]]
    _draw_shape(ImageDraw.Draw(image), obj["shape"], fx * resolution, fy * resolution, resolution * 0.2,
                COLORS[obj["color"]])
    buf = io.BytesIO()
    if image_format == "jpg":
        image.save(buf, format="JPEG", quality=90)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def make_preference_pair(index: int, seed: int, resolution: int, image_format: str = "jpg") -> dict[str, bytes | str]:
    """One pair ``{"__key__", "chosen.EXT", "rejected.EXT", "txt", "json"}`` for ``write_tar_shard``."""
    rng = np.random.default_rng([seed, index, 1])  # per (seed, index): independent of sharding
    chosen = {"shape": str(rng.choice(SHAPES)), "color": str(rng.choice(list(COLORS))),
              "position": str(rng.choice(list(POSITIONS)))}
    rule = RULES[index % len(RULES)]  # alternate, so both rules are equally frequent
    rejected = dict(chosen)
    if rule == "wrong_color":
        rejected["color"] = str(rng.choice([c for c in COLORS if c != chosen["color"]]))
    else:
        rejected["position"] = str(rng.choice([p for p in POSITIONS if p != chosen["position"]]))
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    caption = f"{_article(chosen['color'])} {chosen['color']} {chosen['shape']} {POSITIONS[chosen['position']][2]}"
    key = f"{index:09d}"
    meta = {"key": key, "caption": caption, "rule": rule, "chosen": chosen, "rejected": rejected,
            "width": resolution, "height": resolution}
    return {
        "__key__": key,
        f"chosen.{image_format}": _render(chosen, background, resolution, image_format),
        f"rejected.{image_format}": _render(rejected, background, resolution, image_format),
        "txt": caption,
        "json": json.dumps(meta, sort_keys=True),
    }


def write_preference_shards(
    out_dir: str | Path,
    *,
    num_pairs: int,
    pairs_per_shard: int,
    resolution: int,
    seed: int = 0,
    image_format: str = "jpg",
) -> list[str]:
    """Write ``out_dir/pairs-000000.tar, ...`` plus ``manifest.json``; return the shard paths.

    Deterministic: the same arguments give byte-identical tars.
    """
    if num_pairs < 1 or pairs_per_shard < 1:
        raise ValueError(f"num_pairs={num_pairs}, pairs_per_shard={pairs_per_shard}: both must be >= 1")
    _check_args(num_pairs, pairs_per_shard, resolution, image_format)  # resolution and format
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[str] = []
    for shard_idx, start in enumerate(range(0, num_pairs, pairs_per_shard)):
        path = out / f"pairs-{shard_idx:06d}.tar"
        stop = min(start + pairs_per_shard, num_pairs)
        write_tar_shard(path, [make_preference_pair(i, seed, resolution, image_format) for i in range(start, stop)])
        shards.append(str(path))
    manifest = {"num_pairs": num_pairs, "pairs_per_shard": pairs_per_shard, "shards": [Path(s).name for s in shards],
                "resolution": resolution, "seed": seed, "image_format": image_format, "rules": list(RULES)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return shards
