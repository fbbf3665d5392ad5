"""Frozen text encoders and their tokenizers.

Two sources, nothing downloaded:
- a local folder (``from_pretrained(path, local_files_only=True)``), either the encoder
  folder itself or a diffusers pipeline root holding ``text_encoder/`` and ``tokenizer/``;
- a config-built, randomly initialised encoder of the width the denoiser expects, paired
  with ``ByT5Tokenizer()`` (byte level, needs no vocabulary file). Its embeddings carry no
  meaning; it exists so that demos, tests and benchmarks run offline at the real shapes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    AutoTokenizer,
    ByT5Tokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    T5Config,
    T5EncoderModel,
    UMT5EncoderModel,
)

# ByT5Tokenizer ids: pad=0, eos=1, unk=2, bytes 3..258, extra ids up to 383.
BYTE_VOCAB_SIZE = 384
BYTE_PAD_ID = 0
BYTE_EOS_ID = 1


@dataclass(frozen=True)
class TextEncoderSpec:
    """What a preset needs from its text encoder; `config` builds one when no path is given."""

    kind: str  # "clip" | "t5"
    hidden_size: int
    config: dict[str, Any]
    # CLIP (SD convention) attends over padding causally and the UNet sees all L tokens;
    # T5 (PixArt convention) needs the padding mask in the encoder and in cross-attention.
    use_mask: bool


def build_byte_tokenizer() -> ByT5Tokenizer:
    """Byte-level tokenizer that constructs with no files; every caption ends with eos=1."""
    return ByT5Tokenizer()


def _clip_config(**overrides: Any) -> dict[str, Any]:
    # eos_token_id must be the byte tokenizer's eos (1): CLIPTextModel finds the pooled token
    # by searching for eos_token_id (any value except the legacy 2, which means argmax).
    base = dict(
        vocab_size=BYTE_VOCAB_SIZE, pad_token_id=BYTE_PAD_ID, eos_token_id=BYTE_EOS_ID,
        bos_token_id=BYTE_EOS_ID,
    )
    return {**base, **overrides}


def clip_spec(hidden_size: int, layers: int, heads: int, max_len: int, act: str) -> TextEncoderSpec:
    """A CLIP text encoder of the given shape (used for tiny and SD presets)."""
    cfg = _clip_config(
        hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=max_len, hidden_act=act,
    )
    return TextEncoderSpec(kind="clip", hidden_size=hidden_size, config=cfg, use_mask=False)


def t5_spec(d_model: int, layers: int, heads: int, d_kv: int, d_ff: int) -> TextEncoderSpec:
    """A T5 v1.1-style (gated-gelu) encoder of the given shape (used for PixArt presets)."""
    cfg = dict(
        vocab_size=BYTE_VOCAB_SIZE, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers,
        num_heads=heads, feed_forward_proj="gated-gelu", pad_token_id=BYTE_PAD_ID,
        eos_token_id=BYTE_EOS_ID, decoder_start_token_id=BYTE_PAD_ID, dropout_rate=0.0,
    )
    return TextEncoderSpec(kind="t5", hidden_size=d_model, config=cfg, use_mask=True)


def _split_pipeline_root(path: str) -> tuple[str, str]:
    """(encoder dir, tokenizer dir): a diffusers pipeline root keeps them in subfolders."""
    if os.path.isdir(os.path.join(path, "text_encoder")):
        tok = os.path.join(path, "tokenizer")
        return os.path.join(path, "text_encoder"), tok if os.path.isdir(tok) else path
    return path, path


def _dtype_kw(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers' construction dtype keyword: ``dtype`` since 4.56, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


# A local folder's class comes from its config's model_type, among those of the spec's kind
# (Wan's UMT5 is a T5 by shape but not by weights: every layer has its own relative attention
# bias, so loading it as a T5 silently drops them).
ENCODER_CLASSES: dict[str, dict[str, type]] = {
    "clip": {"clip_text_model": CLIPTextModel, "clip": CLIPTextModel},
    "t5": {"t5": T5EncoderModel, "umt5": UMT5EncoderModel},
}
# Weights a folder may hold beside the encoder's, never used for caption embeddings: CLIP's
# projection heads and vision tower (SDXL's/SD3's text_encoder_2, a whole CLIPModel folder),
# a T5's decoder and LM head (a whole T5ForConditionalGeneration folder).
UNUSED_WEIGHTS = {"clip": ("text_projection.", "vision_model.", "visual_projection.", "logit_scale"),
                  "t5": ("decoder.", "lm_head.")}


def encoder_class(spec: TextEncoderSpec, enc_dir: str, path: str) -> type:
    """The transformers class that loads the folder: by its config's model_type, which must be
    of the preset's kind (one-line ValueError otherwise)."""
    import json

    cfg_file = os.path.join(enc_dir, "config.json")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"model.text_encoder_path={path!r} has no config.json in {enc_dir}; give a folder "
                         "saved with save_pretrained")
    with open(cfg_file) as f:
        model_type = json.load(f).get("model_type")
    classes = ENCODER_CLASSES[spec.kind]
    if model_type not in classes:
        raise ValueError(f"model.text_encoder_path={path!r} holds a {model_type!r} model, but this preset encodes "
                         f"captions with a {spec.kind} encoder ({', '.join(classes)}); use a matching encoder")
    return classes[model_type]


def check_loaded_keys(info: dict, spec: TextEncoderSpec, path: str, cls: type) -> None:
    """transformers only logs weights it could not place; a wrong file would encode captions
    with random layers. Missing, mis-shaped or unexpected keys (beside ``UNUSED_WEIGHTS``) are one
    ValueError naming them."""
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if not k.startswith(UNUSED_WEIGHTS[spec.kind]))
    mismatched = sorted(str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in info.get("mismatched_keys") or [])
    if missing or unexpected or mismatched:
        parts = [f"{len(v)} {what} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                 for what, v in (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched)) if v]
        raise ValueError(f"model.text_encoder_path={path!r} does not fit a {cls.__name__}: keys "
                         f"{'; '.join(parts)}; give the encoder folder this preset's pipeline was trained with")


def build_text_encoder(spec: TextEncoderSpec, path: str | None, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """Return a frozen (eval, requires_grad False) encoder and its tokenizer."""
    cls = CLIPTextModel if spec.kind == "clip" else T5EncoderModel
    # Built directly in ``dtype`` (transformers' torch_dtype), never in fp32 and then cast: a
    # T5-XXL-class encoder is 19 GB in fp32.
    if path is None:
        cfg_cls = CLIPTextConfig if spec.kind == "clip" else T5Config
        encoder, tokenizer = cls._from_config(cfg_cls(**spec.config), **_dtype_kw(dtype)), build_byte_tokenizer()
    else:
        if not os.path.isdir(path):
            raise ValueError(f"model.text_encoder_path={path!r} is not a directory; give a local folder "
                             "saved with save_pretrained (downloads are never attempted)")
        enc_dir, tok_dir = _split_pipeline_root(path)
        cls = encoder_class(spec, enc_dir, path)
        encoder, info = cls.from_pretrained(enc_dir, local_files_only=True, output_loading_info=True,
                                            **_dtype_kw(dtype))
        check_loaded_keys(info, spec, path, cls)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        width = encoder.config.hidden_size if spec.kind == "clip" else encoder.config.d_model
        if width != spec.hidden_size:
            raise ValueError(f"model.text_encoder_path={path!r} has hidden size {width}, but this preset's "
                             f"denoiser cross-attends to {spec.hidden_size}; use a matching encoder")
    encoder.to(dtype).eval().requires_grad_(False)
    return encoder, tokenizer


@torch.no_grad()
def encode_captions(encoder: nn.Module, tokenizer: Any, spec: TextEncoderSpec, captions: list[str],
                    max_len: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Tokenise to a fixed length and encode: (emb (B, L, D) float32, mask (B, L) long)."""
    batch = tokenizer(list(captions), padding="max_length", max_length=max_len, truncation=True,
                      return_tensors="pt")
    ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device).long()
    # CLIP is causal, so real tokens never see padding anyway; passing no mask keeps the
    # padding embeddings identical to what SD checkpoints were trained on.
    enc_mask = mask if spec.use_mask else None
    out = encoder(input_ids=ids, attention_mask=enc_mask)
    return out.last_hidden_state.float(), mask
