"""The published multi-encoder pipelines in and out, as a user fine-tunes them: SDXL, SD3, FLUX.1
and Wan 2.1 folders (built by tests/pipelines.py with diffusers and transformers alone, from the
real classes: CLIPTextModelWithProjection, T5EncoderModel, UMT5EncoderModel, AutoencoderKLWan,
...) fine-tuned with ``model.preset: from_diffusers`` and a recipe with no diffusion section (the
objective and schedule come from the folder's scheduler) on 2 ranks, FSDP2 and ZeRO-3 each;
exported with ``ckpt export --pipeline``; sampled by diffusers alone in a process that never
imports scaletrain, which gets scaletrain's own samples of the export within 1e-4."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.conftest import run_cmd, shard_pattern
from tests.launch import run_batch, sets
from tests.pipelines import (
    build_flux_pipeline,
    build_sd3_pipeline,
    build_sdxl_pipeline,
    build_wan_pipeline,
    forget_pipeline_presets,
)

pytestmark = pytest.mark.e2e

BUILD = {"sdxl": build_sdxl_pipeline, "sd3": build_sd3_pipeline, "flux": build_flux_pipeline, "wan": build_wan_pipeline}
PIPELINE = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline",
            "wan": "WanPipeline"}
# What the folder's scheduler says the run trains (nothing of it is in the recipe).
OBJECTIVE = {"sdxl": ("ddpm", {"prediction_type": "epsilon", "beta_schedule": "scaled_linear"}),
             "sd3": ("flow_matching", {"shift": 3.0, "dynamic_shift": False}),
             "flux": ("flow_matching", {"dynamic_shift": True, "base_shift": 0.5, "max_shift": 1.15}),
             "wan": ("flow_matching", {"shift": 3.0, "dynamic_shift": False})}
ENGINES = {"fsdp": ["engine.kind=fsdp"],
           "zero3": ["engine.kind=deepspeed", "engine.deepspeed_config=ds_configs/zero3.json"]}
STEPS = 2
PROMPTS = ["a red circle on the left", "a blue square in the center"]
RECIPE = """
run: {{seed: 1}}
data: {{shards: "{shards}", num_workers: 0, caption_dropout: 0.25}}
optim: {{lr: 1.0e-3, warmup_steps: 0, schedule: constant}}
train:
  stages:
    - {{name: ft, resolution: 32, steps: {steps}, micro_batch: 2, grad_accum: 1, global_batch: 4}}
engine: {{kind: fsdp, precision: fp32}}
log: {{wandb: disabled, progress: false}}
sample: {{at_end: false}}
validate: {{every_steps: 0, at_end: false}}
"""
# Each pipeline called as its model card samples it, with scaletrain's CFG: an empty negative
# prompt (SDXL: its zeroed unconditional embedding), FLUX-schnell's true CFG at its 256 T5 tokens,
# Wan one frame. Latents are given (FLUX's packed), so both sides start from the same noise.
SAMPLE = """
import json, sys, torch
from safetensors.torch import save_file
from diffusers import DiffusionPipeline, FluxPipeline
folder, out, which = sys.argv[1], sys.argv[2], sys.argv[3]
pipe = DiffusionPipeline.from_pretrained(folder)
pipe.set_progress_bar_config(disable=True)
video = which == "wan"
c = pipe.vae.config.z_dim if video else pipe.vae.config.latent_channels
shape = (c, 1, 16, 16) if video else (c, 16, 16)
latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(2)])
extra = {"guidance_scale": 3.0}
if which == "flux":
    latents = FluxPipeline._pack_latents(latents, 2, c, 16, 16)
    extra = {"true_cfg_scale": 3.0, "negative_prompt": ["", ""], "guidance_scale": 1.0, "max_sequence_length": 256}
elif which in ("sd3", "wan"):
    extra["negative_prompt"] = ["", ""]
if video:
    extra["num_frames"] = 1
with torch.no_grad():
    result = pipe(%r, height=32, width=32, num_inference_steps=5, latents=latents, output_type="pt", **extra)
images = torch.as_tensor(result.frames if video else result.images)
assert not any(m.startswith("scaletrain") for m in sys.modules)
save_file({"images": images.contiguous()}, out)
print(type(pipe).__name__)
""" % (PROMPTS,)


@pytest.fixture(scope="module")
def runs(synth_shards, tmp_path_factory):
    """Each pipeline folder fine-tuned once per engine: 8 two-rank runs of 2 steps through the sft
    entry point, in one torchrun launch (tests/launch.py run_batch)."""
    tmp = tmp_path_factory.mktemp("published")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(RECIPE.format(shards=shard_pattern(synth_shards), steps=STEPS))
    roots = {name: build(tmp / name) for name, build in BUILD.items()}
    recipes = {f"{name}-{engine}": ["--config", str(recipe), *sets(f"init.from_diffusers={root}",
                                                                  "model.preset=from_diffusers", *engine_sets)]
               for name, root in roots.items() for engine, engine_sets in ENGINES.items()}
    batch = run_batch(recipes, tmp / "runs", entry="sft")
    yield {(name, engine): (roots[name], batch[f"{name}-{engine}"]) for name in roots for engine in ENGINES}
    forget_pipeline_presets()


@pytest.mark.parametrize("name", list(BUILD))
@pytest.mark.parametrize("engine", list(ENGINES))
def test_fine_tunes_the_folder_with_its_own_schedule(runs, name, engine) -> None:
    root, run = runs[name, engine]
    run.ok()
    assert f"init: diffusers pipeline {root}" in run.stdout + run.stderr
    run_dir = run.dir
    assert len(run.losses) == STEPS and all(torch.isfinite(torch.tensor(run.losses)))
    state = json.loads(next((run_dir / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["preset"] == f"diffusers:{root.resolve()}"
    objective, keys = OBJECTIVE[name]
    assert state["objective"]["name"] == objective
    assert {k: state["objective"]["params"][k] for k in keys} == keys
    # trained: the denoiser's weights moved away from the folder's
    from safetensors.torch import load_file

    from scaletrain.checkpoint.export import consolidated_state_dict, resolve_checkpoint

    sub = "unet" if name == "sdxl" else "transformer"
    before = load_file(str(root / sub / "diffusion_pytorch_model.safetensors"))
    after = {k.removeprefix("net."): v for k, v in consolidated_state_dict(resolve_checkpoint(run_dir)).items()}
    assert before.keys() <= after.keys()
    moved = [k for k in before if not torch.equal(before[k], after[k].to(before[k].dtype))]
    assert len(moved) > len(before) // 2, f"{len(moved)} of {len(before)} tensors changed"


# The export and diffusers' sampling are engine-independent (they read the consolidated weights);
# each pipeline is exported from one engine's run, both engines' checkpoints covered.
EXPORT_FROM = {"sdxl": "fsdp", "sd3": "zero3", "flux": "fsdp", "wan": "zero3"}


@pytest.mark.parametrize("name", list(BUILD))
def test_exported_pipeline_is_sampled_by_diffusers_alone_as_scaletrain_samples(runs, name, tmp_path) -> None:
    from safetensors.torch import load_file

    from scaletrain.checkpoint.export import checkpoint_objective, resolve_checkpoint
    from scaletrain.eval.samples import generate_samples
    from scaletrain.models import build_model, get_preset

    root, run = runs[name, EXPORT_FROM[name]]
    run_dir = run.ok().dir
    out = tmp_path / "pipe"
    r = run_cmd([sys.executable, "-m", "scaletrain.cli", "ckpt", "export", str(run_dir), str(out), "--pipeline"])
    assert r.returncode == 0 and f"exported {PIPELINE[name]}" in r.stdout, r.stderr[-2000:]
    # every frozen part is the source folder's own: each text encoder, tokenizer class and the VAE
    index = json.loads((root / "model_index.json").read_text())
    parts = sorted(k for k in index if k.startswith(("text_encoder", "vae")) and index[k][0] is not None)
    assert json.loads((out / "model_index.json").read_text()).keys() >= set(parts)
    for part in parts:
        file = next((root / part).glob("*.safetensors")).name
        a, b = load_file(str(out / part / file)), load_file(str(root / part / file))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part

    (tmp_path / "sample.py").write_text(SAMPLE)
    r = run_cmd([sys.executable, str(tmp_path / "sample.py"), str(out), str(tmp_path / "theirs.safetensors"), name],
                cwd=tmp_path)
    assert r.returncode == 0 and PIPELINE[name] in r.stdout, r.stderr[-3000:]
    theirs = load_file(str(tmp_path / "theirs.safetensors"))["images"]

    preset = get_preset(f"diffusers:{root.resolve()}")
    model = build_model(preset, text_encoder_path=str(root), vae_path=str(root))
    sub = "unet" if name == "sdxl" else "transformer"
    model.denoiser.net.load_state_dict(load_file(str(out / sub / "diffusion_pytorch_model.safetensors")))
    model.denoiser.eval()
    with torch.no_grad():
        ours = generate_samples(model.denoiser, lambda texts: model.encode_text(texts, "cpu"), model.decode,
                                prompts=PROMPTS, resolution=32, in_channels=preset.in_channels,
                                latent_factor=preset.vae_factor,
                                objective=checkpoint_objective(resolve_checkpoint(run_dir)),
                                num_inference_steps=5, guidance_scale=3.0, seed=0, frames=1 if preset.video else 0)
    ours = (ours / 2 + 0.5).clamp(0, 1)
    if preset.video:  # WanPipeline's frames are (B, F, C, H, W); ours (B, C, F, H, W)
        theirs = theirs.permute(0, 2, 1, 3, 4)
    assert theirs.shape == ours.shape and theirs.std() > 0.01
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
