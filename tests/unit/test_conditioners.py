"""Text conditioners (scaletrain/models/conditioners/) against the published pipelines'
``encode_prompt``: each pipeline is built by diffusers from the same tiny encoders and
tokenizers, and its prompt embeddings, pooled vectors and unconditional embeddings equal the
conditioner's. Plus the one-line errors for a pipeline folder whose encoders, tokenizers or
components do not fit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from scaletrain.models import build_model

# a long caption (truncated at the tiny prompt length), HTML entities and runs of spaces (Wan cleans them)
PROMPTS = ["a red circle", "two  blue &amp; squares on a long caption " * 3]


def _pipeline(name: str, cls_name: str):
    import diffusers

    torch.manual_seed(0)
    model = build_model(name, seed=0)
    parts = {}
    for slot, encoder, tokenizer in zip(model.preset.conditioner.slots, model.text_encoders, model.tokenizers):
        parts.update({slot.component: encoder, slot.tokenizer: tokenizer})
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler() if cls_name != "StableDiffusionXLPipeline" else \
        diffusers.EulerDiscreteScheduler()
    denoiser = {"unet" if cls_name == "StableDiffusionXLPipeline" else "transformer": model.denoiser.net}
    pipe = getattr(diffusers, cls_name)(vae=model.vae, scheduler=scheduler, **denoiser, **parts)
    return model, pipe


@torch.no_grad()
def test_sdxl_is_both_clips_penultimate_states_clip_g_pooled_and_zeros_for_empty() -> None:
    model, pipe = _pipeline("sdxl-tiny", "StableDiffusionXLPipeline")
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    ours, empty = model.encode_text(PROMPTS, "cpu"), model.encode_text(["", ""], "cpu")
    torch.testing.assert_close(ours["text_emb"], emb)
    torch.testing.assert_close(ours["pooled"], pooled)
    # the pipeline's unconditional half (force_zeros_for_empty_prompt) is what a dropped caption trains
    torch.testing.assert_close(empty["text_emb"], neg)
    torch.testing.assert_close(empty["pooled"], neg_pooled)
    assert not neg.any() and emb.any()


@torch.no_grad()
def test_sd3_is_clips_then_t5_along_the_sequence_and_both_clip_projections_pooled() -> None:
    model, pipe = _pipeline("mmdit-tiny", "StableDiffusion3Pipeline")
    t5_len = model.preset.conditioner.slots[2].max_len
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, device="cpu",
                                                      do_classifier_free_guidance=True, max_sequence_length=t5_len)
    ours, empty = model.encode_text(PROMPTS, "cpu"), model.encode_text(["", ""], "cpu")
    torch.testing.assert_close(ours["text_emb"], emb)
    torch.testing.assert_close(ours["pooled"], pooled)
    torch.testing.assert_close(empty["text_emb"], neg)  # SD3's negative prompt "" is encoded, not zeroed
    torch.testing.assert_close(empty["pooled"], neg_pooled)


@torch.no_grad()
def test_flux_is_t5_states_and_clip_pooled_output() -> None:
    model, pipe = _pipeline("flux-tiny", "FluxPipeline")
    emb, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, device="cpu", max_sequence_length=model.max_text_len)
    ours = model.encode_text(PROMPTS, "cpu")
    torch.testing.assert_close(ours["text_emb"], emb)
    torch.testing.assert_close(ours["pooled"], pooled)


@torch.no_grad()
def test_wan_is_cleaned_umt5_states_zeroed_past_the_caption() -> None:
    model, pipe = _pipeline("wan-tiny", "WanPipeline")
    emb, neg = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True, device="cpu",
                                  max_sequence_length=model.max_text_len)
    ours, empty = model.encode_text(PROMPTS, "cpu"), model.encode_text(["", ""], "cpu")
    torch.testing.assert_close(ours["text_emb"], emb)
    torch.testing.assert_close(empty["text_emb"], neg)
    assert not ours["text_emb"][0, ours["text_mask"][0].sum():].any()  # zeros past the caption


@torch.no_grad()
def test_flux_dev_guidance_embedding_is_fed_and_changes_the_prediction() -> None:
    """A guidance-distilled Flux (guidance_embeds, as FLUX.1-dev) is told its guidance scale: the
    training default 3.5, or the conditioning's own; another value gives another prediction."""
    from scaletrain.models.families.flux import TRAIN_GUIDANCE, flux_tiny_config
    from scaletrain.models.family import get_family

    family = get_family("flux")
    torch.manual_seed(0)
    net = family.build({**flux_tiny_config(32), "guidance_embeds": True}).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([100.0, 700.0])
    cond = {"text_emb": torch.randn(2, 8, 32), "pooled": torch.randn(2, 32)}
    default = family.forward(net, x, t, cond)
    told = family.forward(net, x, t, {**cond, "guidance": torch.full((2,), TRAIN_GUIDANCE)})
    other = family.forward(net, x, t, {**cond, "guidance": torch.full((2,), 1.0)})
    torch.testing.assert_close(default, told)
    assert not torch.allclose(default, other)


def test_a_conditioner_whose_widths_the_denoiser_does_not_take_is_one_line() -> None:
    from scaletrain.models.conditioners.sd3 import SD3Conditioner
    from scaletrain.models.families.mmdit import mmdit_tiny_config
    from scaletrain.models.family import add_preset

    with pytest.raises(ValueError) as e:
        add_preset("mmdit-wrong", "mmdit", None, mmdit_tiny_config(32), SD3Conditioner.tiny(64, 8), "test")
    msg = str(e.value)
    assert "\n" not in msg and msg == ("model preset 'mmdit-wrong': its text conditioner (sd3) gives caption width 64 "
                                       "where the mmdit denoiser takes 32; pooled width 64 where the mmdit denoiser "
                                       "takes 32")


@pytest.fixture(scope="module")
def sdxl_root(tmp_path_factory):
    from tests.pipelines import build_sdxl_pipeline, forget_pipeline_presets

    yield build_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "sdxl")
    forget_pipeline_presets()


def _edited(root, tmp_path, edit):
    out = tmp_path / "edited"
    shutil.copytree(root, out)
    edit(out)
    return out


def _index(root, **changes):
    index = json.loads((root / "model_index.json").read_text())
    index.update(changes)
    (root / "model_index.json").write_text(json.dumps(index))


def _swap_tokenizer(root):
    from transformers import ByT5Tokenizer

    shutil.rmtree(root / "tokenizer_2")
    big = ByT5Tokenizer(extra_ids=2000)  # 2259 ids: more than the tiny CLIP-G's vocabulary embeds
    big.save_pretrained(root / "tokenizer_2")


BAD = {
    "an image encoder": (lambda r: _index(r, image_encoder=["transformers", "CLIPVisionModelWithProjection"]),
                         "holds image_encoder (CLIPVisionModelWithProjection), which unet training neither trains nor "
                         "exports; save the pipeline without it (image_encoder=None)"),
    "a refiner": (lambda r: _index(r, _class_name="StableDiffusionXLImg2ImgPipeline", requires_aesthetics_score=True),
                  "is a StableDiffusionXLImg2ImgPipeline (an image-to-image refiner); scaletrain fine-tunes"),
    "a tokenizer of another vocabulary": (_swap_tokenizer, "tokenizer_2 (ByT5Tokenizer) has 2259 tokens but "
                                                           "text_encoder_2 embeds "),
    "a T5 where CLIP-G belongs": (lambda r: json.dump({**json.loads((r / "text_encoder_2" / "config.json").read_text()),
                                                       "model_type": "t5"},
                                                      open(r / "text_encoder_2" / "config.json", "w")),
                                  "text_encoder_2 is a 't5' model; a StableDiffusionXLPipeline folder holds "
                                  "text_encoder: clip_text_model, text_encoder_2: clip_text_model"),
    "no scheduler": (lambda r: shutil.rmtree(r / "scheduler"), "is missing its scheduler component"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_pipeline_folder_the_family_cannot_use_is_one_line(sdxl_root, tmp_path, case) -> None:
    from scaletrain.models.pipeline_folder import register_pipeline_preset

    edit, fragment = BAD[case]
    root = _edited(sdxl_root, tmp_path, edit)
    with pytest.raises(ValueError) as e:
        register_pipeline_preset(root)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg, msg


def test_an_sdxl_folder_is_read_with_its_two_encoders(sdxl_root) -> None:
    """The folder's pipeline class picks SDXL's conditioner; its slots are the folder's encoder
    configs, and the preset's widths are the UNet's (cross-attention 48, pooled 32)."""
    from scaletrain.models.pipeline_folder import register_pipeline_preset

    p = register_pipeline_preset(sdxl_root)
    c = p.conditioner
    assert (c.name, [s.model_class for s in c.slots], c.text_width, c.pooled_width, p.max_text_len) == \
        ("sdxl", ["CLIPTextModel", "CLIPTextModelWithProjection"], 48, 32, 77)
    model = build_model(p, text_encoder_path=str(sdxl_root), vae_path=str(sdxl_root))
    assert [type(t).__name__ for t in model.tokenizers] == ["CLIPTokenizer", "CLIPTokenizer"]
    cond = model.encode_text(PROMPTS, "cpu")
    assert cond["text_emb"].shape == (2, 77, 48) and cond["pooled"].shape == (2, 32)


@torch.no_grad()
def test_sdxl_micro_conditions_are_each_images_original_size_and_crop() -> None:
    """The loader's geometry (original height, width, crop top, left: what diffusers' SDXL trainer
    computes) becomes the UNet's time_ids with the target size; without it (sample grids) the
    target size uncropped, as StableDiffusionXLPipeline samples."""
    import io

    from PIL import Image

    from scaletrain.data.samples import decode_image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, format="PNG")  # 64 wide, 48 high
    pixels, geometry = decode_image(buf.getvalue(), 32, geometry=True)
    assert pixels.shape == (3, 32, 32) and geometry.tolist() == [48, 64, 0, 5]  # resized to 43 x 32, 5 cut left

    torch.manual_seed(0)
    model = build_model("sdxl-tiny", seed=0)
    net, x, t = model.denoiser.net, torch.randn(2, 4, 8, 8), torch.tensor([10, 600])
    cond = model.encode_text(["a red circle", "a blue square"], "cpu")
    given = model.denoiser(x, t, {**cond, "geometry": geometry.expand(2, 4)})
    default = model.denoiser(x, t, cond)

    def direct(time_ids):
        return net(x, t, encoder_hidden_states=cond["text_emb"], return_dict=False,
                   added_cond_kwargs={"text_embeds": cond["pooled"], "time_ids": torch.tensor([time_ids] * 2).float()})[0]

    torch.testing.assert_close(given, direct([48, 64, 0, 5, 32, 32]))  # pixel size: 8 latents x the VAE's 4
    torch.testing.assert_close(default, direct([32, 32, 0, 0, 32, 32]))
    assert not torch.allclose(given, default)
