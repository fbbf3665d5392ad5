"""Tiny diffusers pipeline folders, built by the tests with diffusers and transformers alone (no
scaletrain import), as ``pipe.save_pretrained`` writes a published one: SD-2.1-768-like (UNet,
AutoencoderKL, CLIP text model with a real CLIPTokenizer, DDIM v-prediction), PixArt-1024-like
(PixArt transformer with learned sigma and resolution micro-conditions, T5 encoder, DPM-Solver),
and the published multi-encoder layouts: SDXL (CLIPTextModel + CLIPTextModelWithProjection,
the "text_time" UNet, Euler), SD3 (two CLIPTextModelWithProjection + T5EncoderModel, the
SD3 transformer, FlowMatch Euler with a shift), FLUX.1 (CLIPTextModel + T5EncoderModel, the
Flux transformer, FlowMatch Euler with dynamic shifting) and Wan 2.1 (UMT5EncoderModel,
AutoencoderKLWan, the Wan transformer, UniPC with flow sigmas).
Their shapes match no scaletrain preset on purpose: ``model.preset: from_diffusers`` must build
the model from the folder's own configs."""

from __future__ import annotations

from pathlib import Path

import torch

VAE = dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
           norm_num_groups=8, sample_size=32, scaling_factor=0.18215)


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE (GPT-2, CLIP) uses for bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b], extra = chr(256 + extra), extra + 1
    return [out[b] for b in range(256)]


def clip_tokenizer(folder: Path):
    """A real CLIPTokenizer with a character-level BPE vocabulary (every byte symbol, alone and as
    a word end; no merges): CLIP's own tokenizer class, small enough to build here."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>",
                                                                                    "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_sd_pipeline(root: Path, *, prediction_type: str = "v_prediction", seed: int = 0,
                      drop: str | None = None) -> Path:
    """SD-2.x layout at toy size: UNet (2 levels, cross-attention 48 wide), a 2-level VAE
    (factor 2), a 2-layer CLIP text model of width 48 and its tokenizer, DDIM with SD's betas.
    ``drop``: delete that component's folder afterwards (for the bad-input tests)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = clip_tokenizer(root)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="gelu", bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(24, 48),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48, attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True)
    vae = AutoencoderKL(**VAE)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root, safe_serialization=True)
    _drop(root, drop)
    return root


def build_pixart_pipeline(root: Path, *, seed: int = 0, drop: str | None = None) -> Path:
    """PixArt-alpha 1024 layout at toy size: the transformer with learned sigma (8 output
    channels for 4 latent ones; width 48, divisible by 3 for the micro-condition embeddings) and the
    resolution/aspect-ratio micro-conditions the 1024 model (diffusers turns them on for sample_size 128,
    and PixArtAlphaPipeline passes them for it)
    uses, a 2-layer T5 encoder (width 32) with the byte-level T5 tokenizer, DPM-Solver++."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok = ByT5Tokenizer()
    text = T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0, dropout_rate=0.0))
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=8, num_layers=2, sample_size=128,
        patch_size=2, caption_channels=32, cross_attention_dim=48,
        norm_type="ada_norm_single", num_embeds_ada_norm=1000, norm_elementwise_affine=False, norm_eps=1e-6,
        activation_fn="gelu-approximate", attention_bias=True)
    vae = AutoencoderKL(**VAE)
    sched = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                        prediction_type="epsilon")
    PixArtAlphaPipeline(tokenizer=tok, text_encoder=text, vae=vae, transformer=transformer,
                        scheduler=sched).save_pretrained(root, safe_serialization=True)
    _drop(root, drop)
    return root


def _clip(tok, width: int, projection: bool, *, layers: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", projection_dim=width,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _t5(width: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    cfg = dict(vocab_size=384, d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=4,
               feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
               dropout_rate=0.0)
    return UMT5EncoderModel(UMT5Config(**cfg)) if umt5 else T5EncoderModel(T5Config(**cfg))


# An SD3/FLUX-layout VAE at toy size: 16 latent channels, a shift, no quant convs (factor 2).
VAE16 = dict(VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
             use_post_quant_conv=False)


def build_sdxl_pipeline(root: Path, *, seed: int = 0, drop: str | None = None) -> Path:
    """SDXL layout at toy size: CLIP-L-like (width 16) and CLIP-G-like (width 32, projection)
    with real CLIPTokenizers; the UNet cross-attends to both (48) and adds the pooled vector and
    six size/crop micro-conditions ("text_time"); a 2-level VAE; Euler (epsilon, scaled linear)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tok, tok2 = clip_tokenizer(root), clip_tokenizer(root)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(24, 48),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=48, attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    StableDiffusionXLPipeline(vae=AutoencoderKL(**VAE), text_encoder=_clip(tok, 16, False),
                              text_encoder_2=_clip(tok2, 32, True), tokenizer=tok, tokenizer_2=tok2, unet=unet,
                              scheduler=sched).save_pretrained(root, safe_serialization=True)
    _drop(root, drop)
    return root


def build_sd3_pipeline(root: Path, *, seed: int = 0, drop: str | None = None) -> Path:
    """SD3 layout at toy size: two CLIPTextModelWithProjection (widths 16, 16: pooled 32) with
    real CLIPTokenizers and a T5 (width 32, ByT5 tokenizer); the SD3 transformer (2 joint
    blocks, caption 32 wide); a 16-channel VAE with a shift; FlowMatch Euler, shift 3."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import ByT5Tokenizer

    torch.manual_seed(seed)
    tok, tok2 = clip_tokenizer(root), clip_tokenizer(root)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16)
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=AutoencoderKL(**VAE16),
        text_encoder=_clip(tok, 16, True), tokenizer=tok, text_encoder_2=_clip(tok2, 16, True), tokenizer_2=tok2,
        text_encoder_3=_t5(32), tokenizer_3=ByT5Tokenizer()).save_pretrained(root, safe_serialization=True)
    _drop(root, drop)
    return root


def build_flux_pipeline(root: Path, *, seed: int = 0, drop: str | None = None) -> Path:
    """FLUX.1-schnell layout at toy size: CLIPTextModel (width 32: the pooled vector) with a real
    CLIPTokenizer and a T5 (width 32, ByT5 tokenizer); the Flux transformer (1 double + 1 single
    block, no guidance embedding); a 16-channel VAE with a shift; FlowMatch Euler with FLUX's
    dynamic shifting."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import ByT5Tokenizer

    torch.manual_seed(seed)
    tok = clip_tokenizer(root)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(2, 2, 4))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(transformer=transformer, scheduler=sched, vae=AutoencoderKL(**VAE16), text_encoder=_clip(tok, 32, False),
                 tokenizer=tok, text_encoder_2=_t5(32), tokenizer_2=ByT5Tokenizer()).save_pretrained(
        root, safe_serialization=True)
    _drop(root, drop)
    return root


def build_wan_pipeline(root: Path, *, seed: int = 0, drop: str | None = None) -> Path:
    """Wan 2.1 layout at toy size: UMT5EncoderModel (width 32, ByT5 tokenizer), AutoencoderKLWan
    (2 levels: 2x in space and time, 4 channels normalised per channel), the Wan transformer
    (2 blocks); UniPC with flow sigmas (flow_shift 3), as Wan 2.1 ships."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import ByT5Tokenizer

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32,
        freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                           latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.5, 1.0])
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                    num_train_timesteps=1000)
    WanPipeline(tokenizer=ByT5Tokenizer(), text_encoder=_t5(32, umt5=True), vae=vae, transformer=transformer,
                scheduler=sched).save_pretrained(root, safe_serialization=True)
    _drop(root, drop)
    return root


def forget_pipeline_presets() -> None:
    """Unregister the presets read from pipeline folders in this process (``diffusers:...``),
    so that later tests see the named presets only."""
    from scaletrain.models.family import PRESETS

    for name in [n for n in PRESETS if n.startswith("diffusers:")]:
        del PRESETS[name]


def _drop(root: Path, component: str | None) -> None:
    import shutil

    if component is not None:
        shutil.rmtree(root / component)
