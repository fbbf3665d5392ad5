"""LoRA adapters of the published layouts load with each pipeline's own ``load_lora_weights``:
an adapter trained on the denoiser of an SDXL, SD3, FLUX or Wan pipeline folder (tiny, built by
tests/pipelines.py), exported in the family's diffusers layout, is loaded by
``DiffusionPipeline.from_pretrained(folder).load_lora_weights(OUT)``, and the pipeline's denoiser
then predicts what scaletrain's adapted denoiser predicts."""

from __future__ import annotations

import pytest
import torch

from tests.pipelines import (
    build_flux_pipeline,
    build_sd3_pipeline,
    build_sdxl_pipeline,
    build_wan_pipeline,
    forget_pipeline_presets,
)

BUILD = {"sdxl": build_sdxl_pipeline, "sd3": build_sd3_pipeline, "flux": build_flux_pipeline, "wan": build_wan_pipeline}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-pipelines")
    yield {name: build(tmp / name) for name, build in BUILD.items()}
    forget_pipeline_presets()


@pytest.mark.parametrize("name", list(BUILD))
def test_lora_export_loads_with_the_pipelines_load_lora_weights(roots, name, tmp_path) -> None:
    import diffusers
    from peft import get_peft_model_state_dict

    from scaletrain.checkpoint.init import load_init_weights
    from scaletrain.config import InitSection, LoraSection
    from scaletrain.models import build_model
    from scaletrain.models.family import get_family
    from scaletrain.models.lora import ADAPTER, apply_lora, build_lora_config
    from scaletrain.models.pipeline_folder import register_pipeline_preset
    from scaletrain.models.registry import Denoiser

    root = roots[name]
    preset = register_pipeline_preset(root)
    model = build_model(preset, text_encoder_path=str(root), vae_path=str(root))
    load_init_weights(model.denoiser, InitSection(from_diffusers=str(root)), preset.name)
    section = LoraSection(enabled=True, rank=4)
    stats = apply_lora(model.denoiser, section)
    assert stats.layers > 0
    torch.manual_seed(1)
    with torch.no_grad():
        for n, t in model.denoiser.named_parameters():
            if "lora_B" in n:
                t.normal_(std=0.05)
    family = get_family(preset.family)
    layers = {k.replace(f".{ADAPTER}", ""): v
              for k, v in get_peft_model_state_dict(model.denoiser.net, adapter_name=ADAPTER).items()}
    assert family.export_lora(tmp_path, model.denoiser.net, layers, build_lora_config(section, preset.family)) == "diffusers"

    pipe = diffusers.DiffusionPipeline.from_pretrained(root)
    # the pipeline's own denoiser called as scaletrain calls its own (the conventions are the
    # pipelines' own: tests/e2e/test_published_pipelines.py)
    theirs = Denoiser(getattr(pipe, family.pipeline_denoiser), preset.family,
                      use_text_mask=preset.conditioner.use_mask, pixel_factor=preset.vae_factor)
    x = torch.randn(2, preset.in_channels, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([100.0, 600.0])
    model.denoiser.eval()
    with torch.no_grad():
        cond = model.encode_text(["a red circle", "a blue square"], "cpu")
        ours = model.denoiser(x, t, cond)
        plain = theirs(x, t, cond)
        pipe.load_lora_weights(str(tmp_path))
        adapted = theirs(x, t, cond)
    torch.testing.assert_close(adapted, ours, rtol=1e-4, atol=1e-5)
    assert (plain - ours).abs().max() > 1e-3  # the adapter changes the prediction: it was loaded, not skipped
