"""Frozen parts presets share: VAE configs and text-encoder specs (random init from these
configs, or loaded from a local folder; nothing is downloaded)."""

from __future__ import annotations

from typing import Any

from scaletrain.models import text

# stabilityai/sd-vae-ft-ema config (the VAE of SD-1.x/2.x and PixArt-alpha), 83.7M params.
SD_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215,
)
SD_VAE_FACTOR = 8  # 3 of the 4 encoder blocks downsample by 2
# stabilityai/stable-diffusion-3-medium vae/config.json: the SD layout with 16 latent channels,
# a shift and no quant convs (83.8M params).
SD3_VAE: dict[str, Any] = dict(
    SD_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, sample_size=1024,
    use_quant_conv=False, use_post_quant_conv=False,
)
# black-forest-labs/FLUX.1-dev vae/config.json: the SD3 layout with Flux's scale and shift.
FLUX_VAE: dict[str, Any] = dict(SD3_VAE, scaling_factor=0.3611, shift_factor=0.1159)
# A 0.2M-param VAE of the SD layout (3 blocks: factor 4, 4 latent channels) for the CPU latent
# path (unet-tiny-latent): random init, so its latents carry no meaning, only the real shapes
# and the real encode -> posterior -> decode code path.
TINY_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
    act_fn="silu", sample_size=64, scaling_factor=0.5,
)

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers vae/config.json (AutoencoderKLWan, 127M params): a causal 3D
# VAE, 8x in space and 4x in time (a clip of 1 + 4k frames gives 1 + k latent frames), 16
# channels normalised per channel by latents_mean / latents_std (diffusers' defaults, kept there).
WAN_VAE: dict[str, Any] = dict(
    _class_name="AutoencoderKLWan", base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
    temperal_downsample=[False, True, True],
)

TINY_TEXT_DIM = 32
TINY_TEXT_LEN = 32

TINY_TEXT = text.clip_spec(TINY_TEXT_DIM, layers=2, heads=2, max_len=TINY_TEXT_LEN, act="quick_gelu")
# Full-depth CLIP-L (12 x 768) and OpenCLIP-H (23 x 1024; SD-2 drops the last of 24 layers,
# which is how it reads the penultimate layer). Byte vocab (384), not CLIP's 49408.
CLIP_L = text.clip_spec(768, layers=12, heads=12, max_len=77, act="quick_gelu")
OPENCLIP_H = text.clip_spec(1024, layers=23, heads=16, max_len=77, act="gelu")
# T5-XXL width (4096, d_ff 10240, 64 heads x 64) but 2 of 24 layers: ~390M instead of 4.7B,
# so an offline build fits in RAM; pass text_encoder_path for the real encoder.
T5_XXL_SHALLOW = text.t5_spec(4096, layers=2, heads=64, d_kv=64, d_ff=10240)
