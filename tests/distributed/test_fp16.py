"""engine.precision=fp16 with dynamic loss scaling, 2 ranks on CPU (torch runs fp16 autocast and
FSDP2 fp16 compute here; DeepSpeed's CPU accelerator does not, which is a one-line config error):
FSDP2 (ShardedGradScaler) and DDP (autocast + GradScaler) follow the fp32 curve within fp16's
rounding and each other closely; a loss scale far too large overflows, the engine skips those
steps and halves the scale, the health guard counts none of them, training then proceeds; the
scale is checkpointed and resumes where it was."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ref_sets, run_cmd
from tests.distributed.util import one_error_line, read_metrics
from tests.launch import run_batch, sets, torchrun

pytestmark = pytest.mark.dist

STEPS = 5
# fp16 keeps 11 significant bits (unit roundoff 2^-11 = 4.9e-4). Measured (2026-12-01, these 5
# steps): FSDP2 fp16 vs DDP fp16 max relative loss difference 1.1e-4; against fp32 FSDP2 9.8e-5
# (FSDP2 fp16) and 1.4e-4 (DDP fp16). 1e-3 leaves ~7x room; a skipped or doubled step, or
# gradients left scaled (AdamW hides a constant factor, clipping does not), moves it by > 1e-2.
RTOL_ENGINES = RTOL_FP32 = 1e-3


def _common(synth_shards, steps: int = STEPS) -> list[str]:
    return ["--config", "configs/demo.yaml", *ref_sets(synth_shards, steps=steps)]


@pytest.fixture(scope="module")
def runs(synth_shards, demo_reference, tmp_path_factory):
    """fp16 on FSDP2 and DDP, the overflow run and its resume: one batch launch (tests/launch.py);
    the fp32 curve is the session's demo reference (the same recipe on FSDP2)."""
    tmp = tmp_path_factory.mktemp("fp16")
    # 2^24: the scaled gradients overflow fp16 at first; the scale halves each step until they fit
    overflow = ["engine.kind=fsdp", "engine.precision=fp16", "engine.fp16_initial_scale=16777216",
                "health.enabled=true", "checkpoint.every_steps=12", f"run.dir={tmp / 'overflow'}"]
    recipes = {
        "fsdp-fp16": _common(synth_shards) + sets("engine.kind=fsdp", "engine.precision=fp16"),
        "ddp-fp16": _common(synth_shards) + sets("engine.kind=ddp", "engine.precision=fp16"),
        "overflow": _common(synth_shards, 16) + sets(*overflow, "run.stop_at_step=12"),
        # resume the overflow run from its step-12 checkpoint: the scale continues, not 2^24 again
        "overflow-resumed": _common(synth_shards, 16) + sets(*overflow, "checkpoint.resume=auto"),
    }
    out = {name: r.ok().dir for name, r in run_batch(recipes, tmp).items()}
    out["fsdp-fp32"] = demo_reference.dir
    return out


def test_fp16_follows_fp32_and_engines_agree(runs) -> None:
    fp32 = read_metrics(runs["fsdp-fp32"])
    fsdp, ddp = read_metrics(runs["fsdp-fp16"]), read_metrics(runs["ddp-fp16"])
    assert len(fp32) == len(fsdp) == len(ddp) == STEPS
    for a, b, c in zip(fp32, fsdp, ddp):
        assert not b["skipped_step"] and not c["skipped_step"]
        assert b["loss"] == pytest.approx(c["loss"], rel=RTOL_ENGINES), (a["step"], b["loss"], c["loss"])
        assert b["loss"] == pytest.approx(a["loss"], rel=RTOL_FP32), (a["step"], a["loss"], b["loss"])
        assert b["loss_scale"] == c["loss_scale"] == 2.0**16  # no overflow at the default scale
        assert "loss_scale" not in a


def test_overflow_is_skipped_by_the_scaler_not_the_guard_and_the_scale_resumes(runs) -> None:
    records = read_metrics(runs["overflow"])
    assert [r["step"] for r in records] == list(range(1, 17))
    skipped = [r["step"] for r in records if r["skipped_step"]]
    assert skipped and skipped == list(range(1, len(skipped) + 1))  # the first steps, then none
    scales = [r["loss_scale"] for r in records]
    assert 0 < len(skipped) < 10
    assert scales[: len(skipped)] == [2.0 ** (24 - k) for k in range(1, len(skipped) + 1)]  # halved each time
    assert all(s == scales[len(skipped)] for s in scales[len(skipped):])  # then steady (growth after 2000)
    assert records[-1]["loss"] != records[len(skipped)]["loss"]  # training proceeded
    assert scales[12] == scales[11]  # step 13, the first after the resume, kept the checkpointed scale
    summary = json.loads((runs["overflow"] / "summary.json").read_text())
    assert summary["bad_steps"] == 0 and summary["rollbacks"] == 0


def test_fp16_under_deepspeed_without_a_gpu_is_a_config_error(synth_shards, tmp_path) -> None:
    proc = run_cmd(torchrun(*_common(synth_shards), *sets(f"run.dir={tmp_path / 'ds'}",
                                                          "engine.kind=deepspeed", "engine.precision=fp16")))
    assert proc.returncode != 0
    one_error_line(proc.stderr, "engine.precision=fp16 under DeepSpeed needs CUDA GPUs")
