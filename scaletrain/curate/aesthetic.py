"""Aesthetic scorer: an MLP head over frozen, L2-normalised image embeddings (the LAION
aesthetic predictor's recipe), trained on rated images, used to score shards.

The encoder is a transformers vision model from a local folder (a CLIP checkpoint gives
``CLIPVisionModelWithProjection.image_embeds``; another vision ``AutoModel`` gives its pooled
output) or the seeded config-built tiny CLIP (``tiny``) offline. Embeddings are computed once
and cached in memory for training: the encoder is frozen, so re-running it every epoch would
only burn time. The saved head folder holds ``head.safetensors`` and ``head.json`` (encoder
reference, widths, the training report), which is all ``aesthetic-score`` needs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from scaletrain.curate.models import (build_tiny_clip_vision, load_image_processor, pil_to_tensor,
                                      require_local_dir)
from scaletrain.curate.shards import Sample
from scaletrain.data.samples import open_image

AESTHETIC_KEY = "aesthetic"  # what data.filters.min_aesthetic reads
LAION_WIDTHS = (1024, 128, 64, 16)


class ImageEmbedder:
    """Frozen image encoder -> (N, D) L2-normalised float32 embeddings."""

    def __init__(self, spec: str, *, device: str | torch.device = "cpu") -> None:
        self.spec, self.device = spec, torch.device(device)
        if spec == "tiny":
            self.model, self.processor = build_tiny_clip_vision(), None
        else:
            folder = require_local_dir(spec, "--encoder")
            from transformers import AutoConfig, AutoModel, CLIPVisionModelWithProjection

            model_type = AutoConfig.from_pretrained(folder, local_files_only=True).model_type
            cls = CLIPVisionModelWithProjection if model_type in ("clip", "clip_vision_model") else AutoModel
            self.model = cls.from_pretrained(folder, local_files_only=True)
            self.processor = load_image_processor(folder)
        self.model.to(self.device).eval().requires_grad_(False)
        cfg = getattr(self.model.config, "vision_config", self.model.config)
        self.image_size = int(getattr(cfg, "image_size", 224))

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        if self.processor is not None:
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        else:
            pixels = pil_to_tensor(images, self.image_size)
        out = self.model(pixel_values=pixels.to(self.device))
        emb = getattr(out, "image_embeds", None)  # CLIP: the projected embedding LAION's head was trained on
        if emb is None:
            emb = getattr(out, "pooler_output", None)
        if emb is None:
            emb = out.last_hidden_state.mean(1)
        emb = emb.float().flatten(1)
        return torch.nn.functional.normalize(emb, dim=-1).cpu()

    @property
    def dim(self) -> int:
        return int(self.embed([Image.new("RGB", (self.image_size, self.image_size))]).shape[1])


class AestheticHead(nn.Module):
    """LAION-aesthetic-predictor widths (1024-128-64-16-1) and dropouts. The original has no
    activations (a deep linear map); we put GELUs between the layers so it can fit a
    non-linear rating. The output bias starts at the training mean rating."""

    def __init__(self, dim: int, widths: tuple[int, ...] = LAION_WIDTHS, dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = dim
        for i, w in enumerate(widths):
            layers += [nn.Linear(prev, w), nn.GELU()]
            if i < len(widths) - 1:
                layers.append(nn.Dropout(dropout if i < 2 else dropout / 2))
            prev = w
        layers.append(nn.Linear(prev, 1))
        self.layers = nn.Sequential(*layers)
        self.dim, self.widths = dim, tuple(widths)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb).squeeze(-1)


# ------------------------------------------------------------------ rated data


def read_rated(path: str | Path) -> list[tuple[Path, float]]:
    """(image path, rating) pairs from a JSONL file, or a folder holding ``ratings.jsonl``. Each line:
    ``{"image": "relative/or/absolute.jpg", "rating": 6.5}``; relative paths are from the file's folder."""
    p = Path(path)
    file = p / "ratings.jsonl" if p.is_dir() else p
    if not file.is_file():
        raise ValueError(f"--rated={str(path)!r}: no such JSONL file or folder with ratings.jsonl; write lines "
                         '{"image": PATH, "rating": NUMBER}')
    pairs = []
    for n, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or "image" not in row or not isinstance(row.get("rating"), (int, float)):
            raise ValueError(f"{file}:{n}: expected {{\"image\": PATH, \"rating\": NUMBER}}, got {line[:80]!r}")
        img = Path(row["image"])
        pairs.append((img if img.is_absolute() else file.parent / img, float(row["rating"])))
    if len(pairs) < 4:
        raise ValueError(f"--rated={str(path)!r} holds {len(pairs)} rated images; need at least 4 (train + held-out)")
    return pairs


def synthetic_rating(image: Image.Image) -> float:
    """Deterministic 'aesthetic' rating of an image in [1, 10]: 1 + 9 x its mean HSV saturation x 2
    (clipped), so colourful images rate high. Ground truth for the synthetic rated set."""
    sat = np.asarray(image.convert("HSV"), dtype=np.float32)[..., 1].mean() / 255.0
    return float(round(1.0 + 9.0 * min(1.0, 2.0 * sat), 4))


def write_synthetic_rated_set(out_dir: str | Path, *, num_images: int = 256, resolution: int = 32,
                              seed: int = 0) -> Path:
    """Synthetic shapes images (``data.synth``) + ``ratings.jsonl`` from ``synthetic_rating``; returns the JSONL."""
    from scaletrain.data.synth import make_synthetic_sample

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(num_images):
        sample = make_synthetic_sample(i, seed, resolution, "png")
        image = open_image(sample["png"]).convert("RGB")
        name = f"images/{i:06d}.png"
        image.save(out / name)
        lines.append(json.dumps({"image": name, "rating": synthetic_rating(image)}))
    (out / "ratings.jsonl").write_text("\n".join(lines) + "\n")
    return out / "ratings.jsonl"


# ------------------------------------------------------------------ training


def _mse(head: AestheticHead, emb: torch.Tensor, y: torch.Tensor) -> float:
    head.eval()
    with torch.no_grad():
        return float(((head(emb) - y) ** 2).mean())


def train_head(emb: torch.Tensor, ratings: torch.Tensor, *, heldout_fraction: float = 0.2, epochs: int = 150,
               lr: float = 3e-3, batch_size: int = 256, weight_decay: float = 0.0,
               seed: int = 0) -> tuple[AestheticHead, dict[str, Any]]:
    """Train on a seeded split; returns the head and a report with train/held-out MSE before and after,
    and the held-out MSE of predicting the training mean (what the images must beat)."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"--heldout={heldout_fraction} must be in (0, 1), e.g. 0.2")
    n = len(ratings)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_held = max(1, round(n * heldout_fraction))
    held, train = perm[:n_held], perm[n_held:]
    if len(train) < 2:
        raise ValueError(f"{n} rated images leave {len(train)} for training; add images or lower --heldout")
    xt, yt, xh, yh = emb[train], ratings[train], emb[held], ratings[held]
    torch.manual_seed(seed)
    head = AestheticHead(emb.shape[1])
    with torch.no_grad():
        head.layers[-1].bias.fill_(float(yt.mean()))
    report: dict[str, Any] = {"train_images": len(train), "heldout_images": n_held,
                              "train_loss_before": _mse(head, xt, yt), "heldout_loss_before": _mse(head, xh, yh),
                              "heldout_loss_mean_predictor": float(((yh - yt.mean()) ** 2).mean())}
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        head.train()
        for idx in torch.randperm(len(train), generator=g).split(batch_size):
            loss = ((head(xt[idx]) - yt[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    report.update(train_loss_after=_mse(head, xt, yt), heldout_loss_after=_mse(head, xh, yh), epochs=epochs, lr=lr)
    return head.eval(), report


def embed_rated(embedder: ImageEmbedder, pairs: list[tuple[Path, float]],
                batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    embs = []
    for lo in range(0, len(pairs), batch_size):
        images = [open_image(Path(p).read_bytes()).convert("RGB") for p, _ in pairs[lo:lo + batch_size]]
        embs.append(embedder.embed(images))
    return torch.cat(embs), torch.tensor([r for _, r in pairs], dtype=torch.float32)


def save_head(head: AestheticHead, out_dir: str | Path, encoder: str, report: dict[str, Any]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / "head.safetensors"))
    meta = {"encoder": encoder, "dim": head.dim, "widths": list(head.widths), "training": report}
    (out / "head.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_head(head_dir: str | Path, *, encoder: str | None = None,
              device: str | torch.device = "cpu") -> tuple[AestheticHead, ImageEmbedder]:
    """The head and its frozen encoder (``encoder`` overrides the stored reference, e.g. a moved folder)."""
    d = Path(head_dir)
    if not (d / "head.json").is_file() or not (d / "head.safetensors").is_file():
        raise ValueError(f"--head={str(head_dir)!r} has no head.json + head.safetensors; "
                         "train one with `scaletrain curate aesthetic-train`")
    meta = json.loads((d / "head.json").read_text())
    head = AestheticHead(int(meta["dim"]), tuple(meta["widths"]))
    head.load_state_dict(load_file(str(d / "head.safetensors")))
    embedder = ImageEmbedder(encoder or meta["encoder"], device=device)
    return head.to(embedder.device).eval(), embedder


class AestheticStage:
    """Curation stage: write ``aesthetic`` (the head's predicted rating) into the metadata."""

    name = "aesthetic"
    rules: tuple[str, ...] = ()
    needs_image = True

    def __init__(self, head: AestheticHead, embedder: ImageEmbedder, label: str) -> None:
        self.head, self.embedder, self.label = head, embedder, label
        self.counters: dict[str, float] = {"scored": 0, "sum": 0.0, "sum_sq": 0.0}

    @torch.no_grad()
    def __call__(self, batch: list[Sample]) -> list[str | None]:
        scores = self.head(self.embedder.embed([s.image() for s in batch]).to(self.embedder.device)).tolist()
        for sample, score in zip(batch, scores, strict=True):
            sample.meta[AESTHETIC_KEY] = round(float(score), 4)
            self.counters["scored"] += 1
            self.counters["sum"] += float(score)
            self.counters["sum_sq"] += float(score) ** 2
        return [None] * len(batch)

    def describe(self, counters: dict[str, float]) -> dict[str, Any]:
        n = counters.get("scored", 0)
        mean = counters.get("sum", 0.0) / n if n else 0.0
        var = max(counters.get("sum_sq", 0.0) / n - mean**2, 0.0) if n else 0.0
        return {"head": self.label, "scored": int(n), "mean": mean, "std": math.sqrt(var)}
