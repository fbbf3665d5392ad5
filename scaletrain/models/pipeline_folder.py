"""Presets read from a diffusers pipeline folder: ``model.preset: from_diffusers``.

A pipeline root (``model_index.json`` and one subfolder per component: ``unet`` or
``transformer``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``, as
``save_pretrained`` of a pipeline writes it, e.g. SD-2.1-768 or PixArt-alpha 1024) describes
its own networks. Instead of refusing a folder that no named preset matches, the recipe says
``model.preset: from_diffusers`` with ``init.from_diffusers: ROOT``; config validation turns
that into the preset name ``diffusers:<absolute root>`` (``PREFIX``), and ``get_preset``
registers that preset on first use, on every rank and in every later command (resume,
``ckpt export``), from the folder's configs:

- the family is the one whose ``pipeline_denoiser`` component holds its ``net_class``
  (``UNet2DConditionModel`` -> unet, ``PixArtTransformer2DModel`` -> dit, ...);
- the denoiser and VAE configs are the folder's ``config.json`` files, reduced to their class's
  init arguments by diffusers' own ``extract_init_dict``;
- the text encoder spec (CLIP or T5, width, mask convention) is the folder's
  ``text_encoder/config.json``; the caption length is the family's pipeline length
  (``ModelFamily.pipeline_text_len``) or the tokenizer's ``model_max_length``.

Configs are read as JSON (``common.safe_load.read_json``): nothing in the folder runs. The
weights are loaded later, by ``checkpoint.init`` (the denoiser) and ``models.text`` /
``registry.build_vae`` (the frozen encoders, whose paths default to the root).

What this does by hand: diffusers' ``DiffusionPipeline.from_pretrained`` would build the same
components, but it instantiates every one (the whole text encoder and VAE on every call,
including config validation and ``scaletrain size``) and may import code named by the folder's
``model_index.json``; a preset needs only the configs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PREFIX = "diffusers:"
KEYWORD = "from_diffusers"  # model.preset value that asks for a preset read from init.from_diffusers
# The components a text-to-image pipeline scaletrain trains needs, besides its denoiser.
REQUIRED = ("text_encoder", "tokenizer", "scheduler")
LAYOUT = ("a diffusers pipeline folder holds model_index.json and one subfolder per component "
          "(unet or transformer, vae, text_encoder, tokenizer, scheduler), as pipe.save_pretrained writes it")


def is_pipeline_root(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / "model_index.json").is_file()


def preset_name(root: str | Path) -> str:
    return PREFIX + str(Path(root).resolve())


def _read(path: Path, what: str) -> dict[str, Any]:
    from scaletrain.common.safe_load import read_json

    try:
        data = read_json(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}: {path} is not readable JSON ({e}); {LAYOUT}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} is not a JSON object; {LAYOUT}")
    return data


def _components(index: dict[str, Any]) -> dict[str, str]:
    """component -> class name, for the entries model_index.json fills ([library, class])."""
    return {k: v[1] for k, v in index.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[1] is not None}


def text_encoders(root: str | Path) -> list[str]:
    """The pipeline's text encoder components (text_encoder, text_encoder_2, ...)."""
    comps = _components(_read(Path(root) / "model_index.json", "init.from_diffusers"))
    return sorted(k for k in comps if k == "text_encoder" or k.startswith("text_encoder_"))


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def denoiser_of(root: Path, what: str) -> tuple[str, Any]:
    """(component name, family) of the pipeline's denoiser."""
    from scaletrain.models.family import FAMILIES, load_families

    load_families()
    comps = _components(_read(root / "model_index.json", what))
    for fam in FAMILIES.values():
        if comps.get(fam.pipeline_denoiser) == fam.net_class.__name__:
            return fam.pipeline_denoiser, fam
    found = ", ".join(f"{k}: {v}" for k, v in comps.items()) or "nothing"
    known = ", ".join(sorted({f"{f.pipeline_denoiser}: {f.net_class.__name__}" for f in FAMILIES.values()}))
    raise ValueError(f"{what}={str(root)!r}: model_index.json names no denoiser scaletrain trains ({found}); "
                     f"it knows {known}")


def check_pipeline(root: str | Path, what: str, *, whole: bool = True) -> tuple[str, Any]:
    """One-line ValueErrors for a pipeline folder that lacks a component (its subfolder, its
    config, its weights); returns ``denoiser_of``. ``whole``: also the encoders and scheduler
    (a preset read from the folder needs them; loading only its denoiser does not)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{what}={str(root)!r} does not exist; {LAYOUT}")
    if not (root / "model_index.json").is_file():
        raise ValueError(f"{what}={str(root)!r} has no model_index.json; {LAYOUT}")
    comp, fam = denoiser_of(root, what)
    comps = _components(_read(root / "model_index.json", what))
    needed = [comp] + ([c for c in ("vae", *REQUIRED) if c != "vae" or "vae" in comps] if whole else [])
    for name in needed:
        folder = root / name
        if name not in comps:
            raise ValueError(f"{what}={str(root)!r}: model_index.json lists no {name}; {LAYOUT}")
        if not folder.is_dir():
            raise ValueError(f"{what}={str(root)!r} is missing its {name} component ({folder} does not exist); "
                             f"{LAYOUT}")
        if name == "tokenizer":
            if not any(folder.iterdir()):
                raise ValueError(f"{what}={str(root)!r}: {folder} is empty; save the tokenizer there")
            continue
        config = folder / ("scheduler_config.json" if name == "scheduler" else "config.json")
        if not config.is_file():
            raise ValueError(f"{what}={str(root)!r} is missing {config.relative_to(root)}; {LAYOUT}")
        if name != "scheduler" and not _has_weights(folder):
            raise ValueError(f"{what}={str(root)!r}: {folder.relative_to(root)} holds no weights "
                             "(*.safetensors or *.bin); save the component with save_pretrained")
    return comp, fam


def _text_spec(root: Path, what: str):
    from scaletrain.models import text

    comps = _components(_read(root / "model_index.json", what))
    extra = sorted(k for k in comps if k.startswith("text_encoder_"))
    if extra:
        raise ValueError(f"{what}={str(root)!r} has {len(extra) + 1} text encoders (text_encoder, "
                         f"{', '.join(extra)}); model.preset=from_diffusers reads one-encoder pipelines (SD 1.x/2.x, "
                         "PixArt). For SD3 or Flux pick the named preset and init.from_diffusers=ROOT/transformer")
    cfg = _read(root / "text_encoder" / "config.json", what)
    kind = {"clip_text_model": "clip", "t5": "t5", "umt5": "t5"}.get(cfg.get("model_type"))
    if kind is None:
        raise ValueError(f"{what}={str(root)!r}: text_encoder is a {cfg.get('model_type')!r} model; scaletrain "
                         "encodes captions with CLIP text models or T5 encoders")
    width = cfg["hidden_size"] if kind == "clip" else cfg["d_model"]
    config = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype")}
    # SD conditions on CLIP's unmasked padding; PixArt (T5) on the masked caption.
    return text.TextEncoderSpec(kind=kind, hidden_size=width, config=config, use_mask=kind == "t5")


def _text_len(root: Path, family: Any, what: str) -> int:
    if family.pipeline_text_len is not None:
        return family.pipeline_text_len
    tok = root / "tokenizer" / "tokenizer_config.json"
    n = _read(tok, what).get("model_max_length") if tok.is_file() else None
    return int(n) if isinstance(n, (int, float)) and 0 < n <= 4096 else 77


def register_pipeline_preset(root: str | Path, what: str = "init.from_diffusers"):
    """Register (once) and return the preset a pipeline folder describes (module doc)."""
    from diffusers import AutoencoderKL

    from scaletrain.models.family import PRESETS, add_preset

    name = preset_name(root)
    if name in PRESETS:
        return PRESETS[name]
    root = Path(root).resolve()
    comp, fam = check_pipeline(root, what)
    denoiser = fam.net_class.extract_init_dict(_read(root / comp / "config.json", what))[0]
    vae = None
    if (root / "vae").is_dir():
        vae_cfg = _read(root / "vae" / "config.json", what)
        if vae_cfg.get("_class_name") != AutoencoderKL.__name__:
            raise ValueError(f"{what}={str(root)!r}: its vae is a {vae_cfg.get('_class_name')}; scaletrain's "
                             "latent presets use AutoencoderKL")
        vae = dict(AutoencoderKL.extract_init_dict(vae_cfg)[0])
    spec = _text_spec(root, what)
    return add_preset(name, fam.name, vae, dict(denoiser), spec, _text_len(root, fam, what),
                      f"read from the diffusers pipeline at {root}")
