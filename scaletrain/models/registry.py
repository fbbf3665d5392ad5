"""Named model presets: what to build, in which space it runs, and how to shard it.

A preset (registered by its family's module, ``models/families/``) bundles the denoiser
config, the text encoder spec, the VAE config (latent presets) and the family that builds,
calls and shards the network (``models/family.py``). `build_model`
random-initialises everything from configs, or loads frozen encoders from local folders;
nothing is ever downloaded. The caller seeds torch first so every rank builds identical
weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor, nn
from diffusers import AutoencoderKL

from scaletrain.models import text
from scaletrain.models.vaes import vae_kind_of

if TYPE_CHECKING:
    from scaletrain.config import RunConfig
from scaletrain.models.components import SD_VAE, SD_VAE_FACTOR, TINY_TEXT_DIM, TINY_TEXT_LEN, TINY_VAE  # noqa: F401
from scaletrain.models.family import (  # noqa: F401  (re-exported)
    FAMILIES, PRESETS, ModelFamily, ModelPreset, all_presets, get_family, load_families,
)


def get_preset(name: str) -> ModelPreset:
    """The preset registered as ``name``; a ``diffusers:<folder>`` name (``model.preset:
    from_diffusers``) is read from that pipeline folder and registered on first use."""
    load_families()
    if name not in PRESETS and name.startswith("diffusers:"):  # read from a pipeline folder, once per process
        from scaletrain.models.pipeline_folder import PREFIX, register_pipeline_preset

        return register_pipeline_preset(name.removeprefix(PREFIX), what="the pipeline folder of model.preset")
    if name not in PRESETS:
        named = ", ".join(n for n in PRESETS if ":" not in n)
        raise ValueError(f"model.preset={name!r} is unknown; choose one of: {named}, or from_diffusers "
                         "(with init.from_diffusers=PIPELINE_FOLDER)")
    return PRESETS[name]


class Denoiser(nn.Module):
    """Uniform wrapper the engines shard/wrap; `self.net` is the diffusers model (save_pretrained-able)."""

    def __init__(self, net: nn.Module, family: str, use_text_mask: bool, pixel_factor: int = 1) -> None:
        super().__init__()
        self.net = net
        self.pixel_factor = pixel_factor  # image pixels per input element (the VAE's factor; 1 in pixel space)
        self.family = family  # the family's name (a FAMILIES key)
        # SD UNets were trained attending over padding tokens; masking them would shift
        # the conditioning of a loaded checkpoint. PixArt was trained with the T5 mask. The
        # conditioner says which (``TextConditioner.use_mask``).
        self.use_text_mask = use_text_mask
        self._forward_fn: Callable[..., Tensor] = get_family(family).forward
        # Built on meta, not yet initialised: what models.meta_init.materialize needs (the engine calls it).
        self.pending_init: Any = None

    def materialize(self, device: torch.device) -> None:
        """Allocate and initialise a denoiser built with ``defer_init`` (after the engine has
        sharded it: each rank allocates and fills only its shards)."""
        from scaletrain.models.meta_init import materialize

        if self.pending_init is not None:
            materialize(self.net, self.pending_init, device)
            self.pending_init = None

    def forward(self, x: Tensor, timesteps: Tensor, cond: text.Cond) -> Tensor:
        """``cond``: the preset's text conditioner's output (``models/text.py``), batch first."""
        if timesteps.ndim == 0:  # a single shared timestep: the nets want one per sample
            timesteps = timesteps.expand(x.shape[0])
        if not self.use_text_mask and "text_mask" in cond:
            cond = {k: v for k, v in cond.items() if k != "text_mask"}
        size = (x.shape[-2] * self.pixel_factor, x.shape[-1] * self.pixel_factor)
        return self._forward_fn(self.net, x, timesteps, cond, pixel_size=size)


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
        self._text: list[tuple[nn.Module, Any]] | None = None  # (encoder, tokenizer) per conditioner slot
        self._vae: AutoencoderKL | None = None
        # How the frozen encoders are laid out across ranks (``lay_out_encoders``); None: whole.
        self._layout: Callable[[nn.Module], nn.Module] | None = None

    def build_encoders(self) -> "DiffusionModel":
        if self._text is None:
            encoders, vae = build_encoders(self.preset, self.source)
            if self._layout is not None:  # on the host: only the shards go to the device
                encoders = [(self._layout(e), t) for e, t in encoders]
                vae = self._layout(vae) if vae is not None else None
            if self.device is not None:
                for e, _ in encoders:
                    e.to(self.device)
                vae = vae.to(self.device) if vae is not None else None
            self._text, self._vae = encoders, vae
        return self

    def lay_out_encoders(self, layout: Callable[[nn.Module], nn.Module]) -> None:
        """Lay out the frozen text encoder and VAE with ``layout`` (``model.frozen_encoders=shard``:
        ``models.parallelize.shard_frozen`` over the run's ranks): now when they are built, else
        when they first are (training on precomputed latents builds them for a sample grid).
        Call it before ``to(device)``: the layout moves only each rank's shards there."""
        self._layout = layout
        if self._text is not None:
            self._text = [(layout(e), t) for e, t in self._text]
            self._vae = layout(self._vae) if self._vae is not None else None

    def frozen_numel(self) -> tuple[int, int]:
        """(parameters this rank holds, parameters in all) of the built frozen encoders."""
        mods = [e for e, _ in self._text or []] + ([self._vae] if self._vae is not None else [])
        params = [p for m in mods for p in m.parameters()]
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
        return local, sum(p.numel() for p in params)

    @property
    def encoders_built(self) -> bool:
        return self._text is not None

    @property
    def text_encoders(self) -> list[nn.Module]:
        """The conditioner's encoders, in slot order (pipeline components text_encoder, _2, ...)."""
        return [e for e, _ in self.build_encoders()._text]

    @property
    def tokenizers(self) -> list[Any]:
        return [t for _, t in self.build_encoders()._text]

    def frozen_modules(self) -> list[nn.Module]:
        """The built frozen encoders: text encoders, then the VAE (if any)."""
        return self.text_encoders + ([self.vae] if self.vae is not None else [])

    @property
    def vae(self) -> AutoencoderKL | None:
        return self.build_encoders()._vae

    def to(self, device: torch.device | str) -> "DiffusionModel":
        self.device = torch.device(device)
        if self.denoiser.pending_init is None:  # else the engine materialises it where it shards it
            self.denoiser.to(device)
        for e, _ in self._text or []:
            e.to(device)
        if self._vae is not None:
            self._vae.to(device)
        return self

    @torch.no_grad()
    def encode_text(self, captions: list[str], device: torch.device | str) -> text.Cond:
        """The conditioning of ``captions`` (``text_emb`` (B, L, D) float32, ``text_mask`` (B, L)
        long, and what else the preset's conditioner gives). "" is the unconditional caption."""
        return self.preset.conditioner.encode(self.build_encoders()._text, captions, device)

    @torch.no_grad()
    def encode_posterior(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Pixels in [-1, 1] (B, 3, H, W) -> the VAE posterior's (mean, logvar), in the VAE's dtype
        (logvar clamped as diffusers' DiagonalGaussianDistribution does). What `data encode` stores."""
        vae = self.vae
        if self.preset.video and pixels.ndim == 4:  # an image through a video VAE: one frame
            mean, logvar = self.encode_posterior(pixels.unsqueeze(2))
            return mean.squeeze(2), logvar.squeeze(2)
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
        factor, shift = scaling if scaling is not None else vae_scaling(self.vae)
        return (z - _per_channel(shift, z)) * _per_channel(factor, z)

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
        if self.preset.video and latents.ndim == 4:
            return self.decode(latents.unsqueeze(2)).squeeze(2)
        factor, shift = vae_scaling(vae)
        z = latents.to(next(vae.parameters()).dtype)
        z = z / _per_channel(factor, z) + _per_channel(shift, z)
        return vae.decode(z).sample.float().clamp(-1, 1)


def vae_scaling(vae: Any) -> tuple[Any, Any]:
    """(scale, shift) taking a VAE sample into the denoiser's space as (z - shift) * scale:
    SD's scaling_factor (shift 0; SD3/Flux's shift_factor), or for a video VAE that normalises
    per channel (Wan: latents_mean / latents_std) one value per channel (tuples). Its kind's
    (``models/vaes.py``); ``vae``: a built VAE, or a config dict (its ``_class_name`` names the kind)."""
    if isinstance(vae, nn.Module):  # by isinstance: FSDP2 (frozen_encoders=shard) subclasses the module's class
        from scaletrain.models.vaes import VAE_KINDS

        kind = next((k for k in VAE_KINDS.values() if isinstance(vae, k.cls)), None)
        if kind is None:
            raise ValueError(f"the VAE is a {type(vae).__name__}; scaletrain's latent presets use {', '.join(VAE_KINDS)}")
        return kind.scaling(vae.config)
    return vae_kind_of(vae).scaling(vae)


def _per_channel(v: Any, z: Tensor) -> Any:
    """A scale or shift from ``vae_scaling``, broadcastable over ``z`` (B, C, ...)."""
    if isinstance(v, (int, float)):
        return v
    return torch.tensor(v, dtype=z.dtype, device=z.device).view(1, -1, *([1] * (z.dim() - 2)))


def _vae_class(config: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    return vae_kind_of(config).cls, {k: v for k, v in config.items() if k != "_class_name"}


def build_vae(config: dict[str, Any], path: str | None, dtype: torch.dtype) -> nn.Module:
    """Frozen VAE (AutoencoderKL, or the preset's other AutoencoderKL* class, e.g. Wan's video
    VAE): random init from `config`, or a local folder (or a pipeline root with vae/)."""
    cls, init = _vae_class(config)
    if path is None:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in its run precision, never fp32 and then cast
        try:
            vae = cls(**init)
        finally:
            torch.set_default_dtype(previous)
    else:
        if not os.path.isdir(path):
            raise ValueError(f"model.vae_path={path!r} is not a directory; give a local {cls.__name__} "
                             "folder saved with save_pretrained (downloads are never attempted)")
        sub = os.path.join(path, "vae")
        vae = cls.from_pretrained(sub if os.path.isdir(sub) else path, local_files_only=True, torch_dtype=dtype)
    # nn.Module.to, not ModelMixin.to: the latter warns about fp32-pinned modules, which
    # AutoencoderKL does not have.
    nn.Module.to(vae, dtype).eval().requires_grad_(False)
    return vae


def build_model(preset: ModelPreset | str, *, text_encoder_path: str | None = None,
                vae_path: str | None = None, dtype: torch.dtype = torch.float32, encoders: bool = True,
                encoder_seed: int = 0, seed: int | None = None, defer_init: bool = False) -> DiffusionModel:
    """Build the denoiser (+ frozen encoders). Seed torch before calling: identical weights on every rank.

    The denoiser is built on the meta device and initialised by ``models.meta_init``: the same
    weights at any world size, whole or sharded, from ``seed`` (default: torch's initial seed).
    ``defer_init``: leave it on ``meta`` (``denoiser.pending_init`` set) for an engine that
    shards it first and initialises only its shards (FSDP2); else it is initialised whole here.
    `dtype` applies to the frozen text encoder and VAE (inference only, so bf16 is safe and
    halves their memory). The denoiser is always float32: engines keep fp32 master weights and
    apply mixed precision themselves (FSDP MixedPrecisionPolicy, DeepSpeed bf16).
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
    denoiser = build_denoiser(preset, seed=seed, defer_init=defer_init)
    model = DiffusionModel(preset, denoiser, source)
    return model.build_encoders() if encoders else model


def build_denoiser(preset: ModelPreset | str, *, seed: int | None = None, defer_init: bool = False) -> Denoiser:
    """The trainable Denoiser of ``preset``, built on ``meta`` (``models.meta_init``) and
    initialised whole on the host, or (``defer_init``) left on ``meta`` with
    ``pending_init`` for the engine. Under an ambient ``torch.device("meta")`` (shape-only
    builds: sizing, config checks) it stays on ``meta`` with nothing pending."""
    from scaletrain.models import meta_init

    if isinstance(preset, str):
        preset = get_preset(preset)
    family = get_family(preset.family)
    if torch.empty(0).is_meta:
        net, pending = family.build(dict(preset.denoiser_config)), None
    else:
        net, pending = meta_init.build_on_meta(lambda: family.build(dict(preset.denoiser_config)),
                                               torch.initial_seed() if seed is None else seed)
        if not defer_init:
            meta_init.materialize(net, pending, torch.device("cpu"))
            pending = None
    denoiser = Denoiser(net, preset.family, use_text_mask=preset.conditioner.use_mask, pixel_factor=preset.vae_factor)
    denoiser.pending_init = pending
    return denoiser


def check_encoder_paths(source: EncoderSource) -> None:
    for key, path in (("model.text_encoder_path", source.text_encoder_path), ("model.vae_path", source.vae_path)):
        if path is not None and not os.path.isdir(path):
            raise ValueError(f"{key}={path!r} is not a directory; give a local folder saved with "
                             "save_pretrained (downloads are never attempted)")


def build_encoders(preset: ModelPreset, source: EncoderSource) -> tuple[list[tuple[nn.Module, Any]], nn.Module | None]:
    """([(text encoder, tokenizer)] per conditioner slot, VAE or None), frozen, in ``source.dtype``;
    the global RNG is untouched."""
    encoders = text.build_encoders(preset.conditioner, source.text_encoder_path, source.dtype, source.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(source.seed + 1)
        vae = build_vae(preset.vae_config, source.vae_path, source.dtype) if preset.vae_config is not None else None
    return encoders, vae


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
        # random init draws in the run precision (built directly in it), so the dtype is part of it
        dtype = "" if source.dtype == torch.float32 else f":dtype={str(source.dtype).removeprefix('torch.')}"
        return f"random-init:{digest}:seed={source.seed}{dtype}"

    return {"text_encoder": ident(source.text_encoder_path, preset.conditioner.describe()),
            "vae": ident(source.vae_path, preset.vae_config)}


def frozen_dtype(precision: str) -> torch.dtype:
    """dtype of the frozen text encoder and VAE for ``engine.precision``: the training precision
    (they only run inference, so bf16 halves their memory and time; their outputs are cast to
    float32 before the objective), never fp32 by default on a bf16 run. fp8 trains the denoiser's
    Linear layers in float8 and runs the rest, the frozen encoders too, in bf16."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}.get(precision, torch.float32)


def build_denoiser_net(preset: ModelPreset | str) -> nn.Module:
    """The bare diffusers network of a preset (random init), e.g. to load exported weights into."""
    if isinstance(preset, str):
        preset = get_preset(preset)
    return get_family(preset.family).build(dict(preset.denoiser_config))


def parallel_units(denoiser: Denoiser) -> list[nn.Module]:
    """The family's FSDP plan: submodules to `fully_shard` (in this order) before the root.

    The root unit is the Denoiser itself; each family's ``parallel_units`` says why each
    module is or is not its own unit.
    """
    return get_family(denoiser.family).parallel_units(denoiser.net)


def count_params(module: nn.Module) -> int:
    """Parameter count (works on meta-device modules)."""
    return sum(p.numel() for p in module.parameters())


load_families()  # every family module registers itself and its presets


# What a recipe means for the preset it names: frames per sample and aspect-ratio buckets per
# stage (the recipe alone cannot say: they depend on the family and its VAE).


def stage_frames(cfg: RunConfig, index: int) -> int:
    """Frames per sample of stage ``index``: its ``frames``, 1 on a video family without
    (images as 1-frame clips), 0 on an image family (plain images)."""
    st = cfg.train.stages[index]
    if st.frames is not None:
        return st.frames
    return 1 if get_preset(cfg.model.preset).video else 0


def validation_frames(cfg: RunConfig) -> int:
    """Frames per validation clip: validate.frames, else the last stage's (0: images)."""
    if not get_preset(cfg.model.preset).video:
        return 0
    return cfg.validate.frames or stage_frames(cfg, len(cfg.train.stages) - 1)


def stage_buckets(cfg: RunConfig, index: int) -> list[tuple[int, int]]:
    """(width, height) aspect-ratio buckets of stage ``index`` ([] when data.buckets is off)."""
    if not cfg.data.buckets.enabled:
        return []
    factor = get_preset(cfg.model.preset).downsample_factor
    return cfg.data.buckets.sizes(cfg.train.stages[index].resolution, factor)
