"""Loading curation models from local folders only, and tiny config-built ones for offline tests.

Nothing here downloads: every ``from_pretrained`` passes ``local_files_only=True`` after
checking that the folder exists, so a typo fails in one line instead of a hub lookup. The
"tiny" models are built from transformers configs with a fixed seed, so tests and demos get
the same real model classes (and the same code path) with deterministic random weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

# CLIP's normalisation; used when a local encoder folder has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def require_local_dir(path: str | Path, option: str) -> Path:
    """``path`` as a Path if it is a folder with a config.json; else ValueError naming ``option``."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise ValueError(f"{option}={str(path)!r} is not a local model folder with config.json; pass a folder "
                         "written by save_pretrained (nothing is downloaded) or 'tiny' for the offline test model")
    return p


def pil_to_tensor(images: list[Image.Image], size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """(N, 3, size, size) float32: bicubic resize of the whole image (no crop), then normalise."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
              for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] (what the samplers return) -> PIL images."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


def load_image_processor(path: Path):
    """The folder's AutoImageProcessor, or None when it ships none (we then resize + CLIP-normalise)."""
    if not (path / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(path, local_files_only=True)


def build_tiny_classifier(seed: int = 0):
    """A 2-label ViT image classifier (labels 'normal', 'nsfw') with seeded random weights."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=2, id2label={0: "normal", 1: "nsfw"},
                    label2id={"normal": 0, "nsfw": 1})
    torch.manual_seed(seed)
    return ViTForImageClassification(cfg).eval()


def build_tiny_clip_vision(seed: int = 0):
    """A small CLIPVisionModelWithProjection (32 px, 64-d embeddings) with seeded random weights. One
    layer: a deeper random encoder washes out the colour statistics the synthetic ratings follow."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(image_size=32, patch_size=4, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=1, num_attention_heads=4, projection_dim=64)
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(cfg).eval()
