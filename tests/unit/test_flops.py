"""Analytic FLOP counts: the per-layer formulas against torch's FlopCounterMode, the DiT closed
form against the walker, how each term scales with resolution, and the GPU peak table."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from scaletrain.models.flops import (
    denoiser_input_size, device_peak_tflops, dit_forward_flops, forward_flops_per_image, gpu_peak_tflops,
    layer_flops, train_flops_per_image,
)
from scaletrain.models import get_preset
from scaletrain.models.family import get_family
from scaletrain.models.registry import Denoiser, build_denoiser_net


def _counter_flops(name: str, resolution: int) -> int:
    preset = get_preset(name)
    with torch.device("meta"):
        den = Denoiser(build_denoiser_net(preset), preset.family, use_text_mask=False)
    width = get_family(preset.family).text_width(preset.denoiser_config)
    s = denoiser_input_size(preset, resolution)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        den(torch.zeros(1, preset.in_channels, s, s, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"),
            preset.conditioner.example(1, device="meta"))
    return fc.get_total_flops()


@pytest.mark.parametrize("name,resolution", [("unet-tiny", 32), ("unet-tiny", 64), ("unet-small", 32), ("dit-tiny", 32),
                                             ("unet-sd15", 256), ("pixart-xl-2", 256),
                                             ("mmdit-tiny", 32), ("mmdit-tiny", 64), ("sd3-medium", 256),
                                             ("flux-tiny", 32), ("flux.1-dev", 256), ("sdxl-tiny", 32),
                                             ("sdxl-base-1.0", 256)])
def test_layer_formulas_match_flop_counter(name, resolution):
    # Conv/linear/attention formulas applied per layer must equal what torch counts for the
    # same forward (matmul-class ops only in both): within 0.5 %.
    assert forward_flops_per_image(name, resolution) == pytest.approx(_counter_flops(name, resolution), rel=5e-3)


@pytest.mark.parametrize("name", ["dit-tiny", "pixart-xl-2"])
def test_dit_closed_form_matches_walker(name):
    c, p = get_preset(name).denoiser_config, get_preset(name)
    for res in (256, 512) if p.latent else (32, 64):
        closed = dit_forward_flops(layers=c["num_layers"], hidden=c["num_attention_heads"] * c["attention_head_dim"],
                                   patch=c["patch_size"], in_channels=c["in_channels"], out_channels=c["out_channels"],
                                   size=denoiser_input_size(p, res), text_tokens=p.max_text_len,
                                   text_width=c["caption_channels"])
        assert closed == pytest.approx(forward_flops_per_image(name, res), rel=1e-3)


def test_terms_scale_with_resolution():
    # Convolutions scale with pixels (x4 per doubling); DiT self-attention with tokens^2 (x16).
    lo, hi = layer_flops("unet-tiny", 32), layer_flops("unet-tiny", 64)
    assert hi["conv"] == 4 * lo["conv"]
    d_lo, d_hi = layer_flops("dit-tiny", 32), layer_flops("dit-tiny", 64)
    assert 4 * d_lo["attention"] < d_hi["attention"] <= 16 * d_lo["attention"]
    assert train_flops_per_image("unet-tiny", 32) == 3 * forward_flops_per_image("unet-tiny", 32)
    # SD-1.5 at 512 px: ~0.8 TFLOP per forward is the widely quoted figure.
    assert 0.7e12 < forward_flops_per_image("unet-sd15", 512) < 0.9e12
    # MMDiT joint attention runs over image + text tokens: at 32 px (256 tokens) + 64 text
    # tokens (SD3's layout: 32 CLIP + 32 T5), 4 x 320^2 x 64 per layer x 4 layers.
    assert layer_flops("mmdit-tiny", 32)["attention"] == 4 * 4 * 320 * 320 * 64
    # SD3-medium at 1024 px: 4096 image + 333 text tokens, each through its own stream's
    # per-token matmuls (q, k, v, out: 4d^2; MLP: 8d^2) in 24 blocks of d = 1536, plus joint
    # attention over all 4429 tokens; adaLN and embeddings are per image (< 1 %).
    d, tok = 1536, 4096 + 333
    by_hand = 24 * (2 * 12 * d * d * tok + 4 * tok * tok * d)
    assert layer_flops("sd3-medium", 1024)["attention"] == 24 * 4 * tok * tok * d
    assert forward_flops_per_image("sd3-medium", 1024) == pytest.approx(by_hand, rel=0.01)


def test_gpu_peak_table_and_override():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16")[0] == 989.4
    assert gpu_peak_tflops("NVIDIA H100 PCIe", "bf16")[0] == 756.0
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16")[0] == 312.0
    assert gpu_peak_tflops("Some Future Accelerator", "bf16") is None
    assert device_peak_tflops(torch.device("cpu"), "fp32", override=1.5) == (1.5, "given")
    peak, source = device_peak_tflops(torch.device("cpu"), "fp32")
    assert peak > 0 and source.startswith("measured")
