"""Clean shutdown under repetition, and uneven / corrupt shards that must never hang a rank."""

from __future__ import annotations

import json

import pytest

from scaletrain.data.synth import make_synthetic_sample, write_tar_shard
from tests.conftest import run_cmd
from tests.launch import run_batch, sets, torchrun

pytestmark = pytest.mark.dist

# FINDINGS: ~1 in 3 runs aborted before the fix. 3 clean runs here (30 % to miss it if it were
# back); the suite's ~100 other 2-rank launches each assert exit 0 as well, which together
# would not miss it (8 repeats here cost a minute of the suite's budget for little more).
REPEATS = 3


def _write_uneven_shards(root, sizes, corrupt_key=None):
    index, paths = 0, []
    for i, n in enumerate(sizes):
        samples = []
        for _ in range(n):
            s = make_synthetic_sample(index, seed=0, resolution=32)
            if s["__key__"] == corrupt_key:
                s["jpg"] = b"\xff\xd8 this is not a jpeg"
            samples.append(s)
            index += 1
        p = root / f"u-{i:06d}.tar"
        write_tar_shard(p, samples)
        paths.append(str(p))
    return paths


def test_two_rank_runs_exit_cleanly_every_time(synth_shards, tmp_path):
    from tests.conftest import shard_pattern

    for i in range(REPEATS):
        run_dir = tmp_path / f"r{i}"
        r = run_cmd(torchrun("--config", "configs/demo.yaml", *sets(
            f"data.shards={shard_pattern(synth_shards)}", f"run.dir={run_dir}", "log.wandb=disabled",
            "log.progress=false", "sample.at_end=false", "validate.every_steps=0", "validate.at_end=false", "data.num_workers=0",
            "train.stages=[{name: s, resolution: 32, steps: 1, micro_batch: 2}]")), timeout=300)
        assert r.returncode == 0, f"run {i}: rc={r.returncode}\n{r.stderr[-3000:]}"
        assert "terminate called" not in r.stderr and "SIGABRT" not in r.stderr, r.stderr[-3000:]


UNEVEN = {"auto": (5, 1, 7), "shard": (5, 1, 7, 2, 3)}
STEPS = 12  # 12 steps x 8 images = 96 samples, several epochs of 13-18 samples


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Both uneven layouts in one batch launch (tests/launch.py)."""
    root = tmp_path_factory.mktemp("uneven")
    first_key = make_synthetic_sample(0, seed=0, resolution=32)["__key__"]
    recipes = {}
    for split, sizes in UNEVEN.items():
        (root / split).mkdir()
        shards = _write_uneven_shards(root / split, sizes, corrupt_key=first_key)
        recipes[split] = ["--config", "configs/demo.yaml", *sets(
            f"data.shards={json.dumps(shards)}", f"data.split={split}", "data.num_workers=2", "log.wandb=disabled",
            "log.progress=false", "sample.at_end=false", "validate.every_steps=0", "validate.at_end=false",
            f"train.stages=[{{name: s, resolution: 32, steps: {STEPS}, micro_batch: 4}}]")]
    return {name: r.ok().dir for name, r in run_batch(recipes, root / "runs").items()}


@pytest.mark.parametrize("split", sorted(UNEVEN))
def test_uneven_shards_never_hang_or_starve(uneven, split):
    """3 shards for 4 (rank, worker) slots, and 5 uneven shards split per shard: every rank
    keeps producing full batches for many epochs; a corrupt image is skipped and counted."""
    steps = STEPS
    summary = json.loads((uneven[split] / "summary.json").read_text())
    assert summary["steps"] == steps and summary["images_seen"] == steps * 8
    assert summary["skipped_samples"] >= 1  # the corrupt sample, once per epoch of its slot
