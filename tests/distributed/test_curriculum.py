"""A 2-rank curriculum with aspect-ratio buckets (FSDP2): stage 0 in steps with accumulation,
stage 1 given in images with its own noise offset. Stopped in the middle of stage 1 and
resumed, it reproduces the uninterrupted run's losses exactly; resumed by 1 process instead,
the images stage is re-planned from the images left. (That the stage's noise offset
reaches the noise is tests/unit/test_curriculum.py; here the stage-start line shows the
trainer's objective carries it.)"""

from __future__ import annotations

import shutil

import pytest

from scaletrain.data.synth import write_synthetic_shards
from tests.conftest import run_cmd
from tests.distributed.util import read_metrics
from tests.launch import python, run_batch, sets

pytestmark = pytest.mark.dist

ENV = {"OMP_NUM_THREADS": "1"}
# stage 0: 3 steps of 2 x 2 x 2 = 8; stage 1: images 20 at global batch 2 x 1 x 2 = 4 -> 5 steps
STAGES = ("train.stages=[{name: a, resolution: 32, steps: 3, micro_batch: 2, grad_accum: 2}, "
          "{name: b, resolution: 48, images: 20, micro_batch: 2, noise_offset: 0.3}]")


@pytest.fixture(scope="module")
def wide_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("wide")
    write_synthetic_shards(out, num_samples=64, samples_per_shard=8, resolution=32, seed=0,
                           aspect_ratios=[1.0, 2.0, 0.5, 1.5, 0.667])
    return out


def _recipe(shards, run_dir, *extra: str) -> list[str]:
    return ["--config", "configs/demo.yaml", *sets(
        f"data.shards={shards}", "data.split=sample", "data.shuffle_buffer=0", "data.num_workers=1",
        "data.buckets.enabled=true", f"run.dir={run_dir}", "log.wandb=disabled", "log.progress=false",
        "sample.at_end=false", "validate.every_steps=0", "validate.at_end=false", STAGES, *extra)]


def _log(run) -> str:
    return run.ok().stdout + run.stderr


def _losses(run_dir) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir)]


def test_bucketed_images_stage_resumes_mid_stage(wide_shards, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # the straight run, and the same stopped 2 steps into stage 1 then resumed by the same
    # recipe: one batch launch (tests/launch.py)
    runs = run_batch({"straight": _recipe(wide_shards, straight),
                      "first": _recipe(wide_shards, resumed, "run.stop_at_step=5"),
                      "second": _recipe(wide_shards, resumed)}, tmp_path)
    log = _log(runs["straight"])
    assert "stage 1 'b': 48px, 5 steps (images=20 / global batch 4, rounded up: 20 images" in log
    assert "noise offset 0.3, buckets (WxH) 34x66" in log
    records = read_metrics(straight)
    assert [m["step"] for m in records] == list(range(1, 9)) and [m["stage"] for m in records] == [0] * 3 + [1] * 5
    # every batch is one bucket; the sizes change between steps and between micro-batches of a step
    sizes = [m["bucket_sizes"] for m in records]
    assert len({s for step in sizes for s in step}) >= 4 and any(len(set(step)) > 1 for step in sizes[:3])
    assert all(m["images_seen"] == 8 * min(i + 1, 3) + 4 * max(i - 2, 0) for i, m in enumerate(records))

    # stopped 2 steps into stage 1, then resumed by the same command: the same losses, step for step
    first, second = _log(runs["first"]), _log(runs["second"])
    assert "stopping at step 5" in first
    assert "resumed at step 5 (stage 1, step 2 of it)" in second and "stored on rank 0, 8 steps" in second
    assert _losses(resumed) == _losses(straight)

    # the step-5 checkpoint resumed by 1 process (DCP reshards; stage 1's global batch is now 2):
    # the images stage is re-planned from the 12 images left, 6 more steps, 11 in the run
    one = tmp_path / "one"
    shutil.copytree(resumed / "checkpoints" / "step-00000005", one / "checkpoints" / "step-00000005")
    r = run_cmd(python("launchers/pretrain.py", *_recipe(wide_shards, one)), env=ENV, timeout=300)
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    log = r.stdout + r.stderr
    assert "stored on rank 0, 11 steps" in log
    assert "stage 1 'b': 48px, 8 steps (images=20: 2 steps done with 8 images, 6 more at global batch 2" in log
    records = read_metrics(one)
    assert [m["step"] for m in records] == list(range(6, 12)) and records[-1]["images_seen"] == 24 + 20
