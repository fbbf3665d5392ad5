"""Health guard, 2 ranks on CPU: a NaN on one rank is skipped on both; repeated NaNs roll back
to the last checkpoint with a lower LR and the run completes; endless NaNs stop the run.

The NaN comes from the test hook ``health.inject_nan_steps`` on rank 1 only, so every check
below also shows that both ranks took the same decision (a rank that stepped alone would
hang the next collective or diverge)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cmd, shard_pattern
from tests.distributed.util import free_port, read_metrics

pytestmark = pytest.mark.dist

ENV = {"OMP_NUM_THREADS": "1"}
LR = 1e-3


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *args]


def _train(synth_shards, run_dir: Path, engine: str, *extra: str):
    sets = [
        f"data.shards={shard_pattern(synth_shards)}", "data.split=sample", "data.shuffle_buffer=0",
        "data.num_workers=0", f"run.dir={run_dir}", "log.wandb=disabled", "log.progress=false",
        "sample.at_end=false", "validate.every_steps=0", "validate.at_end=false", f"optim.lr={LR}", "optim.warmup_steps=0", "optim.schedule=constant",
        "train.stages=[{name: s0, resolution: 32, steps: 8, micro_batch: 2, global_batch: 4}]",
        f"engine.kind={engine}", *extra,
    ]
    cmd = _torchrun("launchers/pretrain.py", "--config", "configs/demo.yaml", *[x for s in sets for x in ("--set", s)])
    return run_cmd(cmd, env=ENV, timeout=600)


def _quarantine(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "quarantine.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kinds", [["fsdp", "ddp"], ["zero2", "zero3"]], ids=["torch", "deepspeed"])
def test_skip_leaves_weights_and_optimizer_bit_identical(kinds):
    """Engine level (tests/distributed/_health_worker.py): NaN on rank 1 -> non-finite norm on
    both ranks; skip_step keeps weights, master weights and AdamW moments bit-identical; the
    next step equals a run that never had the skipped steps."""
    r = run_cmd(_torchrun("tests/distributed/_health_worker.py", *kinds), env=ENV, timeout=600)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    for kind in kinds:
        assert sum(line.startswith(f"OK {kind} ") for line in r.stdout.splitlines()) == 2, r.stdout


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])  # deepspeed: ds_configs/zero3.json
def test_nan_on_one_rank_is_skipped_then_repeated_nans_roll_back(synth_shards, tmp_path, engine):
    """NaN at step 3 (rank 1): skipped. NaN at steps 5 and 6: 2 bad within the window -> back
    to the step-4 checkpoint, LR halved, data moved past the bad stretch, run completes."""
    d = tmp_path / "run"
    r = _train(synth_shards, d, engine, "checkpoint.every_steps=4", "health.inject_nan_steps=[3,5,6]",
               "health.window=2", "health.max_bad_in_window=2")
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    records = read_metrics(d, steps_only=False)
    steps = [m for m in records if "loss" in m]
    # attempts 1-6 are steps 1-6; the rollback returns to step 4; attempts 7-10 are steps 5-8
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]
    assert [m["skipped_step"] for m in steps] == [False, False, True, False, True, True, False, False, False, False]
    rollbacks = [m for m in records if m.get("rollback")]
    assert rollbacks == [{"step": 6, "rollback": True, "to_step": 4, "lr_scale": 0.5,
                          "skipped_micro_batches": 2, "stage": 0}]
    assert [m["lr"] for m in steps] == pytest.approx([LR] * 6 + [LR / 2] * 4)
    assert all(math.isfinite(m["loss"]) for m in steps if not m["skipped_step"])
    assert all(not math.isfinite(m["grad_norm"]) for m in steps if m["skipped_step"])
    summary = json.loads((d / "summary.json").read_text())
    assert (summary["steps"], summary["bad_steps"], summary["rollbacks"], summary["lr_scale"]) == (8, 3, 1, 0.5)
    assert math.isfinite(summary["final_loss"])
    # quarantine: one line per rank per bad step; rank 1 had the NaN, rank 0 a finite loss
    q = _quarantine(d)
    assert [(x["step"], x["rank"]) for x in q] == [(3, 0), (3, 1), (5, 0), (5, 1), (6, 0), (6, 1)]
    assert all(len(x["keys"]) == 2 and "not finite" in x["reason"] for x in q)
    assert all(math.isnan(x["loss"]) == (x["rank"] == 1) for x in q)
    assert len({k for x in q for k in x["keys"]}) == 12  # each bad step's own, distinct samples
    # the final checkpoint carries the LR scale and the data skip, so a relaunch keeps both
    state = json.loads((d / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())
    assert state["health"]["lr_scale"] == 0.5 and state["health"]["data_skip"] == {"0": 2}


def test_endless_nans_stop_after_max_rollbacks(synth_shards, tmp_path):
    d = tmp_path / "run"
    r = _train(synth_shards, d, "fsdp", "checkpoint.every_steps=2", f"health.inject_nan_steps={list(range(3, 30))}",
               "health.window=2", "health.max_bad_in_window=2", "health.max_rollbacks=1")
    assert r.returncode != 0 and "exitcode  : 3" in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("scaletrain: health guard stopped")]
    assert len(lines) == 1, r.stderr[-3000:]
    assert "health.max_rollbacks=1" in lines[0] and "quarantine.jsonl" in lines[0] and "optim.lr" in lines[0]
    records = read_metrics(d, steps_only=False)
    assert [m["to_step"] for m in records if m.get("rollback")] == [2]  # one rollback, then the stop
    assert [m["step"] for m in records if "loss" in m] == [1, 2, 3, 4, 3, 4]
    assert not (d / "summary.json").exists()
