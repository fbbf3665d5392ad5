"""Video end to end, as a user runs it: `scaletrain data synth --video`, then configs/video.yaml
(wan-tiny, flow matching, frames as a curriculum axis: images as 1-frame clips -> 5-frame clips
mixed with images -> 9-frame clips) on 2 ranks under torchrun (FSDP2); a resume from a
checkpoint in the middle of the joint image-video stage gives the uninterrupted run's losses
exactly; the end-of-run samples are an animated GIF; `ckpt export` writes a transformer that
diffusers alone loads. One straight run and one resumed run are shared by every test."""

from __future__ import annotations

import shutil
import sys

import pytest

from tests.conftest import BIN, run_cmd
from tests.distributed.util import free_port, read_metrics

pytestmark = pytest.mark.e2e

ENV = {"OMP_NUM_THREADS": "1"}
STEPS = (3, 3, 2)  # images, clips-5 (joint), clips-9


def _ok(r):
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    return r


def _launch(shards, run_dir, *extra: str) -> list[str]:
    clips, images = f"{shards}/clips/shard-{{000000..000003}}.tar", f"{shards}/images/shard-{{000000..000003}}.tar"
    sets = [f"data.shards={images}", f"train.stages.1.data.sources.0.shards={clips}",
            f"train.stages.1.data.sources.1.shards={images}", f"train.stages.2.data.shards={clips}",
            f"run.dir={run_dir}", "log.wandb=disabled", "log.progress=false", "data.shuffle_buffer=8",
            "sample.steps=2", f"validate.shards={clips}", "validate.num_images=4", "validate.steps=2",
            *(f"train.stages.{i}.steps={n}" for i, n in enumerate(STEPS)), *extra]
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
            "launchers/pretrain.py", "--config", "configs/video.yaml", *[x for p in sets for x in ("--set", p)]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    for kind, extra in (("clips", ["--video", "--frames", "12", "--fps", "8"]), ("images", [])):
        _ok(run_cmd([str(BIN / "scaletrain"), "data", "synth", "--out", str(root / kind), "--num-samples", "32",
                     "--per-shard", "8", "--resolution", "32", *extra]))
    straight = root / "straight"
    out = _ok(run_cmd(_launch(root, straight, "checkpoint.every_steps=1", "checkpoint.keep_last=10"), env=ENV))
    # resume from step 5: the middle of the joint image-video stage (stage 1 is steps 4-6)
    resumed = root / "resumed"
    src = straight / "checkpoints" / "step-00000005"
    shutil.copytree(src, resumed / "checkpoints" / src.name)
    again = _ok(run_cmd(_launch(root, resumed), env=ENV))
    return {"root": root, "straight": straight, "resumed": resumed, "out": out.stdout + out.stderr,
            "again": again.stdout + again.stderr}


def test_frames_curriculum_trains_images_then_clips(runs):
    out = runs["out"]
    assert "wan-tiny on fsdp x2" in out
    for i, name in enumerate(("'images'", "'clips-5'", "'clips-9'")):
        assert f"stage {i} {name}: 32px" in out, out[-3000:]
    records = read_metrics(runs["straight"])
    assert [m["step"] for m in records] == list(range(1, 9))
    assert all(m["loss"] == m["loss"] and m["loss"] > 0 for m in records)  # finite
    assert "FSDP2-wrapped module" not in out  # no view-output warning from the 1-frame path


def test_resume_mid_joint_stage_is_exact(runs):
    assert "resumed at step 5" in runs["again"]
    assert "data: stage 1 continues at its checkpointed stream position" in runs["again"]
    straight = [m["loss"] for m in read_metrics(runs["straight"])]
    resumed = [m["loss"] for m in read_metrics(runs["resumed"])]
    assert resumed == straight[5:]


def test_samples_are_an_animated_gif_of_the_last_stage_frames(runs):
    from PIL import Image

    with Image.open(runs["straight"] / "samples.gif") as gif:
        assert gif.is_animated and gif.n_frames == 9
    assert not (runs["straight"] / "samples.png").exists()


def test_validation_logs_per_frame_fid_and_temporal_consistency_with_an_animated_grid(runs):
    """validate.at_end on 4 reference clips of 9 frames (the last stage's): FID over every frame,
    the generated clips' consecutive-frame feature similarity and the reference clips' for scale;
    the grid is a GIF."""
    from PIL import Image

    (rec,) = [m for m in read_metrics(runs["straight"], steps_only=False) if m.get("validation")]
    assert rec["step"] == 8 and rec["val_images"] == 4 and rec["fid_offline-gridorient"] > 0
    assert 0 < rec["validation/temporal_consistency"] <= 1
    assert 0.5 < rec["validation/temporal_consistency_ref"] <= 1  # real clips: a shape moving smoothly
    assert "validation at step 8: fid_offline-gridorient=" in runs["out"]
    assert "4 9-frame clips, per-frame" in runs["out"] and "temporal_consistency=" in runs["out"]
    with Image.open(runs["straight"] / "validation" / "step-000008.gif") as gif:
        assert gif.n_frames == 9


EXPORT_CHECK = """
import sys, torch
from diffusers import WanTransformer3DModel
net = WanTransformer3DModel.from_pretrained(sys.argv[1]).eval()
assert not any(m.startswith("scaletrain") for m in sys.modules)
x = torch.randn(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    out = net(x, timestep=torch.tensor([500.0]), encoder_hidden_states=torch.zeros(1, 32, 32), return_dict=False)[0]
assert out.shape == x.shape and torch.isfinite(out).all()
print("ok", net.config.num_layers, net.config.patch_size)
"""


def test_export_loads_in_diffusers_alone(runs, tmp_path):
    out = tmp_path / "wan"
    _ok(run_cmd([sys.executable, "-m", "scaletrain.cli", "ckpt", "export", str(runs["straight"]), str(out)]))
    (tmp_path / "check.py").write_text(EXPORT_CHECK)
    r = _ok(run_cmd([sys.executable, str(tmp_path / "check.py"), str(out)], cwd=tmp_path))
    assert "ok 3 [1, 2, 2]" in r.stdout
