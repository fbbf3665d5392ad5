"""Named model presets: what to build, in which space it runs, and how to shard it.

A preset bundles the denoiser config, the text encoder spec, the VAE config (latent
presets) and the family whose parallel plan applies (`parallel_units`). `build_model`
random-initialises everything from configs, or loads frozen encoders from local folders;
nothing is ever downloaded. The caller seeds torch first so every rank builds identical
weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from diffusers import AutoencoderKL

from scaletrain.models import dit, text, unet

# stabilityai/sd-vae-ft-ema config (the VAE of SD-1.x/2.x and PixArt-alpha), 83.7M params.
SD_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215,
)
SD_VAE_FACTOR = 8  # 3 of the 4 encoder blocks downsample by 2
# A 0.2M-param VAE of the SD layout (3 blocks: factor 4, 4 latent channels) for the CPU latent
# path (unet-tiny-latent): random init, so its latents carry no meaning, only the real shapes
# and the real encode -> posterior -> decode code path.
TINY_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
    act_fn="silu", sample_size=64, scaling_factor=0.5,
)

TINY_TEXT_DIM = 32
TINY_TEXT_LEN = 32


@dataclass(frozen=True)
class ModelPreset:
    name: str
    family: str  # "unet" | "dit"
    latent: bool  # False: pixel space; True: VAE latent space
    downsample_factor: int  # vae factor x denoiser factor; stage resolutions must divide by it
    vae_factor: int  # pixels per latent (1 in pixel space)
    in_channels: int  # channels the denoiser sees
    description: str
    denoiser_config: dict[str, Any] = field(repr=False, compare=False, hash=False)
    text_encoder: text.TextEncoderSpec = field(repr=False, compare=False, hash=False)
    max_text_len: int = 77
    vae_config: dict[str, Any] | None = field(default=None, repr=False, compare=False, hash=False)


class Denoiser(nn.Module):
    """Uniform wrapper the engines shard/wrap; `self.net` is the diffusers model (save_pretrained-able)."""

    def __init__(self, net: nn.Module, family: str, use_text_mask: bool) -> None:
        super().__init__()
        self.net = net
        self.family = family
        # SD UNets were trained attending over padding tokens; masking them would shift
        # the conditioning of a loaded checkpoint. PixArt was trained with the T5 mask.
        self.use_text_mask = use_text_mask
        self._forward_fn: Callable[..., Tensor] = _FORWARD[family]

    def forward(self, x: Tensor, timesteps: Tensor, text_emb: Tensor, text_mask: Tensor | None) -> Tensor:
        if timesteps.ndim == 0:  # a single shared timestep: the nets want one per sample
            timesteps = timesteps.expand(x.shape[0])
        mask = text_mask if self.use_text_mask else None
        return self._forward_fn(self.net, x, timesteps, text_emb, mask)


_FORWARD: dict[str, Callable[..., Tensor]] = {"unet": unet.unet_forward, "dit": dit.pixart_forward}
_BUILD: dict[str, Callable[[dict[str, Any]], nn.Module]] = {"unet": unet.build_unet, "dit": dit.build_pixart}
_SHARD_UNITS: dict[str, Callable[[Any], list[nn.Module]]] = {
    "unet": unet.unet_shard_units, "dit": dit.dit_shard_units,
}


@dataclass(frozen=True)
class EncoderSource:
    """Where the frozen encoders come from: local folders, or random init from the preset's
    configs with a seed of their own (so a run that never builds them, training on
    precomputed latents, gets the same ones when it samples)."""

    text_encoder_path: str | None = None
    vae_path: str | None = None
    seed: int = 0
    dtype: torch.dtype = torch.float32


class DiffusionModel:
    """The parts of one diffusion model. Only `denoiser` trains; encoders are frozen.

    The text encoder and VAE are built at construction, or (``build_model(encoders=False)``,
    training on precomputed latents) on first use, e.g. for a sample grid."""

    def __init__(self, preset: ModelPreset, denoiser: Denoiser, source: EncoderSource) -> None:
        self.preset = preset
        self.denoiser = denoiser
        self.source = source
        self.device: torch.device | None = None  # set by `to`; lazily built encoders go there
        self.max_text_len = preset.max_text_len
        self._text: tuple[nn.Module, Any] | None = None
        self._vae: AutoencoderKL | None = None

    def build_encoders(self) -> "DiffusionModel":
        if self._text is None:
            encoder, tokenizer, vae = build_encoders(self.preset, self.source)
            if self.device is not None:
                encoder.to(self.device)
                vae = vae.to(self.device) if vae is not None else None
            self._text, self._vae = (encoder, tokenizer), vae
        return self

    @property
    def encoders_built(self) -> bool:
        return self._text is not None

    @property
    def text_encoder(self) -> nn.Module:
        return self.build_encoders()._text[0]

    @property
    def tokenizer(self) -> Any:
        return self.build_encoders()._text[1]

    @property
    def vae(self) -> AutoencoderKL | None:
        return self.build_encoders()._vae

    def to(self, device: torch.device | str) -> "DiffusionModel":
        self.device = torch.device(device)
        self.denoiser.to(device)
        if self._text is not None:
            self._text[0].to(device)
        if self._vae is not None:
            self._vae.to(device)
        return self

    @torch.no_grad()
    def encode_text(self, captions: list[str], device: torch.device | str) -> tuple[Tensor, Tensor]:
        """(emb (B, L, D) float32, mask (B, L) long). "" encodes to eos + padding (unconditional)."""
        return text.encode_captions(self.text_encoder, self.tokenizer, self.preset.text_encoder,
                                    captions, self.max_text_len, device)

    @torch.no_grad()
    def encode_posterior(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Pixels in [-1, 1] (B, 3, H, W) -> the VAE posterior's (mean, logvar), in the VAE's dtype
        (logvar clamped as diffusers' DiagonalGaussianDistribution does). What `data encode` stores."""
        vae = self.vae
        dist = vae.encode(pixels.to(next(vae.parameters()).dtype)).latent_dist
        return dist.mean, dist.logvar

    def latents_from_posterior(self, mean: Tensor, logvar: Tensor, generators: list[torch.Generator] | None,
                               scaling: tuple[float, float] | None = None) -> Tensor:
        """One posterior sample per image (SD/PixArt training draws from the posterior every
        step, not its mode), scaled into the denoiser's space, float32. With ``generators`` (one
        per sample, keyed like the diffusion noise) the draw is layout-independent, so the online
        and the precomputed path give the same latents; ``scaling`` = (scaling_factor,
        shift_factor) lets the precomputed path run without building the VAE."""
        if generators is None:
            noise = torch.randn(mean.shape, dtype=torch.float32)
        else:
            noise = torch.stack([torch.randn(tuple(mean.shape[1:]), generator=g) for g in generators])
        z = mean.float() + torch.exp(0.5 * logvar.float()) * noise.to(mean.device)
        factor, shift = scaling if scaling is not None else vae_scaling(self.vae.config)
        return (z - shift) * factor

    @torch.no_grad()
    def encode_images(self, pixels: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
        """Pixels in [-1, 1] (B, 3, H, W) -> denoiser input space (float32): a posterior sample
        (keyed by ``generators`` when given) for latent presets, the pixels otherwise."""
        if not self.preset.latent:
            return pixels.float()
        mean, logvar = self.encode_posterior(pixels)
        return self.latents_from_posterior(mean, logvar, generators)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Inverse of `encode_images`: returns pixels in [-1, 1] (float32)."""
        if not self.preset.latent:
            return latents.float().clamp(-1, 1)
        vae = self.vae
        factor, shift = vae_scaling(vae.config)
        z = latents.to(next(vae.parameters()).dtype) / factor + shift
        return vae.decode(z).sample.float().clamp(-1, 1)


def vae_scaling(config: Any) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of a VAE config (shift 0 for SD's VAE, set for SD3/Flux's)."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    return float(get("scaling_factor")), float(get("shift_factor", None) or 0.0)


def _preset(name: str, family: str, vae: dict[str, Any] | None, denoiser_config: dict[str, Any],
            text_encoder: text.TextEncoderSpec, max_text_len: int, description: str) -> ModelPreset:
    """Derive the space-dependent fields so they can never disagree with the configs."""
    net_factor = unet.unet_downsample(denoiser_config) if family == "unet" else denoiser_config["patch_size"]
    vae_factor = 2 ** (len(vae["down_block_types"]) - 1) if vae is not None else 1  # the last block keeps size
    return ModelPreset(
        name=name, family=family, latent=vae is not None, downsample_factor=vae_factor * net_factor,
        vae_factor=vae_factor, in_channels=denoiser_config["in_channels"], description=description,
        denoiser_config=denoiser_config, text_encoder=text_encoder, max_text_len=max_text_len,
        vae_config=vae,
    )


_TINY_TEXT = text.clip_spec(TINY_TEXT_DIM, layers=2, heads=2, max_len=TINY_TEXT_LEN, act="quick_gelu")
# Full-depth CLIP-L (12 x 768) and OpenCLIP-H (23 x 1024; SD-2 drops the last of 24 layers,
# which is how it reads the penultimate layer). Byte vocab (384), not CLIP's 49408.
_CLIP_L = text.clip_spec(768, layers=12, heads=12, max_len=77, act="quick_gelu")
_OPENCLIP_H = text.clip_spec(1024, layers=23, heads=16, max_len=77, act="gelu")
# T5-XXL width (4096, d_ff 10240, 64 heads x 64) but 2 of 24 layers: ~390M instead of 4.7B,
# so an offline PixArt build fits in RAM; pass text_encoder_path for the real encoder.
_T5_XXL_SHALLOW = text.t5_spec(4096, layers=2, heads=64, d_kv=64, d_ff=10240)

PRESETS: dict[str, ModelPreset] = {p.name: p for p in (
    _preset("unet-tiny", "unet", None, unet.unet_tiny_config(TINY_TEXT_DIM), _TINY_TEXT, TINY_TEXT_LEN,
            "~1M-param pixel-space UNet + 2-layer CLIP; CPU demos and tests at 32-64 px"),
    _preset("unet-small", "unet", None, unet.unet_small_config(TINY_TEXT_DIM), _TINY_TEXT, TINY_TEXT_LEN,
            "~1.7M-param 3-level pixel-space UNet + 2-layer CLIP; learns prompted positions (configs/quality.yaml)"),
    _preset("unet-tiny-latent", "unet", TINY_VAE, {**unet.unet_tiny_config(TINY_TEXT_DIM), "in_channels": 4,
                                                    "out_channels": 4}, _TINY_TEXT, TINY_TEXT_LEN,
            "unet-tiny on the latents of a tiny random-init VAE (factor 4); the latent path on CPU "
            "(data encode, data.precomputed) at 32-64 px"),
    _preset("unet-sd15", "unet", SD_VAE, unet.UNET_SD15, _CLIP_L, 77,
            "Stable Diffusion 1.5 UNet (860M) on SD VAE latents, CLIP-L text (768)"),
    _preset("unet-sd2", "unet", SD_VAE, unet.UNET_SD2, _OPENCLIP_H, 77,
            "Stable Diffusion 2.x UNet (866M) on SD VAE latents, OpenCLIP-H text (1024)"),
    _preset("dit-tiny", "dit", None, dit.dit_tiny_config(TINY_TEXT_DIM), _TINY_TEXT, TINY_TEXT_LEN,
            "~0.3M-param pixel-space PixArt DiT (patch 2) + 2-layer CLIP; CPU demos and tests"),
    _preset("dit-b-2", "dit", SD_VAE, dit.DIT_B_2, _CLIP_L, 77,
            "DiT-B/2 size (12 x 768, patch 2; 119M) in PixArt's layout on SD VAE latents, CLIP-L text (768)"),
    _preset("pixart-xl-2", "dit", SD_VAE, dit.PIXART_XL_2, _T5_XXL_SHALLOW, 120,
            "PixArt-alpha XL/2 (611M, 28 x 1152, patch 2) on SD VAE latents, T5-XXL-width text (4096)"),
)}


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"model.preset={name!r} is unknown; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def build_vae(config: dict[str, Any], path: str | None, dtype: torch.dtype) -> AutoencoderKL:
    """Frozen SD VAE: random init from `config`, or a local folder (or a pipeline root with vae/)."""
    if path is None:
        vae = AutoencoderKL(**config)
    else:
        if not os.path.isdir(path):
            raise ValueError(f"model.vae_path={path!r} is not a directory; give a local AutoencoderKL "
                             "folder saved with save_pretrained (downloads are never attempted)")
        sub = os.path.join(path, "vae")
        vae = AutoencoderKL.from_pretrained(sub if os.path.isdir(sub) else path, local_files_only=True)
    # nn.Module.to, not ModelMixin.to: the latter warns about fp32-pinned modules, which
    # AutoencoderKL does not have.
    nn.Module.to(vae, dtype).eval().requires_grad_(False)
    return vae


def build_model(preset: ModelPreset | str, *, text_encoder_path: str | None = None,
                vae_path: str | None = None, dtype: torch.dtype = torch.float32, encoders: bool = True,
                encoder_seed: int = 0) -> DiffusionModel:
    """Build the denoiser (+ frozen encoders). Seed torch before calling: identical weights on every rank.

    `dtype` applies to the frozen text encoder and VAE (inference only, so bf16 is safe and
    halves their memory). The denoiser is always built in float32: engines keep fp32 master
    weights and apply mixed precision themselves (FSDP MixedPrecisionPolicy, DeepSpeed bf16).
    Random-init encoders draw from ``encoder_seed`` only (not from the global RNG), so
    ``scaletrain data encode`` and a training run with the same seed build the same ones.
    ``encoders=False`` defers them to first use (training on precomputed latents).
    """
    if isinstance(preset, str):
        preset = get_preset(preset)
    if vae_path is not None and not preset.latent:
        raise ValueError(f"model.vae_path={vae_path!r} was given but model.preset={preset.name!r} runs in "
                         "pixel space; drop vae_path or choose a latent preset")
    source = EncoderSource(text_encoder_path, vae_path, encoder_seed, dtype)
    check_encoder_paths(source)
    net = build_denoiser_net(preset)
    denoiser = Denoiser(net, preset.family, use_text_mask=preset.text_encoder.use_mask)
    model = DiffusionModel(preset, denoiser, source)
    return model.build_encoders() if encoders else model


def check_encoder_paths(source: EncoderSource) -> None:
    for key, path in (("model.text_encoder_path", source.text_encoder_path), ("model.vae_path", source.vae_path)):
        if path is not None and not os.path.isdir(path):
            raise ValueError(f"{key}={path!r} is not a directory; give a local folder saved with "
                             "save_pretrained (downloads are never attempted)")


def build_encoders(preset: ModelPreset, source: EncoderSource) -> tuple[nn.Module, Any, AutoencoderKL | None]:
    """(text encoder, tokenizer, VAE or None), frozen, in ``source.dtype``; the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(source.seed)
        encoder, tokenizer = text.build_text_encoder(preset.text_encoder, source.text_encoder_path, source.dtype)
        torch.manual_seed(source.seed + 1)
        vae = build_vae(preset.vae_config, source.vae_path, source.dtype) if preset.vae_config is not None else None
    return encoder, tokenizer, vae


def encoder_identity(preset: ModelPreset, source: EncoderSource) -> dict[str, Any]:
    """What determines the encoders' outputs, recorded in precomputed shards and compared with a
    recipe's before training on them: a local folder's absolute path, or the random-init
    config's hash and seed."""
    def ident(path: str | None, config: dict[str, Any] | None) -> str | None:
        if config is None:
            return None
        if path is not None:
            return "path:" + os.path.abspath(path)
        digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return f"random-init:{digest}:seed={source.seed}"

    return {"text_encoder": ident(source.text_encoder_path, preset.text_encoder.config),
            "vae": ident(source.vae_path, preset.vae_config)}


def frozen_dtype(precision: str) -> torch.dtype:
    """dtype of the frozen text encoder and VAE for ``engine.precision``: the training precision
    (they only run inference, so bf16 halves their memory and time; their outputs are cast to
    float32 before the objective), never fp32 by default on a bf16 run."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def build_denoiser_net(preset: ModelPreset | str) -> nn.Module:
    """The bare diffusers network of a preset (random init), e.g. to load exported weights into."""
    if isinstance(preset, str):
        preset = get_preset(preset)
    return _BUILD[preset.family](dict(preset.denoiser_config))


def parallel_units(denoiser: Denoiser) -> list[nn.Module]:
    """The family's FSDP plan: submodules to `fully_shard` (in this order) before the root.

    The root unit is the Denoiser itself; see `unet.unet_shard_units` / `dit.dit_shard_units`
    for why each module is or is not its own unit.
    """
    if denoiser.family not in _SHARD_UNITS:
        raise ValueError(f"denoiser.family={denoiser.family!r} has no parallel plan; "
                         f"known families: {', '.join(_SHARD_UNITS)}")
    return _SHARD_UNITS[denoiser.family](denoiser.net)


def count_params(module: nn.Module) -> int:
    """Parameter count (works on meta-device modules)."""
    return sum(p.numel() for p in module.parameters())
