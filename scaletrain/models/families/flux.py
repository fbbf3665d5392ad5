"""Flux family: Flux.1-style transformers (diffusers `FluxTransformer2DModel`).

Flux is an MMDiT with rotary positions: a stack of double-stream blocks (image and text keep
their own weights and attend jointly, as in SD3), then single-stream blocks over the
concatenated sequence. It patchifies outside the network: the pipeline packs each 2 x 2 patch
of latents into one token (C -> 4C channels) and passes (row, column) ids for the rotary
embedding; ``forward`` here does both, so the trainer still hands it (B, C, H, W). Its
timestep input is sigma in [0, 1] (it multiplies by 1000 itself), so the objective's 0..1000
timestep is divided back. Its conditioner (``conditioners/flux.py``) gives T5-XXL's states as
the caption sequence and CLIP-L's pooled output (768) as the pooled vector. FLUX.1-dev is
guidance-distilled: its transformer embeds a guidance scale (``guidance_embeds``), which
training feeds as diffusers' FLUX trainers do (``TRAIN_GUIDANCE``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from diffusers import FluxTransformer2DModel

from scaletrain.models.components import CLIP_L_PUBLISHED, FLUX_VAE, T5_XXL_PUBLISHED, TINY_TEXT_DIM, TINY_TEXT_LEN
from scaletrain.models.conditioners.flux import FluxConditioner
from scaletrain.models.families.mmdit import MMDiTFamily
from scaletrain.models.text import Cond
from scaletrain.models.family import ModelFamily, add_alias, add_preset, register_family

PACK = 2  # latents per token side (FluxPipeline._pack_latents)

# black-forest-labs/FLUX.1-dev transformer/config.json (11.9B): 19 double-stream + 38
# single-stream blocks, 24 heads x 128 = 3072 hidden, 16 latent channels packed 2 x 2 -> 64,
# T5-XXL context (4096), CLIP-L pooled (768), a guidance embedding.
FLUX_DEV: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# black-forest-labs/FLUX.1-schnell: the same network without the guidance embedding (timestep-distilled).
FLUX_SCHNELL: dict[str, Any] = dict(FLUX_DEV, guidance_embeds=False)
# The guidance scale a guidance-embedding transformer is told while it trains: diffusers' FLUX
# trainers' default (examples/dreambooth/train_dreambooth_flux.py, --guidance_scale 3.5).
TRAIN_GUIDANCE = 3.5


def flux_tiny_config(text_dim: int) -> dict[str, Any]:
    """~0.5M-param pixel-space Flux: 2 double + 2 single blocks x 64 hidden; RGB packed 2 x 2."""
    return dict(
        patch_size=1, in_channels=3 * PACK * PACK, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=text_dim, pooled_projection_dim=text_dim,
        guidance_embeds=False, axes_dims_rope=(4, 6, 6),
    )


def pack(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), as FluxPipeline packs latents."""
    b, c, h, w = x.shape
    return x.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5).reshape(
        b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    b, _, c4 = tokens.shape
    c = c4 // (PACK * PACK)
    return tokens.view(b, height // PACK, width // PACK, c, PACK, PACK).permute(0, 3, 1, 4, 2, 5).reshape(
        b, c, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(tokens, 3) rotary ids: (0, row, column) per packed token (FluxPipeline's layout)."""
    rows = torch.arange(height // PACK, device=device, dtype=dtype)
    cols = torch.arange(width // PACK, device=device, dtype=dtype)
    grid = torch.stack(torch.meshgrid(torch.zeros_like(rows[:1]), rows, cols, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


@register_family
class FluxFamily(ModelFamily):
    name = "flux"
    pipeline_class = "FluxPipeline"
    net_class = FluxTransformer2DModel
    # MMDiT's: both streams' attention projections (the single-stream blocks have to_q/k/v only)
    lora_targets = MMDiTFamily.lora_targets
    lora_loader = "FluxLoraLoaderMixin"  # exported in diffusers' LoRA layout

    def forward(self, net: nn.Module, x: Tensor, timesteps: Tensor, cond: Cond, *,
                pixel_size: tuple[int, int] | None = None) -> Tensor:
        h, w = x.shape[-2:]
        emb = cond["text_emb"]
        txt_ids = torch.zeros(emb.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = None
        if net.config.guidance_embeds:  # FLUX.1-dev: guidance-distilled, told its guidance scale
            guidance = cond.get("guidance")
            if guidance is None:
                guidance = torch.full((x.shape[0],), TRAIN_GUIDANCE, device=x.device, dtype=x.dtype)
        out = net(hidden_states=pack(x), encoder_hidden_states=emb, pooled_projections=cond["pooled"],
                  timestep=timesteps.to(x.dtype) / 1000.0, img_ids=image_ids(h, w, x.device, x.dtype),
                  txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        return unpack(out, h, w)

    def downsample(self, config: dict[str, Any]) -> int:
        return PACK * config["patch_size"]

    def input_channels(self, config: dict[str, Any]) -> int:
        return config["in_channels"] // (PACK * PACK)  # the network sees packed tokens

    def text_width(self, config: dict[str, Any]) -> int:
        return config["joint_attention_dim"]

    def pooled_width(self, config: dict[str, Any]) -> int | None:
        return config["pooled_projection_dim"]

    def parallel_units(self, net: FluxTransformer2DModel) -> list[nn.Module]:
        """FSDP units: each double-stream block, then each single-stream block (forward order).
        The root keeps x_embedder, context_embedder, time_text_embed, the rotary embedding,
        norm_out and proj_out, which the root forward calls directly."""
        return [*net.transformer_blocks, *net.single_transformer_blocks]


add_preset("flux-tiny", "flux", None, flux_tiny_config(TINY_TEXT_DIM), FluxConditioner.tiny(TINY_TEXT_DIM, TINY_TEXT_LEN),
           "~0.5M-param pixel-space Flux (2 double + 2 single blocks, rotary positions) conditioned as FLUX.1 is "
           "(a tiny CLIP pooled + a tiny T5); CPU tests")
add_preset("flux.1-dev", "flux", FLUX_VAE, FLUX_DEV, FluxConditioner(CLIP_L_PUBLISHED, T5_XXL_PUBLISHED, 512),
           "FLUX.1-dev as published (11.9B: 19 double + 38 single blocks x 3072, guidance embedding) on Flux-VAE "
           "latents; CLIP-L pooled + T5-XXL (512 tokens)")
add_preset("flux.1-schnell", "flux", FLUX_VAE, FLUX_SCHNELL, FluxConditioner(CLIP_L_PUBLISHED, T5_XXL_PUBLISHED, 256),
           "FLUX.1-schnell as published (11.9B, no guidance embedding) on Flux-VAE latents; CLIP-L pooled + "
           "T5-XXL (256 tokens)")
add_alias("flux-dev", "flux.1-dev")
