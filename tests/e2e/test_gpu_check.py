"""benchmarks/gpu_check.sh, the one call a lent GPU gets, run here on CPU (GPU_CHECK_DRY=1: the
same script, every cell with a tiny stand-in preset) so its plumbing is proven before it ever
runs on a GPU: each cell's command line works, a cell's processes die with it (even one in a
session of its own), the report is rewritten after every cell, and the global limit skips
what it cannot fit instead of overrunning."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e

CELLS = ["imports", "reap-selftest", "synth", "encode-sd2", "sd2-256", "dit-256", "dit-256-fp8", "startup-fsdp",
         "startup-deepspeed", "sd2-512", "sd2-online", "sd2-ac", "profile", "encode-sdxl", "sdxl-256", "sd3-256",
         "sd3-256-fp8", "sd2-compile"]


def _run(out, limit: int, **env) -> tuple[subprocess.CompletedProcess, float, list[list[str]]]:
    t0 = time.time()
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out)], cwd=REPO, capture_output=True, text=True,
                       timeout=limit + 120, env={**os.environ, "GPU_CHECK_DRY": "1", "PYTHON": sys.executable,
                                                 "GPU_CHECK_LIMIT": str(limit), "OMP_NUM_THREADS": "1",
                                                 "GPU_CHECK_TMP": str(out / "data"), **env})
    rows = [ln.split("\t") for ln in (out / "cells.tsv").read_text().splitlines()[1:]]
    return r, time.time() - t0, rows


def _left_running(marker: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"GPU_CHECK_CELL={marker}".encode() in env:
            pids.append(int(pid))
    return pids


def test_dry_run_runs_every_cell_and_kills_what_a_cell_leaves(tmp_path):
    """Every cell of the GPU order succeeds on its tiny stand-in; the reaper self-test (a child
    started with setsid, which timeout's process-group kill misses) leaves no process behind; the
    report holds the goal cells' rows, the start-up lines and every cell's status."""
    r, seconds, rows = _run(tmp_path, 540, GPU_CHECK_SELFTEST="1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [row[0] for row in rows] == CELLS, rows
    status = {row[0]: row[1] for row in rows}
    assert status.pop("reap-selftest") == "124"
    assert set(status.values()) == {"0"}, rows
    assert _left_running("reap-selftest") == []
    gpu = (tmp_path / "gpu.txt").read_text()
    assert "unet-tiny on fsdp, 1 rank: start-up:" in gpu and "unet-tiny on deepspeed, 1 rank: start-up:" in gpu
    report = (tmp_path / "gpu_dry_run.md").read_text()
    for run in ("sd2-256", "dit-256", "dit-256-fp8", "sd2-512", "sd2-online", "sd2-ac", "sdxl-256", "sd3-256",
                "sd3-256-fp8", "sd2-compile"):
        assert f"| {run} | " in report and f"| {run} | ok |" in report, run
    # the fp8 cells ran in fp8 (torchao's emulation here) and sit beside their base cells
    assert "| dit-256-fp8 | dit-tiny | 32 | fsdp | 2 | fp8 |" in report
    assert "| dit-tiny | 32 | 40 (emulated) | fp32 | " in report and "| mmdit-tiny | 32 | " in report
    # killed at its 3 s limit; the reaper's walk over /proc can add a second on a loaded machine
    assert "| reap-selftest | timed out | 3 | 3 |" in report or "| reap-selftest | timed out | 4 | 3 |" in report
    assert (tmp_path / "profile_unet-tiny-latent_32.txt").is_file()


def test_the_global_limit_skips_cells_instead_of_overrunning(tmp_path):
    """With 22 s in all (none kept in reserve) the import check runs (its imports alone take more
    than 3 s) and every later cell is recorded as skipped, not started; the report is still
    written."""
    r, seconds, rows = _run(tmp_path, 22, GPU_CHECK_RESERVE="0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert rows[0][:2] == ["imports", "0"]
    assert [row[1] for row in rows[1:]] == ["skipped"] * (len(CELLS) - 2), rows
    assert seconds < 22 + 30
    assert "| synth | skipped (global limit) |" in (tmp_path / "gpu_dry_run.md").read_text()
