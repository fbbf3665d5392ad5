"""Frozen text encoders, their tokenizers, and the text-conditioner seam.

A preset conditions its denoiser through a ``TextConditioner`` (one file each in
``models/conditioners/``, chosen by the preset's family): which encoders it runs
(``EncoderSlot``: the pipeline component, the transformers class, its config, its prompt
length) and how their outputs become the tensors the denoiser takes, a ``Cond`` dict
(batch first): ``text_emb`` (B, L, D) and ``text_mask`` (B, L) always, ``pooled`` (B, P) where
the family conditions on a pooled vector (SDXL, SD3, FLUX). Each conditioner does what the
family's published diffusers pipeline does in its ``encode_prompt`` (tests compare them).

An encoder comes from one of two sources, nothing downloaded:
- a local folder (``from_pretrained(path, local_files_only=True)``): the encoder folder itself
  (one-encoder presets) or a diffusers pipeline root holding ``text_encoder/``,
  ``text_encoder_2/``, ... and ``tokenizer/``, ``tokenizer_2/``, ...;
- a config-built, randomly initialised encoder (the slot's config), paired with a byte-level
  ``ByT5Tokenizer`` (needs no vocabulary file). Its embeddings carry no meaning; it exists so
  that demos, tests and benchmarks run offline at the real shapes.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import (
    AutoTokenizer,
    ByT5Tokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

# ByT5Tokenizer ids: pad=0, eos=1, unk=2, bytes 3..258, extra ids up to 383.
BYTE_VOCAB_SIZE = 384
BYTE_PAD_ID = 0
BYTE_EOS_ID = 1

Cond = dict[str, Tensor]  # what a conditioner hands the denoiser, batch first


def build_byte_tokenizer(max_len: int | None = None) -> ByT5Tokenizer:
    """Byte-level tokenizer that constructs with no files; every caption ends with eos=1.
    ``max_len`` becomes its ``model_max_length`` (what diffusers pipelines pad prompts to)."""
    return ByT5Tokenizer(**({"model_max_length": max_len} if max_len else {}))


# The transformers classes a slot may name: (class, its config class, the model_type values a
# folder's config.json may carry for it). A T5-kind slot loads a UMT5 folder as UMT5 and a T5
# folder as T5 (Wan's UMT5 is a T5 by shape but not by weights: every layer has its own relative
# attention bias, so loading it as a T5 would silently drop them).
ENCODER_CLASSES: dict[str, tuple[type, type, tuple[str, ...]]] = {
    "CLIPTextModel": (CLIPTextModel, CLIPTextConfig, ("clip_text_model", "clip")),
    "CLIPTextModelWithProjection": (CLIPTextModelWithProjection, CLIPTextConfig, ("clip_text_model", "clip")),
    "T5EncoderModel": (T5EncoderModel, T5Config, ("t5", "umt5")),
    "UMT5EncoderModel": (UMT5EncoderModel, UMT5Config, ("umt5", "t5")),
}
_T5_BY_TYPE = {"t5": T5EncoderModel, "umt5": UMT5EncoderModel}
# Weights a folder may hold beside the encoder's, never used for caption embeddings: CLIP's
# projection head (a CLIPTextModel slot) and vision tower (a whole CLIPModel folder), a T5's
# decoder and LM head (a whole T5ForConditionalGeneration folder).
UNUSED_WEIGHTS = {
    "CLIPTextModel": ("text_projection.", "vision_model.", "visual_projection.", "logit_scale"),
    "CLIPTextModelWithProjection": ("vision_model.", "visual_projection.", "logit_scale"),
    "T5EncoderModel": ("decoder.", "lm_head."), "UMT5EncoderModel": ("decoder.", "lm_head."),
}


@dataclass(frozen=True)
class EncoderSlot:
    """One text encoder of a conditioner: its pipeline component and tokenizer folders, its
    transformers class, the config a random init builds, and the prompt length it is fed."""

    component: str  # "text_encoder", "text_encoder_2", ...
    tokenizer: str  # "tokenizer", "tokenizer_2", ...
    model_class: str  # an ENCODER_CLASSES key
    config: dict[str, Any]
    max_len: int

    @property
    def width(self) -> int:
        return int(self.config.get("hidden_size") or self.config["d_model"])

    @property
    def is_clip(self) -> bool:
        return self.model_class.startswith("CLIP")


def clip_config(hidden_size: int, layers: int, heads: int, max_len: int, act: str,
                projection_dim: int | None = None, **overrides: Any) -> dict[str, Any]:
    """A CLIP text config of the given shape on the byte vocabulary. eos_token_id must be the
    byte tokenizer's eos (1): CLIPTextModel finds the pooled token by searching for eos_token_id
    (any value except the legacy 2, which means argmax)."""
    cfg = dict(vocab_size=BYTE_VOCAB_SIZE, pad_token_id=BYTE_PAD_ID, eos_token_id=BYTE_EOS_ID,
               bos_token_id=BYTE_EOS_ID, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
               num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_len,
               hidden_act=act, projection_dim=projection_dim or hidden_size)
    return {**cfg, **overrides}


def t5_config(d_model: int, layers: int, heads: int, d_kv: int, d_ff: int, **overrides: Any) -> dict[str, Any]:
    """A T5 v1.1-style (gated-gelu) encoder config on the byte vocabulary."""
    cfg = dict(vocab_size=BYTE_VOCAB_SIZE, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers,
               num_heads=heads, feed_forward_proj="gated-gelu", pad_token_id=BYTE_PAD_ID,
               eos_token_id=BYTE_EOS_ID, decoder_start_token_id=BYTE_PAD_ID, dropout_rate=0.0)
    return {**cfg, **overrides}


def _dtype_kw(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers' construction dtype keyword: ``dtype`` since 4.56, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _folders(slot: EncoderSlot, path: str, single: bool) -> tuple[str, str]:
    """(encoder dir, tokenizer dir) of ``slot`` under ``path``: a pipeline root keeps them in
    the slot's subfolders; a one-encoder preset may also name the encoder folder itself."""
    enc = os.path.join(path, slot.component)
    if os.path.isdir(enc):
        tok = os.path.join(path, slot.tokenizer)
        return enc, tok if os.path.isdir(tok) else path
    if single:
        return path, path
    raise ValueError(f"model.text_encoder_path={path!r} has no {slot.component}/ folder; this preset encodes "
                     "captions with several encoders, so give the pipeline folder that holds them all")


def encoder_class(slot: EncoderSlot, enc_dir: str, path: str) -> type:
    """The transformers class that loads the folder: by its config's model_type, which must be
    one the slot accepts (one-line ValueError otherwise)."""
    cfg_file = os.path.join(enc_dir, "config.json")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"model.text_encoder_path={path!r} has no config.json in {enc_dir}; give a folder "
                         "saved with save_pretrained")
    with open(cfg_file) as f:
        model_type = json.load(f).get("model_type")
    cls, _, types = ENCODER_CLASSES[slot.model_class]
    if model_type not in types:
        raise ValueError(f"model.text_encoder_path={path!r} holds a {model_type!r} model in {enc_dir}, but this "
                         f"preset encodes captions there with a {slot.model_class} ({', '.join(types)}); "
                         "use a matching encoder")
    return _T5_BY_TYPE[model_type] if model_type in _T5_BY_TYPE else cls


def check_loaded_keys(info: dict, slot: EncoderSlot, path: str, cls: type) -> None:
    """transformers only logs weights it could not place; a wrong file would encode captions
    with random layers. Missing, mis-shaped or unexpected keys (beside ``UNUSED_WEIGHTS``) are one
    ValueError naming them."""
    missing = sorted(info.get("missing_keys") or [])
    unused = UNUSED_WEIGHTS[slot.model_class]
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if not k.startswith(unused))
    mismatched = sorted(str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in info.get("mismatched_keys") or [])
    if missing or unexpected or mismatched:
        parts = [f"{len(v)} {what} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                 for what, v in (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched)) if v]
        raise ValueError(f"model.text_encoder_path={path!r} does not fit a {cls.__name__} ({slot.component}): keys "
                         f"{'; '.join(parts)}; give the encoder folder this preset's pipeline was trained with")


def build_encoder(slot: EncoderSlot, path: str | None, dtype: torch.dtype, *, single: bool = True
                  ) -> tuple[nn.Module, Any]:
    """A frozen (eval, requires_grad False) encoder for ``slot`` and its tokenizer, from
    ``path`` (module doc) or random init from the slot's config. Built directly in ``dtype``
    (transformers' construction dtype), never in fp32 and then cast: a T5-XXL is 19 GB in fp32."""
    cls, cfg_cls, _ = ENCODER_CLASSES[slot.model_class]
    if path is None:
        encoder = cls._from_config(cfg_cls(**slot.config), **_dtype_kw(dtype))
        tokenizer = build_byte_tokenizer(slot.max_len)
    else:
        if not os.path.isdir(path):
            raise ValueError(f"model.text_encoder_path={path!r} is not a directory; give a local folder "
                             "saved with save_pretrained (downloads are never attempted)")
        enc_dir, tok_dir = _folders(slot, path, single)
        cls = encoder_class(slot, enc_dir, path)
        encoder, info = cls.from_pretrained(enc_dir, local_files_only=True, output_loading_info=True,
                                            **_dtype_kw(dtype))
        check_loaded_keys(info, slot, path, cls)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        width = getattr(encoder.config, "hidden_size", None) or encoder.config.d_model
        if width != slot.width:
            raise ValueError(f"model.text_encoder_path={path!r}: {slot.component} has hidden size {width}, but this "
                             f"preset's denoiser is conditioned on {slot.width}; use a matching encoder")
    encoder.to(dtype).eval().requires_grad_(False)
    return encoder, tokenizer


def tokenize(tokenizer: Any, captions: Sequence[str], max_len: int, device: torch.device | str
             ) -> tuple[Tensor, Tensor]:
    """(input ids, attention mask (long)) padded to ``max_len``, as the pipelines tokenize."""
    batch = tokenizer(list(captions), padding="max_length", max_length=max_len, truncation=True,
                      return_tensors="pt")
    return batch.input_ids.to(device), batch.attention_mask.to(device).long()


class TextConditioner(ABC):
    """How a family's published pipeline turns captions into what its denoiser takes.

    Stateless beyond its slots (one per text encoder, in pipeline order); the preset holds one.
    ``encode`` runs the built encoders; ``fields`` says the per-sample shapes of what it returns
    (precomputed shards, sizing, shape checks)."""

    name: ClassVar[str]
    # The denoiser attends with the caption's padding mask (PixArt's T5); False: it attends over
    # the padding as its pipeline does (CLIP-conditioned UNets, SD3, FLUX) or the conditioner
    # has zeroed the padding itself (Wan), so the mask is not passed on.
    use_mask: ClassVar[bool] = False
    # The diffusers pipeline class whose ``encode_prompt`` this is, when it decides the pipeline
    # (SDXL's two encoders: StableDiffusionXLPipeline); None: the family's pipeline.
    pipeline: ClassVar[str | None] = None

    def __init__(self, slots: Sequence[EncoderSlot]) -> None:
        self.slots = tuple(slots)

    @property
    @abstractmethod
    def text_len(self) -> int:
        """Tokens of the ``text_emb`` sequence."""

    @property
    @abstractmethod
    def text_width(self) -> int:
        """Width of ``text_emb``."""

    @property
    def pooled_width(self) -> int | None:
        """Width of ``pooled``; None: the conditioner gives none."""
        return None

    @abstractmethod
    def encode(self, encoders: Sequence[tuple[nn.Module, Any]], captions: Sequence[str],
               device: torch.device | str) -> Cond:
        """The conditioning of ``captions`` (float32 embeddings, long mask); ``encoders`` are the
        built (encoder, tokenizer) pairs in slot order."""

    def fields(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of each tensor ``encode`` returns."""
        out = {"text_emb": (self.text_len, self.text_width), "text_mask": (self.text_len,)}
        if self.pooled_width is not None:
            out["pooled"] = (self.pooled_width,)
        return out

    @classmethod
    @abstractmethod
    def from_pipeline(cls, configs: dict[str, dict[str, Any]], *, text_len: int, denoiser: dict[str, Any],
                      where: str) -> "TextConditioner":
        """The conditioner of a pipeline folder (``models/pipeline_folder.py``) from its text
        encoders' config.json files (component -> config); ``text_len``: a one-encoder pipeline's
        prompt length; ``denoiser``: the folder's denoiser config. One-line ValueError (naming
        ``where``) when the folder's encoders are not this conditioner's."""

    def example(self, batch: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> Cond:
        """Random conditioning of the right shapes (every token real), for shape-only runs: FLOP
        counts, benchmarks, tests of a denoiser alone."""
        out: Cond = {}
        for name, shape in self.fields().items():
            if name == "text_mask":
                out[name] = torch.ones(batch, *shape, dtype=torch.long, device=device)
            else:
                out[name] = torch.randn(batch, *shape, generator=generator, dtype=dtype).to(device)
        return out

    def describe(self) -> dict[str, Any]:
        """What decides its outputs besides the weights (hashed into precomputed shards' identity)."""
        return {"conditioner": self.name, "slots": [(s.component, s.model_class, s.config, s.max_len) for s in self.slots]}


CONDITIONERS: dict[str, type[TextConditioner]] = {}

# config.json model_type -> the slot class a one-encoder pipeline loads it as.
MODEL_TYPE_CLASSES = {"clip_text_model": "CLIPTextModel", "t5": "T5EncoderModel", "umt5": "UMT5EncoderModel"}


def expect_encoders(configs: dict[str, dict[str, Any]], wanted: dict[str, tuple[str, ...]], pipeline: str,
                    where: str) -> None:
    """One ValueError naming every text encoder of a pipeline folder that is missing or of a
    model_type its pipeline does not use (``wanted``: component -> accepted model_type values)."""
    problems = [f"{c} is missing" if c not in configs else f"{c} is a {configs[c].get('model_type')!r} model"
                for c, types in wanted.items() if c not in configs or configs[c].get("model_type") not in types]
    problems += [f"{c} is one {pipeline} does not use" for c in configs if c not in wanted]
    if problems:
        need = ", ".join(f"{c}: {'/'.join(t)}" for c, t in wanted.items())
        raise ValueError(f"{where}: {'; '.join(problems)}; a {pipeline} folder holds {need}")


def register_conditioner(cls: type[TextConditioner]) -> type[TextConditioner]:
    if getattr(cls, "name", None) in CONDITIONERS:
        raise ValueError(f"text conditioner {cls.name!r} is registered twice")
    CONDITIONERS[cls.name] = cls
    return cls


def load_conditioners() -> None:
    """Import every module of ``scaletrain.models.conditioners`` (each registers itself)."""
    import importlib
    import pkgutil

    from scaletrain.models import conditioners

    for mod in pkgutil.iter_modules(conditioners.__path__):
        importlib.import_module(f"{conditioners.__name__}.{mod.name}")


def build_encoders(conditioner: TextConditioner, path: str | None, dtype: torch.dtype, seed: int = 0
                   ) -> list[tuple[nn.Module, Any]]:
    """Every slot's (encoder, tokenizer); random init draws from ``seed`` + slot index only."""
    out = []
    for i, slot in enumerate(conditioner.slots):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + (0 if i == 0 else 1000 + i))  # slot 0 as the one-encoder presets always drew
            out.append(build_encoder(slot, path, dtype, single=len(conditioner.slots) == 1))
    return out
