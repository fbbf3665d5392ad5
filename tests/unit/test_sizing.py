"""The sizing model: analytic model-state bytes, the collective fit, the micro-batch search,
the `size` report, and calibration against the measured matrix committed for this machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scaletrain.bench.runner import merge_rounds, round_medians, search_micro_batch
from scaletrain.bench.sizing import (
    SizeInputs, calibrate, comm_from_sweep, exposed_comm_seconds, model_facts, size_report, state_bytes,
)

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "cpu_matrix.json"


def test_state_bytes_per_engine():
    f = model_facts("unet-sd15")
    P = f.params
    assert state_bytes("ddp", f, 8) == 20 * P  # replicated: independent of the world size
    assert state_bytes("fsdp", f, 1) == 16 * P
    assert state_bytes("zero3", f, 64) < state_bytes("zero2", f, 64) < state_bytes("zero1", f, 64) < state_bytes("ddp", f, 64)
    # Offload only helps where host and device memory differ.
    assert state_bytes("zero3-offload", f, 8, host_is_device=False) < state_bytes("zero3", f, 8)
    assert state_bytes("zero3-offload", f, 8, host_is_device=True) == state_bytes("zero3", f, 8)


def test_comm_fit_recovers_latency_and_busbw():
    lat, bw, world = 400e-6, 1.3e9, 2
    rows = {op: [{"size_bytes": s, "time_us": (lat + s * (2 * (world - 1) / world if op == "all_reduce" else
                                                       (world - 1) / world) / bw) * 1e6} for s in (2**12, 2**16, 2**20, 2**24)]
            for op in ("all_reduce", "all_gather", "reduce_scatter")}
    comm = comm_from_sweep(rows, world)
    for op in rows:
        assert comm.latency[op] == pytest.approx(lat, rel=1e-6) and comm.busbw[op] == pytest.approx(bw, rel=1e-6)
    f = model_facts("unet-tiny")
    assert exposed_comm_seconds("ddp", f, 1, comm) == 0.0
    # More ranks: more bytes per rank through the ring (factor 2(N-1)/N grows), never less.
    assert exposed_comm_seconds("ddp", f, 8, comm) > exposed_comm_seconds("ddp", f, 2, comm) > 0


@pytest.mark.parametrize("threshold,start,limit,expected", [(37, 1, 64, 37), (64, 1, 64, 64), (100, 1, 64, 64),
                                                            (1, 1, 64, 1), (0, 1, 64, None), (12, 2, 64, 12)])
def test_micro_batch_search(threshold, start, limit, expected):
    probes = []

    def fits(mb: int) -> bool:
        probes.append(mb)
        return mb <= threshold

    assert search_micro_batch(fits, start, limit) == expected
    assert len(probes) <= 2 * limit.bit_length() + 1  # doubling then bisection, not a linear scan


def _rank(steps, peak, status="ok"):
    snap = {"peak_gib": peak}
    return {"status": status, "steps": [{"step": x} for x in steps], "memory": snap, "after_build": snap,
            "baseline": {"peak_gib": 0.3}}


def test_rounds_pool_repetitions_per_rank_and_keep_the_highest_memory():
    r1 = [_rank([1.0, 1.2], 0.5), _rank([1.1, 1.3], 0.6)]
    r2 = [_rank([2.0, 2.2], 0.7), _rank([2.1, 2.3], 0.4)]
    rank0, rank1 = merge_rounds([r1, r2])
    assert [s["step"] for s in rank0["steps"]] == [1.0, 1.2, 2.0, 2.2]  # round order kept
    assert [s["step"] for s in rank1["steps"]] == [1.1, 1.3, 2.1, 2.3]
    assert rank0["memory"]["peak_gib"] == 0.7 and rank1["memory"]["peak_gib"] == 0.6
    assert r1[0]["steps"][0]["step"] == 1.0 and len(r1[0]["steps"]) == 2  # inputs untouched
    assert round_medians([1.0, 1.2, 2.0, 2.2], 2) == pytest.approx([1.1, 2.1])
    # A round that did not finish is the cell's result (an OOM in any round is an OOM).
    oom = [_rank([], 0.9, status="oom"), _rank([], 0.9, status="ok")]
    assert merge_rounds([r1, oom]) is oom


def test_size_report_names_measured_and_assumed_inputs():
    text = size_report(SizeInputs(preset="unet-sd15", stages=[(256, 10_000_000, 64), (512, 1_000_000, 16)], gpu="H100",
                                  gpus_per_node=8, price_per_gpu_hour=2.0, engines=["ddp", "zero3"], nodes=[1, 4],
                                  act_gib_per_image=(0.11, 256)))
    assert "activations: given, 0.11 GiB per image at 256 px" in text
    assert "assumed MFU 35%" in text and "DEFAULT, assumed" in text and "whole curriculum" in text
    # Under DDP (replicated states) the micro-batch shrinks to fit an L4 and accumulation keeps
    # the global batch; ZeRO-3 shards the states and keeps micro-batch 16. With 3 GiB of
    # activations per image DDP does not fit even one.
    def rows(act: float) -> dict[str, str]:
        text = size_report(SizeInputs(preset="unet-sd15", stages=[(1024, 1_000_000, 16)], gpu="L4", gpus_per_node=8,
                                      price_per_gpu_hour=1.0, engines=["ddp", "zero3"], nodes=[1],
                                      act_gib_per_image=(act, 1024)))
        lines = text.splitlines()
        return {ln.split()[0]: lines[i + 2] for i, ln in enumerate(lines) if "GiB/GPU" in ln}

    assert rows(0.2)["ddp"].split()[2:5] == ["8", "x", "2"] and rows(0.2)["zero3"].split()[2:5] == ["16", "x", "1"]
    assert "no fit" in rows(3.0)["ddp"] and "no fit" not in rows(3.0)["zero3"]


def _results() -> dict:
    return json.loads(RESULTS.read_text())


def test_two_rank_prediction_starts_from_the_loaded_one_rank_step():
    """calibrate() predicts N ranks from the 1-rank step taken with N copies at once when the
    matrix has it (host load is in the basis), else from the idle 1-rank step."""
    sweep = {op: [{"size_bytes": b, "time_us": 100 + b / 1e3} for b in (2**12, 2**16, 2**20, 2**24)]
             for op in ("all_reduce", "all_gather", "reduce_scatter")}

    def cell(world, step, loaded=None):
        c = {"preset": "unet-tiny", "resolution": 32, "engine": "ddp", "micro_batch": 8, "world_size": world,
             "status": "ok", "baseline_gib": 0.3, "peak_memory_gib": 0.6, "step_seconds": {"median": step},
             "images_per_second": {"median": 8 * world / step}}
        if loaded is not None:
            c["loaded"] = {"status": "ok", "copies": 2, "step_seconds": {"median": loaded}, "phases_seconds": {}}
        return c

    results = {"hardware": {"gpus": []}, "comm": sweep, "cells": [cell(1, 0.4, loaded=0.5), cell(2, 0.52)]}
    comm = exposed_comm_seconds("ddp", model_facts("unet-tiny"), 2, comm_from_sweep(sweep, 2))
    (row,) = [r for r in calibrate(results) if "ips_error" in r]
    assert row["ips_predicted"] == pytest.approx(16 / (0.5 + comm))
    del results["cells"][0]["loaded"]
    (row,) = [r for r in calibrate(results) if "ips_error" in r]
    assert row["ips_predicted"] == pytest.approx(16 / (0.4 + comm))


@pytest.mark.parametrize("name", ["cpu_matrix.json", "cpu_matrix_idle.json", "cpu_matrix_loaded.json",
                                  "cpu_matrix_rounds.json"])
def test_memory_calibration_against_measured_matrix(name):
    """Issue 6's memory bar on the configurations benchmarked here (every committed CPU run):
    within +-10 % of the measured peak for every cell. The fit uses only the 1-rank cells, so
    the 2-rank cells are out of sample."""
    rows = calibrate(json.loads((RESULTS.parent / name).read_text()))
    assert len(rows) >= 6 and any(r["world_size"] == 2 for r in rows)
    bad = [r for r in rows if abs(r["memory_error"]) > 0.10]
    assert not bad, bad


ROUNDS = RESULTS.parent / "cpu_matrix_rounds.json"


def _two_rank_rows():
    return [r for r in calibrate(json.loads(ROUNDS.read_text())) if "ips_error" in r]


@pytest.mark.parametrize("row", _two_rank_rows(), ids=lambda r: f"{r['preset']}-{r['resolution']}-{r['engine']}")
def test_throughput_calibration_against_measured_matrix(row):
    """Issue 6's throughput bar on the committed CPU run: 2-rank img/s predicted from the 1-rank
    cell measured with 2 copies at once (host load in the basis) + the measured collective
    sweep, within +-20 % of the measured 2-rank img/s. The run took 3 rounds, each measuring a
    group's 1-rank, loaded and 2-rank cells back to back (``--rounds``), so basis and
    prediction target come from the same minutes of this drifting VM."""
    assert abs(row["ips_error"]) <= 0.20, row


def test_committed_throughput_matrix_has_every_two_rank_cell():
    results = json.loads(ROUNDS.read_text())
    assert results["spec"]["rounds"] == 3 and all(c["rounds"] == 3 for c in results["cells"])
    assert {(r["resolution"], r["engine"]) for r in _two_rank_rows()} == \
        {(res, e) for res in (32, 64) for e in ("ddp", "fsdp", "zero2")}


def test_activation_fit_uses_the_measured_split_and_the_encoders_a_cell_really_held():
    """Cells with a measured memory split give the activation slope from the tracker's activation
    bytes (not the residual, which here also holds 300 MiB of allocator slack: the engine constant);
    a precomputed cell holds no encoders, a bf16 cell holds them in 2 bytes per parameter."""
    from scaletrain.bench.sizing import fit_activations, frozen_bytes, predict_memory_gib

    facts = model_facts("unet-tiny")
    a, slack, base = 3000.0, 300 * 2**20, 0.5
    cells = []
    for mb, precomputed in ((2, False), (4, True), (8, False)):
        x = mb * 32 ** 2
        act = a * x
        cell = {"status": "ok", "preset": "unet-tiny", "engine": "fsdp", "world_size": 1, "resolution": 32,
                "micro_batch": mb, "precision": "bf16", "baseline_gib": base, "precomputed": precomputed,
                "params_frozen": facts.frozen, "memory_split_mib": {"activations": act / 2**20}}
        frozen = 0 if precomputed else 2 * facts.frozen
        cell["peak_memory_gib"] = base + (state_bytes("fsdp", facts, 1, "bf16") + frozen + act + slack) / 2**30
        cells.append(cell)
    fit = fit_activations(cells)
    assert fit.per_elem["unet-tiny"] == pytest.approx(a) and "unet-tiny" in fit.from_split
    assert fit.engine_bytes["fsdp"] == pytest.approx(slack)
    for c in cells:  # the fit reproduces every cell, encoders counted as each held them
        assert predict_memory_gib(c, fit, base) == pytest.approx(c["peak_memory_gib"])
    assert frozen_bytes({"precomputed": True}, facts) == 0
    assert frozen_bytes({"precision": "fp32"}, facts) == 4 * facts.frozen
    # model.frozen_encoders=shard: 1/world of them per rank
    assert frozen_bytes({"precision": "bf16", "frozen_encoders": "shard", "world_size": 8}, facts) == 2 * facts.frozen / 8


def test_size_by_frames_says_where_context_parallelism_is_needed_and_prices_it():
    """Wan 2.1 14B on H100s (its 5.7B UMT5 sharded over the GPUs): images (1-frame clips) fit
    without it; 81-frame 768 px clips
    (48,384 tokens) do not fit one per GPU, so each node count gets the smallest K that fits
    (more GPUs shard the states further, leaving room for a smaller K); the step carries the
    Ulysses all-to-alls."""
    from scaletrain.bench.sizing import context_degrees, ulysses_seconds
    from scaletrain.bench.sizing import comm_given

    text = size_report(SizeInputs(preset="wan-2.1-14b", stages=[(256, 10_000_000, 8, 1024, 1),
                                                               (768, 1_000_000, 1, 256, 81)],
                                  gpu="H100", gpus_per_node=8, price_per_gpu_hour=2.5, engines=["fsdp"],
                                  nodes=[1, 4], act_gib_per_image=(0.6, 256), frozen_encoders="shard"))
    lines = text.splitlines()
    stage2 = lines.index(next(ln for ln in lines if ln.startswith("stage 768 px x 81 frames (48,384 tokens)")))
    assert "context parallelism" not in "\n".join(lines[:stage2])
    assert "context parallelism needed: one clip's activations are 113.4 GiB per GPU" in lines[stage2 + 1]
    rows = [ln for ln in lines[stage2:] if ln.strip().startswith(("1 ", "4 "))]
    assert rows[0].split()[:2] == ["1", "8"] and rows[0].endswith("K=4")
    assert rows[1].split()[:2] == ["4", "32"] and rows[1].endswith("K=2")
    assert "all-to-all per sample" in lines[stage2 + 2] and "whole curriculum" in text
    # the degrees a preset can use, and the all-to-all term's scaling
    assert context_degrees("wan-2.1-14b", 8) == [1, 2, 4, 8] and context_degrees("unet-sd2", 8) == [1]
    link = comm_given(360.0, 1.5, 0.0)
    t2, t4 = (ulysses_seconds("wan-2.1-14b", 768, 81, k, link, "bf16") for k in (2, 4))
    assert 0 < t4 < t2  # each rank moves N/K tokens, (K-1)/K of them off the rank


def test_video_stage_arguments(tmp_path):
    import argparse

    from scaletrain.bench.commands import _parse_stages
    from scaletrain.config import ConfigError

    def parse(preset, *stages):
        return _parse_stages(argparse.Namespace(preset=preset, recipe=None, stage=list(stages), gpus_per_node=8))

    assert parse("wan-2.1-1.3b", "480:2000000:1:81:512", "256:1000:8") == [(480, 2000000, 1, 512, 81),
                                                                           (256, 1000, 8, 0, 1)]
    assert parse("unet-sd2", "256:1000:64:2048") == [(256, 1000, 64, 2048, 0)]
    with pytest.raises(ConfigError, match=r"is not RES\[:CLIPS\[:MICRO\[:FRAMES\[:GLOBAL\]\]\]\]; write e.g. "):
        parse("wan-2.1-1.3b", "480:x")
    # a recipe's stages carry their frames (images on a video preset: 1)
    from tests.conftest import REPO

    recipe = _parse_stages(argparse.Namespace(preset="wan-tiny", recipe=str(REPO / "configs" / "video.yaml"),
                                              stage=[], gpus_per_node=8))
    assert [s[4] for s in recipe] == [1, 5, 9]


def test_activation_fit_counts_frames():
    """Two cells of one video preset at 1 and 5 frames: one bytes-per-element slope explains both."""
    from scaletrain.bench.sizing import act_elems, fit_activations

    cells = []
    for frames, mib in ((1, 11.5), (5, 56.9)):
        cells.append({"status": "ok", "preset": "wan-tiny", "engine": "fsdp", "world_size": 1, "micro_batch": 2,
                      "resolution": 32, "frames": frames, "precision": "fp32", "peak_memory_gib": 0.5,
                      "baseline_gib": 0.37, "memory_split_mib": {"activations": mib}, "params_frozen": 0})
    fit = fit_activations(cells)
    assert act_elems("wan-tiny", 32, 5) == 5 * act_elems("wan-tiny", 32, 1)
    for frames, mib in ((1, 11.5), (5, 56.9)):
        got = fit.bytes("wan-tiny", 2, 32, None, frames) / 2**20
        assert got == pytest.approx(mib, rel=0.05)
    assert fit.bytes("wan-tiny", 2, 32, None, 5, context=2) == pytest.approx(fit.bytes("wan-tiny", 2, 32, None, 5) / 2)
