"""NSFW safety classifier: p(nsfw) per image, for training shards and generated validation samples.

Any transformers image classifier works (``AutoModelForImageClassification`` from a local
folder, e.g. a ViT fine-tuned for NSFW detection): p(nsfw) is the softmax mass on the labels
named NSFW (``nsfw_labels``; by default any label containing one of ``DEFAULT_NSFW_WORDS``).
A sample is flagged when p(nsfw) > threshold (inclusive keep, like ``data.filters.max_punsafe``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from scaletrain.curate.models import build_tiny_classifier, load_image_processor, pil_to_tensor, require_local_dir
from scaletrain.curate.shards import Sample

DEFAULT_NSFW_WORDS = ("nsfw", "porn", "hentai", "sexy", "explicit", "unsafe", "nude")
SAFETY_KEY = "safety_nsfw"  # metadata field the scores are written to


class SafetyClassifier(Protocol):
    def score(self, images: list[Image.Image]) -> list[float]:
        """p(nsfw) in [0, 1] per image."""
        ...


class HFSafetyClassifier:
    """An ``AutoModelForImageClassification`` (a local folder, or a model object for tests)."""

    def __init__(self, model, *, image_processor=None, nsfw_labels: list[str] | None = None,
                 device: str | torch.device = "cpu", label: str = "model") -> None:
        self.model, self.processor, self.label = model.eval(), image_processor, label
        self.device = torch.device(device)
        self.model.to(self.device)
        id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
        if nsfw_labels:
            unknown = sorted(set(nsfw_labels) - set(id2label.values()))
            if unknown:
                raise ValueError(f"--nsfw-labels {unknown} are not labels of the model; it has "
                                 f"{sorted(id2label.values())}")
            self.nsfw_ids = [i for i, name in id2label.items() if name in nsfw_labels]
        else:
            self.nsfw_ids = [i for i, name in id2label.items()
                             if any(w in name.lower() for w in DEFAULT_NSFW_WORDS)]
        if not self.nsfw_ids:
            raise ValueError(f"the safety model's labels {sorted(id2label.values())} name no NSFW class; "
                             "pass --nsfw-labels LABEL[,LABEL] (validate.safety_nsfw_labels in a recipe)")

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> "HFSafetyClassifier":
        from transformers import AutoModelForImageClassification

        folder = require_local_dir(path, kwargs.pop("option", "--model"))
        model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True)
        return cls(model, image_processor=load_image_processor(folder), label=str(path), **kwargs)

    @torch.no_grad()
    def score(self, images: list[Image.Image]) -> list[float]:
        if self.processor is not None:
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        else:
            pixels = pil_to_tensor(images, int(self.model.config.image_size))
        logits = self.model(pixel_values=pixels.to(self.device)).logits.float()
        return logits.softmax(-1)[:, self.nsfw_ids].sum(-1).clamp(0, 1).tolist()


def build_safety_classifier(spec: str, *, nsfw_labels: list[str] | None = None, option: str = "--model",
                            device: str | torch.device = "cpu") -> HFSafetyClassifier:
    """'tiny' -> the seeded config-built ViT (tests/demos: its scores mean nothing); else a local folder."""
    if spec == "tiny":
        return HFSafetyClassifier(build_tiny_classifier(), nsfw_labels=nsfw_labels, device=device, label="tiny")
    return HFSafetyClassifier.from_pretrained(spec, nsfw_labels=nsfw_labels, device=device, option=option)


class SafetyStage:
    """Curation stage: write ``safety_nsfw`` into the metadata; drop flagged samples (rule
    ``safety_nsfw``) unless ``keep_flagged`` (score only)."""

    name = "safety"
    rules = (SAFETY_KEY,)
    needs_image = True

    def __init__(self, classifier: SafetyClassifier, threshold: float, *, keep_flagged: bool = False,
                 label: str = "model") -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"--threshold={threshold} must be a probability in [0, 1], e.g. 0.5")
        self.classifier, self.threshold, self.keep_flagged, self.label = classifier, threshold, keep_flagged, label
        self.counters: dict[str, float] = {"scored": 0, "flagged": 0, "score_sum": 0.0}

    def __call__(self, batch: list[Sample]) -> list[str | None]:
        scores = self.classifier.score([s.image() for s in batch])
        reasons: list[str | None] = []
        for sample, p in zip(batch, scores, strict=True):
            p = round(float(p), 6)  # decide on the stored value, so metadata and report agree
            sample.meta[SAFETY_KEY] = p
            flagged = p > self.threshold
            self.counters["scored"] += 1
            self.counters["flagged"] += flagged
            self.counters["score_sum"] += p
            reasons.append(SAFETY_KEY if flagged and not self.keep_flagged else None)
        return reasons

    def describe(self, counters: dict[str, float]) -> dict[str, Any]:
        n = counters.get("scored", 0)
        return {"model": self.label, "threshold": self.threshold, "scored": int(n),
                "flagged": int(counters.get("flagged", 0)),
                "flagged_rate": counters.get("flagged", 0) / n if n else 0.0,
                "mean_nsfw": counters.get("score_sum", 0.0) / n if n else 0.0,
                "flagged_dropped": not self.keep_flagged}
