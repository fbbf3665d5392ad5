"""The matrix runner on a tiny matrix: results schema, repetitions, OOM recorded as a result,
and the `scaletrain bench` command writing JSON + Markdown + PNG."""

from __future__ import annotations

import json
import sys

import pytest

from scaletrain.bench.runner import MatrixSpec, run_matrix
from tests.conftest import run_cmd, shard_pattern

pytestmark = pytest.mark.dist


def test_one_rank_cell_is_also_timed_with_every_device_busy_in_rounds(synth_shards, tmp_path):
    """With world sizes 1 and 2, each 1-rank cell runs again as 2 independent copies at once:
    per repetition the slower copy's step, the basis the 2-rank prediction and the exposed
    comm are taken from. With 2 rounds, the 1-rank, loaded and 2-rank runs each happen twice
    and their repetitions are pooled."""
    spec = MatrixSpec(presets=["unet-tiny"], resolutions=[16], engines=["ddp"], micro_batches=[2],
                      world_sizes=[1, 2], warmup=1, reps=2, num_workers=0, comm_sweep=False, rounds=2,
                      shards=shard_pattern(synth_shards))
    res = run_matrix(spec, tmp_path, log=lambda s: None)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["schema"] == "scaletrain.bench/1" and on_disk["config_hash"] == spec.config_hash()
    for key in ("hardware", "versions", "conditions", "spec", "cells"):
        assert key in on_disk
    one, two = res["cells"]
    assert (one["world_size"], two["world_size"]) == (1, 2) and one["status"] == two["status"] == "ok"
    # each cell: repetitions after warm-up, phases, memory, MFU (the 2-rank DDP cell)
    cell = two
    assert cell["step_seconds"]["min"] <= cell["step_seconds"]["median"] <= cell["step_seconds"]["max"]
    assert set(cell["phases_seconds"]) == {"data", "encode", "forward", "backward", "optimizer"}
    assert sum(cell["phases_seconds"].values()) <= cell["step_seconds"]["max"] * 1.05
    assert cell["params_local"] == cell["params_total"]  # DDP replicates
    assert cell["peak_memory_gib"] > cell["baseline_gib"] > 0
    assert 0 < cell["mfu"] and cell["peak_source"].startswith("measured")
    assert cell["images_per_second"]["median"] == pytest.approx(4 / cell["step_seconds"]["median"])
    # measured memory split (torch's tracker, one extra step): the replicated fp32 weights and
    # AdamW's two moments are what the model's size says; activations are there; parts sum to total
    split = cell["memory_split_mib"]
    weights = cell["params_total"] * 4 / 2**20
    assert split["params"] == pytest.approx(weights, rel=0.05) and split["optimizer"] == pytest.approx(2 * weights, rel=0.05)
    assert split["activations"] > 0
    parts = sum(split[k] for k in ("params", "grads", "optimizer", "activations", "comm_buffers", "other"))
    assert parts == pytest.approx(split["total"], rel=0.02)
    md_all = (tmp_path / "results.md").read_text()
    assert "| unet-tiny | 16 | ddp | 2 | 2 | ok |" in md_all
    assert "| unet-tiny | 16 | ddp | 2 | 2 | " + f"{split['params']:.1f} |" in md_all
    loaded = one["loaded"]
    assert loaded["status"] == "ok" and loaded["copies"] == 2
    for timed in (one, two, loaded):  # 2 rounds x 2 repetitions, each round's median kept
        assert timed["step_seconds"]["n"] == 4 and len(timed["step_seconds_all"]) == 4
        assert len(timed["round_step_medians"]) == 2
        assert min(timed["round_step_medians"]) >= timed["step_seconds"]["min"]
    assert one["rounds"] == two["rounds"] == 2
    assert set(loaded["phases_seconds"]) == {"data", "encode", "forward", "backward", "optimizer"}
    assert "loaded" not in two
    assert two["exposed_comm_seconds"] == pytest.approx(two["step_seconds"]["median"] - loaded["step_seconds"]["median"])
    assert one["exposed_comm_seconds"] == 0.0
    md = (tmp_path / "results.md").read_text()
    assert "copies running at once" in md and "Every cell ran in 2 rounds of 2 repetitions" in md
    assert "| unet-tiny | 16 | ddp | 2 | 2 | " + " / ".join(f"{x:.3f}" for x in two["round_step_medians"]) + " | - |" in md


def test_out_of_memory_is_a_result_not_a_crash(synth_shards, tmp_path):
    # 0.05 GiB is below the runtime's own RSS: every rank trips the guard right after the build.
    out = tmp_path / "bench"
    r = run_cmd([sys.executable, "-m", "scaletrain.cli", "bench", "--presets", "unet-tiny", "--resolutions", "16",
                 "--engines", "fsdp", "--micro-batches", "2", "--world-sizes", "2", "--warmup", "1", "--reps", "1",
                 "--num-workers", "0", "--max-memory-gib", "0.05", "--no-comm-sweep",
                 "--shards", shard_pattern(synth_shards), "--out", str(out)], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (cell,) = json.loads((out / "results.json").read_text())["cells"]
    assert cell["status"] == "oom" and "max_memory_gib" in cell["error"]
    assert "| unet-tiny | 16 | fsdp | 2 | 2 | oom |" in (out / "results.md").read_text()
    # No ok cell, so nothing to plot; the plots exist (empty axes) rather than crashing.
    assert (out / "throughput.png").is_file() and (out / "memory.png").is_file()


def test_frames_axis_measures_clips(tmp_path):
    """`scaletrain bench --frames 1 5` on a video preset: one cell per frame count on synthetic
    clips written into --out, labelled 32x1f / 32x5f; a 5-frame clip holds about 5x the
    activations of a 1-frame one, and its FLOPs (hence MFU) count the frames."""
    from tests.conftest import BIN, run_cmd

    r = run_cmd([str(BIN / "scaletrain"), "bench", "--presets", "wan-tiny", "--resolutions", "32", "--frames", "1", "5",
                 "--engines", "fsdp", "--world-sizes", "1", "--micro-batches", "2", "--warmup", "1", "--reps", "1",
                 "--no-comm-sweep", "--no-loaded", "--num-workers", "0", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert [(c["frames"], c["status"]) for c in cells] == [(1, "ok"), (5, "ok")]
    one, five = (c["memory_split_mib"]["activations"] for c in cells)
    assert 4 < five / one < 6
    assert "| wan-tiny | 32x5f | fsdp | 1 | 2 | ok |" in (tmp_path / "results.md").read_text()
    from scaletrain.models.flops import train_flops_per_image

    assert cells[1]["tflops_per_device"] == pytest.approx(
        train_flops_per_image("wan-tiny", 32, 5) * 2 / cells[1]["step_seconds"]["median"] / 1e12)
