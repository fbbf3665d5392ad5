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
- the text conditioner is the one of the folder's pipeline class (``TextConditioner.pipeline``:
  SDXL's two CLIPs, SD3's three encoders, FLUX's CLIP + T5, Wan's UMT5), else one encoder
  (SD 1.x/2.x, PixArt), its slots built from the folder's ``text_encoder*/config.json``; a
  one-encoder caption length is the family's pipeline length (``ModelFamily.pipeline_text_len``)
  or the tokenizer's ``model_max_length``.

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
    index = _read(root / "model_index.json", what)
    comps = _components(index)
    if whole:
        _check_text_to_image(root, index, comps, fam, what)
    encoders = sorted(k for k in comps if k.startswith(("text_encoder_", "tokenizer_")))
    needed = [comp] + ([c for c in ("vae", *REQUIRED, *encoders) if c != "vae" or "vae" in comps] if whole else [])
    for name in needed:
        folder = root / name
        if name not in comps:
            raise ValueError(f"{what}={str(root)!r}: model_index.json lists no {name}; {LAYOUT}")
        if not folder.is_dir():
            raise ValueError(f"{what}={str(root)!r} is missing its {name} component ({folder} does not exist); "
                             f"{LAYOUT}")
        if name.startswith("tokenizer"):
            if not any(folder.iterdir()):
                raise ValueError(f"{what}={str(root)!r}: {folder} is empty; save the tokenizer there")
            continue
        config = folder / ("scheduler_config.json" if name == "scheduler" else "config.json")
        if not config.is_file():
            raise ValueError(f"{what}={str(root)!r} is missing {config.relative_to(root)}; {LAYOUT}")
        if name != "scheduler" and not _has_weights(folder):
            raise ValueError(f"{what}={str(root)!r}: {folder.relative_to(root)} holds no weights "
                             "(*.safetensors or *.bin); save the component with save_pretrained")
    if whole:
        _check_tokenizers(root, [c for c in comps if c.startswith("text_encoder")], what)
    return comp, fam


# Pipeline components that a text-to-image (or -video) fine-tune has no use for: an image
# encoder (IP-Adapter) or a second denoiser would be silently left out of training and export.
UNUSED_COMPONENTS = ("image_encoder", "transformer_2", "unet_2", "controlnet", "prior", "decoder")


def _check_text_to_image(root: Path, index: dict[str, Any], comps: dict[str, str], family: Any, what: str) -> None:
    """The folder's pipeline must be one scaletrain writes (text-to-image: SD, SDXL, SD3, FLUX,
    PixArt; Wan text-to-video) and hold nothing it would leave out (one line each)."""
    from scaletrain.models.family import FAMILIES
    from scaletrain.models.text import CONDITIONERS, load_conditioners

    load_conditioners()
    known = {f.pipeline_class for f in FAMILIES.values()} | {c.pipeline for c in CONDITIONERS.values()}
    known |= {"PixArtSigmaPipeline"}  # PixArt-Sigma: the same components as PixArt-alpha
    known.discard(None)
    pipeline = index.get("_class_name")
    if pipeline not in known:
        kind = " (an image-to-image refiner)" if index.get("requires_aesthetics_score") or "Img2Img" in str(pipeline) else ""
        raise ValueError(f"{what}={str(root)!r} is a {pipeline}{kind}; scaletrain fine-tunes the text-to-image and "
                         f"text-to-video pipelines {', '.join(sorted(known))}")
    extra = [c for c in UNUSED_COMPONENTS if c in comps]
    if extra:
        raise ValueError(f"{what}={str(root)!r} holds {', '.join(f'{c} ({comps[c]})' for c in extra)}, which "
                         f"{family.name} training neither trains nor exports; save the pipeline without it "
                         f"({extra[0]}=None)")


def _check_tokenizers(root: Path, encoders: list[str], what: str) -> None:
    """Each tokenizer's ids must fit its text encoder's vocabulary (a CLIP tokenizer saved beside
    a T5 encoder would index past its embedding table, or silently encode other tokens)."""
    from transformers import AutoTokenizer

    for enc in sorted(encoders):
        tok_dir = root / enc.replace("text_encoder", "tokenizer")
        if not tok_dir.is_dir():
            raise ValueError(f"{what}={str(root)!r} is missing {tok_dir.name} for its {enc}; {LAYOUT}")
        vocab = _read(root / enc / "config.json", what).get("vocab_size")
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad folder
            raise ValueError(f"{what}={str(root)!r}: {tok_dir.name} does not load as a tokenizer "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
        if isinstance(vocab, int) and len(tokenizer) > vocab:
            raise ValueError(f"{what}={str(root)!r}: {tok_dir.name} ({type(tokenizer).__name__}) has {len(tokenizer)} "
                             f"tokens but {enc} embeds {vocab}; save the tokenizer {enc} was trained with")


def _conditioner(root: Path, family: Any, denoiser: dict[str, Any], what: str):
    """The text conditioner the folder's pipeline encodes prompts with: the one whose
    ``pipeline`` is the folder's ``_class_name`` (SDXL, SD3, FLUX, Wan), else one encoder (SD
    1.x/2.x, PixArt), built from the encoders' own config.json files."""
    from scaletrain.models.text import CONDITIONERS, load_conditioners

    load_conditioners()
    index = _read(root / "model_index.json", what)
    pipeline = index.get("_class_name")
    cls = next((c for c in CONDITIONERS.values() if c.pipeline is not None and c.pipeline == pipeline),
               CONDITIONERS["single"])
    configs = {c: _text_config(root, c, what) for c in text_encoders(root)}
    return cls.from_pipeline(configs, text_len=_text_len(root, family, what), denoiser=denoiser, where=f"{what}={str(root)!r}")


def _text_config(root: Path, component: str, what: str) -> dict[str, Any]:
    cfg = _read(root / component / "config.json", what)
    return {k: v for k, v in cfg.items()
            if not k.startswith("_") and k not in ("architectures", "torch_dtype", "dtype", "transformers_version")}


def _text_len(root: Path, family: Any, what: str) -> int:
    if family.pipeline_text_len is not None:
        return family.pipeline_text_len
    tok = root / "tokenizer" / "tokenizer_config.json"
    n = _read(tok, what).get("model_max_length") if tok.is_file() else None
    return int(n) if isinstance(n, (int, float)) and 0 < n <= 4096 else 77


def register_pipeline_preset(root: str | Path, what: str = "init.from_diffusers"):
    """Register (once) and return the preset a pipeline folder describes (module doc)."""
    from scaletrain.models.family import PRESETS, add_preset
    from scaletrain.models.vaes import vae_kind_of

    name = preset_name(root)
    if name in PRESETS:
        return PRESETS[name]
    root = Path(root).resolve()
    comp, fam = check_pipeline(root, what)
    denoiser = fam.net_class.extract_init_dict(_read(root / comp / "config.json", what))[0]
    vae = None
    if (root / "vae").is_dir():
        vae_cfg = _read(root / "vae" / "config.json", what)
        vae = vae_kind_of(vae_cfg, f"{what}={str(root)!r}: its vae").from_folder_config(vae_cfg)
    conditioner = _conditioner(root, fam, dict(denoiser), what)
    return add_preset(name, fam.name, vae, dict(denoiser), conditioner, f"read from the diffusers pipeline at {root}")
