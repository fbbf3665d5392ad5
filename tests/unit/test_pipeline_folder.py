"""Diffusers pipeline folders as init sources and as presets (``model.preset: from_diffusers``):
the preset read from a folder's own configs, the weights and encoders loaded from it, PixArt's
micro-conditions, and a clear one-line error for each way a folder can be incomplete."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from tests.conftest import run_cmd
from tests.pipelines import build_pixart_pipeline, build_sd_pipeline, forget_pipeline_presets


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipelines")
    yield {"sd": build_sd_pipeline(tmp / "sd21"), "pixart": build_pixart_pipeline(tmp / "pixart")}
    forget_pipeline_presets()


def _cfg(root, **extra):
    from scaletrain.checks import validate_config

    data = {"model": {"preset": "from_diffusers"}, "init": {"from_diffusers": str(root)},
            "diffusion": {"prediction_type": "v_prediction"},
            "train": {"stages": [{"name": "s", "resolution": 32, "steps": 2, "micro_batch": 2}]}}
    for key, value in extra.items():
        section, name = key.split("__")
        data.setdefault(section, {})[name] = value
    return validate_config(data, check_paths=False)


def test_from_diffusers_reads_the_preset_from_the_folder(roots) -> None:
    from scaletrain.models import get_preset

    cfg = _cfg(roots["sd"])
    assert cfg.model.preset == f"diffusers:{roots['sd'].resolve()}"
    assert cfg.model.text_encoder_path == cfg.model.vae_path == str(roots["sd"].resolve())
    p = get_preset(cfg.model.preset)
    unet = json.loads((roots["sd"] / "unet" / "config.json").read_text())
    assert (p.family, p.latent, p.vae_factor, p.downsample_factor, p.in_channels) == ("unet", True, 2, 4, 4)
    assert p.denoiser_config["block_out_channels"] == unet["block_out_channels"] == [24, 48]
    c = p.conditioner
    assert (c.name, c.slots[0].model_class, c.text_width, c.use_mask, p.max_text_len) == \
        ("single", "CLIPTextModel", 48, False, 77)
    assert p.vae_config["scaling_factor"] == 0.18215
    px = get_preset(_cfg(roots["pixart"], diffusion__prediction_type="epsilon").model.preset)
    assert (px.family, px.conditioner.slots[0].model_class, px.conditioner.use_mask, px.max_text_len) == \
        ("dit", "T5EncoderModel", True, 120)
    assert px.denoiser_config["out_channels"] == 8 and px.denoiser_config["sample_size"] == 128


@pytest.mark.parametrize("which", ["sd", "pixart"])
def test_weights_and_encoders_come_from_the_folder(roots, which) -> None:
    """The denoiser loaded by init equals the folder's; the frozen encoders are the folder's."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, T5EncoderModel

    from scaletrain.checkpoint.init import load_init_weights
    from scaletrain.models import build_model, get_preset

    root = roots[which]
    cfg = _cfg(root, diffusion__prediction_type="v_prediction" if which == "sd" else "epsilon")
    preset = get_preset(cfg.model.preset)
    model = build_model(preset, text_encoder_path=cfg.model.text_encoder_path, vae_path=cfg.model.vae_path)
    line = load_init_weights(model.denoiser, cfg.init, cfg.model.preset)
    assert line == f"init: diffusers pipeline {root}"
    sub = "unet" if which == "sd" else "transformer"
    theirs = load_file(str(root / sub / "diffusion_pytorch_model.safetensors"))
    ours = model.denoiser.net.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    enc_cls = CLIPTextModel if which == "sd" else T5EncoderModel
    ref = enc_cls.from_pretrained(root / "text_encoder")
    assert all(torch.equal(a, b) for a, b in zip(model.text_encoders[0].state_dict().values(), ref.state_dict().values()))
    vae = AutoencoderKL.from_pretrained(root / "vae")
    assert all(torch.equal(a, b) for a, b in zip(model.vae.state_dict().values(), vae.state_dict().values()))
    assert type(model.tokenizers[0]).__name__ == ("CLIPTokenizer" if which == "sd" else "ByT5Tokenizer")


def test_pixart_micro_conditions_are_the_image_size_in_pixels(roots) -> None:
    """PixArt-alpha 1024 conditions on (height, width) and aspect ratio of the image, as
    PixArtAlphaPipeline passes them; the Denoiser hands the family the pixel size of its latents."""
    from scaletrain.models import build_model, get_preset

    preset = get_preset(_cfg(roots["pixart"], diffusion__prediction_type="epsilon").model.preset)
    model = build_model(preset, encoders=False)
    assert model.denoiser.net.use_additional_conditions  # diffusers' rule for sample_size 128
    x, t = torch.randn(2, 4, 8, 12), torch.tensor([10, 500])
    emb, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        ours = model.denoiser(x, t, {"text_emb": emb, "text_mask": mask})
        cond = {"resolution": torch.tensor([[16.0, 24.0]]).repeat(2, 1), "aspect_ratio": torch.tensor([[16 / 24]]).repeat(2, 1)}
        theirs = model.denoiser.net(x, encoder_hidden_states=emb, timestep=t, encoder_attention_mask=mask,
                                    added_cond_kwargs=cond).sample[:, :4]
        cond["resolution"] = torch.tensor([[64.0, 96.0]]).repeat(2, 1)
        other = model.denoiser.net(x, encoder_hidden_states=emb, timestep=t, encoder_attention_mask=mask,
                                   added_cond_kwargs=cond).sample[:, :4]
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, other)  # the size does condition it


def _broken(roots, tmp_path, which, edit):
    root = tmp_path / "broken"
    shutil.copytree(roots[which], root)
    edit(root)
    return root


def _index(root, **changes):
    index = json.loads((root / "model_index.json").read_text())
    index.update(changes)
    (root / "model_index.json").write_text(json.dumps(index))


BROKEN = {
    "no vae folder": (lambda r: shutil.rmtree(r / "vae"), "is missing its vae component"),
    "no unet folder": (lambda r: shutil.rmtree(r / "unet"), "is missing its unet component"),
    "no text encoder weights": (lambda r: (r / "text_encoder" / "model.safetensors").unlink(),
                                "text_encoder holds no weights"),
    "empty tokenizer": (lambda r: [f.unlink() for f in (r / "tokenizer").iterdir()], "tokenizer is empty"),
    "no scheduler config": (lambda r: (r / "scheduler" / "scheduler_config.json").unlink(),
                            "is missing scheduler/scheduler_config.json"),
    "no denoiser in the index": (lambda r: _index(r, unet=[None, None]), "model_index.json names no denoiser"),
    "two text encoders (SD3)": (lambda r: (_index(r, text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                                                  tokenizer_2=["transformers", "CLIPTokenizer"]),
                                           shutil.copytree(r / "text_encoder", r / "text_encoder_2"),
                                           shutil.copytree(r / "tokenizer", r / "tokenizer_2")),
                                "has 2 text encoders (text_encoder, text_encoder_2) and a pipeline class scaletrain "
                                "reads one encoder from"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_an_incomplete_pipeline_folder_is_one_line_naming_the_component(roots, tmp_path, case) -> None:
    from scaletrain.checks import check_launch
    from scaletrain.checks import validate_config

    edit, fragment = BROKEN[case]
    root = _broken(roots, tmp_path, "sd", edit)
    data = {"model": {"preset": "from_diffusers"}, "init": {"from_diffusers": str(root)},
            "diffusion": {"prediction_type": "v_prediction"}, "run": {"dir": str(tmp_path / "run")},
            "train": {"stages": [{"name": "s", "resolution": 32, "steps": 2, "micro_batch": 2}]}}
    with pytest.raises(ValueError) as e:
        check_launch(validate_config(data, check_paths=False), world_size=1)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg, msg


def test_pipeline_mismatches_are_one_line(roots, tmp_path) -> None:
    """The recipe's objective against the pipeline's scheduler; from_diffusers without a folder;
    a named preset the pipeline's UNet does not match."""
    from scaletrain.checks import check_launch
    from scaletrain.checks import validate_config

    base = {"run": {"dir": str(tmp_path / "run")},
            "train": {"stages": [{"name": "s", "resolution": 32, "steps": 2, "micro_batch": 2}]}}
    cases = [
        ({"model": {"preset": "from_diffusers"}, "init": {"from_diffusers": str(roots["sd"])},
          "diffusion": {"prediction_type": "epsilon"}}, "was trained with prediction_type='v_prediction'"),
        ({"model": {"preset": "from_diffusers"}, "init": {"from_diffusers": str(roots["sd"])},
          "diffusion": {"prediction_type": "v_prediction", "beta_schedule": "linear"}},
         "was trained with beta_schedule='scaled_linear'"),
        # every contradicting key at once, in one line
        ({"model": {"preset": "from_diffusers"}, "init": {"from_diffusers": str(roots["sd"])},
          "diffusion": {"prediction_type": "epsilon", "beta_schedule": "linear", "beta_end": 0.02}},
         "was trained with prediction_type='v_prediction', beta_schedule='scaled_linear', beta_end=0.012 (its "
         "scheduler_config.json) but the recipe has diffusion.prediction_type='epsilon', "
         "diffusion.beta_schedule='linear', diffusion.beta_end=0.02"),
        ({"model": {"preset": "from_diffusers"}, "init": {"from_diffusers": str(roots["sd"])},
          "diffusion": {"objective": "flow_matching"}}, "set diffusion.objective=ddpm"),
        ({"model": {"preset": "from_diffusers"}}, "set init.from_diffusers=FOLDER"),
        ({"model": {"preset": "from_diffusers"}, "init": {"from_diffusers": str(roots["sd"] / "unet")}},
         "needs init.from_diffusers to be a diffusers pipeline folder"),
        ({"model": {"preset": "unet-tiny-latent"}, "init": {"from_diffusers": str(roots["sd"])},
          "diffusion": {"prediction_type": "v_prediction"}}, "pick the preset the model was exported from"),
    ]
    for extra, fragment in cases:
        with pytest.raises(ValueError) as e:
            check_launch(validate_config({**base, **extra}, check_paths=False), world_size=1)
        assert fragment in str(e.value) and "\n" not in str(e.value), (extra, str(e.value))


def test_the_schedule_comes_from_the_folder_unless_the_recipe_sets_it(roots, tmp_path) -> None:
    """A recipe with no diffusion keys fine-tunes the folder with its own objective and schedule
    (the SD folder: DDPM, v-prediction, SD's scaled-linear betas), passes the launch checks, and
    keeps what it does set where the folder agrees; a DDPM-default recipe no longer takes four
    runs naming one key each."""
    from scaletrain.checks import check_launch, validate_config

    data = {"model": {"preset": "from_diffusers"}, "init": {"from_diffusers": str(roots["sd"])},
            "run": {"dir": str(tmp_path / "run")},
            "train": {"stages": [{"name": "s", "resolution": 32, "steps": 2, "micro_batch": 2}]}}
    cfg = validate_config(data, check_paths=False)
    assert cfg.diffusion.objective == "ddpm"
    assert cfg.diffusion.params() == {"prediction_type": "v_prediction", "beta_schedule": "scaled_linear",
                                      "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}
    check_launch(cfg, world_size=1)
    kept = validate_config({**data, "diffusion": {"min_snr_gamma": 1.0, "beta_end": 0.012}}, check_paths=False)
    assert kept.diffusion.params()["min_snr_gamma"] == 1.0 and kept.diffusion.params()["prediction_type"] == "v_prediction"


def test_config_check_prints_one_line_for_a_missing_component(roots, tmp_path) -> None:
    """As a user meets it: `scaletrain config check` exits non-zero with one line on stderr."""
    root = _broken(roots, tmp_path, "sd", lambda r: shutil.rmtree(r / "vae"))
    r = run_cmd([sys.executable, "-m", "scaletrain.cli", "config", "check", "--config", "configs/demo.yaml",
                 "--set", "model.preset=from_diffusers", "--set", f"init.from_diffusers={root}",
                 "--set", "diffusion.prediction_type=v_prediction", "--set", f"run.dir={tmp_path / 'run'}"],
                timeout=120)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "is missing its vae component" in lines[0], r.stderr


def test_a_named_preset_takes_only_the_vae_of_a_several_encoder_pipeline(roots, tmp_path) -> None:
    """An SD3/Flux-style folder (text_encoder_2, ...) with a named preset: the transformer and the
    VAE are the folder's, the text encoder stays the preset's (scaletrain conditions on one)."""
    from scaletrain.checks import validate_config

    root = _broken(roots, tmp_path, "sd", lambda r: _index(r, text_encoder_2=["transformers", "CLIPTextModel"]))
    cfg = validate_config({"model": {"preset": "unet-tiny-latent"}, "init": {"from_diffusers": str(root)},
                           "train": {"stages": [{"name": "s", "resolution": 32, "steps": 2, "micro_batch": 2}]}},
                          check_paths=False)
    assert cfg.model.text_encoder_path is None and cfg.model.vae_path == str(root.resolve())
