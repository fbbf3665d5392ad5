"""Sample generation with an analytic toy denoiser, and the PNG grid writer."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from scaletrain.diffusion import build_objective
from scaletrain.eval.samples import _caption_lines, generate_samples, save_image_grid

PROMPTS = ["a red cube", "a blue sphere on grass"]
CHANNELS, RES, FACTOR, STEPS = 4, 16, 4, 5


class ToyDenoiser:
    """eps_hat = 0.3 * x + text signal; records batch sizes to check the call pattern."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def __call__(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        assert t.shape == (x.shape[0],)
        self.batch_sizes.append(x.shape[0])
        return 0.3 * x + cond["text_emb"].mean(dim=(1, 2)).view(-1, 1, 1, 1) + 1e-4 * t.view(-1, 1, 1, 1)


def encode_text(texts: list[str]) -> dict[str, Tensor]:
    emb = torch.tensor([len(s) / 20.0 for s in texts]).view(-1, 1, 1).expand(-1, 3, 8)
    return {"text_emb": emb.clone(), "text_mask": torch.ones(len(texts), 3, dtype=torch.long)}


def decode(latents: Tensor) -> Tensor:
    return 2.0 * F.interpolate(latents[:, :3], scale_factor=FACTOR, mode="nearest")


def _scheduler_config() -> dict:
    return dict(build_objective("ddpm", {}).noise_scheduler.config)


def _generate(denoiser: ToyDenoiser | None = None, **overrides: object) -> Tensor:
    kwargs = dict(
        prompts=PROMPTS, resolution=RES, in_channels=CHANNELS, latent_factor=FACTOR,
        objective=build_objective("ddpm", {}), num_inference_steps=STEPS, guidance_scale=3.0, seed=123,
    )
    kwargs.update(overrides)
    return generate_samples(denoiser or ToyDenoiser(), encode_text, decode, **kwargs)


def _reference_loop(texts: list[str], seed: int = 123) -> Tensor:
    """Plain DDIM with a single (unguided) branch, written out independently; timesteps offset
    by 1, the Stable Diffusion convention that diffusers' SD pipelines sample with."""
    public = {k: v for k, v in _scheduler_config().items() if not k.startswith("_")}  # _use_default_values would
    sched = DDIMScheduler.from_config({**public, "steps_offset": 1})  # reset steps_offset to DDIM's default
    sched.set_timesteps(STEPS)
    side = RES // FACTOR
    x = torch.stack([
        torch.randn(CHANNELS, side, side, generator=torch.Generator().manual_seed(seed + i))
        for i in range(len(texts))
    ])
    cond = encode_text(texts)
    for t in sched.timesteps:
        eps = ToyDenoiser()(x, t.expand(len(texts)), cond)
        x = sched.step(eps, t, x, eta=0.0).prev_sample
    return decode(x).clamp(-1, 1)


def test_shape_range_and_call_pattern() -> None:
    den = ToyDenoiser()
    out = _generate(den)
    assert out.shape == (2, 3, RES, RES) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    # One batched cond+uncond forward per step: the same calls on every rank.
    assert den.batch_sizes == [2 * len(PROMPTS)] * STEPS


def test_deterministic_for_a_seed() -> None:
    torch.testing.assert_close(_generate(), _generate(), rtol=0, atol=0)
    assert not torch.equal(_generate(), _generate(seed=124))


def test_guidance_scale_one_is_conditional_only() -> None:
    den = ToyDenoiser()
    torch.testing.assert_close(_generate(den, guidance_scale=1.0), _reference_loop(PROMPTS))
    assert den.batch_sizes == [len(PROMPTS)] * STEPS


def test_guidance_scale_zero_is_unconditional() -> None:
    # guided = uncond + 0 * (cond - uncond): the empty prompt drives every sample.
    torch.testing.assert_close(
        _generate(guidance_scale=0.0), _reference_loop([""] * len(PROMPTS)), rtol=1e-5, atol=1e-5
    )
    assert not torch.allclose(_generate(guidance_scale=3.0), _generate(guidance_scale=1.0))


def test_global_rng_untouched() -> None:
    def noisy_decode(latents: Tensor) -> Tensor:
        torch.randn(10)  # a callback that draws from the global RNG must not leak
        return decode(latents)

    torch.manual_seed(0)
    before = torch.get_rng_state()
    generate_samples(
        ToyDenoiser(), encode_text, noisy_decode, prompts=PROMPTS, resolution=RES,
        in_channels=CHANNELS, latent_factor=FACTOR,
        objective=build_objective("ddpm", {"prediction_type": "v_prediction"}), num_inference_steps=STEPS,
    )
    assert torch.equal(before, torch.get_rng_state())


def test_save_image_grid_size_and_pixels(tmp_path: Path) -> None:
    images = torch.linspace(-1, 1, 5 * 3 * 8 * 6).view(5, 3, 8, 6)
    images[0] = -1.0
    images[1] = 1.0
    path = save_image_grid(images, tmp_path / "sub" / "grid.png", nrow=3)
    with Image.open(path) as img:
        assert img.size == (3 * 6, 2 * 8)  # nrow x tile width, ceil(5/3) rows x tile height
        assert img.getpixel((0, 0)) == (0, 0, 0)
        assert img.getpixel((6, 0)) == (255, 255, 255)
    captions = [f"p{i}" * 9 for i in range(5)]  # long enough to be truncated
    captioned = save_image_grid(images, tmp_path / "cap.png", nrow=3, captions=captions, min_tile=24)
    with Image.open(captioned) as img:
        # tiles enlarged 4x (nearest) to reach min_tile; each row gains a caption band
        assert img.size[0] == 3 * 24 and img.size[1] > 2 * 32
        assert img.getpixel((0, 0)) == img.getpixel((23, 31)) == (0, 0, 0)  # tile 0, enlarged
        assert img.getpixel((24, 0)) == img.getpixel((47, 31)) == (255, 255, 255)  # tile 1
    big = save_image_grid(images, tmp_path / "big.png", nrow=3, captions=captions, min_tile=6)
    with Image.open(big) as img:
        assert img.size[0] == 3 * 6  # already min_tile wide: not enlarged
    default = save_image_grid(images[:4], tmp_path / "sq.png")  # no captions: never enlarged
    with Image.open(default) as img:
        assert img.size == (2 * 6, 2 * 8)


def test_caption_lines_wrap_then_truncate() -> None:
    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), ImageFont.load_default()
    width = int(draw.textlength("a green triangle", font=font))
    assert _caption_lines(draw, "a green triangle on the right", font, width, 2) == ["a green triangle", "on the right"]
    lines = _caption_lines(draw, "a green triangle on the right and a red square at the top", font, width, 2)
    assert lines[0] == "a green triangle" and lines[1].endswith("...") and len(lines) == 2
    assert all(draw.textlength(x, font=font) <= width for x in lines)
    assert _caption_lines(draw, "short", font, width, 2) == ["short"]
