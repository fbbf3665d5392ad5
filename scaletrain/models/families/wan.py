"""Video family: Wan 2.1's text-to-video DiT (diffusers `WanTransformer3DModel`) and presets.

Why Wan over CogVideoX or HunyuanVideo (all three are diffusers 3D transformers):
- It fits the one Denoiser signature as it is: (B, C, F, H, W) in, the same shape out, one
  timestep per sample, cross-attention to the caption (no text tokens in the sequence, unlike
  CogVideoX's joint attention, so the token count is the video's alone).
- Its blocks are uniform and independent (`blocks`, the root touches only embeddings and
  the output head): each one is an FSDP2 / checkpoint / compile unit, as for PixArt.
- It was trained with flow matching (the `flow_matching` objective, timesteps x 1000).
- diffusers gives it a context-parallel plan (`_cp_plan`: Ulysses / ring attention over the
  token axis), a LoRA loader (`WanLoraLoaderMixin`) and a pipeline (`WanPipeline`).
- It takes images as 1-frame videos, so joint image-video training needs nothing extra.

An image-shaped input (B, C, H, W) is run as one frame, so every image-path tool (bench
cells, FLOPs, sample grids at frames=1) works on this family unchanged.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from diffusers import WanTransformer3DModel

from scaletrain.models.components import TINY_TEXT_DIM, TINY_TEXT_LEN, UMT5_XXL_PUBLISHED, WAN_VAE
from scaletrain.models.conditioners.wan import WanConditioner
from scaletrain.models.text import Cond
from scaletrain.models.family import ModelFamily, add_preset, register_family

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json: 30 layers, 12 heads x 128 = 1536,
# FFN 8960, patch (1, 2, 2) over the Wan VAE's 16 latent channels, UMT5-XXL text (4096), ~1.42B.
WAN_T2V_1_3B: dict[str, Any] = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)
# Wan-AI/Wan2.1-T2V-14B-Diffusers: 40 layers, 40 heads x 128 = 5120, FFN 13824 (~14.3B).
WAN_T2V_14B: dict[str, Any] = dict(WAN_T2V_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)


def wan_tiny_config(text_dim: int) -> dict[str, Any]:
    """~0.3M-parameter pixel-space Wan: 3 layers, 4 heads x 16 = 64 wide (rotary split 6 / 4 / 4
    over frames, height, width), FFN 192, patch (1, 2, 2) over RGB."""
    return dict(WAN_T2V_1_3B, num_attention_heads=4, attention_head_dim=16, in_channels=3, out_channels=3,
                text_dim=text_dim, freq_dim=64, ffn_dim=192, num_layers=3)


@register_family
class WanFamily(ModelFamily):
    name = "wan"
    net_class = WanTransformer3DModel
    video = True
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
    lora_loader = "WanLoraLoaderMixin"
    lora_prefix = "transformer"
    pipeline_denoiser = "transformer"
    pipeline_class = "WanPipeline"

    def forward(self, net: nn.Module, x: Tensor, timesteps: Tensor, cond: Cond, *,
                pixel_size: tuple[int, int] | None = None) -> Tensor:
        if x.ndim == 4:  # an image: one frame
            out = self.forward(net, x.unsqueeze(2), timesteps, cond).squeeze(2)
        else:
            # the Wan conditioner has zeroed the caption's padding (Wan's attention takes no mask)
            out = net(x, timestep=timesteps, encoder_hidden_states=cond["text_emb"], return_dict=False)[0]
        # Wan's unpatchify is a view for one frame; FSDP2 warns on a view output (an in-place op
        # on it would skip its backward hook), so hand back a tensor of its own then.
        return out.clone() if out._is_view() else out

    def downsample(self, config: dict[str, Any]) -> int:
        return config["patch_size"][-1]

    def frame_factor(self, config: dict[str, Any]) -> int:
        return config["patch_size"][0]

    def text_width(self, config: dict[str, Any]) -> int:
        return config["text_dim"]

    def parallel_units(self, net: WanTransformer3DModel) -> list[nn.Module]:
        """Each `WanTransformerBlock` (self-attention, cross-attention, FFN, its own adaLN
        table) is one unit. The root keeps the patch embedding, rotary table, condition embedder
        (time + text projections) and output head: it runs once per step, before and after the
        blocks, which receive everything as tensors."""
        return list(net.blocks)


add_preset("wan-tiny", "wan", None, wan_tiny_config(TINY_TEXT_DIM), WanConditioner.tiny(TINY_TEXT_DIM, TINY_TEXT_LEN),
           "~0.3M-param pixel-space Wan video DiT (patch 1x2x2) conditioned as Wan is (a tiny UMT5); CPU video "
           "demos and tests")
add_preset("wan-2.1-1.3b", "wan", WAN_VAE, WAN_T2V_1_3B, WanConditioner(UMT5_XXL_PUBLISHED, 512),
           "Wan 2.1 T2V 1.3B as published (30 x 1536, patch 1x2x2) on Wan-VAE latents (8x space, 4x time); "
           "UMT5-XXL (512 tokens)")
add_preset("wan-2.1-14b", "wan", WAN_VAE, WAN_T2V_14B, WanConditioner(UMT5_XXL_PUBLISHED, 512),
           "Wan 2.1 T2V 14B as published (40 x 5120, patch 1x2x2) on Wan-VAE latents; UMT5-XXL (512 tokens)")
