"""UNet family: diffusers `UNet2DConditionModel` configs, forward, parallel plan and presets."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from diffusers import UNet2DConditionModel

from scaletrain.models.components import (
    CLIP_G_PUBLISHED, CLIP_L, CLIP_L_PUBLISHED, OPENCLIP_H, SD_VAE, SDXL_VAE, TINY_TEXT, TINY_TEXT_DIM,
    TINY_TEXT_LEN, TINY_VAE,
)
from scaletrain.models.conditioners.sdxl import SDXLConditioner
from scaletrain.models.text import Cond
from scaletrain.models.family import ModelFamily, add_preset, register_family

_SD_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    norm_num_groups=32,
)

# runwayml/stable-diffusion-v1-5 unet/config.json (859.5M parameters).
UNET_SD15: dict[str, Any] = dict(
    _SD_BLOCKS, sample_size=64, in_channels=4, out_channels=4, attention_head_dim=8,
    cross_attention_dim=768,
)

# stabilityai/stable-diffusion-2-1-base unet/config.json (865.9M parameters).
UNET_SD2: dict[str, Any] = dict(
    _SD_BLOCKS, sample_size=64, in_channels=4, out_channels=4, attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024, use_linear_projection=True,
)


# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2.57B): three levels (the first
# without attention), 1 / 2 / 10 transformer layers per attention block, cross-attention to both
# CLIPs' states (2048), and the "text_time" added embedding: CLIP-G's pooled vector (1280) with
# six size/crop micro-conditions embedded at 256 each (1280 + 6 x 256 = 2816).
UNET_SDXL: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, norm_num_groups=32, attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    upcast_attention=None,
)


def unet_sdxl_tiny_config(text_dim: int, pooled: int) -> dict[str, Any]:
    """unet-tiny in SDXL's layout on 4 latent channels: the "text_time" added embedding (the
    pooled vector + six micro-conditions at 8 each)."""
    return dict(unet_tiny_config(text_dim), in_channels=4, out_channels=4, addition_embed_type="text_time",
                addition_time_embed_dim=8, projection_class_embeddings_input_dim=pooled + 6 * 8)


def unet_tiny_config(text_dim: int) -> dict[str, Any]:
    """~1M-parameter pixel-space UNet that trains in seconds on CPU at 32-64 px.

    The one cross-attention level sits at half resolution (second block): at full resolution
    64 px means 4096-token self-attention, ~10x slower for no benefit at this size.
    `attention_head_dim` is really the head *count* in UNet2DConditionModel (a diffusers
    naming quirk kept for SD compatibility): 2 heads of 32 at 64 channels.
    """
    return dict(
        sample_size=32, in_channels=3, out_channels=3,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
        norm_num_groups=8, cross_attention_dim=text_dim,
    )


def unet_small_config(text_dim: int) -> dict[str, Any]:
    """~1.7M-parameter pixel-space UNet for the CPU sample-quality recipe (configs/quality.yaml).

    unet-tiny's one down-sampling step leaves its convolutions too short a reach to find the
    image borders, and attention has no position embedding, so it learns colour and shape but
    barely "left" vs "right". A third level (8 x 8 at 32 px) lets the 3 x 3 convolutions see
    the zero padding from every pixel, which is where a UNet learns absolute position (SD's
    UNet reaches 8 x 8 latents the same way). Cross-attention at 16 and 8 px only.
    """
    return dict(
        sample_size=32, in_channels=3, out_channels=3,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=(1, 2, 2),
        norm_num_groups=8, cross_attention_dim=text_dim,
    )


@register_family
class UNetFamily(ModelFamily):
    name = "unet"
    net_class = UNet2DConditionModel
    # The attention projections (self and cross); LoRA leaves the resnets alone.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    lora_loader = "StableDiffusionLoraLoaderMixin"  # exported in diffusers' LoRA layout
    lora_prefix = "unet"
    # a latent UNet with its CLIP-style encoder is what StableDiffusionPipeline runs, with SDXL's
    # two encoders StableDiffusionXLPipeline (``pipeline_for``)
    pipeline_class = "StableDiffusionPipeline"
    pipeline_denoiser = "unet"
    pipeline_extras = {"StableDiffusionPipeline": {"safety_checker": None, "feature_extractor": None,
                                                   "requires_safety_checker": False}}

    def forward(self, net: nn.Module, x: Tensor, timesteps: Tensor, cond: Cond, *,
                pixel_size: tuple[int, int] | None = None) -> Tensor:
        added = None
        if net.config.addition_embed_type == "text_time":
            # SDXL: the pooled text vector and the size/crop micro-conditions (original size, crop
            # top-left, target size), as diffusers' SDXL trainer computes them: the loader's
            # ``geometry`` (original height, width, crop top, left) per image. Without it (sample
            # grids): the target size, uncropped, as StableDiffusionXLPipeline samples by default.
            h, w = pixel_size if pixel_size is not None else x.shape[-2:]
            target = torch.tensor([[h, w]], dtype=x.dtype, device=x.device).expand(x.shape[0], 2)
            geometry = cond.get("geometry")
            source = torch.cat([target, torch.zeros_like(target)], dim=1) if geometry is None else geometry.to(x.dtype)
            added = {"text_embeds": cond["pooled"], "time_ids": torch.cat([source, target], dim=1)}
        return net(x, timesteps, encoder_hidden_states=cond["text_emb"], encoder_attention_mask=cond.get("text_mask"),
                   added_cond_kwargs=added, return_dict=False)[0]

    def downsample(self, config: dict[str, Any]) -> int:
        """Every down block but the last halves the resolution."""
        return 2 ** (len(config["down_block_types"]) - 1)

    def text_width(self, config: dict[str, Any]) -> int:
        return config["cross_attention_dim"]

    def pooled_width(self, config: dict[str, Any]) -> int | None:
        """SDXL's "text_time" added embedding: the pooled vector beside six micro-conditions."""
        if config.get("addition_embed_type") != "text_time":
            return None
        return config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]

    def parallel_units(self, net: UNet2DConditionModel) -> list[nn.Module]:
        """FSDP units for a UNet, in forward order; the root (Denoiser) is sharded after these.

        - Each down block, the mid block and each up block is one unit: a block's params are
          only touched inside its own forward, so each all-gather overlaps the previous block.
        - time_proj/time_embedding, conv_in, conv_norm_out and conv_out stay in the root unit:
          together they are <1% of the params, and the time embedding is used by every block, so
          a separate unit would only add a collective.
        - Up blocks are the largest units (SD: ~1280 ch x 3 resnets + 3 transformers); going finer
          (per resnet/attention) would cut peak memory further at more collectives. Not done.
        """
        units: list[nn.Module] = list(net.down_blocks)
        if net.mid_block is not None:  # mid_block_type=None builds a UNet with no mid block
            units.append(net.mid_block)
        units.extend(net.up_blocks)
        return units


add_preset("unet-tiny", "unet", None, unet_tiny_config(TINY_TEXT_DIM), TINY_TEXT,
           "~1M-param pixel-space UNet + 2-layer CLIP; CPU demos and tests at 32-64 px")
add_preset("unet-small", "unet", None, unet_small_config(TINY_TEXT_DIM), TINY_TEXT,
           "~1.7M-param 3-level pixel-space UNet + 2-layer CLIP; learns prompted positions (configs/quality.yaml)")
add_preset("unet-tiny-latent", "unet", TINY_VAE, {**unet_tiny_config(TINY_TEXT_DIM), "in_channels": 4,
                                                  "out_channels": 4}, TINY_TEXT,
           "unet-tiny on the latents of a tiny random-init VAE (factor 4); the latent path on CPU "
           "(data encode, data.precomputed) at 32-64 px")
SDXL_TINY = SDXLConditioner.tiny(TINY_TEXT_DIM, TINY_TEXT_LEN)
add_preset("sdxl-tiny", "unet", TINY_VAE, unet_sdxl_tiny_config(TINY_TEXT_DIM, SDXL_TINY.pooled_width), SDXL_TINY,
           "unet-tiny in SDXL's layout (two tiny CLIPs, pooled text + size micro-conditions) on tiny-VAE latents; "
           "CPU tests of the SDXL path")
add_preset("sdxl-base-1.0", "unet", SDXL_VAE, UNET_SDXL, SDXLConditioner(CLIP_L_PUBLISHED, CLIP_G_PUBLISHED),
           "Stable Diffusion XL base 1.0 as published (2.57B UNet) on SDXL-VAE latents; CLIP-L + CLIP-G (2048) "
           "with CLIP-G pooled and size/crop micro-conditions")
add_preset("unet-sd15", "unet", SD_VAE, UNET_SD15, CLIP_L,
           "Stable Diffusion 1.5 UNet (860M) on SD VAE latents, CLIP-L text (768)")
add_preset("unet-sd2", "unet", SD_VAE, UNET_SD2, OPENCLIP_H,
           "Stable Diffusion 2.x UNet (866M) on SD VAE latents, OpenCLIP-H text (1024)")
