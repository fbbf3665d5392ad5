"""One raw sample's members, decoded: its image and its metadata and caption.

Shared by every reader of image shards: the training loader (``data/pipeline.py``), the
preference-pair loader (``data/pairs.py``), ``scaletrain data encode`` (``data/latents.py``) and
``scaletrain curate`` (``curate/shards.py``); video frames take the images' resize-and-crop rule
(``data/video.py``). Imports nothing from the readers, so each of them can import it.
"""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image

from scaletrain.data.buckets import nearest_bucket

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class ImageTooLarge(ValueError):
    """The image header declares more pixels than allowed (checked before decoding)."""


def decode_image(data: bytes, resolution: int, buckets: tuple[tuple[int, int], ...] = (),
                 max_pixels: int | None = None, *, geometry: bool = False):
    """Bytes -> float32 (3, H, W) in [-1, 1]: resized (bicubic) to cover the target and
    center-cropped to it. The target is R x R, or with ``buckets`` the (W, H) bucket whose
    aspect ratio is nearest the image's. ``max_pixels``: raise ``ImageTooLarge`` from the header
    (PIL opens lazily), before any pixel is decoded. ``geometry``: also return the image's
    (original height, original width, crop top, crop left) as a long tensor (crop offsets in the
    resized image), what SDXL micro-conditions on (``crop_top_left`` in diffusers' SDXL trainer)."""
    with Image.open(io.BytesIO(data)) as img:
        if max_pixels is not None and img.size[0] * img.size[1] > max_pixels:
            raise ImageTooLarge(f"{img.size[0]}x{img.size[1]} pixels")
        img = img.convert("RGB")
    w, h = img.size
    tw, th = buckets[nearest_bucket(w, h, buckets)] if buckets else (resolution, resolution)
    cropped, (left, top) = resize_crop(img, tw, th, offsets=True)
    arr = np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(arr.transpose(2, 0, 1).copy())
    return (pixels, torch.tensor([h, w, top, left], dtype=torch.long)) if geometry else pixels


def resize_crop(img: Image.Image, tw: int, th: int, *, offsets: bool = False):
    """Resize (bicubic) to cover (tw, th), then center-crop to it: images and video frames alike.
    ``offsets``: also return the crop's (left, top) in the resized image."""
    w, h = img.size
    scale = max(tw / w, th / h)  # = R / min(w, h) for the square target
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    if (nw, nh) != (w, h):
        # PIL widens the bicubic kernel when downscaling, i.e. it antialiases.
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - tw) // 2, (nh - th) // 2
    out = img.crop((left, top, left + tw, top + th))
    return (out, (left, top)) if offsets else out


def read_meta_caption(raw: dict) -> tuple[dict, str] | None:
    """(metadata, caption) of a raw sample, or None when its ``.json`` is not a JSON object.

    The caption is ``.txt``, else the metadata's ``caption``, else "" (still trainable).
    Shared by the training loader, the preference-pair loader, ``data encode`` and ``scaletrain curate``."""
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict):
        return None
    if "txt" in raw:
        return meta, raw["txt"].decode("utf-8", errors="replace").strip()
    return meta, str(meta.get("caption") or "")
