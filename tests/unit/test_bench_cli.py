"""`scaletrain bench` as docs/benchmarks.md types it, in one process: the command line becomes
the whole matrix (presets x resolutions x engines x micro-batches x world sizes, each 1-rank
cell again as N copies at once, one collective sweep), and results.json, results.md and the
PNG plots are written from what the cells return.

Each cell's torchrun launch is replaced by a stand-in that validates the cell's recipe the way
the cell does (``scaletrain.bench.cell.run_config``: engine kind, DeepSpeed JSON, stage) and
returns rank records with made-up step times. The real launches, cells and plots on a
cut-short matrix are tests/distributed/test_bench.py's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scaletrain.bench import runner
from scaletrain.bench.cell import PHASES, run_config

# Made-up step time of a cell: compute per image grows with the pixels; an N-rank step adds the
# exposed communication of its engine; N copies at once run 10 % slower than one alone.
PER_IMAGE_32PX = 0.002
COMM = {"ddp": 0.004, "fsdp": 0.006, "zero2": 0.005, "zero3": 0.008}
LOADED_SLOWDOWN = 1.1
PHASE_SHARE = dict(zip(PHASES, (0.1, 0.1, 0.3, 0.4, 0.1)))


def _step_seconds(spec: dict, world: int) -> float:
    compute = PER_IMAGE_32PX * spec["micro_batch"] * (spec["resolution"] / 32) ** 2
    return compute + (COMM[spec["engine"]] if world > 1 else 0.0)


def _records(spec: dict, world: int, ranks: int, slowdown: float = 1.0) -> list[dict]:
    step = _step_seconds(spec, world) * slowdown
    peak = 0.5 + 0.01 * spec["micro_batch"] * (spec["resolution"] / 32) ** 2
    return [{"rank": r, "status": "ok", "world_size": world, "threads": 1,
             "steps": [{**{p: step * s for p, s in PHASE_SHARE.items()}, "step": step} for _ in range(spec["reps"])],
             "params_total": 1000, "params_local": 1000 if spec["engine"] in ("ddp", "zero2") else 500,
             "params_frozen": 100, "precomputed": False, "memory_split_mib": None,
             "baseline": {"peak_gib": 0.3}, "after_build": {"peak_gib": 0.4}, "memory": {"peak_gib": peak},
             "peak_tflops": 1.0, "peak_source": "stand-in"} for r in range(ranks)]


def _sweep() -> dict:
    """A collective sweep on 2 ranks: 400 us latency, 1.3 GB/s bus bandwidth."""
    return {op: [{"size_bytes": s, "time_us": (400e-6 + s * (1.0 if op == "all_reduce" else 0.5) / 1.3e9) * 1e6}
                 for s in (2**12, 2**16, 2**20, 2**24)] for op in ("all_reduce", "all_gather", "reduce_scatter")}


def test_bench_command_runs_the_whole_matrix_and_writes_its_results(tmp_path, monkeypatch, capsys) -> None:
    from scaletrain.cli import main

    launched: list[tuple[str, int, str, int]] = []  # (kind, ranks or copies, engine, resolution)

    def launch(spec: dict, world_size: int, work: Path, timeout_s: float) -> list[dict]:
        if spec.get("comm_sweep"):
            launched.append(("sweep", world_size, spec["engine"], 0))
            return [{"rank": 0, "status": "ok", "collectives": _sweep()}]
        cfg = run_config(spec, world_size)  # the recipe the cell would build its engine from
        assert cfg.train.stages[0].resolution == spec["resolution"] and Path(spec["shards"]).is_dir()
        if spec["engine"].startswith("zero"):
            assert cfg.engine.kind == "deepspeed" and Path(cfg.engine.deepspeed_config).is_file()
        launched.append(("cell", world_size, spec["engine"], spec["resolution"]))
        return _records(spec, world_size, world_size)

    def launch_loaded(spec: dict, copies: int, work: Path, timeout_s: float) -> list[dict]:
        launched.append(("loaded", copies, spec["engine"], spec["resolution"]))
        return [_records(spec, 1, 1, LOADED_SLOWDOWN)[0] for _ in range(copies)]

    monkeypatch.setattr(runner, "launch", launch)
    monkeypatch.setattr(runner, "launch_loaded", launch_loaded)
    out = tmp_path / "runs" / "bench"
    assert main(["bench", "--presets", "unet-tiny", "--resolutions", "32", "64", "--engines", "ddp", "fsdp", "zero2",
                 "zero3", "--micro-batches", "8", "--world-sizes", "1", "2", "--warmup", "1", "--reps", "2",
                 "--out", str(out)]) == 0
    engines = ["ddp", "fsdp", "zero2", "zero3"]
    # every (resolution, engine) pair: a 1-rank cell, its 2 copies at once, a 2-rank cell; one sweep
    assert sorted(launched) == sorted([("cell", w, e, r) for r in (32, 64) for e in engines for w in (1, 2)]
                                      + [("loaded", 2, e, r) for r in (32, 64) for e in engines]
                                      + [("sweep", 2, "ddp", 0)])
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == runner.SCHEMA and results["comm"] == _sweep()
    spec = results["spec"]
    assert (spec["presets"], spec["resolutions"], spec["engines"], spec["micro_batches"], spec["world_sizes"]) == \
        (["unet-tiny"], [32, 64], engines, [8], [1, 2])
    cells = results["cells"]
    assert len(cells) == 16 and {c["status"] for c in cells} == {"ok"}
    for c in cells:
        step = _step_seconds(c, c["world_size"])
        assert c["step_seconds"]["median"] == pytest.approx(step)
        assert c["images_per_second"]["median"] == pytest.approx(8 * c["world_size"] / step)
        if c["world_size"] == 1:  # the basis the 2-rank cell is predicted from: 2 copies at once
            assert c["loaded"]["copies"] == 2
            assert c["loaded"]["step_seconds"]["median"] == pytest.approx(step * LOADED_SLOWDOWN)
            assert c["exposed_comm_seconds"] == 0.0
        else:  # exposed comm = 2-rank step - loaded 1-rank step
            solo = _step_seconds(c, 1) * LOADED_SLOWDOWN
            assert c["exposed_comm_seconds"] == pytest.approx(step - solo)
    md = (out / "results.md").read_text()
    for e in engines:
        for r in (32, 64):
            for w in (1, 2):
                assert f"| unet-tiny | {r} | {e} | {w} | 8 | ok |" in md
    assert "copies running at once" in md and md in capsys.readouterr().out
    for png in ("throughput.png", "memory.png"):
        assert (out / png).stat().st_size > 10_000
