"""Model registry: presets build, shapes line up, encoders are frozen, parallel plans are sane."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from scaletrain.models import PRESETS, DiffusionModel, build_model, count_params, get_preset, parallel_units
from scaletrain.models.family import FAMILIES
from scaletrain.models.registry import build_vae

TINY = ["unet-tiny", "dit-tiny", "unet-tiny-latent", "mmdit-tiny", "flux-tiny", "sdxl-tiny"]
# Expected denoiser params (millions) of the real-size presets not in tests/data/published/
# (test_published.py holds those exactly): published config sizes.
REAL_PARAMS_M = {"dit-b-2": 119.0, "unet-sd15": 859.5, "unet-sd2": 865.9, "pixart-xl-2": 610.9}
DOWNSAMPLE = {"unet-tiny": 2, "unet-tiny-latent": 8, "unet-small": 4, "dit-tiny": 2, "dit-b-2": 16, "unet-sd15": 64, "unet-sd2": 64, "pixart-xl-2": 16,
              "mmdit-tiny": 2, "sd3-medium": 16, "sd3.5-large": 16, "mmdit-sd3-medium": 16,
              "flux-tiny": 2, "flux.1-dev": 16, "flux.1-schnell": 16, "flux-dev": 16,
              "sdxl-tiny": 8, "sdxl-base-1.0": 32,
              "wan-tiny": 2, "wan-2.1-1.3b": 16, "wan-2.1-14b": 16}


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, DiffusionModel]:
    out = {}
    for name in TINY:
        torch.manual_seed(0)
        out[name] = build_model(name)
    return out


def test_every_preset_is_listed_with_consistent_fields() -> None:
    named = {n: p for n, p in PRESETS.items() if not n.startswith("diffusers:")}  # not read from a folder
    assert set(named) == set(DOWNSAMPLE)
    for name, preset in named.items():
        assert preset.name == name and preset.family in FAMILIES
        assert preset.downsample_factor == DOWNSAMPLE[name]
        vae = preset.vae_config or {}
        assert preset.in_channels == (vae.get("latent_channels") or vae.get("z_dim") or 3)  # z_dim: Wan's VAE
        assert (preset.vae_config is not None) == preset.latent


def test_unknown_preset_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"model.preset=.nope. is unknown.*pixart-xl-2.*unet-tiny"):
        get_preset("nope")


@pytest.mark.parametrize("name", sorted(REAL_PARAMS_M))
def test_real_presets_build_on_meta_with_published_size(name: str) -> None:
    with torch.device("meta"):
        model = build_model(name)
    n = count_params(model.denoiser) / 1e6
    assert abs(n - REAL_PARAMS_M[name]) / REAL_PARAMS_M[name] < 0.05, n
    assert model.vae is not None and 80 < count_params(model.vae) / 1e6 < 90
    config = model.text_encoders[0].config
    width = config.d_model if config.model_type == "t5" else config.hidden_size
    assert width == {"dit-b-2": 768, "unet-sd15": 768, "unet-sd2": 1024, "pixart-xl-2": 4096}[name]
    assert parallel_units(model.denoiser)


def test_tiny_denoisers_are_about_a_million_params(tiny_models: dict[str, DiffusionModel]) -> None:
    for model in tiny_models.values():
        assert 1e5 < count_params(model.denoiser) < 2e6


@pytest.mark.parametrize("name", TINY)
def test_encode_text_shapes_and_empty_caption(name: str, tiny_models: dict[str, DiffusionModel]) -> None:
    model = tiny_models[name]
    cond = model.encode_text(["a red circle", ""], "cpu")
    assert {k: tuple(v.shape[1:]) for k, v in cond.items()} == model.preset.conditioner.fields()
    assert cond["text_emb"].shape == (2, model.max_text_len, model.preset.conditioner.text_width)
    assert cond["text_emb"].dtype == torch.float32 and cond["text_mask"].dtype == torch.long
    assert all(torch.isfinite(v).all() for v in cond.values())
    # "" -> eos only, per encoder in the sequence (SD3: CLIP's then T5's): the unconditional caption
    assert cond["text_mask"][1].sum() == (2 if name == "mmdit-tiny" else 1)
    if name == "sdxl-tiny":  # SDXL's unconditional conditioning is all zeros, as its pipeline's
        assert not cond["text_emb"][1].any() and not cond["pooled"][1].any() and cond["pooled"][0].any()


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("res", [32, 64])
def test_denoiser_forward_backward(name: str, res: int, tiny_models: dict[str, DiffusionModel]) -> None:
    model = tiny_models[name]
    cond = model.encode_text(["a red circle", ""], "cpu")
    x = model.encode_images(torch.rand(2, 3, res, res) * 2 - 1)
    assert res % model.preset.downsample_factor == 0
    out = model.denoiser(x, torch.tensor([3, 900]), cond)
    assert out.shape == x.shape
    model.denoiser.zero_grad()
    out.square().mean().backward()
    grads = [p.grad for p in model.denoiser.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for enc in model.text_encoders for p in enc.parameters())


@pytest.mark.parametrize("name", TINY)
def test_text_encoder_is_frozen(name: str, tiny_models: dict[str, DiffusionModel]) -> None:
    for enc in tiny_models[name].text_encoders:
        assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert all(p.requires_grad for p in tiny_models[name].denoiser.parameters())


@pytest.mark.parametrize("name", TINY)
def test_parallel_units_are_disjoint_submodules(name: str, tiny_models: dict[str, DiffusionModel]) -> None:
    denoiser = tiny_models[name].denoiser
    units = parallel_units(denoiser)
    assert units
    inside = {id(m) for m in denoiser.modules()}
    assert all(id(u) in inside and u is not denoiser for u in units)
    owned = [{id(p) for p in u.parameters()} for u in units]
    assert all(owned) and sum(map(len, owned)) == len(set().union(*owned))


def test_same_seed_same_weights() -> None:
    models = []
    for _ in range(2):
        torch.manual_seed(7)
        models.append(build_model("dit-tiny"))
    a, b = models
    for pa, pb in zip(a.denoiser.parameters(), b.denoiser.parameters()):
        assert torch.equal(pa, pb)


def test_text_encoder_from_local_folder(tmp_path, tiny_models: dict[str, DiffusionModel]) -> None:
    src = tiny_models["unet-tiny"]
    # diffusers pipeline layout: root/text_encoder + root/tokenizer
    src.text_encoders[0].save_pretrained(tmp_path / "text_encoder")
    src.tokenizers[0].save_pretrained(tmp_path / "tokenizer")
    loaded = build_model("unet-tiny", text_encoder_path=str(tmp_path))
    torch.testing.assert_close(src.encode_text(["hello"], "cpu"), loaded.encode_text(["hello"], "cpu"))


def test_bad_paths_raise_value_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="model.text_encoder_path"):
        build_model("unet-tiny", text_encoder_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="pixel space"):
        build_model("unet-tiny", vae_path=str(tmp_path))


def test_latent_encode_decode_roundtrip_shapes(tmp_path, tiny_models: dict[str, DiffusionModel]) -> None:
    # A VAE saved locally (the code path of model.vae_path=...) in the tiny latent preset's layout.
    from scaletrain.models.registry import TINY_VAE

    torch.manual_seed(1)
    AutoencoderKL(**TINY_VAE).save_pretrained(tmp_path / "vae")
    vae = build_vae(TINY_VAE, str(tmp_path), torch.float32)
    assert not any(p.requires_grad for p in vae.parameters())
    latent_model = build_model("unet-tiny-latent", vae_path=str(tmp_path))
    assert torch.equal(latent_model.vae.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    z = latent_model.encode_images(torch.zeros(1, 3, 32, 32))
    assert z.shape == (1, 4, 8, 8)
    px = latent_model.decode(z)
    assert px.shape == (1, 3, 32, 32) and px.abs().max() <= 1


def test_frozen_encoders_run_in_the_training_precision() -> None:
    """engine.precision=bf16 builds the text encoder (and a latent preset's VAE) in bf16, never
    fp32; their outputs reach the objective as float32."""
    from scaletrain.models import frozen_dtype

    assert frozen_dtype("bf16") == torch.bfloat16 and frozen_dtype("fp32") == torch.float32
    torch.manual_seed(0)
    model = build_model("unet-tiny", dtype=frozen_dtype("bf16"))
    assert {p.dtype for p in model.text_encoders[0].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.denoiser.parameters()} == {torch.float32}  # engines own the denoiser's precision
    assert model.encode_text(["a red circle"], "cpu")["text_emb"].dtype == torch.float32


def test_frozen_encoder_layout_applies_now_or_at_the_first_build() -> None:
    """model.frozen_encoders=shard's hook (DiffusionModel.lay_out_encoders): applied to built
    encoders at once; on precomputed latents (encoders not built) when a sample grid first builds
    them, to the text encoder and the VAE, once each. The units are the encoders' repeated blocks."""
    from scaletrain.models.parallelize import frozen_units

    seen: list[str] = []

    def layout(module):
        seen.append(type(module).__name__)
        return module

    lazy = build_model("unet-tiny-latent", encoders=False)
    lazy.lay_out_encoders(layout)
    assert seen == [] and not lazy.encoders_built
    lazy.vae  # first use builds both
    assert seen == ["CLIPTextModel", "AutoencoderKL"]
    lazy.text_encoders
    assert len(seen) == 2
    built = build_model("unet-tiny-latent")
    built.lay_out_encoders(layout)
    assert seen[2:] == ["CLIPTextModel", "AutoencoderKL"]
    layers = built.text_encoders[0].encoder.layers  # newer transformers: no text_model level
    assert frozen_units(built.text_encoders[0]) == list(layers) and len(layers) > 1
    vae_units = frozen_units(built.vae)
    assert all(b in vae_units for b in built.vae.encoder.down_blocks)
    assert not any(u is built.vae.encoder for u in vae_units)  # the root keeps what no list holds


def test_text_encoder_folder_is_loaded_by_its_own_class_and_every_key_must_fit(tmp_path) -> None:
    """A UMT5 folder (Wan's encoder) for a T5 preset loads as UMT5EncoderModel with its own
    embeddings (as a T5 its per-layer attention biases were dropped with a log line); a folder of
    another kind, or one whose weights miss a tensor, is one error naming what does not fit."""
    from safetensors.torch import load_file, save_file
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    from scaletrain.models import text

    from scaletrain.models.conditioners.single import SingleEncoder

    t5 = SingleEncoder.t5(d_model=32, layers=2, heads=2, d_kv=16, d_ff=64, max_len=8)
    spec = t5.slots[0]
    torch.manual_seed(0)
    umt5 = UMT5EncoderModel(UMT5Config(**spec.config)).eval()
    umt5.save_pretrained(tmp_path / "umt5" / "text_encoder")  # a pipeline's layout
    ByT5Tokenizer().save_pretrained(tmp_path / "umt5" / "tokenizer")
    loaded, tok = text.build_encoder(spec, str(tmp_path / "umt5"), torch.float32)
    assert type(loaded) is UMT5EncoderModel
    with torch.no_grad():
        got = t5.encode([(loaded, tok)], ["a red circle"], "cpu")["text_emb"]
        want = t5.encode([(umt5, tok)], ["a red circle"], "cpu")["text_emb"]
    assert torch.equal(got, want)
    # a CLIP preset given the UMT5 folder
    with pytest.raises(ValueError, match=r"holds a 'umt5' model in .*, but this preset encodes captions there with a "
                                         r"CLIPTextModel"):
        text.build_encoder(SingleEncoder.clip(32, 2, 2, 8, "gelu").slots[0], str(tmp_path / "umt5"), torch.float32)
    # one tensor gone from the file
    weights = tmp_path / "umt5" / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    gone = next(k for k in state if "relative_attention_bias" in k and ".1." in k)
    del state[gone]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        text.build_encoder(spec, str(tmp_path / "umt5"), torch.float32)
    msg = str(e.value)
    assert "\n" not in msg and "does not fit a UMT5EncoderModel (text_encoder): keys 1 missing (" in msg and gone in msg, msg
