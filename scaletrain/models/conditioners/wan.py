"""Wan 2.1: UMT5-XXL, masked; each caption's states are cut at its length and zero-padded back
to the prompt length (512), so the transformer (whose attention takes no mask) sees zeros past
the caption. Captions are cleaned first (HTML entities, whitespace; ftfy where installed) by
diffusers' own ``prompt_clean``. What ``WanPipeline.encode_prompt`` does."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from scaletrain.models.text import (
    Cond, EncoderSlot, TextConditioner, expect_encoders, register_conditioner, t5_config, tokenize,
)


@register_conditioner
class WanConditioner(TextConditioner):
    name = "wan"
    pipeline = "WanPipeline"

    def __init__(self, umt5: dict[str, Any], max_len: int = 512) -> None:
        super().__init__([EncoderSlot("text_encoder", "tokenizer", "UMT5EncoderModel", umt5, max_len)])

    @classmethod
    def tiny(cls, width: int, max_len: int) -> "WanConditioner":
        return cls(t5_config(width, 2, 2, 16, 2 * width), max_len)

    @classmethod
    def from_pipeline(cls, configs: dict[str, dict[str, Any]], *, text_len: int, denoiser: dict[str, Any],
                      where: str) -> "WanConditioner":
        expect_encoders(configs, {"text_encoder": ("umt5",)}, cls.pipeline, where)
        return cls(configs["text_encoder"], 512)  # WanPipeline's max_sequence_length

    @property
    def text_len(self) -> int:
        return self.slots[0].max_len

    @property
    def text_width(self) -> int:
        return self.slots[0].width

    def encode(self, encoders: Sequence[tuple[nn.Module, Any]], captions: Sequence[str],
               device: torch.device | str) -> Cond:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        encoder, tokenizer = encoders[0]
        ids, mask = tokenize(tokenizer, [prompt_clean(c) for c in captions], self.text_len, device)
        emb = encoder(ids, mask).last_hidden_state.float()
        return {"text_emb": emb * mask.unsqueeze(-1).to(emb.dtype), "text_mask": mask}
