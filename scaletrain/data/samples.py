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

# Untrusted image bytes are decoded only by these PIL plugins, whatever a member's name says:
# PIL's own decoders, in process. ``data.image_formats`` may add from ``EXTRA_IMAGE_FORMATS``;
# never EPS/PS (PIL hands those to Ghostscript, an external program) or PDF/formats PIL can
# only write. A member in any other format fails to open and counts as corrupt.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
EXTRA_IMAGE_FORMATS = ("GIF", "BMP", "TIFF", "PPM", "TGA")


class ImageTooLarge(ValueError):
    """The image header declares more pixels than allowed (checked before decoding)."""


def image_formats(extra: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """The PIL formats an image member may be decoded by: the defaults and ``extra``
    (``data.image_formats``); a format outside ``EXTRA_IMAGE_FORMATS`` is a one-line ValueError."""
    bad = [f for f in extra if f.upper() not in EXTRA_IMAGE_FORMATS]
    if bad:
        raise ValueError(f"data.image_formats={list(extra)!r}: {', '.join(bad)} is not a format scaletrain decodes "
                         f"(JPEG, PNG and WebP always; add any of {', '.join(EXTRA_IMAGE_FORMATS)}; never EPS or PS, "
                         "which PIL decodes by running Ghostscript)")
    return IMAGE_FORMATS + tuple(f.upper() for f in extra if f.upper() not in IMAGE_FORMATS)


def open_image(data: bytes, formats: tuple[str, ...] = IMAGE_FORMATS) -> Image.Image:
    """Open untrusted image bytes with the allow-listed PIL decoders only (``formats``): the one
    place scaletrain opens shard images. Raises (PIL's UnidentifiedImageError) for anything else."""
    return Image.open(io.BytesIO(data), formats=list(formats))


def decode_image(data: bytes, resolution: int, buckets: tuple[tuple[int, int], ...] = (),
                 max_pixels: int | None = None, *, geometry: bool = False, formats: tuple[str, ...] = IMAGE_FORMATS):
    """Bytes -> float32 (3, H, W) in [-1, 1]: resized (bicubic) to cover the target and
    center-cropped to it. The target is R x R, or with ``buckets`` the (W, H) bucket whose
    aspect ratio is nearest the image's. ``max_pixels``: raise ``ImageTooLarge`` from the header
    (PIL opens lazily), before any pixel is decoded. ``geometry``: also return the image's
    (original height, original width, crop top, crop left) as a long tensor (crop offsets in the
    resized image), what SDXL micro-conditions on (``crop_top_left`` in diffusers' SDXL trainer).
    ``formats``: the PIL decoders allowed (``open_image``)."""
    with open_image(data, formats) as img:
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
