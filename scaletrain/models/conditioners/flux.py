"""FLUX.1: CLIP-L's pooled output (not its projection) as the pooled vector (768), and T5-XXL's
last hidden states as the caption sequence (dev: 512 tokens, schnell: 256), T5 unmasked and
attended over its padding. What ``FluxPipeline.encode_prompt`` does."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from scaletrain.models.text import (
    Cond, EncoderSlot, TextConditioner, clip_config, expect_encoders, register_conditioner, t5_config, tokenize,
)


@register_conditioner
class FluxConditioner(TextConditioner):
    name = "flux"
    pipeline = "FluxPipeline"

    def __init__(self, clip: dict[str, Any], t5: dict[str, Any], t5_len: int, clip_len: int = 77) -> None:
        super().__init__([EncoderSlot("text_encoder", "tokenizer", "CLIPTextModel", clip, clip_len),
                          EncoderSlot("text_encoder_2", "tokenizer_2", "T5EncoderModel", t5, t5_len)])

    @classmethod
    def tiny(cls, width: int, max_len: int) -> "FluxConditioner":
        return cls(clip_config(width, 1, 2, max_len, "quick_gelu"), t5_config(width, 1, 2, 16, 2 * width),
                   max_len, max_len)

    @classmethod
    def from_pipeline(cls, configs: dict[str, dict[str, Any]], *, text_len: int, denoiser: dict[str, Any],
                      where: str) -> "FluxConditioner":
        expect_encoders(configs, {"text_encoder": ("clip_text_model",), "text_encoder_2": ("t5",)}, cls.pipeline, where)
        # FLUX.1-dev (guidance-distilled) was trained on 512 T5 tokens, schnell on 256 (its model card)
        t5_len = 512 if denoiser.get("guidance_embeds") else 256
        return cls(configs["text_encoder"], configs["text_encoder_2"], t5_len,
                   int(configs["text_encoder"]["max_position_embeddings"]))

    @property
    def text_len(self) -> int:
        return self.slots[1].max_len

    @property
    def text_width(self) -> int:
        return self.slots[1].width

    @property
    def pooled_width(self) -> int:
        return self.slots[0].width

    def encode(self, encoders: Sequence[tuple[nn.Module, Any]], captions: Sequence[str],
               device: torch.device | str) -> Cond:
        (clip, clip_tok), (t5, t5_tok) = encoders
        ids, _ = tokenize(clip_tok, captions, self.slots[0].max_len, device)
        pooled = clip(ids, output_hidden_states=False).pooler_output.float()
        ids, mask = tokenize(t5_tok, captions, self.slots[1].max_len, device)
        emb = t5(ids, output_hidden_states=False)[0].float()
        return {"text_emb": emb, "text_mask": mask, "pooled": pooled}
