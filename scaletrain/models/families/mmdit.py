"""MMDiT family: SD3-style joint-attention transformers (diffusers `SD3Transformer2DModel`).

Image and text tokens keep their own weights (two streams per block) and attend jointly:
each block's attention runs over the concatenation of both sequences, which is why the text
needs no cross-attention and no attention mask (SD3 attends over padding, as its T5 stream
was trained). SD3 also conditions adaLN on a pooled text vector (CLIP-L + CLIP-G pooled,
2048 wide); scaletrain runs one text encoder per preset, so the pooled vector here is the
masked mean of that encoder's token embeddings and ``pooled_projection_dim`` is its width.
That changes one linear layer's input width and nothing else in the block stack.
"""

from __future__ import annotations

from typing import Any


from torch import Tensor, nn
from diffusers import SD3Transformer2DModel

from scaletrain.models.components import SD3_VAE, T5_XXL_SHALLOW, TINY_TEXT, TINY_TEXT_DIM, TINY_TEXT_LEN
from scaletrain.models.family import ModelFamily, add_preset, register_family

# stabilityai/stable-diffusion-3-medium transformer/config.json (2.03B there): 24 joint blocks,
# 24 heads x 64 = 1536 hidden, patch 2 on 16-channel latents, T5-XXL-width context (4096).
# pooled_projection_dim is the context width (see the module docstring): 2.03B -> 2.03B.
SD3_MEDIUM: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
    caption_projection_dim=1536, pooled_projection_dim=4096, pos_embed_max_size=192,
)
# SD3's text sequence: 77 CLIP tokens + 256 T5 tokens, here one 333-token sequence, so FLOPs and
# activations carry the real joint-attention length.
SD3_TEXT_LEN = 333


def mmdit_tiny_config(text_dim: int) -> dict[str, Any]:
    """~0.5M-param pixel-space MMDiT: 4 joint blocks x 64 hidden, patch 2; accepts up to 128 px."""
    return dict(
        sample_size=32, patch_size=2, in_channels=3, out_channels=3, num_layers=4,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=text_dim,
        caption_projection_dim=64, pooled_projection_dim=text_dim, pos_embed_max_size=64,
    )


def pooled_text(text_emb: Tensor, text_mask: Tensor | None) -> Tensor:
    """Mean of the token embeddings over the mask (over every token without one)."""
    if text_mask is None:
        return text_emb.mean(dim=1)
    m = text_mask.to(text_emb.dtype).unsqueeze(-1)
    return (text_emb * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


@register_family
class MMDiTFamily(ModelFamily):
    name = "mmdit"
    pipeline_refusal = ("StableDiffusion3Pipeline expects three text encoders (two CLIP with pooled projections and "
                        "T5); scaletrain's MMDiT conditions on one encoder with a mean-pooled vector, so no diffusers "
                        "pipeline runs it: export the transformer alone (README: sampling it with diffusers)")
    net_class = SD3Transformer2DModel
    # Both streams' attention projections: what diffusers' SD3 LoRA training script adapts.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    lora_loader = "SD3LoraLoaderMixin"  # exported in diffusers' LoRA layout

    def forward(self, net: nn.Module, x: Tensor, timesteps: Tensor, text_emb: Tensor,
                text_mask: Tensor | None, *, pixel_size: tuple[int, int] | None = None) -> Tensor:
        return net(hidden_states=x, encoder_hidden_states=text_emb, pooled_projections=pooled_text(text_emb, text_mask),
                   timestep=timesteps, return_dict=False)[0]

    def downsample(self, config: dict[str, Any]) -> int:
        return config["patch_size"]

    def text_width(self, config: dict[str, Any]) -> int:
        return config["joint_attention_dim"]

    def max_input_size(self, config: dict[str, Any]) -> int | None:
        # PatchEmbed crops its sin-cos table from a pos_embed_max_size^2 grid of patches.
        return config["pos_embed_max_size"] * config["patch_size"]

    def parallel_units(self, net: SD3Transformer2DModel) -> list[nn.Module]:
        """FSDP units: each joint block (~84M at SD3-medium, its image and text streams
        together, since one attention reads both). The root keeps pos_embed, context_embedder,
        time_text_embed, norm_out and proj_out (~2% of the model), which the root forward calls
        directly; the blocks get their outputs as tensors."""
        return list(net.transformer_blocks)


add_preset("mmdit-tiny", "mmdit", None, mmdit_tiny_config(TINY_TEXT_DIM), TINY_TEXT, TINY_TEXT_LEN,
           "~0.5M-param pixel-space SD3-style MMDiT (patch 2, joint attention) + 2-layer CLIP; CPU demos and tests")
add_preset("mmdit-sd3-medium", "mmdit", SD3_VAE, SD3_MEDIUM, T5_XXL_SHALLOW, SD3_TEXT_LEN,
           "SD3-medium size MMDiT (2.0B, 24 x 1536, patch 2) on 16-channel SD3-VAE latents, "
           "T5-XXL-width text (4096, 333 tokens)")

