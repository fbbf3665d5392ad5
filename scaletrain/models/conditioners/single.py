"""One text encoder, its last hidden states as the caption sequence: SD 1.x/2.x (CLIP, the
UNet attends over the padding) and PixArt (T5, masked), and every tiny CPU preset of those
families. What ``StableDiffusionPipeline`` / ``PixArtAlphaPipeline`` do in ``encode_prompt``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from scaletrain.models.text import (
    MODEL_TYPE_CLASSES, Cond, EncoderSlot, TextConditioner, clip_config, register_conditioner, t5_config, tokenize,
)


@register_conditioner
class SingleEncoder(TextConditioner):
    name = "single"

    def __init__(self, slot: EncoderSlot, use_mask: bool) -> None:
        super().__init__([slot])
        # CLIP (SD convention) attends over padding causally and the UNet sees all L tokens;
        # T5 (PixArt convention) needs the padding mask in the encoder and in cross-attention.
        self.use_mask = use_mask

    @classmethod
    def clip(cls, hidden_size: int, layers: int, heads: int, max_len: int, act: str) -> "SingleEncoder":
        """A byte-vocabulary CLIP text encoder of the given shape (tiny and SD presets)."""
        return cls(EncoderSlot("text_encoder", "tokenizer", "CLIPTextModel",
                               clip_config(hidden_size, layers, heads, max_len, act), max_len), use_mask=False)

    @classmethod
    def t5(cls, d_model: int, layers: int, heads: int, d_kv: int, d_ff: int, max_len: int) -> "SingleEncoder":
        """A byte-vocabulary T5 v1.1 encoder of the given shape (PixArt presets), masked."""
        return cls(EncoderSlot("text_encoder", "tokenizer", "T5EncoderModel",
                               t5_config(d_model, layers, heads, d_kv, d_ff), max_len), use_mask=True)

    @classmethod
    def from_pipeline(cls, configs: dict[str, dict[str, Any]], *, text_len: int, denoiser: dict[str, Any],
                      where: str) -> "SingleEncoder":
        if list(configs) != ["text_encoder"]:
            raise ValueError(f"{where} has {len(configs)} text encoders ({', '.join(configs) or 'none'}) and a pipeline "
                             "class scaletrain reads one encoder from (SD 1.x/2.x, PixArt); SDXL, SD3, FLUX and Wan "
                             "folders are read by their own pipeline class (model_index.json _class_name)")
        cfg = configs["text_encoder"]
        model_class = MODEL_TYPE_CLASSES.get(cfg.get("model_type"))
        if model_class is None:
            raise ValueError(f"{where}: text_encoder is a {cfg.get('model_type')!r} model; scaletrain encodes captions "
                             "with CLIP text models or T5 encoders")
        # SD conditions on CLIP's unmasked padding; PixArt (T5) on the masked caption.
        clip = model_class.startswith("CLIP")
        return cls(EncoderSlot("text_encoder", "tokenizer", model_class, cfg, text_len), use_mask=not clip)

    @property
    def text_len(self) -> int:
        return self.slots[0].max_len

    @property
    def text_width(self) -> int:
        return self.slots[0].width

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "use_mask": self.use_mask}

    def encode(self, encoders: Sequence[tuple[nn.Module, Any]], captions: Sequence[str],
               device: torch.device | str) -> Cond:
        encoder, tokenizer = encoders[0]
        ids, mask = tokenize(tokenizer, captions, self.text_len, device)
        # CLIP is causal, so real tokens never see padding anyway; passing no mask keeps the
        # padding embeddings identical to what SD checkpoints were trained on.
        out = encoder(input_ids=ids, attention_mask=mask if self.use_mask else None)
        return {"text_emb": out.last_hidden_state.float(), "text_mask": mask}
