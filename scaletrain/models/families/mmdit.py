"""MMDiT family: SD3-style joint-attention transformers (diffusers `SD3Transformer2DModel`).

Image and text tokens keep their own weights (two streams per block) and attend jointly:
each block's attention runs over the concatenation of both sequences, which is why the text
needs no cross-attention and no attention mask (SD3 attends over padding, as its T5 stream
was trained). adaLN is also conditioned on a pooled text vector: SD3's conditioner
(``conditioners/sd3.py``) gives CLIP-L's and CLIP-G's projected outputs side by side (2048).
"""

from __future__ import annotations

from typing import Any


from torch import Tensor, nn
from diffusers import SD3Transformer2DModel

from scaletrain.models.components import (
    CLIP_G_PUBLISHED, CLIP_L_PUBLISHED, SD3_VAE, T5_XXL_PUBLISHED, TINY_TEXT_DIM, TINY_TEXT_LEN,
)
from scaletrain.models.conditioners.sd3 import SD3Conditioner
from scaletrain.models.text import Cond
from scaletrain.models.family import ModelFamily, add_alias, add_preset, register_family

# stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json (2.03B): 24 joint
# blocks, 24 heads x 64 = 1536 hidden, patch 2 on 16-channel latents, T5-XXL-width context
# (4096), CLIP-L + CLIP-G pooled (2048).
SD3_MEDIUM: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192,
)
# stabilityai/stable-diffusion-3.5-large transformer/config.json (8.06B): 38 blocks x 2432,
# RMS-normed queries and keys.
SD35_LARGE: dict[str, Any] = dict(SD3_MEDIUM, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                                  qk_norm="rms_norm")
# SD3's text sequence: 77 CLIP tokens + 256 T5 tokens (the pipeline's max_sequence_length).
SD3_CONDITIONER = SD3Conditioner(CLIP_L_PUBLISHED, CLIP_G_PUBLISHED, T5_XXL_PUBLISHED, clip_len=77, t5_len=256)


def mmdit_tiny_config(text_dim: int) -> dict[str, Any]:
    """~0.5M-param pixel-space MMDiT: 4 joint blocks x 64 hidden, patch 2; accepts up to 128 px."""
    return dict(
        sample_size=32, patch_size=2, in_channels=3, out_channels=3, num_layers=4,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=text_dim,
        caption_projection_dim=64, pooled_projection_dim=text_dim, pos_embed_max_size=64,
    )


@register_family
class MMDiTFamily(ModelFamily):
    name = "mmdit"
    pipeline_class = "StableDiffusion3Pipeline"
    net_class = SD3Transformer2DModel
    # Both streams' attention projections: what diffusers' SD3 LoRA training script adapts.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    lora_loader = "SD3LoraLoaderMixin"  # exported in diffusers' LoRA layout

    def forward(self, net: nn.Module, x: Tensor, timesteps: Tensor, cond: Cond, *,
                pixel_size: tuple[int, int] | None = None) -> Tensor:
        return net(hidden_states=x, encoder_hidden_states=cond["text_emb"], pooled_projections=cond["pooled"],
                   timestep=timesteps, return_dict=False)[0]

    def downsample(self, config: dict[str, Any]) -> int:
        return config["patch_size"]

    def text_width(self, config: dict[str, Any]) -> int:
        return config["joint_attention_dim"]

    def pooled_width(self, config: dict[str, Any]) -> int | None:
        return config["pooled_projection_dim"]

    def max_input_size(self, config: dict[str, Any]) -> int | None:
        # PatchEmbed crops its sin-cos table from a pos_embed_max_size^2 grid of patches.
        return config["pos_embed_max_size"] * config["patch_size"]

    def parallel_units(self, net: SD3Transformer2DModel) -> list[nn.Module]:
        """FSDP units: each joint block (~84M at SD3-medium, its image and text streams
        together, since one attention reads both). The root keeps pos_embed, context_embedder,
        time_text_embed, norm_out and proj_out (~2% of the model), which the root forward calls
        directly; the blocks get their outputs as tensors."""
        return list(net.transformer_blocks)


add_preset("mmdit-tiny", "mmdit", None, mmdit_tiny_config(TINY_TEXT_DIM), SD3Conditioner.tiny(TINY_TEXT_DIM, TINY_TEXT_LEN),
           "~0.5M-param pixel-space SD3-style MMDiT (patch 2, joint attention) conditioned as SD3 is (two tiny "
           "CLIPs + a tiny T5); CPU demos and tests")
add_preset("sd3-medium", "mmdit", SD3_VAE, SD3_MEDIUM, SD3_CONDITIONER,
           "Stable Diffusion 3 medium as published (2.03B MMDiT, 24 x 1536, patch 2) on SD3-VAE latents; "
           "CLIP-L + CLIP-G + T5-XXL (333 tokens)")
add_preset("sd3.5-large", "mmdit", SD3_VAE, SD35_LARGE, SD3_CONDITIONER,
           "Stable Diffusion 3.5 large as published (8.06B MMDiT, 38 x 2432, QK RMS norm) on SD3-VAE latents; "
           "CLIP-L + CLIP-G + T5-XXL (333 tokens)")
add_alias("mmdit-sd3-medium", "sd3-medium")

