"""`scaletrain preflight`: the bandwidth math and detectors on synthetic data, then real 2-rank runs
under torchrun and the deepspeed launcher (gloo on CPU) checked against the same definitions."""

from __future__ import annotations

import json

import pytest

from scaletrain.comm.preflight import (
    bus_bandwidth,
    flag_slow,
    parse_size,
    recommend_bucket,
    ring_rounds,
    slow_ranks,
    sweep_sizes,
)
from scaletrain.config import ConfigError
from tests.conftest import BIN, run_cmd
from tests.distributed.util import free_port

KiB, MiB = 1 << 10, 1 << 20


# ------------------------------------------------------------------ math on synthetic curves

def test_busbw_factors_follow_nccl_tests():
    # nccl-tests PERFORMANCE.md: all-reduce 2(n-1)/n, all-gather and reduce-scatter (n-1)/n.
    assert bus_bandwidth("all_reduce", 10.0, 8) == pytest.approx(17.5)
    assert bus_bandwidth("all_gather", 10.0, 8) == pytest.approx(8.75)
    assert bus_bandwidth("reduce_scatter", 10.0, 4) == pytest.approx(7.5)
    assert bus_bandwidth("all_reduce", 10.0, 2) == pytest.approx(10.0)
    assert bus_bandwidth("all_reduce", 10.0, 1) == 0.0  # nothing crosses a link


def _alpha_beta_curve(sizes, alpha, beta):
    """busbw of t = alpha + S/beta: reaches 90 % of beta at S = 9 alpha beta."""
    return [s / (alpha + s / beta) for s in sizes]


def test_recommendation_on_alpha_beta_curve():
    sizes = sweep_sizes(1 * KiB, 1024 * MiB)
    alpha, beta = 20e-6, 20e9  # 20 us latency, 20 GB/s links: 90 % at 3.6 MB
    rec = recommend_bucket(sizes, _alpha_beta_curve(sizes, alpha, beta))
    assert rec["bucket_bytes"] == 4 * MiB  # first power of two >= 9 * alpha * beta = 3.6e6
    assert rec["plateau_reached"] is True
    assert rec["plateau_busbw_gbps"] == pytest.approx(20.0, rel=1e-3)


def test_recommendation_says_when_the_curve_is_still_rising():
    sizes = sweep_sizes(1 * KiB, 4 * MiB)  # the same link, swept only to 4 MiB
    rec = recommend_bucket(sizes, _alpha_beta_curve(sizes, 20e-6, 20e9))
    assert rec["plateau_reached"] is False  # 4 MiB is the last size: a lower bound only


def test_recommendation_on_a_curve_that_peaks_then_falls():
    # Host-memory collectives often peak while buffers fit in cache, then fall: the plateau is
    # the peak, reached, even though the last doubling gained again.
    sizes = sweep_sizes(1 * KiB, 64 * MiB)
    gbps = [0.001, 0.002, 0.004, 0.008, 0.016, 0.03, 0.06, 0.12, 0.24, 0.40, 0.58, 0.60, 0.30, 0.25, 0.26, 0.24, 0.28]
    rec = recommend_bucket(sizes, [g * 1e9 for g in gbps])
    # median-of-3 peak: 0.58 at 1 MiB and 2 MiB; 512 KiB smooths to 0.40 < 0.9 x 0.58
    assert rec["bucket_bytes"] == 1 * MiB and rec["plateau_reached"] is True
    assert rec["plateau_busbw_gbps"] == pytest.approx(0.58)


def test_recommendation_ignores_a_single_spike():
    sizes = sweep_sizes(1 * KiB, 256 * MiB)
    curve = _alpha_beta_curve(sizes, 20e-6, 20e9)
    spiked = list(curve)
    spiked[3] = 40e9  # one lucky 8 KiB point at twice the link speed
    assert recommend_bucket(sizes, spiked)["bucket_bytes"] == recommend_bucket(sizes, curve)["bucket_bytes"]


def test_flag_slow_leave_one_out_and_classes():
    # Two directions of one link: the plain median (their mean) would hide a 3x outlier at factor 2.
    assert flag_slow({"a": 1.0, "b": 3.0}, 2.0) == {"b"}
    assert flag_slow({"a": 1.0, "b": 1.5}, 2.0) == set()
    # 8 ranks, 2 nodes: inter-node links are 10x slower by nature and must not be flagged as
    # such; one inter-node link 3x slower than its peers is.
    times = {i: 1.0 for i in range(6)} | {"x1": 10.0, "x2": 10.0, "x3": 30.0}
    classes = {k: ("inter" if str(k).startswith("x") else "intra") for k in times}
    assert flag_slow(times, 2.0, classes) == {"x3"}


def _ring_links(world, slow_sender=None):
    links = []
    for a, b in sorted({tuple(sorted((r, (r + 1) % world))) for r in range(world)}):
        for s, d in ((a, b), (b, a)):
            links.append({"src": s, "dst": d, "time_us": 300.0 if s == slow_sender else 100.0})
    slow = flag_slow({(x["src"], x["dst"]): x["time_us"] for x in links}, 2.0)
    for x in links:
        x["slow"] = (x["src"], x["dst"]) in slow
    return links


def test_slow_rank_named_only_with_two_peers():
    assert slow_ranks(_ring_links(4, slow_sender=2)) == [{"rank": 2, "side": "send", "peers": [1, 3]}]
    assert slow_ranks(_ring_links(4)) == []
    # Two ranks: 1 -> 0 slow could be 1 sending or 0 receiving; only the link is reported.
    links = _ring_links(2, slow_sender=1)
    assert [(x["src"], x["dst"]) for x in links if x["slow"]] == [(1, 0)]
    assert slow_ranks(links) == []


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 8])
def test_ring_rounds_cover_each_pair_once_without_conflicts(world):
    rounds = ring_rounds(world)
    pairs = [p for rnd in rounds for p in rnd]
    expected = {tuple(sorted((r, (r + 1) % world))) for r in range(world)} if world > 1 else set()
    assert sorted(pairs) == sorted(expected)
    for rnd in rounds:
        ranks = [r for p in rnd for r in p]
        assert len(ranks) == len(set(ranks))
    assert len(rounds) <= 3  # a ring is 2- or 3-edge-colourable


def test_parse_size_and_errors():
    assert parse_size("4MiB", "--max-size") == 4 * MiB
    assert parse_size("64m", "--max-size") == 64 * MiB
    assert parse_size("1048576", "--max-size") == MiB
    with pytest.raises(ConfigError, match=r"--max-size='4XB' is not a size; use e.g. 4MiB"):
        parse_size("4XB", "--max-size")
    assert sweep_sizes(KiB, 5 * KiB) == [KiB, 2 * KiB, 4 * KiB, 5 * KiB]


# ------------------------------------------------------------------ real 2-rank runs (gloo)

FACTORS = {"all_reduce": 1.0, "all_gather": 0.5, "reduce_scatter": 0.5}  # 2(n-1)/n, (n-1)/n at n=2
SWEEP = ["--max-size", "256KiB", "--iters", "5", "--warmup", "1", "--link-size", "64KiB"]


def _check_report(rep: dict, world: int = 2) -> None:
    assert rep["schema"] == "scaletrain.preflight/1"
    assert rep["world_size"] == world and rep["backend"] == "gloo"
    expected_sizes = [KiB << i for i in range(9)]  # 1 KiB .. 256 KiB
    for op, factor in FACTORS.items():
        rows = rep["collectives"][op]
        assert [r["size_bytes"] for r in rows] == expected_sizes
        for r in rows:
            assert r["count"] * 4 == r["size_bytes"]  # float32
            assert len(r["rank_time_us"]) == world and r["time_max_us"] == max(r["rank_time_us"])
            assert r["time_us"] == pytest.approx(sum(r["rank_time_us"]) / world)
            algbw = r["size_bytes"] / (r["time_us"] * 1e-6) / 1e9
            assert r["algbw_gbps"] == pytest.approx(algbw, rel=1e-9)
            assert r["busbw_gbps"] == pytest.approx(algbw * factor, rel=1e-9)
        rec = rep["recommendations"][op]
        assert rec["bucket_bytes"] in expected_sizes and rec["plateau_busbw_gbps"] > 0
        assert isinstance(rec["plateau_reached"], bool) and rec["knobs"]
    assert {(x["src"], x["dst"]) for x in rep["links"]} == {(0, 1), (1, 0)}
    assert all(x["size_bytes"] == 64 * KiB and x["gbps"] > 0 for x in rep["links"])


def test_preflight_two_ranks_torchrun_flags_the_delayed_rank(tmp_path):
    out = tmp_path / "pf.json"
    # Rank 1 sleeps 0.1 s before each link-test send: 1 -> 0 must be flagged, 0 -> 1 must not.
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "scaletrain.cli", "preflight", *SWEEP,
           "--inject-delay", "1:0.1", "--json", str(out), "--markdown", str(tmp_path / "pf.md")]
    r = run_cmd(cmd, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    rep = json.loads(out.read_text())
    _check_report(rep)
    slow = {(x["src"], x["dst"]): x["slow"] for x in rep["links"]}
    assert slow == {(0, 1): False, (1, 0): True}, rep["links"]
    assert rep["slow_links"] == [[1, 0]] and rep["inject_delay"] == [1, 0.1]
    # The printed table and the Markdown file carry the same numbers, once (rank 0 only).
    assert r.stdout.count("scaletrain preflight: 2 rank(s)") == 1
    assert "1 -> 0 (intra-node)" in r.stdout and "SLOW" in r.stdout
    md = (tmp_path / "pf.md").read_text()
    assert "| all_reduce | 256 KiB | 65536 |" in md and "NCCL_ALGO" in md


def test_preflight_under_deepspeed_launcher(tmp_path):
    """The deepspeed launcher appends --local_rank and exports its own env; same report."""
    out = tmp_path / "pf.json"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), "--module", "scaletrain.cli", "preflight", *SWEEP, "--json", str(out)]
    r = run_cmd(cmd, timeout=300, env={"DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    rep = json.loads(out.read_text())
    _check_report(rep)
    # The launcher's node rank (CROSS_RANK) names the node: both ranks on one, links intra-node.
    assert rep["nodes"] == 1 and {x["link_class"] for x in rep["links"]} == {"intra-node"}


def test_preflight_bad_flag_is_one_line():
    r = run_cmd([str(BIN / "scaletrain"), "preflight", "--max-size", "4XB"], timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == ("scaletrain: preflight error: --max-size='4XB' is not a size; "
                                "use e.g. 4MiB, 512KiB or 1048576")
