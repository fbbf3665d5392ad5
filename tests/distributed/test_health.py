"""Health guard, 2 ranks on CPU: a NaN on one rank is skipped on both; repeated NaNs roll back
to the last checkpoint with a lower LR and the run completes; endless NaNs stop the run.

The NaN comes from the test hook ``health.inject_nan_steps`` on rank 1 only, so every check
below also shows that both ranks took the same decision (a rank that stepped alone would
hang the next collective or diverge)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import run_cmd, shard_pattern
from tests.distributed.util import read_metrics
from tests.launch import run_batch, sets, torchrun

pytestmark = pytest.mark.dist

ENV = {"OMP_NUM_THREADS": "1"}
LR = 1e-3


def _recipe(synth_shards, engine: str, *extra: str) -> list[str]:
    return ["--config", "configs/demo.yaml", *sets(
        f"data.shards={shard_pattern(synth_shards)}", "data.split=sample", "data.shuffle_buffer=0",
        "data.num_workers=0", "log.wandb=disabled", "log.progress=false", "sample.at_end=false",
        "validate.every_steps=0", "validate.at_end=false", f"optim.lr={LR}", "optim.warmup_steps=0",
        "optim.schedule=constant", "train.stages=[{name: s0, resolution: 32, steps: 8, micro_batch: 2, global_batch: 4}]",
        f"engine.kind={engine}", *extra)]


NAN = ("checkpoint.every_steps=4", "health.inject_nan_steps=[3,6,7]", "health.window=2", "health.max_bad_in_window=2")
SPIKE = ("health.inject_spike_steps=[5,7]", "health.min_steps=2", "health.window=8", "health.max_bad_in_window=3")


@pytest.fixture(scope="module")
def guarded(synth_shards, tmp_path_factory):
    """The NaN and spike runs on both engines in one batch launch (tests/launch.py)."""
    recipes = {f"{what}-{engine}": _recipe(synth_shards, engine, *extra)
               for what, extra in (("nan", NAN), ("spike", SPIKE)) for engine in ("fsdp", "deepspeed")}
    return {name: r.ok().dir for name, r in run_batch(recipes, tmp_path_factory.mktemp("health")).items()}


def _quarantine(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "quarantine.jsonl").read_text().splitlines()]


def test_skip_leaves_weights_and_optimizer_bit_identical():
    """Engine level (tests/distributed/_health_worker.py, every engine in one launch): NaN on
    rank 1 -> non-finite norm on both ranks; skip_step keeps weights, master weights and AdamW
    moments bit-identical; the next step equals a run that never had the skipped steps."""
    kinds = ["fsdp", "ddp", "zero2", "zero3"]
    r = run_cmd(torchrun("tests/distributed/_health_worker.py", *kinds, script=None), env=ENV, timeout=600)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    for kind in kinds:
        assert sum(line.startswith(f"OK {kind} ") for line in r.stdout.splitlines()) == 2, r.stdout


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])  # deepspeed: ds_configs/zero3.json
def test_nan_on_one_rank_is_skipped_then_repeated_nans_roll_back(guarded, engine):
    """NaN at step 3 (rank 1): skipped. Step 5 trains; NaN at steps 6 and 7: 2 bad within the
    window -> back to the step-4 checkpoint, LR halved, data moved past the bad stretch, run
    completes. The rollback really reloads: the weights before it (step 5 applied) differ from
    the checkpoint's, and after it equal them bit for bit."""
    d = guarded[f"nan-{engine}"]
    records = read_metrics(d, steps_only=False)
    steps = [m for m in records if "loss" in m]
    # attempts 1-7 are steps 1-7; the rollback returns to step 4; attempts 8-11 are steps 5-8
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8]
    assert [m["skipped_step"] for m in steps] == [False, False, True, False, False, True, True] + [False] * 4
    rollbacks = [m for m in records if m.get("rollback")]
    prints = [{k: m.pop(k) for k in ("weights_fingerprint_before", "weights_fingerprint_after")} for m in rollbacks]
    assert rollbacks == [{"step": 7, "rollback": True, "to_step": 4, "lr_scale": 0.5,
                          "skipped_micro_batches": 3, "stage": 0}]
    saved = {m["step"]: m["checkpoint_weights_fingerprint"] for m in records if "checkpoint_weights_fingerprint" in m}
    assert prints[0]["weights_fingerprint_after"] == saved[4]
    assert prints[0]["weights_fingerprint_before"] != saved[4]
    assert [m["lr"] for m in steps] == pytest.approx([LR] * 7 + [LR / 2] * 4)
    assert all(math.isfinite(m["loss"]) for m in steps if not m["skipped_step"])
    assert all(not math.isfinite(m["grad_norm"]) for m in steps if m["skipped_step"])
    summary = json.loads((d / "summary.json").read_text())
    assert (summary["steps"], summary["bad_steps"], summary["rollbacks"], summary["lr_scale"]) == (8, 3, 1, 0.5)
    assert math.isfinite(summary["final_loss"])
    # quarantine: one line per rank per bad step; rank 1 had the NaN, rank 0 a finite loss
    q = _quarantine(d)
    assert [(x["step"], x["rank"]) for x in q] == [(3, 0), (3, 1), (6, 0), (6, 1), (7, 0), (7, 1)]
    assert all(len(x["keys"]) == 2 and "not finite" in x["reason"] for x in q)
    assert all(math.isnan(x["loss"]) == (x["rank"] == 1) for x in q)
    assert len({k for x in q for k in x["keys"]}) == 12  # each bad step's own, distinct samples
    # the final checkpoint carries the LR scale and the data skip, so a relaunch keeps both
    state = json.loads((d / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())
    assert state["health"]["lr_scale"] == 0.5 and state["health"]["data_skip"] == {"0": 3}


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_loss_spike_on_one_rank_is_skipped_on_every_rank(guarded, engine):
    """End to end: rank 1's loss x 1000 at steps 5 and 7 (finite, so only the spike check can
    catch it). The all-reduced loss exceeds 3 x its EMA: both steps are skipped on both ranks
    (quarantine has each rank's line), no rollback (2 bad < max_bad_in_window 3), the run ends."""
    d = guarded[f"spike-{engine}"]
    steps = read_metrics(d)
    assert [m["step"] for m in steps] == list(range(1, 9))
    assert [m["step"] for m in steps if m["skipped_step"]] == [5, 7]
    assert all(math.isfinite(m["loss"]) for m in steps)
    assert steps[4]["loss"] > 100 * steps[3]["loss"]  # the spike reached the guard (rank mean)
    q = _quarantine(d)
    assert [(x["step"], x["rank"]) for x in q] == [(5, 0), (5, 1), (7, 0), (7, 1)]
    assert all("loss=" in x["reason"] and "x its EMA" in x["reason"] for x in q)
    summary = json.loads((d / "summary.json").read_text())
    assert (summary["bad_steps"], summary["rollbacks"]) == (2, 0)


def test_endless_nans_stop_after_max_rollbacks(synth_shards, tmp_path):
    d = tmp_path / "run"
    r = run_cmd(torchrun(*_recipe(synth_shards, "fsdp", f"run.dir={d}", "checkpoint.every_steps=2",
                                  f"health.inject_nan_steps={list(range(3, 30))}", "health.window=2",
                                  "health.max_bad_in_window=2", "health.max_rollbacks=1")), env=ENV, timeout=600)
    assert r.returncode != 0 and "exitcode  : 3" in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("scaletrain: health guard stopped")]
    assert len(lines) == 1, r.stderr[-3000:]
    assert "health.max_rollbacks=1" in lines[0] and "quarantine.jsonl" in lines[0] and "optim.lr" in lines[0]
    records = read_metrics(d, steps_only=False)
    assert [m["to_step"] for m in records if m.get("rollback")] == [2]  # one rollback, then the stop
    assert [m["step"] for m in records if "loss" in m] == [1, 2, 3, 4, 3, 4]
    assert not (d / "summary.json").exists()
