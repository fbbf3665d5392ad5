"""Auto-captioning: rewrite each sample's caption with a pluggable captioner.

The new caption goes into ``KEY.txt`` and ``json["caption"]``; the caption the sample had
before is kept as ``json["original_caption"]`` (only the first rewrite sets it, so re-running
a captioner over curated shards never loses the web alt-text).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from scaletrain.curate.models import require_local_dir
from scaletrain.curate.shards import Sample


class Captioner(Protocol):
    """Images (and their current captions) -> new captions, one per image."""

    def caption(self, images: list[Image.Image], originals: list[str]) -> list[str]: ...


_COLOR_NAMES = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 210, 20),
                "purple": (140, 40, 170), "orange": (245, 130, 20), "black": (20, 20, 20),
                "cyan": (20, 200, 210), "white": (245, 245, 245), "gray": (128, 128, 128)}


class OfflineCaptioner:
    """Deterministic, model-free captions from image statistics: size, brightness and the
    dominant non-background colour ("a 64x64 bright image with mostly red"). For tests and
    pipelines without a VLM; not a substitute for one."""

    def caption(self, images: list[Image.Image], originals: list[str]) -> list[str]:
        return [self._one(im) for im in images]

    @staticmethod
    def _one(image: Image.Image) -> str:
        arr = np.asarray(image.convert("RGB"), dtype=np.float32)
        brightness = "bright" if arr.mean() > 160 else "dark" if arr.mean() < 80 else "mid-tone"
        pixels = arr.reshape(-1, 3)
        # The background of a photo-like image is near-grey; colour lives in saturated pixels.
        saturated = pixels[(pixels.max(1) - pixels.min(1)) > 60]
        mean = (saturated if len(saturated) else pixels).mean(0)
        names = list(_COLOR_NAMES)
        refs = np.array([_COLOR_NAMES[n] for n in names], dtype=np.float32)
        colour = names[int(np.argmin(((refs - mean) ** 2).sum(1)))]
        return f"a {image.width}x{image.height} {brightness} image with mostly {colour}"


class HFCaptioner:
    """A transformers image-to-text model (BLIP, GIT, Florence-2, LLaVA-style...) from a local folder:
    ``AutoModelForImageTextToText`` + ``AutoProcessor``, greedy decoding. ``prompt`` is passed as the
    text input for models that need one and stripped from the output."""

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu", max_new_tokens: int = 40,
                 prompt: str | None = None) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        folder = require_local_dir(path, "--captioner")
        self.device, self.max_new_tokens, self.prompt = torch.device(device), max_new_tokens, prompt
        self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        self.model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
        self.model.to(self.device).eval()

    @torch.no_grad()
    def caption(self, images: list[Image.Image], originals: list[str]) -> list[str]:
        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(images)
        inputs = self.processor(**kwargs).to(self.device)
        ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        if self.prompt:
            texts = [t.removeprefix(self.prompt) for t in texts]
        return [t.strip() for t in texts]


def build_captioner(spec: str, **kwargs: Any) -> Captioner:
    """'offline' -> OfflineCaptioner; anything else is a local model folder for HFCaptioner."""
    return OfflineCaptioner() if spec == "offline" else HFCaptioner(spec, **kwargs)


class CaptionStage:
    """Curation stage: rewrite captions, keep the first original in ``original_caption``. Drops
    samples whose new caption is empty (rule ``empty_caption``): a model that produced nothing
    has not described the image."""

    name = "caption"
    rules = ("empty_caption",)
    needs_image = True

    def __init__(self, captioner: Captioner, label: str) -> None:
        self.captioner, self.label = captioner, label
        self.counters: dict[str, float] = {"captioned": 0, "chars": 0}

    def __call__(self, batch: list[Sample]) -> list[str | None]:
        new = self.captioner.caption([s.image() for s in batch], [s.caption for s in batch])
        if len(new) != len(batch):
            raise RuntimeError(f"captioner {self.label!r} returned {len(new)} captions for {len(batch)} images")
        reasons: list[str | None] = []
        for sample, text in zip(batch, new):
            sample.meta.setdefault("original_caption", sample.caption)
            sample.meta["caption"] = sample.caption = text.strip()
            sample.meta["caption_model"] = self.label
            self.counters["captioned"] += 1
            self.counters["chars"] += len(sample.caption)
            reasons.append(None if sample.caption else "empty_caption")
        return reasons

    def describe(self, counters: dict[str, float]) -> dict[str, Any]:
        n = counters.get("captioned", 0)
        return {"captioner": self.label, "captioned": int(n),
                "mean_caption_chars": counters.get("chars", 0) / n if n else 0.0}
