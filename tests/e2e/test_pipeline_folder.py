"""Whole diffusers pipelines in and out, as a user runs them: fine-tune a pipeline folder (built
by the test with diffusers and transformers: SD-2.1-768-like with v-prediction, PixArt-1024-like
with learned sigma and micro-conditions) with ``model.preset: from_diffusers`` on 2 ranks
(FSDP2) through ``launchers/sft.py``; export the run with ``ckpt export --pipeline``; sample the
export with ``DiffusionPipeline.from_pretrained`` in a process that never imports scaletrain,
and get scaletrain's own samples of the checkpoint."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.conftest import run_cmd, shard_pattern
from tests.distributed.util import free_port, read_metrics
from tests.pipelines import build_pixart_pipeline, build_sd_pipeline, forget_pipeline_presets

pytestmark = pytest.mark.e2e

STEPS = 3
PROMPTS = ["a red circle on the left", "a blue square in the center"]
# Each pipeline's noise schedule, as its scheduler_config.json says (the launch refuses others).
OBJECTIVE = {
    "sd": ["diffusion.prediction_type=v_prediction", "diffusion.beta_schedule=scaled_linear"],
    "pixart": ["diffusion.prediction_type=epsilon", "diffusion.beta_schedule=linear", "diffusion.beta_start=0.0001",
               "diffusion.beta_end=0.02"],
}
SAMPLE = """
import json, sys, torch
from safetensors.torch import save_file
from diffusers import DiffusionPipeline
folder, out, side, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
pipe = DiffusionPipeline.from_pretrained(folder)
pipe.set_progress_bar_config(disable=True)
latents = torch.stack([torch.randn((4, side, side), generator=torch.Generator().manual_seed(i)) for i in range(2)])
images = pipe(%r, height=32, width=32, num_inference_steps=6, guidance_scale=3.0, latents=latents,
              output_type="pt", **extra).images
assert not any(m.startswith("scaletrain") for m in sys.modules)
save_file({"images": images.contiguous()}, out)
print(type(pipe).__name__)
""" % (PROMPTS,)


@pytest.fixture(scope="module")
def runs(synth_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline_folder")
    out = {}
    for name, build in (("sd", build_sd_pipeline), ("pixart", build_pixart_pipeline)):
        root, run_dir = build(tmp / name), tmp / f"{name}-run"
        sets = ["init.from_checkpoint=null", f"init.from_diffusers={root}", "model.preset=from_diffusers",
                f"data.shards={shard_pattern(synth_shards)}", f"run.dir={run_dir}", "data.num_workers=0",
                "log.wandb=disabled", "log.progress=false", "sample.at_end=false", "optim.warmup_steps=0",
                f"train.stages=[{{name: ft, resolution: 32, steps: {STEPS}, micro_batch: 2, grad_accum: 1, "
                "global_batch: 4}]", *OBJECTIVE[name]]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "launchers/sft.py", "--config", "configs/sft.yaml",
               *[x for s in sets for x in ("--set", s)]]
        out[name] = (root, run_dir, run_cmd(cmd))
    yield out
    forget_pipeline_presets()


@pytest.mark.parametrize("name", ["sd", "pixart"])
def test_fine_tunes_a_pipeline_folder_from_its_own_configs(runs, name) -> None:
    root, run_dir, proc = runs[name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"init: diffusers pipeline {root}" in proc.stdout + proc.stderr
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    state = json.loads(next((run_dir / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["preset"] == f"diffusers:{root.resolve()}"
    # The loss trained is the folder's objective: the schedule its scheduler_config.json states.
    want = dict(x.removeprefix("diffusion.").split("=") for x in OBJECTIVE[name])
    assert state["objective"]["name"] == "ddpm", state["objective"]
    got = state["objective"]["params"]
    assert {k: str(got[k]) for k in want} == want, got
    # The weights moved: every tensor of the pipeline's denoiser is in the checkpoint, and the
    # trained ones differ from the folder's (a run that trained nothing, or trained a copy that
    # was never saved, keeps them equal).
    from safetensors.torch import load_file

    from scaletrain.checkpoint.export import consolidated_state_dict, resolve_checkpoint

    sub = "unet" if name == "sd" else "transformer"
    before = load_file(str(root / sub / "diffusion_pytorch_model.safetensors"))
    after = {k.removeprefix("net."): v for k, v in consolidated_state_dict(resolve_checkpoint(run_dir)).items()}
    assert before.keys() <= after.keys()
    moved = [k for k in before if not torch.equal(before[k], after[k].to(before[k].dtype))]
    assert len(moved) > len(before) // 2, f"{len(moved)} of {len(before)} tensors changed"
    assert all(torch.isfinite(after[k]).all() for k in before)


@pytest.mark.parametrize("name", ["sd", "pixart"])
def test_exported_pipeline_is_sampled_by_diffusers_alone_as_scaletrain_samples(runs, name, tmp_path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from scaletrain.checkpoint.export import checkpoint_objective, resolve_checkpoint
    from scaletrain.eval.samples import generate_samples
    from scaletrain.models import build_model, get_preset

    root, run_dir, proc = runs[name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "pipe"
    r = run_cmd([sys.executable, "-m", "scaletrain.cli", "ckpt", "export", str(run_dir), str(out), "--pipeline"])
    cls = {"sd": "StableDiffusionPipeline", "pixart": "PixArtAlphaPipeline"}[name]
    assert r.returncode == 0 and f"exported {cls}" in r.stdout, r.stderr[-2000:]
    # The frozen parts are the source pipeline's own: its tokenizer class and files, its encoder weights.
    assert type(AutoTokenizer.from_pretrained(out / "tokenizer")) is type(AutoTokenizer.from_pretrained(root / "tokenizer"))
    for part in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        a, b = load_file(str(out / part)), load_file(str(root / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sub = "unet" if name == "sd" else "transformer"
    assert json.loads((out / sub / "config.json").read_text()) | {"_diffusers_version": None} == \
        json.loads((root / sub / "config.json").read_text()) | {"_diffusers_version": None}

    (tmp_path / "sample.py").write_text(SAMPLE)
    extra = {} if name == "sd" else {"use_resolution_binning": False, "clean_caption": False}
    r = run_cmd([sys.executable, str(tmp_path / "sample.py"), str(out), str(tmp_path / "theirs.safetensors"), "16",
                 json.dumps(extra)], cwd=tmp_path)
    assert r.returncode == 0 and cls in r.stdout, r.stderr[-3000:]
    theirs = load_file(str(tmp_path / "theirs.safetensors"))["images"]

    preset = get_preset(f"diffusers:{root.resolve()}")
    model = build_model(preset, text_encoder_path=str(root), vae_path=str(root))
    model.denoiser.net.load_state_dict(load_file(str(out / sub / "diffusion_pytorch_model.safetensors")))
    model.denoiser.eval()
    with torch.no_grad():
        ours = generate_samples(model.denoiser, lambda texts: model.encode_text(texts, "cpu"), model.decode,
                                prompts=PROMPTS, resolution=32, in_channels=preset.in_channels,
                                latent_factor=preset.vae_factor, objective=checkpoint_objective(resolve_checkpoint(run_dir)),
                                num_inference_steps=6, guidance_scale=3.0, seed=0)
    assert theirs.shape == (2, 3, 32, 32) and theirs.std() > 0.01
    torch.testing.assert_close(theirs, (ours / 2 + 0.5).clamp(0, 1), rtol=1e-4, atol=1e-4)
