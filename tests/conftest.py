"""Shared fixtures: synthetic shards written once per session, repo paths, subprocess helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The suite proves the CPU paths (2 ranks on gloo). On a host with a GPU it must not pick it up
# half-way (two ranks on one GPU, or rank 1 on a device that does not exist): hide GPUs from this
# process and every launch it starts, before anything initializes CUDA. The GPU paths are
# checked by benchmarks/gpu_check.sh.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["DS_ACCELERATOR"] = "cpu"


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory) -> Path:
    """8 shards x 32 samples at 64 px (deterministic)."""
    from scaletrain.data.synth import write_synthetic_shards

    out = tmp_path_factory.mktemp("synth")
    write_synthetic_shards(out, num_samples=256, samples_per_shard=32, resolution=64, seed=0)
    return out


def shard_pattern(d: Path) -> str:
    return str(d / "shard-{000000..000007}.tar")


def run_cmd(cmd: list[str], *, timeout: float = 600, env: dict | None = None, cwd: Path = REPO):
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PATH"] = f"{BIN}{os.pathsep}{full_env.get('PATH', '')}"
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
