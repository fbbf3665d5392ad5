"""2 ranks: a run mixing two sources with filters and class balancing, and a per-stage data
override, stopped mid-stage and resumed, equals the uninterrupted run: the same losses and the
same realised per-source and per-class counts (checkpointed trainer state)."""

from __future__ import annotations

import json

import pytest

from tests.distributed.util import read_metrics
from tests.launch import run_batch, sets

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
    return sets(*pairs)


def _counts(run_dir) -> list[dict]:
    return [{k: v for k, v in m.items() if k.split("/")[0] in ("source_count", "class_count", "filtered_samples")}
            for m in read_metrics(run_dir)]


def test_mixed_balanced_filtered_run_resumes_mid_stage(sources, tmp_path):
    """One batch launch (tests/launch.py): the straight run, and the same stopped mid stage 0
    (step 2) and resumed by the same recipe."""
    straight, d = tmp_path / "straight", tmp_path / "resumed"
    demo = ["--config", "configs/demo.yaml"]
    runs = run_batch({"straight": demo + _sets(sources, straight), "first": demo + _sets(sources, d, "run.stop_at_step=2"),
                      "second": demo + _sets(sources, d)}, tmp_path)
    assert "stopping at step 2" in runs["first"].ok().stdout + runs["first"].stderr
    assert "resumed at step 2" in runs["second"].ok().stdout + runs["second"].stderr
    runs["straight"].ok()

    ref = read_metrics(straight)
    # steps 1-2 from the stopped launch, 3-5 from the resumed one, in the same metrics file
    assert [m["step"] for m in read_metrics(d)] == [1, 2, 3, 4, 5]
    assert [m["loss"] for m in read_metrics(d)] == [m["loss"] for m in ref]
    # The cumulative counts continue from the checkpoint (step 3 includes steps 1-2's samples).
    assert _counts(d) == _counts(straight)
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
