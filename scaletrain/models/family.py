"""The model-family seam: what a denoiser family must provide, and the preset registry.

A family (``scaletrain/models/families/<name>.py``, one file each) subclasses
``ModelFamily``, registers itself with ``@register_family`` and its presets with
``add_preset``; every module in that package is imported when the registry is first used,
so a new family is one new file. Everything family-specific lives there: how the diffusers
network is built and called, its parallel plan, its down-sampling factor and text width
(FLOPs, resolution checks), its LoRA targets and the layout its LoRA adapter is exported in.
Nothing outside the family modules branches on a family's name.

This module imports neither ``models/lora.py`` nor ``models/pipeline_folder.py`` (both import
it): ``get_preset`` lives above them in ``models/registry.py`` and reads a ``diffusers:<folder>``
preset through ``pipeline_folder.register_pipeline_preset``, which registers it here.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from scaletrain.models import text

# peft's adapter name, part of every LoRA parameter's state-dict key: models/lora.py puts the
# adapters on under it and ``ModelFamily.export_lora`` writes them out under it.
ADAPTER = "default"


class ModelFamily(ABC):
    """One denoiser family. Stateless: the registry holds one instance per family."""

    name: ClassVar[str]
    net_class: ClassVar[type[nn.Module]]  # the diffusers class (save_pretrained / from_pretrained)
    # peft target-module suffixes when lora.target_modules is not set
    lora_targets: ClassVar[tuple[str, ...]]
    # The diffusers LoRA loader mixin (in diffusers.loaders) whose file layout the adapter is
    # exported in, and its key prefix ("unet" / "transformer"); None: peft's own layout.
    lora_loader: ClassVar[str | None] = None
    lora_prefix: ClassVar[str] = "transformer"
    # `ckpt export --pipeline`: the diffusers pipeline class a latent preset of this family is
    # written as (unless its conditioner names its own: ``pipeline_for``), the name of its
    # denoiser component, and each pipeline's other arguments; None: the family has none, and
    # ``pipeline_refusal`` says why.
    pipeline_class: ClassVar[str | None] = None
    pipeline_denoiser: ClassVar[str] = "transformer"
    pipeline_extras: ClassVar[dict[str, dict[str, Any]]] = {}
    pipeline_refusal: ClassVar[str] = "scaletrain writes no diffusers pipeline for this family"
    # Caption tokens of a preset read from a pipeline folder (models/pipeline_folder.py): the
    # pipeline's own prompt length where it is not the tokenizer's model_max_length.
    pipeline_text_len: ClassVar[int | None] = None
    # A video family takes (B, C, F, H, W) (F frames; an image is F = 1) and can train stages
    # with `frames`; an image family takes (B, C, H, W) only.
    video: ClassVar[bool] = False

    def frame_factor(self, config: dict[str, Any]) -> int:
        """Frames per token along time (a video family's temporal patch size)."""
        return 1

    def pipeline_for(self, preset: Any) -> str | None:
        """The diffusers pipeline class ``preset`` is written as: its conditioner's (SDXL's two
        encoders are StableDiffusionXLPipeline's) or the family's."""
        return preset.conditioner.pipeline or self.pipeline_class

    def pipeline_problem(self, preset: Any) -> str | None:
        """Why ``preset`` cannot be written as this family's pipeline (one line), or None."""
        return None if self.pipeline_for(preset) is not None else self.pipeline_refusal

    def build(self, config: dict[str, Any]) -> nn.Module:
        """The bare diffusers network, random init (seed torch first)."""
        return self.net_class(**config)

    @abstractmethod
    def forward(self, net: nn.Module, x: Tensor, timesteps: Tensor, cond: text.Cond, *,
                pixel_size: tuple[int, int] | None = None) -> Tensor:
        """The prediction for ``x`` (B, C, H, W) at ``timesteps`` (B,) in the objective's
        0..1000 scale, conditioned on ``cond`` (the preset's text conditioner's output:
        ``text_emb`` (B, L, D), ``text_mask`` (B, L) when the denoiser attends with it, and
        what else the conditioner gives, e.g. ``pooled``). ``pixel_size``: (height, width) of
        the images ``x`` stands for, for networks that micro-condition on it (PixArt-alpha
        1024, SDXL)."""

    @abstractmethod
    def parallel_units(self, net: nn.Module) -> list[nn.Module]:
        """Submodules to shard (FSDP2 unit, checkpoint, compile) in forward order; the root
        (the Denoiser) is sharded after them."""

    @abstractmethod
    def downsample(self, config: dict[str, Any]) -> int:
        """Spatial factor from the denoiser's input to its coarsest grid: stage resolutions
        (in the denoiser's space) must divide by it."""

    @abstractmethod
    def text_width(self, config: dict[str, Any]) -> int:
        """Width of the text embedding the network is conditioned on."""

    def pooled_width(self, config: dict[str, Any]) -> int | None:
        """Width of the pooled text vector the network is conditioned on (SD3, FLUX, SDXL), or
        None when it takes none."""
        return None

    def input_channels(self, config: dict[str, Any]) -> int:
        """Channels of the (B, C, H, W) tensor the Denoiser takes (pixels or latents)."""
        return config["in_channels"]

    def hidden_size(self, config: dict[str, Any]) -> int:
        """The network's width, for DeepSpeed's "auto" bucket sizes (engines/ds_config.py):
        ``hidden_size``, else attention heads x head dim (transformers), else the widest
        UNet block. A family whose config says none of these overrides it."""
        if isinstance(config.get("hidden_size"), int):
            return config["hidden_size"]
        heads, dim = config.get("num_attention_heads"), config.get("attention_head_dim")
        if isinstance(heads, int) and isinstance(dim, int):
            return heads * dim
        if config.get("block_out_channels"):
            return max(config["block_out_channels"])
        raise ValueError(f"the {self.name} family names no hidden size")

    def max_input_size(self, config: dict[str, Any]) -> int | None:
        """Largest side (denoiser input, e.g. latents) the network accepts; None: no limit."""
        return None

    def export_lora(self, out: Path, base: nn.Module, layers: dict[str, Tensor], lora_config: Any) -> str:
        """Write a trained adapter (peft keys, adapter name dropped) in the layout this family's
        loader reads; returns the layout's name. With ``lora_loader`` set: diffusers'
        ``pytorch_lora_weights.safetensors`` (keys ``<lora_prefix>.*``, peft config in the header)
        by that pipeline loader's own writer, a classmethod (no pipeline needed), which
        ``pipe.load_lora_weights(OUT)`` and ``net.load_lora_adapter(OUT, prefix=lora_prefix)``
        read. Without one: peft's ``adapter_config.json`` + ``adapter_model.safetensors``
        (``PeftModel.from_pretrained(net, OUT)`` reads it)."""
        if self.lora_loader is not None:
            import diffusers.loaders

            writer = getattr(diffusers.loaders, self.lora_loader).save_lora_weights
            writer(out, **{f"{self.lora_prefix}_lora_layers": layers,
                           f"{self.lora_prefix}_lora_adapter_metadata": lora_config.to_dict()})
            return "diffusers"
        from peft import get_peft_model, set_peft_model_state_dict

        # get_peft_model adds fresh adapters (B = 0), so load the trained ones in.
        model = get_peft_model(base, lora_config, adapter_name=ADAPTER)
        loaded = set_peft_model_state_dict(model, {f"base_model.model.{k}": v for k, v in layers.items()},
                                           adapter_name=ADAPTER)
        if loaded.unexpected_keys:  # peft reports, does not raise
            raise ValueError(f"adapter tensor {loaded.unexpected_keys[0]!r} has no place in the model")
        model.save_pretrained(out, safe_serialization=True)
        return "peft"


FAMILIES: dict[str, ModelFamily] = {}


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    if getattr(cls, "name", None) in FAMILIES:
        raise ValueError(f"model family {cls.name!r} is registered twice")
    FAMILIES[cls.name] = cls()
    return cls


@dataclass(frozen=True)
class ModelPreset:
    name: str
    family: str  # a FAMILIES key
    latent: bool  # False: pixel space; True: VAE latent space
    downsample_factor: int  # vae factor x denoiser factor; stage resolutions must divide by it
    vae_factor: int  # pixels per latent (1 in pixel space)
    in_channels: int  # channels the denoiser sees
    description: str
    denoiser_config: dict[str, Any] = field(repr=False, compare=False, hash=False)
    conditioner: text.TextConditioner = field(repr=False, compare=False, hash=False)
    vae_config: dict[str, Any] | None = field(default=None, repr=False, compare=False, hash=False)
    # Video presets: frames per latent frame after the first (a causal video VAE keeps frame 0
    # and compresses the rest by this; 1 in pixel space and for image VAEs).
    vae_frame_factor: int = 1
    video: bool = False  # the family's `video`

    @property
    def max_text_len(self) -> int:
        """Tokens of the caption sequence the denoiser attends to (FLOPs, shapes)."""
        return self.conditioner.text_len

    def latent_frames(self, frames: int) -> int:
        """Frames the denoiser sees for a clip of ``frames`` frames."""
        return 1 + (frames - 1) // self.vae_frame_factor

    def tokens(self, height: int, width: int, frames: int = 0) -> int:
        """Tokens per sample of an image (``frames`` 0) or clip at (height, width) pixels: the
        denoiser's grid after its patching (its down-sampling factor, and in time its frame factor)."""
        f = get_family(self.family)
        grid = (height // self.downsample_factor) * (width // self.downsample_factor)
        if not self.video:
            return grid
        return -(-self.latent_frames(max(frames, 1)) // f.frame_factor(self.denoiser_config)) * grid

    @property
    def max_resolution(self) -> int | None:
        """Largest image side (pixels) the network accepts, or None."""
        side = get_family(self.family).max_input_size(self.denoiser_config)
        return None if side is None else side * self.vae_factor


PRESETS: dict[str, ModelPreset] = {}


def vae_factors(vae: dict[str, Any] | None) -> tuple[int, int]:
    """(pixels per latent along each side, frames per latent frame) of a VAE config."""
    if vae is None:
        return 1, 1
    from scaletrain.models.vaes import vae_kind_of

    return vae_kind_of(vae).factors(vae)


def add_preset(name: str, family: str, vae: dict[str, Any] | None, denoiser_config: dict[str, Any],
               conditioner: text.TextConditioner, description: str) -> ModelPreset:
    """Register a preset, deriving the space-dependent fields so they can never disagree
    with the configs."""
    if name in PRESETS:
        raise ValueError(f"model preset {name!r} is registered twice")
    fam = FAMILIES[family]
    widths = {"caption width": (conditioner.text_width, fam.text_width(denoiser_config)),
              "pooled width": (conditioner.pooled_width, fam.pooled_width(denoiser_config))}
    wrong = [f"{what} {have} where the {fam.name} denoiser takes {want}" for what, (have, want) in widths.items()
             if have != want]
    if wrong:
        raise ValueError(f"model preset {name!r}: its text conditioner ({conditioner.name}) gives {'; '.join(wrong)}")
    net_factor = fam.downsample(denoiser_config)
    vae_factor, frame_factor = vae_factors(vae)
    preset = ModelPreset(
        name=name, family=family, latent=vae is not None, downsample_factor=vae_factor * net_factor,
        vae_factor=vae_factor, in_channels=fam.input_channels(denoiser_config), description=description,
        denoiser_config=denoiser_config, conditioner=conditioner,
        vae_config=vae, vae_frame_factor=frame_factor, video=fam.video,
    )
    PRESETS[name] = preset
    return preset


def add_alias(alias: str, name: str) -> ModelPreset:
    """Register ``alias`` as another name of preset ``name`` (an earlier name kept for recipes and
    results that use it): the same configs under its own name."""
    from dataclasses import replace

    if alias in PRESETS:
        raise ValueError(f"model preset {alias!r} is registered twice")
    PRESETS[alias] = replace(PRESETS[name], name=alias, description=f"= {name} (an earlier name)")
    return PRESETS[alias]


_loaded = False


def load_families() -> None:
    """Import every module of ``scaletrain.models.families`` (each registers itself)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from scaletrain.models import families

    for mod in sorted(pkgutil.iter_modules(families.__path__), key=lambda m: m.name):
        importlib.import_module(f"{families.__name__}.{mod.name}")


def get_family(name: str) -> ModelFamily:
    load_families()
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r} is unknown; known families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def all_presets() -> dict[str, ModelPreset]:
    load_families()
    return PRESETS
