"""SDXL: two CLIP text encoders (CLIP-L, then OpenCLIP-bigG with its projection). The caption
sequence is both encoders' penultimate hidden states side by side (768 + 1280 = 2048 wide),
the pooled vector is the second's projected output (1280), and an empty caption is all zeros
(``force_zeros_for_empty_prompt``: what the pipeline feeds the unconditional half, and what
SDXL's own trainer fed a dropped caption). The size and crop micro-conditions (``time_ids``)
come from the image, not the caption: the UNet family adds them. What
``StableDiffusionXLPipeline.encode_prompt`` does."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from scaletrain.models.text import (
    Cond, EncoderSlot, TextConditioner, clip_config, expect_encoders, register_conditioner, tokenize,
)

CLIP = ("clip_text_model",)


@register_conditioner
class SDXLConditioner(TextConditioner):
    name = "sdxl"
    pipeline = "StableDiffusionXLPipeline"

    def __init__(self, clip_l: dict[str, Any], clip_g: dict[str, Any], max_len: int = 77) -> None:
        super().__init__([EncoderSlot("text_encoder", "tokenizer", "CLIPTextModel", clip_l, max_len),
                          EncoderSlot("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection", clip_g, max_len)])

    @classmethod
    def tiny(cls, width: int, max_len: int) -> "SDXLConditioner":
        half = width // 2
        return cls(clip_config(half, 1, 2, max_len, "quick_gelu"), clip_config(half, 2, 2, max_len, "gelu"), max_len)

    @classmethod
    def from_pipeline(cls, configs: dict[str, dict[str, Any]], *, text_len: int, denoiser: dict[str, Any],
                      where: str) -> "SDXLConditioner":
        expect_encoders(configs, {"text_encoder": CLIP, "text_encoder_2": CLIP}, cls.pipeline, where)
        return cls(configs["text_encoder"], configs["text_encoder_2"], int(configs["text_encoder"]["max_position_embeddings"]))

    @property
    def text_len(self) -> int:
        return self.slots[0].max_len

    @property
    def text_width(self) -> int:
        return sum(s.width for s in self.slots)

    @property
    def pooled_width(self) -> int:
        return int(self.slots[1].config["projection_dim"])

    def encode(self, encoders: Sequence[tuple[nn.Module, Any]], captions: Sequence[str],
               device: torch.device | str) -> Cond:
        states, masks, pooled = [], [], None
        for (encoder, tokenizer), slot in zip(encoders, self.slots):
            ids, mask = tokenize(tokenizer, captions, slot.max_len, device)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2].float())
            masks.append(mask)
            pooled = out[0].float()  # the last encoder's: text_embeds of the projection model
        emb = torch.cat(states, dim=-1)
        empty = torch.tensor([c == "" for c in captions], device=emb.device)
        keep = (~empty).to(emb.dtype)
        return {"text_emb": emb * keep.view(-1, 1, 1), "text_mask": masks[0], "pooled": pooled * keep.view(-1, 1)}
