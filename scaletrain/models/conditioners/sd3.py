"""SD3 / SD3.5: CLIP-L and OpenCLIP-bigG (both with projections) and T5-XXL. The caption
sequence is the two CLIPs' penultimate hidden states side by side (768 + 1280), zero-padded to
T5's width (4096), followed along the sequence by T5's last hidden states (77 + 256 = 333
tokens); the pooled vector is both CLIPs' projected outputs side by side (2048). T5 runs without
a mask and the transformer attends over the padding, as the pipeline does. What
``StableDiffusion3Pipeline.encode_prompt`` does (clip_skip unset)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from scaletrain.models.text import (
    Cond, EncoderSlot, TextConditioner, clip_config, expect_encoders, register_conditioner, t5_config, tokenize,
)

CLIP = ("clip_text_model",)


@register_conditioner
class SD3Conditioner(TextConditioner):
    name = "sd3"
    pipeline = "StableDiffusion3Pipeline"

    def __init__(self, clip_l: dict[str, Any], clip_g: dict[str, Any], t5: dict[str, Any],
                 clip_len: int = 77, t5_len: int = 256) -> None:
        super().__init__([
            EncoderSlot("text_encoder", "tokenizer", "CLIPTextModelWithProjection", clip_l, clip_len),
            EncoderSlot("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection", clip_g, clip_len),
            EncoderSlot("text_encoder_3", "tokenizer_3", "T5EncoderModel", t5, t5_len)])

    @classmethod
    def tiny(cls, width: int, max_len: int) -> "SD3Conditioner":
        half = width // 2
        return cls(clip_config(half, 1, 2, max_len, "quick_gelu"), clip_config(half, 2, 2, max_len, "gelu"),
                   t5_config(width, 1, 2, 16, 2 * width), max_len, max_len)

    @classmethod
    def from_pipeline(cls, configs: dict[str, dict[str, Any]], *, text_len: int, denoiser: dict[str, Any],
                      where: str) -> "SD3Conditioner":
        expect_encoders(configs, {"text_encoder": CLIP, "text_encoder_2": CLIP, "text_encoder_3": ("t5",)},
                        cls.pipeline, where)
        # the pipeline's max_sequence_length default (256) for T5
        return cls(configs["text_encoder"], configs["text_encoder_2"], configs["text_encoder_3"],
                   int(configs["text_encoder"]["max_position_embeddings"]), 256)

    @property
    def text_len(self) -> int:
        return self.slots[0].max_len + self.slots[2].max_len

    @property
    def text_width(self) -> int:
        return self.slots[2].width

    @property
    def pooled_width(self) -> int:
        return sum(int(s.config["projection_dim"]) for s in self.slots[:2])

    def encode(self, encoders: Sequence[tuple[nn.Module, Any]], captions: Sequence[str],
               device: torch.device | str) -> Cond:
        states, pooled, masks = [], [], []
        for (encoder, tokenizer), slot in zip(encoders[:2], self.slots[:2]):
            ids, mask = tokenize(tokenizer, captions, slot.max_len, device)
            out = encoder(ids, output_hidden_states=True)
            pooled.append(out[0].float())
            states.append(out.hidden_states[-2].float())
        masks.append(mask)
        clip = torch.cat(states, dim=-1)
        clip = F.pad(clip, (0, self.text_width - clip.shape[-1]))
        t5, tokenizer = encoders[2]
        ids, mask = tokenize(tokenizer, captions, self.slots[2].max_len, device)
        masks.append(mask)
        emb = torch.cat([clip, t5(ids)[0].float()], dim=-2)
        return {"text_emb": emb, "text_mask": torch.cat(masks, dim=1), "pooled": torch.cat(pooled, dim=-1)}
