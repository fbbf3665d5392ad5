"""Precomputed latents on 2 ranks, run as a user runs them: `data encode` under torchrun (each rank
its share of shards), then the latent recipe (configs/latent.yaml) on FSDP2 and DeepSpeed ZeRO-3,
online (VAE + text encoders every step) and from the encoded shards (neither built): the same
per-step losses (fp32, rtol 1e-5), caption dropout on. The preset is `sdxl-tiny`: SDXL's
conditioning (two CLIPs' states, CLIP-G's pooled vector, zeros for a dropped caption) is what
the shards must carry beside the latents (the one-encoder path: tests/unit/test_latents.py)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.conftest import run_cmd, shard_pattern
from tests.launch import run_batch, sets, torchrun

pytestmark = pytest.mark.dist

STEPS = 4
RTOL = 1e-5  # as test_engine_equivalence: summation-order noise only


@pytest.fixture(scope="module")
def runs(synth_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("precomputed")
    enc = tmp / "enc"
    common = sets(
        "model.preset=sdxl-tiny", "data.split=sample", "data.shuffle_buffer=0", "data.num_workers=0", "data.caption_dropout=0.25",
        "log.wandb=disabled", "log.progress=false", "sample.at_end=false", "optim.warmup_steps=0",
        f"train.stages=[{{name: s0, resolution: 32, steps: {STEPS}, micro_batch: 4, grad_accum: 1, global_batch: 8}}]",
    )
    encode = run_cmd(torchrun("-m", "scaletrain.cli", "data", "encode", "--config", "configs/latent.yaml",
                               "--shards", shard_pattern(synth_shards), "--out", str(enc), "--no-progress", *common, script=None))
    assert encode.returncode == 0, encode.stderr[-3000:]
    out = {"encode": encode, "enc": enc}
    engines = {"fsdp": ["engine.kind=fsdp"],
               "zero3": ["engine.kind=deepspeed", "engine.deepspeed_config=ds_configs/zero3.json"]}
    recipes = {(name, path): ["--config", "configs/latent.yaml", *common, *sets(f"data.shards={shards}", *engine)]
               for name, engine in engines.items()
               for path, shards in (("online", shard_pattern(synth_shards)), ("precomputed", str(enc)))}
    batch = run_batch({f"{n}-{p}": r for (n, p), r in recipes.items()}, tmp)  # one launch (tests/launch.py)
    for name, path in recipes:
        run = batch[f"{name}-{path}"].ok()
        out[name, path] = (run, run.metrics)
        out["run_dir", name, path] = run.dir
    return out


def test_encode_under_torchrun_splits_shards_and_keeps_every_sample(runs) -> None:
    enc = runs["enc"]
    manifest = json.loads((enc / "32px" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["samples_written"] == 256 and manifest["corrupt"] == 0
    assert manifest["shards_written"] == 8 and len(list((enc / "32px").glob("*.tar"))) == 8
    assert "data encode 32px: 256 samples written in 8 shards" in runs["encode"].stdout


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_precomputed_losses_equal_online(runs, engine: str) -> None:
    (online_proc, online), (pre_proc, pre) = runs[engine, "online"], runs[engine, "precomputed"]
    assert [r["step"] for r in online] == [r["step"] for r in pre] == list(range(1, STEPS + 1))
    for a, b in zip(online, pre):
        assert b["loss"] == pytest.approx(a["loss"], rel=RTOL), (engine, a["step"], a["loss"], b["loss"])
    # The losses move (so equality is not two constant curves) and the encoders were never built.
    assert len({round(r["loss"], 6) for r in online}) == STEPS
    assert "VAE and text encoder not built" in pre_proc.stdout
    assert "training on precomputed latents" not in online_proc.stdout


def test_bench_cell_trains_on_the_encoded_shards(runs, tmp_path) -> None:
    """`scaletrain bench --shards ENCODED`: the cell reads the stored latents and builds no encoder."""
    from scaletrain.bench.runner import MatrixSpec, run_matrix

    spec = MatrixSpec(presets=["sdxl-tiny"], resolutions=[32], engines=["ddp"], micro_batches=[4],
                      world_sizes=[1], warmup=1, reps=2, num_workers=0, comm_sweep=False, shards=str(runs["enc"]))
    (cell,) = run_matrix(spec, tmp_path, log=lambda s: None)["cells"]
    assert cell["status"] == "ok", cell.get("error")
    assert cell["precomputed"] is True and cell["params_frozen"] == 0
    assert "latents precomputed" in (tmp_path / "results.md").read_text()


DIFFUSERS_PIPELINE = """
import sys, torch
from safetensors.torch import save_file
from diffusers import DiffusionPipeline
folder, out = sys.argv[1:3]
pipe = DiffusionPipeline.from_pretrained(folder)
pipe.set_progress_bar_config(disable=True)
latents = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)])
images = pipe(["a red circle on the left", "a blue square in the center"], height=32, width=32,
              num_inference_steps=6, guidance_scale=3.0, latents=latents, output_type="pt").images
assert not any(m.startswith("scaletrain") for m in sys.modules)
save_file({"images": images.contiguous()}, out)
print(type(pipe).__name__)
"""


def test_pipeline_export_is_loaded_and_sampled_by_diffusers_alone(runs, tmp_path) -> None:
    """`scaletrain ckpt export RUN OUT --pipeline` of the latent recipe's FSDP2 run writes a
    StableDiffusionXLPipeline folder (the trained UNet, the run's frozen VAE, both text encoders
    and byte tokenizers, its DDIM scheduler); `DiffusionPipeline.from_pretrained` in a process
    without scaletrain samples from it (SDXL's zeroed unconditional half, its size
    micro-conditions) and gets scaletrain's own images of the checkpoint."""
    from safetensors.torch import load_file

    from scaletrain.checkpoint.export import checkpoint_objective, resolve_checkpoint
    from scaletrain.eval.samples import generate_samples
    from scaletrain.models import build_model, get_preset

    run_dir, out = runs["run_dir", "fsdp", "online"], tmp_path / "pipe"
    r = run_cmd([sys.executable, "-m", "scaletrain.cli", "ckpt", "export", str(run_dir), str(out), "--pipeline"])
    assert r.returncode == 0 and "exported StableDiffusionXLPipeline" in r.stdout, r.stderr[-2000:]
    assert json.loads((out / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    (tmp_path / "sample.py").write_text(DIFFUSERS_PIPELINE)
    r = run_cmd([sys.executable, str(tmp_path / "sample.py"), str(out), str(tmp_path / "theirs.safetensors")],
                cwd=tmp_path)
    assert r.returncode == 0 and "StableDiffusionXLPipeline" in r.stdout, r.stderr[-3000:]
    theirs = load_file(str(tmp_path / "theirs.safetensors"))["images"]
    preset = get_preset("sdxl-tiny")
    model = build_model(preset, encoder_seed=0)  # configs/latent.yaml: run.seed 0
    model.denoiser.net.load_state_dict(load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors")))
    model.denoiser.eval()
    with torch.no_grad():
        ours = generate_samples(model.denoiser, lambda texts: model.encode_text(texts, "cpu"), model.decode,
                                prompts=["a red circle on the left", "a blue square in the center"], resolution=32,
                                in_channels=preset.in_channels, latent_factor=preset.vae_factor,
                                objective=checkpoint_objective(resolve_checkpoint(run_dir)), num_inference_steps=6,
                                guidance_scale=3.0, seed=0)
    assert theirs.shape == (2, 3, 32, 32) and theirs.std() > 0.01
    torch.testing.assert_close(theirs, (ours / 2 + 0.5).clamp(0, 1), rtol=1e-4, atol=1e-4)

