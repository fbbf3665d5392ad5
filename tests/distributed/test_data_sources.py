"""2 ranks: a run mixing two sources with filters and class balancing, and a per-stage data
override, stopped mid-stage and resumed, equals the uninterrupted run: the same losses and the
same realised per-source and per-class counts (checkpointed trainer state)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import run_cmd
from tests.distributed.test_checkpoint import ENV, _ok, _torchrun
from tests.distributed.util import read_metrics

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from scaletrain.data.synth import write_synthetic_shards

    real, synth = tmp_path_factory.mktemp("real"), tmp_path_factory.mktemp("synthetic")
    write_synthetic_shards(real, num_samples=80, samples_per_shard=20, resolution=32, seed=0,
                           labels={"cat": 0.8, "dog": 0.2})
    write_synthetic_shards(synth, num_samples=32, samples_per_shard=8, resolution=32, seed=1,
                           labels={"cat": 0.5, "dog": 0.5})
    return real, synth


def _sets(sources, run_dir, *extra: str) -> list[str]:
    real, synth = sources
    pairs = [
        f"data.sources=[{{name: real, shards: '{real}', weight: 3, filters: {{min_aesthetic: 4.5}}}}, "
        f"{{name: synthetic, shards: '{synth}', weight: 1}}]",
        "data.filters={max_pwatermark: 0.4}", "data.balance={field: label}",
        "data.split=sample", "data.shuffle_buffer=0", "data.num_workers=1", f"run.dir={run_dir}",
        "log.wandb=disabled", "log.progress=false", "sample.at_end=false", "validate.every_steps=0",
        "validate.at_end=false",
        "train.stages.0.resolution=32", "train.stages.0.steps=3", "train.stages.0.micro_batch=4",
        "train.stages.0.global_batch=8",
        "train.stages.1.resolution=32", "train.stages.1.steps=2", "train.stages.1.micro_batch=2",
        "train.stages.1.global_batch=4",
        # Stage 1: equal weights by name (shards and filters inherited), no class balancing.
        "train.stages.1.data={sources: [{name: real, weight: 1}, {name: synthetic, weight: 1}], balance: null}",
        *extra,
    ]
    return [x for p in pairs for x in ("--set", p)]


def _counts(run_dir) -> list[dict]:
    return [{k: v for k, v in m.items() if k.split("/")[0] in ("source_count", "class_count", "filtered_samples")}
            for m in read_metrics(run_dir)]


def test_mixed_balanced_filtered_run_resumes_mid_stage(sources, tmp_path):
    """Two launches, not three: the resumed run starts from the straight run's step-2 checkpoint
    (mid stage 0), written by the same Trainer.save_checkpoint as a run.stop_at_step=2 exit."""
    straight = tmp_path / "straight"
    _ok(run_cmd(_torchrun(*_sets(sources, straight, "checkpoint.every_steps=2", "checkpoint.keep_last=10")), env=ENV))
    d = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "step-00000002", d / "checkpoints" / "step-00000002")
    second = _ok(run_cmd(_torchrun(*_sets(sources, d)), env=ENV))
    assert "resumed at step 2" in second.stdout + second.stderr

    ref = read_metrics(straight)
    assert [m["step"] for m in read_metrics(d)] == [3, 4, 5]
    assert [m["loss"] for m in read_metrics(d)] == [m["loss"] for m in ref[2:]]
    # The cumulative counts continue from the checkpoint (step 3 includes steps 1-2's samples).
    assert _counts(d) == _counts(straight)[2:]
    # Stage 0: 3 steps x 8 samples, all tagged; sources and classes are both logged.
    end0, end1 = ref[2], ref[4]
    assert end0["source_count/real"] + end0["source_count/synthetic"] == 24
    assert end0["class_count/cat"] + end0["class_count/dog"] == 24
    assert min(end0["class_count/cat"], end0["class_count/dog"]) > 0  # ratios: tests/unit/test_data_sources.py
    # Stage 1 (override): counts restart with the stage, no class fields without balancing.
    assert end1["source_count/real"] + end1["source_count/synthetic"] == 8
    assert not any(k.startswith("class_") for k in end1)
    stages = [json.loads((r / "summary.json").read_text())["stages"] for r in (straight, d)]
    assert [s.get("sources") for s in stages[0]] == [s.get("sources") for s in stages[1]]
    assert stages[0][0]["classes"] == {"cat": end0["class_count/cat"], "dog": end0["class_count/dog"]}
    # Filters ran: the real source drops low aesthetic scores, the synthetic one high watermark ones.
    assert sum(m["filtered_samples"] for m in ref) > 0
