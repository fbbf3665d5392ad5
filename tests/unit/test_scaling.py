"""The N-scaling part of the sizing model (scaletrain/bench/scaling.py): hierarchical
collectives over two links, the fixed-global-batch plan, overlap, and calibration from a
measured point; and `scaletrain size` with them (flags, one-line errors, the plot)."""

from __future__ import annotations

import pytest

from scaletrain.bench.scaling import (
    Comm, Fabric, MicroTime, calibrate_points, exposed, fit_eta, fit_micro_time, link, plan_step, step_comms,
)
from scaletrain.bench.sizing import SizeInputs, model_facts, size_report

INTRA, INTER = link(100.0, 10.0, "intra"), link(10.0, 30.0, "inter")


def test_collectives_on_one_node_are_the_flat_ring_and_across_nodes_hierarchical() -> None:
    B = 1e9
    fab = Fabric(INTRA, INTER, 8)
    # one node of 8: reduce-scatter + all-gather, 2 x (g-1)/g x B over the intra link
    # (latency per ring hop: 10 us inside a node, 30 us between nodes)
    assert fab.time("all_reduce", B, 8) == pytest.approx(2 * (7 * 10e-6 + B * 7 / 8 / 100e9))
    # 4 nodes x 8: the intra steps on B plus an inter all-reduce of each GPU's B/8 (2 x 3 hops)
    assert fab.time("all_reduce", B, 32) == pytest.approx(2 * (7 * 10e-6 + B * 7 / 8 / 100e9)
                                                          + 6 * 30e-6 + B / 8 * 2 * 3 / 4 / 10e9)
    assert fab.time("all_gather", B, 32) == pytest.approx(7 * 10e-6 + B * 7 / 8 / 100e9
                                                          + 3 * 30e-6 + B / 8 * 3 / 4 / 10e9)
    # one GPU per node: the flat ring over the inter link
    assert Fabric(INTRA, INTER, 1).time("all_reduce", B, 2) == pytest.approx(2 * 30e-6 + B * 1 / 10e9)
    # scopes: HSDP's shard group stays inside a node; its replica all-reduce crosses nodes only
    assert fab.time("all_gather", B, 32, "intra") == pytest.approx(7 * 10e-6 + B * 7 / 8 / 100e9)
    assert fab.time("all_reduce", B, 32, "inter") == pytest.approx(6 * 30e-6 + B * 2 * 3 / 4 / 10e9)
    assert fab.time("all_reduce", B, 8, calls=5) == pytest.approx(2 * (5 * 7 * 10e-6 + B * 7 / 8 / 100e9))


def test_hsdp_and_hpz_move_less_over_the_slow_link() -> None:
    facts = model_facts("unet-sd2")
    fab = Fabric(INTRA, INTER, 8)

    def inter_seconds(engine: str) -> float:
        comms = step_comms(engine, facts, "bf16", 8, 64)
        full = sum(fab.time(c.op, c.nbytes, 64, c.scope, c.calls) for c in comms)
        intra_only = sum(Fabric(INTRA, link(1e9, 0.0, "free"), 8).time(c.op, c.nbytes, 64, c.scope, c.calls)
                         for c in comms)
        return full - intra_only

    # HSDP sends as many bytes across nodes as FSDP (a gradient all-reduce of each shard instead
    # of inter-node gathers and reduce-scatters) but none of its per-micro-batch parameter
    # gathers: those run on rings of 8, not of all GPUs, so where latency dominates (a small
    # model on 512 GPUs) less is exposed.
    assert inter_seconds("hsdp") == pytest.approx(inter_seconds("fsdp"), rel=0.05)
    assert all(c.scope == "intra" for c in step_comms("hsdp", facts, "bf16", 8, 64) if c.kind == "gather")
    tiny = model_facts("unet-tiny")

    def exposed_at(engine: str) -> float:
        return sum(exposed(step_comms(engine, tiny, "bf16", 8, 512), fab, 512, 0.01, 0.8)[:2])

    assert exposed_at("hsdp") < 0.9 * exposed_at("fsdp")
    # hpZ: backward gathers come from the per-node copy
    assert inter_seconds("zero3-hpz") < 0.8 * inter_seconds("zero3")
    with pytest.raises(ValueError, match="unknown to the scaling model"):
        step_comms("megatron", facts, "bf16", 8, 8)


def test_global_batch_stays_fixed_and_the_micro_batch_follows() -> None:
    mt = MicroTime(0.02, 0.01, "test")
    comms: list[Comm] = []  # compute only: what the batch plan alone does
    fab = Fabric(INTRA, INTER, 8)
    plans = {g: plan_step(gpus=g, global_batch=512, max_micro=16, micro_time=mt, comms=comms, fabric=fab, eta=1.0)
             for g in (8, 16, 32, 64, 128)}
    assert [(p.micro, p.accum, p.global_batch) for p in plans.values()] == [
        (16, 4, 512), (16, 2, 512), (16, 1, 512), (8, 1, 512), (4, 1, 512)]
    # a smaller micro-batch pays the fixed cost on fewer images: per-GPU efficiency falls
    assert plans[32].efficiency > 0.99 and plans[128].efficiency < plans[64].efficiency < 0.95
    assert plans[128].efficiency == pytest.approx(mt.efficiency(4) / mt.efficiency(16), rel=1e-3)
    assert plan_step(gpus=1024, global_batch=512, max_micro=16, micro_time=mt, comms=comms, fabric=fab,
                     eta=1.0) is None


def test_overlap_hides_up_to_the_compute_window_never_the_first_and_last_calls() -> None:
    fab = Fabric(INTRA, INTER, 8)
    grad = [Comm("all_reduce", 4e9, 10, "global", "grad")]
    t_comm = fab.time("all_reduce", 4e9, 64, calls=10)
    one_call = fab.time("all_reduce", 4e9 / 10, 64)
    assert exposed(grad, fab, 64, 1.0, 0.0)[1] == pytest.approx(t_comm)  # eta 0: all of it
    big = exposed(grad, fab, 64, 100.0, 1.0)[1]  # a long backward hides all but the last bucket
    assert big == pytest.approx(one_call)
    mid = exposed(grad, fab, 64, 0.3, 0.8)[1]
    assert mid == pytest.approx(max(t_comm - 0.8 * 0.2, one_call))


def test_eta_fitted_back_from_cells_the_model_made() -> None:
    facts = model_facts("unet-tiny")
    slow = link(0.2, 50.0, "slow")  # comm comparable to compute, so eta shows in the step time
    fab = Fabric(slow, slow, 2)
    rows = []
    for solo in (0.01, 0.02, 0.05):
        comms = step_comms("fsdp", facts, "fp32", 2, 2)
        measured = solo + sum(exposed(comms, fab, 2, solo, 0.37)[:2])
        rows.append((measured, solo, comms, fab, 2))
    assert fit_eta(rows) == pytest.approx(0.37, abs=1e-3)
    assert fit_eta([]) is None


def _truth_points(per_image: float, fixed: float, inter_bw: float, sizes: list[int], micro: int = 8):
    """Measured img/s made by the model itself from a known compute and inter-node link (the
    intra-node link at its typical value), with predictors over the fitted parameters."""
    from dataclasses import replace

    facts = model_facts("unet-sd2")
    flops_per_image = 1e12  # per_image = flops / (peak x mfu) with peak 1e15 below

    def ips(gpus: int, mfu: float, fix: float, factors: dict[str, float]) -> float:
        fab = Fabric(INTRA, INTER, 8)
        for which, k in factors.items():
            base = getattr(fab, which)
            fab = replace(fab, **{which: replace(base, busbw={op: v * k for op, v in base.busbw.items()})})
        mt = MicroTime(fix, flops_per_image / (1e15 * mfu), "test")
        return plan_step(gpus=gpus, global_batch=gpus * micro, max_micro=micro, micro_time=mt,
                         comms=step_comms("ddp", facts, "bf16", 8, gpus), fabric=fab, eta=0.5).images_per_second

    mfu = flops_per_image / (1e15 * per_image)
    truth = {"inter": inter_bw / 10.0}
    return [(g, ips(g, mfu, fixed, truth), (lambda m, f, k, g=g: ips(g, m, f, k)), f"{g}:x@256") for g in sizes], mfu


def test_calibration_sets_compute_first_and_charges_only_what_is_left_to_the_link_crossed() -> None:
    """calibrate_points (issue 27): one 8-GPU point on an 8-GPU node sets the MFU and moves no
    link (it used to be charged wholly to NVLink); 1-, 8- and 32-GPU points recover the compute and
    the slow inter-node link they were made with, reproducing each point within 2 %; a point no
    physical link explains is a warning line naming the fitted number."""
    links = {"intra": (100.0, (50.0, 500.0)), "inter": (10.0, (2.0, 50.0))}
    pts, mfu = _truth_points(0.01, 0.0, 3.0, [8])
    cal = calibrate_points(pts, mfu0=0.35, fixed_free=False, links={"intra": links["intra"]})
    assert cal.mfu == pytest.approx(mfu, rel=0.02) and cal.factors["intra"] == pytest.approx(1.0, abs=0.05)
    assert cal.warnings == [] and "compute: MFU 10.0% fitted on --measured 8:x@256" in cal.notes[0]
    pts, mfu = _truth_points(0.01, 0.0, 3.0, [1, 8, 32])
    cal = calibrate_points(pts, mfu0=0.35, fixed_free=False, links=links)
    assert cal.mfu == pytest.approx(mfu, rel=0.02)
    assert cal.factors["inter"] * 10.0 == pytest.approx(3.0, rel=0.1) and cal.factors["intra"] == pytest.approx(1, abs=0.1)
    assert all(abs(pred(cal.mfu, cal.fixed, cal.factors) / ips - 1) <= 0.02 for _, ips, pred, _ in pts)
    assert cal.warnings == []
    # the same points on hardware whose inter-node link cannot be under 5 GB/s: a warning, not a silent fit
    cal = calibrate_points(pts, mfu0=0.35, fixed_free=False, links={**links, "inter": (10.0, (5.0, 50.0))})
    assert any("WARNING: the inter-node link fitted to 3" in w and "outside the physical 5-50 GB/s" in w
               for w in cal.warnings), cal.warnings


def test_calibration_fits_a_fixed_cost_per_micro_batch_from_points_at_several_micro_batches() -> None:
    """Points whose plans ran at different micro-batches (here 2 and 8 images per GPU) pin the fixed
    cost per micro-batch as well as the per-image compute, so small micro-batches at high N are
    priced, not free."""
    a, mfu = _truth_points(0.01, 0.05, 3.0, [1], micro=2)
    b, _ = _truth_points(0.01, 0.05, 3.0, [1], micro=8)
    cal = calibrate_points(a + b, mfu0=0.35, fixed_free=True, links={})
    assert cal.mfu == pytest.approx(mfu, rel=0.02) and cal.fixed == pytest.approx(0.05, rel=0.05)
    assert "fixed cost 50.0 ms per micro-batch fitted" in cal.notes[0]


def test_each_engine_with_points_gets_its_own_compute_and_the_others_their_mean() -> None:
    """Issue 27 item 5: --measured points on two engines (fsdp 8 GPUs at 7,000 img/s, zero3 at
    5,700) are each reproduced within 2 % by an MFU of their own, where one shared MFU reproduces
    neither (the report then warned); an engine with no point (ddp) takes their geometric mean and
    says so; hsdp computes like fsdp and takes fsdp's."""
    stages = [(256, 0, 16, 1024)]
    base = dict(preset="unet-sd2", stages=stages, gpu="H100", gpus_per_node=8, price_per_gpu_hour=None,
                engines=["fsdp", "zero3", "ddp", "hsdp"], nodes=[1], act_gib_per_image=(0.2, 256))
    rows: list[dict] = []
    text = size_report(SizeInputs(**base, measured=[(8, 7000.0, 256, "fsdp"), (8, 5700.0, 256, "zero3")]), rows)
    ips = {r["engine"]: r["images_per_second"] for r in rows}
    assert ips["fsdp"] == pytest.approx(7000, rel=0.02) and ips["zero3"] == pytest.approx(5700, rel=0.02)
    assert "WARNING" not in text
    fitted = next(ln for ln in text.splitlines() if "compute: MFU fitted per engine" in ln)
    import re

    by = {g: float(v) for g, v in re.findall(r"(fsdp|zero3) ([\d.]+)%", fitted)}
    assert set(by) == {"fsdp", "zero3"} and by["fsdp"] > 1.2 * by["zero3"]
    assert "geometric mean" in fitted and "geometric mean of the engines measured" in text  # ddp's source
    assert ips["hsdp"] == pytest.approx(ips["fsdp"], rel=0.03)
    assert min(ips["fsdp"], ips["zero3"]) < ips["ddp"] < max(ips["fsdp"], ips["zero3"]) * 1.05
    # the same two points under one shared MFU (no engine named: both calibrate the first engine)
    # cannot both be reproduced: the old behaviour, a warning
    text = size_report(SizeInputs(**{**base, "engines": ["fsdp"]},
                                  measured=[(8, 7000.0, 256, None), (8, 5700.0, 256, None)]))
    assert "WARNING: --measured 8:7000@256 is reproduced as" in text


def test_micro_time_fit() -> None:
    mt = fit_micro_time([(4, 0.06), (8, 0.1), (16, 0.18)], "bench")
    assert (mt.fixed, mt.per_image) == pytest.approx((0.02, 0.01))
    assert mt.efficiency(4) == pytest.approx(0.04 / 0.06)
    one = fit_micro_time([(8, 0.1)], "bench")
    assert (one.fixed, one.per_image) == (0.0, 0.1 / 8) and "one micro-batch" in one.source


def _bench(ips_1gpu: float) -> dict:
    cells = [{"preset": "unet-sd2", "resolution": 256, "engine": "ddp", "micro_batch": m, "world_size": 1,
              "status": "ok", "baseline_gib": 1.0, "peak_memory_gib": 30.0 + m, "precision": "bf16",
              "step_seconds": {"median": m / ips_1gpu}, "images_per_second": {"median": ips_1gpu}}
             for m in (8, 16)]
    return {"hardware": {"gpus": ["H100"]}, "cells": cells}


def test_size_report_with_measured_points_and_a_plot(tmp_path) -> None:
    stages = [(256, 10_000_000, 16, 1024)]
    base = dict(preset="unet-sd2", stages=stages, gpu="H100", gpus_per_node=8, price_per_gpu_hour=2.0,
                engines=["ddp"], nodes=[1, 4, 16], act_gib_per_image=(0.2, 256))
    text = size_report(SizeInputs(**base, measured=[(1, 400.0, 256, None), (32, 8000.0, 256, None)],
                                  plot=str(tmp_path / "scaling.png")))
    assert "micro x accum" in text and "scaling eff." in text and "global batch 1024" in text
    assert "compute: MFU" in text and "fitted on --measured 1:400@256, 32:8000@256" in text
    assert "1-GPU step" in text and "calibrated: MFU" in text
    assert "inter-node link: calibrated from --measured" in text and "WARNING" not in text
    row4 = next(ln for ln in text.splitlines() if ln.split()[:2] == ["4", "32"])
    assert float(row4.split()[5].replace(",", "")) == pytest.approx(8000, rel=0.02)  # reproduces the point
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match=r"--measured 1:900@256 contradicts the bench file's 400.0 img/s \(ddp, "
                                         r"1 GPU\(s\), 256 px\); drop one of the two"):
        size_report(SizeInputs(**base, bench=_bench(400.0), measured=[(1, 900.0, 256, None)]))
    with pytest.raises(ValueError, match="--measured 8:100@512: no stage at 512 px"):
        size_report(SizeInputs(**base, measured=[(8, 100.0, 512, None)]))


def test_size_command_flags_and_one_line_errors(capsys) -> None:
    from scaletrain.cli import main

    args = ["size", "--preset", "unet-sd2", "--stage", "256:1000000:16:512", "--price", "2", "--nodes", "1", "2",
            "--engines", "fsdp", "hsdp", "--act-gib-per-image", "0.2@256", "--intra-busbw-gbps", "300",
            "--inter-busbw-gbps", "25", "--eta", "0.5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "intra-node link: given: busbw 300.0 GB/s" in out and "inter-node link: given: busbw 25.0 GB/s" in out
    assert "eta = 0.5 given" in out
    for extra, fragment in [(["--measured", "8:fast@256"], "--measured '8:fast@256' is not GPUS:IMG_S@RES[:ENGINE]"),
                            (["--stage", "256:1:2:3:4"], "is not RES[:IMAGES[:MICRO[:GLOBAL]]]"),
                            (["--engines", "zero4"], "engine 'zero4' is unknown"),
                            (["--gpu", "H1000"], "--gpu 'H1000' is unknown; choose from"),
                            # two figures for one configuration, more than 25 % apart
                            (["--measured", "8:2000@256:fsdp", "--measured", "8:3000@256:fsdp"],
                             "--measured 8:2000@256 and 8:3000@256 (fsdp) contradict each other (50% apart); drop one"),
                            # 100,000 img/s on one H100 would be far above its bf16 peak
                            (["--measured", "1:100000@256"], "TFLOP/s per GPU for unet-sd2, above the H100's bf16 "
                                                             "peak of 989; check the figure")]:
        assert main(args + extra) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], lines


def test_size_command_with_a_bench_file_a_given_link_a_measured_point_and_a_plot(tmp_path, capsys) -> None:
    """`scaletrain size` as docs/benchmarks.md types it: two stages, a GPU and its node size, a
    price, a bench results.json, the inter-node bandwidth given, six engines, a measured point
    and --plot. The bench file's 1-GPU cells set ddp's compute, the point (16 GPUs, across
    nodes) the other engines' compute and then the inter-node link, and the plot is written."""
    import json

    from scaletrain.cli import main

    bench, plot = tmp_path / "results.json", tmp_path / "size.png"
    bench.write_text(json.dumps(_bench(400.0)))
    engines = ["ddp", "fsdp", "hsdp", "zero2", "zero3", "zero3-hpz"]
    assert main(["size", "--preset", "unet-sd2", "--stage", "256:200000000:16:1024", "--stage", "512:50000000:4:512",
                 "--gpu", "H100", "--gpus-per-node", "8", "--price", "2.5", "--bench", str(bench),
                 "--busbw-gbps", "40", "--engines", *engines, "--measured", "16:5000@256", "--nodes", "1", "2", "4",
                 "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "H100 x8 per node" in out and "$2.5/GPU-hour" in out
    for res in (256, 512):
        tables = [ln.split()[0] for ln in out.split(f"stage {res} px")[1].split("\n\n")[0].splitlines()
                  if "GiB/GPU" in ln]
        assert tables == engines
    assert "1-GPU step 0.040 s at micro-batch 16 (measured (bench)" in out  # ddp: the bench file's cells
    assert "compute: MFU" in out and "fitted on --measured 16:5000@256" in out
    assert "inter-node link: calibrated from --measured" in out and "given: busbw 40.0 GB/s" in out
    assert f"plot: {plot}" in out and plot.stat().st_size > 10_000


def test_size_for_throughput_alone_needs_no_price_or_image_count(capsys) -> None:
    """`scaletrain size --stage RES` without --price: img/s and scaling efficiency per node
    count, no hours or cost columns, no whole-curriculum block; with an image count but no
    price: hours, no cost."""
    from scaletrain.cli import main

    args = ["size", "--preset", "unet-sd2", "--nodes", "1", "2", "--engines", "fsdp", "--act-gib-per-image", "0.2@256"]
    assert main([*args, "--stage", "256", "--stage", "512::16:512"]) == 0
    out = capsys.readouterr().out
    assert "no --price: throughput and time only" in out and "no image count: throughput only" in out
    header = next(ln for ln in out.splitlines() if "micro x accum" in ln)
    assert header.split()[-2:] == ["scaling", "eff."] and "$" not in out and "whole curriculum" not in out
    rows = [ln.split() for ln in out.splitlines() if ln.split()[:2] in (["1", "8"], ["2", "16"])]
    assert len(rows) == 4 and all(len(r) == 7 for r in rows)  # nodes GPUs micro x accum img/s eff.
    assert main([*args, "--stage", "256:1000000:16:512"]) == 0
    out = capsys.readouterr().out
    assert "hours" in out and "$" not in out and "whole curriculum" in out


def test_committed_two_host_measurement_is_predicted_within_20_percent() -> None:
    """benchmarks/results/cpu_two_hosts.json (benchmarks/two_host_scaling.py, schema 2): 1 -> 2
    ranks on one host and 1 -> 2 hosts over a veth limited by tc. Every prediction was stored
    before its cell started (its timestamps say so) with an eta fitted on another run's bench
    file. Across the two hosts every stored prediction is within the issue's +-20 % of what was
    then measured; on one host (loopback, where gloo's reductions run on the same 2 cores as the
    compute) 3 of 6 were not (worst -31.4 %), as benchmarks/README.md says, and the test holds
    the file to those figures. The model as it is now still makes each prediction from the
    stored inputs; on the limited link the inter-node term is most of the step."""
    import importlib.util
    import json
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("two_host_scaling", repo / "benchmarks" / "two_host_scaling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = json.loads((repo / "benchmarks" / "results" / "cpu_two_hosts.json").read_text())
    assert out["schema"] == "scaletrain.two_host_scaling/2" and not out["git_dirty"]
    assert "cpu_matrix_rounds.json" in out["eta_source"]  # not this run's cells
    assert {r["setup"] for r in out["rows"]} == {"2 ranks, one host", "2 hosts, limited veth"}
    assert len(out["rows"]) >= 6
    for row in out["rows"]:
        # the prediction as stored before the measurement began, against the measurement
        assert row["predicted_at"] < row["measured_started_at"] < row["measured_at"], row
        assert row["error"] == pytest.approx(row["predicted"]["step_seconds"] / row["measured_step_s"] - 1)
        rnd = out["rounds"][row["round"]]
        one_host = row["setup"].startswith("2 ranks")
        if not one_host:
            assert abs(row["error"]) <= 0.20, row
        sweep, g = (rnd["sweep_one_host"], 2) if one_host else (rnd["sweep_two_hosts"], 1)
        # and the model as it is now still makes that prediction from the stored inputs
        pred = mod.predict(row["engine"], out["preset"], out["micro_batch"], row["solo_loaded_step_s"], sweep, g,
                           row["eta"])
        assert pred["step_seconds"] == pytest.approx(row["predicted"]["step_seconds"], rel=1e-6), row
        if not one_host:
            assert pred["exposed_seconds"] > 0.5 * pred["step_seconds"], row
    one = sorted(r["error"] for r in out["rows"] if r["setup"].startswith("2 ranks"))
    assert sum(abs(e) > 0.20 for e in one) == 3 and one[0] == pytest.approx(-0.314, abs=1e-3)
