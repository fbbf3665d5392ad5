"""Validation sample grids: deterministic sampling (the objective's sampler) with classifier-free guidance.

Every rank calls `generate_samples` with the same prompts because the denoiser may be
sharded (FSDP2) or wrapped (DeepSpeed) and its forwards are collectives. So the loop
below is fully deterministic and makes the same calls, with the same shapes, on every
rank; only rank 0 should call `save_image_grid`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from scaletrain.diffusion import Objective

Cond = dict[str, Tensor]  # a text conditioner's output (models/text.py), batch first
Denoiser = Callable[[Tensor, Tensor, Cond], Tensor]
TextEncoder = Callable[[list[str]], Cond]
Decoder = Callable[[Tensor], Tensor]


@contextmanager
def _preserve_global_rng(device: torch.device) -> Iterator[None]:
    # We only draw from explicit generators, but user callbacks (a VAE that samples its
    # latent distribution, a module left in train mode) may not: validation must never
    # shift the training RNG streams, so snapshot and restore them regardless.
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        yield


def _initial_latents(
    num: int, shape: tuple[int, ...], seed: int, device: torch.device
) -> Tensor:
    # One generator per prompt (seed + index) on CPU: the grid is identical across runs,
    # world sizes and devices, so checkpoints can be compared by eye.
    gens = [torch.Generator().manual_seed(seed + i) for i in range(num)]
    rows = [torch.randn(shape, generator=gen) for gen in gens]
    return torch.stack(rows).to(device)


def _guided_prediction(
    denoiser: Denoiser, x: Tensor, t: Tensor, cond: Cond, guidance_scale: float, use_cfg: bool,
) -> Tensor:
    batch = x.shape[0]
    x_in = torch.cat([x, x]) if use_cfg else x
    timesteps = t.reshape(1).expand(x_in.shape[0]).to(x.device)
    pred = denoiser(x_in, timesteps, cond).to(x.dtype)
    if not use_cfg:
        return pred
    # Classifier-free guidance (Ho & Salimans 2022): uncond half first, then cond.
    uncond, cond = pred[:batch], pred[batch:]
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def generate_samples(
    denoiser: Denoiser,
    encode_text: TextEncoder,
    decode: Decoder,
    *,
    prompts: list[str],
    resolution: int,
    in_channels: int,
    latent_factor: int,
    objective: Objective,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    frames: int = 0,
) -> Tensor:
    """Sample one image per prompt; returns float32 pixels (B, 3, H, W) in [-1, 1]. With
    ``frames`` (the denoiser's frames: latent frames of a video VAE) one clip per prompt,
    (B, 3, F, H, W).

    Latents are float32; a bf16 denoiser is expected to cast its inputs (FSDP2's
    MixedPrecisionPolicy does). guidance_scale == 1 skips the unconditional half, which
    is exactly the conditional-only path; the choice is the same on every rank.
    """
    if resolution % latent_factor:
        raise ValueError(
            f"resolution={resolution} is not divisible by latent_factor={latent_factor}"
        )
    device = torch.device(device)
    use_cfg = guidance_scale != 1.0
    side = resolution // latent_factor
    shape = (in_channels, frames, side, side) if frames else (in_channels, side, side)
    with _preserve_global_rng(device):
        # The objective's own sampler (DDIM with eta=0 for DDPM, flow Euler for flow
        # matching): deterministic, no RNG after the initial latents.
        scheduler = objective.sampler(num_inference_steps, device, latent_shape=shape)
        # One text-encoder call for both halves keeps the batch (and any collectives) fixed.
        texts = [""] * len(prompts) + list(prompts) if use_cfg else list(prompts)
        cond = encode_text(texts)
        x = _initial_latents(len(prompts), shape, seed, device)
        x = x * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            pred = _guided_prediction(denoiser, x_in, t, cond, guidance_scale, use_cfg)
            x = scheduler.step(pred, t, x)
        return decode(x).float().clamp(-1.0, 1.0)


def _to_uint8(images: Tensor) -> np.ndarray:
    images = images.detach().float().cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    pixels = ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def _caption_lines(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int, max_lines: int) -> list[str]:
    # Word-wrap to at most `max_lines`; the last line is truncated with "..." if words remain.
    lines, words = [], text.split()
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}", font=font) <= width:
            line += " " + words.pop(0)
        lines.append(line)
    if words or (lines and draw.textlength(lines[-1], font=font) > width):
        last = lines[-1] + " " + " ".join(words) if words else lines[-1]
        while last and draw.textlength(last + "...", font=font) > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + "..."
    return lines


def save_image_grid(
    images: Tensor,
    path: str | Path,
    nrow: int | None = None,
    captions: Sequence[str] | None = None,
    min_tile: int = 128,
) -> Path:
    """Tile (B, C, H, W) images in [-1, 1] into a PNG with `nrow` tiles per row.

    Without captions the PNG is exactly (nrow * W) x (rows * H). With captions (the
    validation and end-of-run grids meant for a person), tiles narrower than `min_tile`
    are enlarged by a whole factor with nearest-neighbour (pixels stay exact, just bigger:
    a 32 px sample is otherwise too small to judge and its caption unreadable), and each
    row gets a two-line text band under its tiles (PIL's default font).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, 1|3, H, W), got {tuple(images.shape)}")
    if captions is not None and len(captions) != images.shape[0]:
        raise ValueError(f"got {len(captions)} captions for {images.shape[0]} images")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _grid(images, nrow, captions, min_tile).save(path, format="PNG")
    return path


def save_video_grid(videos: Tensor, path: str | Path, fps: float = 8.0, nrow: int | None = None,
                    captions: Sequence[str] | None = None, min_tile: int = 128) -> Path:
    """Tile (B, C, F, H, W) clips in [-1, 1] into an animated GIF (frame f of every clip in
    one grid, the layout and captions of ``save_image_grid``), looping at ``fps``."""
    if videos.ndim != 5 or videos.shape[1] not in (1, 3):
        raise ValueError(f"videos must be (B, 1|3, F, H, W), got {tuple(videos.shape)}")
    if captions is not None and len(captions) != videos.shape[0]:
        raise ValueError(f"got {len(captions)} captions for {videos.shape[0]} videos")
    frames = [_grid(videos[:, :, f], nrow, captions, min_tile) for f in range(videos.shape[2])]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                   duration=max(20, round(1000 / fps)), optimize=False)
    return path


def _grid(images: Tensor, nrow: int | None, captions: Sequence[str] | None, min_tile: int) -> Image.Image:
    tiles = _to_uint8(images)
    count, height, width = tiles.shape[:3]
    scale = max(1, math.ceil(min_tile / width)) if captions is not None else 1
    height, width = height * scale, width * scale
    nrow = nrow or math.ceil(math.sqrt(count))
    rows = math.ceil(count / nrow)
    font = ImageFont.load_default()
    band, line_height, max_lines = 0, 0, 2
    if captions is not None:
        top, bottom = font.getbbox("Ag")[1::2]
        line_height = bottom - top + 2
        band = max_lines * line_height + 2
    grid = Image.new("RGB", (nrow * width, rows * (height + band)), color=(0, 0, 0))
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        left, top = (i % nrow) * width, (i // nrow) * (height + band)
        image = Image.fromarray(tile)
        if scale > 1:
            image = image.resize((width, height), Image.NEAREST)
        grid.paste(image, (left, top))
        if captions is not None:
            for j, line in enumerate(_caption_lines(draw, captions[i], font, width - 4, max_lines)):
                draw.text((left + 2, top + height + 1 + j * line_height), line, fill=(255, 255, 255), font=font)
    return grid
