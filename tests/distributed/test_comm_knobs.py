"""2 ranks on CPU (gloo): every communication knob changes what the engine does, gradient
accumulation skips the non-final reductions, and sampled steps log the comm split.

The knob checks live in ``_comm_worker.py`` (one torchrun launch per group: start-up is the
cost); each prints "OK <check> rank=<r>" when its assertions held on that rank.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cmd, shard_pattern
from tests.distributed.util import read_metrics
from tests.launch import torchrun

pytestmark = pytest.mark.dist

WORKER = Path(__file__).with_name("_comm_worker.py")

TORCH_CHECKS = [
    "ddp-buckets",  # bucket_cap_mb: 1 vs 3 gradient buckets; gradient_as_bucket_view: grads alias them
    "ddp-static-graph",  # a parameter ready twice per backward: refused without, trained with
    "ddp-fp16-hook",  # compressed all-reduce: error 0 < e <= 2^-10 vs the fp32 mean; fp32 exact
    "ddp-powersgd",  # exact before powersgd_start_step, low-rank (error > 1e-2) from it on
    "accum-ddp",  # no all-reduce on the non-final micro-step; grads still differ across ranks
    "fsdp-hsdp",  # 1-D, 2x1 and 1x2 meshes: shape, placements, storage; same weights after 2 steps
    "fsdp-prefetch",  # explicit forward/backward prefetch lists; the next unit's gather issued early
    "accum-fsdp",  # no reduce-scatter on the non-final micro-step
]
DS_CHECKS = [
    "deepspeed-knobs",  # every knob in the engine's zero config; persistence threshold keeps params whole
    "accum-zero1",  # ZeRO-1: no reduction on the non-final micro-step
    "accum-zero2-reduces-every-micro-step",  # ZeRO-2/3 reduce every micro-step (DeepSpeed design)
    "accum-zero3-reduces-every-micro-step",
]


@pytest.fixture(scope="module")
def output() -> str:
    """Both groups' checks in one launch of the worker."""
    env = {"PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = run_cmd(torchrun(str(WORKER), "torch", "deepspeed", script=None), env=env, timeout=600)
    assert proc.returncode == 0, f"workers exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout



def _ranks(check: str, output: str) -> list[str]:
    # Ranks share one stdout, so lines can interleave: search, don't split on newlines.
    return sorted(re.findall(rf"OK {re.escape(check)} rank=(\d+)", output))


@pytest.mark.parametrize("check", TORCH_CHECKS)
def test_ddp_and_fsdp_knobs(check: str, output: str) -> None:
    assert _ranks(check, output) == ["0", "1"], output


@pytest.mark.parametrize("check", DS_CHECKS)
def test_deepspeed_knobs(check: str, output: str) -> None:
    assert _ranks(check, output) == ["0", "1"], output


def test_sampled_steps_log_the_comm_split(synth_shards, tmp_path) -> None:
    """engine.comm_profile_every=2: steps 2 and 4 carry compute / exposed / in-flight seconds that
    add up to the step time; the others carry none (no profiler, no overhead)."""
    sets = [f"data.shards={shard_pattern(synth_shards)}", f"run.dir={tmp_path / 'run'}", "engine.kind=ddp",
            "log.wandb=disabled", "log.progress=false", "sample.at_end=false", "validate.every_steps=0", "validate.at_end=false", "checkpoint.at_stage_end=false",
            "engine.comm_profile_every=2", "data.num_workers=0",
            "train.stages=[{name: a, resolution: 32, steps: 4, micro_batch: 4, grad_accum: 2}]"]
    cmd = torchrun("--config", "configs/demo.yaml", *[x for s in sets for x in ("--set", s)])
    proc = run_cmd(cmd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        sampled = r["step"] % 2 == 0
        assert ("comm_exposed_seconds" in r) == sampled, r
        if sampled:
            parts = r["compute_seconds"] + r["comm_exposed_seconds"] + r["data_wait_seconds"]
            assert parts == pytest.approx(r["step_seconds"], rel=1e-9)
            # DDP all-reduces gradients and the trainer all-reduces the loss: comm is never zero.
            assert 0 < r["comm_exposed_seconds"] <= r["comm_in_flight_seconds"] + 1e-9
            assert r["compute_seconds"] > 0
