"""VAE kinds: what scaletrain needs to know of each diffusers autoencoder class a preset uses.

A preset's ``vae_config`` names its class (``_class_name``; AutoencoderKL when absent, as SD's
configs are written). Its kind says how far it compresses (pixels per latent along each side,
frames per latent frame) and how a posterior sample is taken into the denoiser's space (SD's
``scaling_factor``, SD3/FLUX's ``shift_factor``, Wan's per-channel ``latents_mean`` /
``latents_std``), and reads a pipeline folder's ``vae/config.json``. A new autoencoder class is
one more kind here; nothing else branches on the VAE's class.
"""

from __future__ import annotations

from typing import Any, ClassVar

Scaling = tuple[Any, Any]  # (scale, shift): floats, or one value per channel (tuples)


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


class VaeKind:
    class_name: ClassVar[str]

    @property
    def cls(self) -> type:
        import diffusers

        return getattr(diffusers, self.class_name)

    def init_args(self, config: Any) -> dict[str, Any]:
        """Every init argument of the class, the config's values over the class defaults."""
        return dict(self.cls.extract_init_dict(dict(config))[0])

    def factors(self, config: dict[str, Any]) -> tuple[int, int]:
        """(pixels per latent along each side, frames per latent frame)."""
        raise NotImplementedError

    def scaling(self, config: Any) -> Scaling:
        """(scale, shift) taking a VAE sample into the denoiser's space as (z - shift) * scale."""
        raise NotImplementedError

    def from_folder_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """A preset's vae_config from a pipeline folder's vae/config.json."""
        return {**self.init_args(config), "_class_name": self.class_name}


class KL(VaeKind):
    """SD, SDXL, SD3, FLUX: 2x per down block but the last, one scale (and shift) for all channels."""

    class_name = "AutoencoderKL"

    def factors(self, config: dict[str, Any]) -> tuple[int, int]:
        return 2 ** (len(config["down_block_types"]) - 1), 1

    def scaling(self, config: Any) -> Scaling:
        return float(_get(config, "scaling_factor")), float(_get(config, "shift_factor") or 0.0)


class KLWan(VaeKind):
    """Wan 2.1's causal 3D VAE: 2x in space per level after the first, 2x in time where
    ``temperal_downsample`` says (a clip of 1 + 4k frames gives 1 + k latent frames), latents
    normalised per channel by ``latents_mean`` / ``latents_std`` (the class defaults when a
    preset's config leaves them out, as diffusers does)."""

    class_name = "AutoencoderKLWan"

    def factors(self, config: dict[str, Any]) -> tuple[int, int]:
        return 2 ** (len(config["dim_mult"]) - 1), 2 ** sum(bool(t) for t in config.get("temperal_downsample", ()))

    def scaling(self, config: Any) -> Scaling:
        mean, std = _get(config, "latents_mean"), _get(config, "latents_std")
        if mean is None or std is None:
            full = self.init_args({k: v for k, v in dict(config).items() if not k.startswith("_")})
            mean, std = full["latents_mean"], full["latents_std"]
        return tuple(1.0 / float(s) for s in std), tuple(float(m) for m in mean)


VAE_KINDS: dict[str, VaeKind] = {k.class_name: k for k in (KL(), KLWan())}


def vae_kind_of(config: Any, where: str | None = None) -> VaeKind:
    """The kind of a VAE config (a preset's dict, a folder's config.json or a built VAE's
    config); one-line ValueError naming ``where`` for a class scaletrain does not train with."""
    name = _get(config, "_class_name") or "AutoencoderKL"
    if name not in VAE_KINDS:
        raise ValueError(f"{where or 'the VAE'} is a {name}; scaletrain's latent presets use "
                         f"{', '.join(VAE_KINDS)}")
    return VAE_KINDS[name]
