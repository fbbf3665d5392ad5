"""Frozen parts presets share: VAE configs and one-encoder text conditioners (random init from
these configs, or loaded from a local folder; nothing is downloaded)."""

from __future__ import annotations

from typing import Any

from scaletrain.models.conditioners.single import SingleEncoder

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

TINY_TEXT = SingleEncoder.clip(TINY_TEXT_DIM, layers=2, heads=2, max_len=TINY_TEXT_LEN, act="quick_gelu")
# Full-depth CLIP-L (12 x 768) and OpenCLIP-H (23 x 1024; SD-2 drops the last of 24 layers,
# which is how it reads the penultimate layer). Byte vocab (384), not CLIP's 49408.
CLIP_L = SingleEncoder.clip(768, layers=12, heads=12, max_len=77, act="quick_gelu")
OPENCLIP_H = SingleEncoder.clip(1024, layers=23, heads=16, max_len=77, act="gelu")
# T5-XXL width (4096, d_ff 10240, 64 heads x 64) but 2 of 24 layers: ~390M instead of 4.7B,
# so an offline build fits in RAM; pass text_encoder_path for the real encoder. PixArt: 120 tokens.
T5_XXL_SHALLOW = SingleEncoder.t5(4096, layers=2, heads=64, d_kv=64, d_ff=10240, max_len=120)

# The published text encoders of SDXL, SD3/SD3.5, FLUX.1 and Wan 2.1, as their pipelines'
# text_encoder*/config.json hold them (tests/data/published/ keeps those files; a test compares
# each preset with them key by key). A random init of these pairs them with the byte tokenizer
# (ids < 384 fit every vocabulary); a real run gives the pipeline folder (model.text_encoder_path).
_CLIP = dict(attention_dropout=0.0, dropout=0.0, initializer_factor=1.0, initializer_range=0.02,
             layer_norm_eps=1e-05, max_position_embeddings=77, vocab_size=49408, bos_token_id=0,
             eos_token_id=2, pad_token_id=1)
# openai/clip-vit-large-patch14's text tower (SDXL's and FLUX's text_encoder; SD3's with projection).
CLIP_L_PUBLISHED: dict[str, Any] = dict(_CLIP, hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072,
                                        num_attention_heads=12, num_hidden_layers=12, projection_dim=768)
# laion/CLIP-ViT-bigG-14's text tower (SDXL's and SD3's text_encoder_2, with projection).
CLIP_G_PUBLISHED: dict[str, Any] = dict(_CLIP, hidden_act="gelu", hidden_size=1280, intermediate_size=5120,
                                        num_attention_heads=20, num_hidden_layers=32, projection_dim=1280)
_T5_XXL = dict(d_ff=10240, d_kv=64, d_model=4096, decoder_start_token_id=0, dense_act_fn="gelu_new", dropout_rate=0.1,
               eos_token_id=1, feed_forward_proj="gated-gelu", initializer_factor=1.0, is_encoder_decoder=True,
               is_gated_act=True, layer_norm_epsilon=1e-06, num_decoder_layers=24, num_heads=64, num_layers=24,
               pad_token_id=0, relative_attention_max_distance=128, relative_attention_num_buckets=32,
               tie_word_embeddings=False)
# google/t5-v1_1-xxl's encoder (SD3's text_encoder_3, FLUX's text_encoder_2): 4.76B.
T5_XXL_PUBLISHED: dict[str, Any] = dict(_T5_XXL, vocab_size=32128)
# google/umt5-xxl's encoder (Wan 2.1's text_encoder): 5.68B (a 256k vocabulary).
UMT5_XXL_PUBLISHED: dict[str, Any] = dict(_T5_XXL, vocab_size=256384, scalable_attention=True)
# stabilityai/sdxl-vae: the SD layout, SDXL's scale, kept in fp32 by the pipeline (force_upcast).
SDXL_VAE: dict[str, Any] = dict(SD_VAE, scaling_factor=0.13025, sample_size=1024, force_upcast=True)
