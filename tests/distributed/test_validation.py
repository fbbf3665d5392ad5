"""Distributed validation (2 ranks on CPU): FID and sample grids under FSDP2 and DeepSpeed ZeRO-3,
the same FID at 1 and 2 ranks, and training that is bit-identical with and without validation.

Small on purpose: 3 steps at 32 px; 5 reference images (rank 0 holds 2, rank 1 holds 3, so
rank 0 pads its generation) in sampling batches of 2 (two calls per rank, the last short).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import run_cmd, shard_pattern
from tests.distributed.util import free_port, read_metrics

pytestmark = pytest.mark.dist

LABEL = "fid_offline-gridorient"
ENV = {"OMP_NUM_THREADS": "1"}


def _sets(synth_shards, run_dir, *extra: str, accum: int = 1) -> list[str]:
    pairs = [
        f"data.shards={shard_pattern(synth_shards)}", "data.split=sample", "data.shuffle_buffer=0",
        "data.num_workers=1", f"run.dir={run_dir}", "log.wandb=disabled", "log.progress=false",
        "sample.at_end=false", "checkpoint.resume=never",
        f"train.stages=[{{name: s0, resolution: 32, steps: 3, micro_batch: 4, grad_accum: {accum}, global_batch: 8}}]",
        *extra,
    ]
    return [x for p in pairs for x in ("--set", p)]


VALIDATE = ("validate.every_steps=2", "validate.at_end=true", "validate.num_images=5", "validate.batch_size=2",
            "validate.steps=3")


def _torchrun(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "launchers/pretrain.py", "--config", "configs/demo.yaml", *args]


@pytest.fixture(scope="module")
def runs(synth_shards, tmp_path_factory):
    cmds = {
        "fsdp": _torchrun(_sets(synth_shards, "{d}", "engine.kind=fsdp", *VALIDATE)),
        "zero3": _torchrun(_sets(synth_shards, "{d}", "engine.kind=deepspeed",
                                 "engine.deepspeed_config=ds_configs/zero3.json", *VALIDATE)),
        "fsdp-off": _torchrun(_sets(synth_shards, "{d}", "engine.kind=fsdp")),
        "single": [sys.executable, "launchers/pretrain.py", "--config", "configs/demo.yaml",
                   *_sets(synth_shards, "{d}", "engine.kind=fsdp", *VALIDATE, accum=2)],
    }
    out = {}
    for name, cmd in cmds.items():
        d = tmp_path_factory.mktemp(name)
        r = run_cmd([c.replace("{d}", str(d)) for c in cmd], env=ENV)
        assert r.returncode == 0, f"{name}: rc={r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
        out[name] = (d, r.stdout + r.stderr)
    return out


def _validations(run_dir) -> list[dict]:
    return [m for m in read_metrics(run_dir, steps_only=False) if m.get("validation")]


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_validation_logs_labelled_fid_and_grids(runs, engine):
    d, out = runs[engine]
    records = _validations(d)
    # every 2 steps -> step 2; at_end -> step 3 (the last step was not a multiple of 2)
    assert [r["step"] for r in records] == [2, 3]
    for r in records:
        assert "fid" not in r and math.isfinite(r[LABEL]) and r[LABEL] > 0
        assert r["val_images"] == 5 and r["val_resolution"] == 32 and r["val_seconds"] > 0
        assert f"{LABEL}=" in out  # the console line names the extractor too
        grid = Image.open(d / "validation" / f"step-{r['step']:06d}.png")
        # 4 demo prompts: 2 x 2 tiles of 32 px shown at 128 px (nearest), plus caption bands
        assert grid.width == 2 * 128 and grid.height > 2 * 128
    assert records[0][LABEL] != records[1][LABEL]  # the weights changed between the two


def test_fid_is_the_same_at_one_and_two_ranks(runs):
    """Each image's caption and seed depend on its global index only and torchmetrics sums the
    statistics over ranks, so 1 process (same global batch) gives the 2-rank FID; a rank
    computing FID on its own half, or a seed depending on the rank, would not."""
    two = [r[LABEL] for r in _validations(runs["fsdp"][0])]
    one = [r[LABEL] for r in _validations(runs["single"][0])]
    assert one == pytest.approx(two, rel=1e-3)


def test_validation_leaves_training_bit_identical(runs):
    """Losses, grad norms and each rank's saved RNG state after the run are identical with
    and without validation (every 2 steps plus at the end)."""
    on, off = runs["fsdp"][0], runs["fsdp-off"][0]
    keys = ("step", "loss", "grad_norm")
    assert [[m[k] for k in keys] for m in read_metrics(on)] == [[m[k] for k in keys] for m in read_metrics(off)]
    for rank in (0, 1):
        a = load_file(str(on / "checkpoints" / "step-00000003" / f"rng-rank{rank}.safetensors"))
        b = load_file(str(off / "checkpoints" / "step-00000003" / f"rng-rank{rank}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
