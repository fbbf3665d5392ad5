"""DiT family: text-conditioned PixArt-alpha transformers (diffusers `PixArtTransformer2DModel`) and presets.

diffusers' `DiTTransformer2DModel` is class-conditioned (ImageNet labels), so it cannot take
captions; PixArt is the same DiT block plus cross-attention to text and a shared adaLN-single
time embedding, which is what a text-to-image toolkit needs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from diffusers import PixArtTransformer2DModel

from scaletrain.models.components import CLIP_L, SD_VAE, T5_XXL_SHALLOW, TINY_TEXT, TINY_TEXT_DIM
from scaletrain.models.text import Cond
from scaletrain.models.family import ModelFamily, add_preset, register_family

# PixArt-alpha XL/2 at 512 px (PixArt-XL-2-512x512 transformer/config.json, ~611M params):
# 28 layers, 16 heads x 72 = 1152 hidden, patch 2, learned sigma (8 = 2 x 4 latent channels).
# sample_size 64 (not the 1024-px model's 128) because diffusers turns on
# `use_additional_conditions` (resolution/aspect-ratio embeddings) for sample_size 128; we pin it
# off so the forward needs nothing beyond (x, t, text). Other resolutions still work: PatchEmbed
# recomputes its sin-cos table for any input size.
PIXART_XL_2: dict[str, Any] = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
    sample_size=64, patch_size=2, caption_channels=4096, cross_attention_dim=1152,
    use_additional_conditions=False, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
    norm_elementwise_affine=False, norm_eps=1e-6, activation_fn="gelu-approximate",
    attention_bias=True,
)

# DiT-B/2 size (Peebles & Xie: 12 x 768, 12 heads, patch 2) in PixArt's block layout (cross-
# attention to the text): a mid-size model, ~1.6 GB of fp32 weights + AdamW state, for
# checkpoint I/O and scaling measurements between the tiny and the billion-parameter presets.
DIT_B_2: dict[str, Any] = dict(
    PIXART_XL_2, num_attention_heads=12, attention_head_dim=64, num_layers=12, out_channels=4,
    caption_channels=768, cross_attention_dim=768, sample_size=32,
)


def dit_tiny_config(text_dim: int) -> dict[str, Any]:
    """~0.3M-parameter pixel-space PixArt: 4 layers x 64 hidden, patch 2, no learned sigma."""
    return dict(
        PIXART_XL_2, num_attention_heads=4, attention_head_dim=16, in_channels=3, out_channels=3,
        num_layers=4, sample_size=32, caption_channels=text_dim, cross_attention_dim=64,
        interpolation_scale=1,
    )


@register_family
class PixArtFamily(ModelFamily):
    name = "dit"
    net_class = PixArtTransformer2DModel
    pipeline_class = "PixArtAlphaPipeline"
    pipeline_text_len = 120  # PixArt-alpha's max_sequence_length (its T5 tokenizer says 512)

    def pipeline_problem(self, preset: Any) -> str | None:
        # The pipeline encodes prompts with the mask and pads them to max_sequence_length (120):
        # T5's convention; a CLIP-conditioned preset (dit-b-2) would be sampled differently.
        slots = preset.conditioner.slots
        if len(slots) != 1 or slots[0].is_clip or preset.max_text_len != self.pipeline_text_len:
            return (f"PixArtAlphaPipeline encodes prompts with a masked T5 at {self.pipeline_text_len} tokens; "
                    f"{preset.name} conditions on {'+'.join(s.model_class for s in slots)} at {preset.max_text_len}: "
                    "export the transformer alone")
        return None
    # Attention projections plus the feed-forward ones: the blocks are attention + MLP only.
    # Exported in peft's layout (diffusers has no LoRA loader for PixArt): the default.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")

    def forward(self, net: nn.Module, x: Tensor, timesteps: Tensor, cond: Cond, *,
                pixel_size: tuple[int, int] | None = None) -> Tensor:
        added = {"resolution": None, "aspect_ratio": None}
        if net.use_additional_conditions:  # PixArt-alpha 1024: the image size (pixels) and aspect ratio
            h, w = pixel_size if pixel_size is not None else x.shape[-2:]
            added = {"resolution": torch.tensor([[h, w]], dtype=x.dtype, device=x.device).expand(x.shape[0], 2),
                    "aspect_ratio": torch.tensor([[h / w]], dtype=x.dtype, device=x.device).expand(x.shape[0], 1)}
        out = net(x, encoder_hidden_states=cond["text_emb"], timestep=timesteps,
                  encoder_attention_mask=cond.get("text_mask"), added_cond_kwargs=added, return_dict=False)[0]
        # Learned-sigma presets predict (mean, variance) stacked on channels; the objective only
        # trains the mean, so hand back x's channels.
        return out[:, : x.shape[1]]

    def downsample(self, config: dict[str, Any]) -> int:
        return config["patch_size"]

    def text_width(self, config: dict[str, Any]) -> int:
        return config["caption_channels"]

    def parallel_units(self, net: PixArtTransformer2DModel) -> list[nn.Module]:
        """FSDP units for PixArt, in forward order; the root (Denoiser) is sharded after these.

        - Each transformer block is one unit.
        - Unlike `DiTTransformer2DModel` (whose root forward calls `transformer_blocks[0].norm1.emb`
          and so needs that submodule as its own unit), PixArt's root forward touches only
          root-owned modules: pos_embed, adaln_single, caption_projection, scale_shift_table,
          norm_out, proj_out. The blocks receive the adaLN-single output as a tensor, so
          per-block sharding needs no exception.
        - adaln_single (~8M at XL) and caption_projection (~6M) stay in the root unit: they run
          once per step at the start, and at ~2% of the model a separate unit buys little.
        """
        return list(net.transformer_blocks)


add_preset("dit-tiny", "dit", None, dit_tiny_config(TINY_TEXT_DIM), TINY_TEXT,
           "~0.3M-param pixel-space PixArt DiT (patch 2) + 2-layer CLIP; CPU demos and tests")
add_preset("dit-b-2", "dit", SD_VAE, DIT_B_2, CLIP_L,
           "DiT-B/2 size (12 x 768, patch 2; 119M) in PixArt's layout on SD VAE latents, CLIP-L text (768)")
add_preset("pixart-xl-2", "dit", SD_VAE, PIXART_XL_2, T5_XXL_SHALLOW,
           "PixArt-alpha XL/2 (611M, 28 x 1152, patch 2) on SD VAE latents, T5-XXL-width text (4096)")
