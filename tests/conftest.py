"""Shared fixtures: synthetic shards written once per session, repo paths, subprocess helpers."""

from __future__ import annotations

import os
import sys
import time
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
    """A launch in its own process group, killed whole when the test stops (tests/launch.py)."""
    from tests.launch import run

    return run(cmd, timeout=timeout, env=env, cwd=cwd)


# The 32 px demo reference: 5 AdamW steps of unet-tiny at global batch 8, layout-invariant data
# (rank r's n-th sample is global sample n*world+r) and no warm-up. Shared by every module that
# compares against it (engine equivalence, fp16, two hosts, Slurm, precomputed latents).
REF_STEPS = 5


def ref_sets(shards: Path, *extra: str, steps: int = REF_STEPS, micro: int = 4, accum: int = 1) -> list[str]:
    from tests.launch import sets

    return sets(f"data.shards={shard_pattern(shards)}", "data.split=sample", "data.shuffle_buffer=0",
                "data.num_workers=0", "log.wandb=disabled", "log.progress=false", "sample.at_end=false",
                "validate.every_steps=0", "validate.at_end=false", "optim.warmup_steps=0", "optim.lr=1e-3",
                "checkpoint.resume=never",
                f"train.stages=[{{name: s0, resolution: 32, steps: {steps}, micro_batch: {micro}, "
                f"grad_accum: {accum}, global_batch: 8}}]", *extra)


@pytest.fixture(scope="session")
def demo_reference(synth_shards, tmp_path_factory):
    """The 32 px demo reference on FSDP2, 2 ranks, launched once per pytest run as a user
    launches it (torchrun launchers/pretrain.py): a tests.launch.Run."""
    from tests.launch import Run, torchrun

    d = tmp_path_factory.mktemp("demo-reference")
    r = run_cmd(torchrun("--config", "configs/demo.yaml", *ref_sets(synth_shards, "engine.kind=fsdp",
                                                                    f"run.dir={d}")),
                env={"OMP_NUM_THREADS": "1"})
    return Run("fsdp-reference", d, r.returncode, r.stdout, r.stderr).ok()


# Tiers, from where a test lives: tests/unit -> unit, tests/distributed -> distributed,
# tests/e2e -> e2e. Every distributed and e2e test is also `slow` unless its module marks it
# `fast`: `make test-fast` (the developers' loop) runs `unit or fast`; `make test` (CI) runs all.
_TIERS = {"unit": "unit", "distributed": "distributed", "e2e": "e2e"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = _TIERS.get(Path(str(item.fspath)).parent.name)
        if tier:
            item.add_marker(getattr(pytest.mark, tier))
        if tier in ("distributed", "e2e") and item.get_closest_marker("fast") is None:
            item.add_marker(pytest.mark.slow)


_SESSION_START = time.time()


def pytest_sessionfinish(session, exitstatus):
    """DeepSpeed CPU all-reduce buffers of runs killed on purpose (SIGKILL tests) cannot be
    removed by the run itself (scaletrain.distributed.remove_deepspeed_shm does it on a clean
    exit): remove this user's buffers made since the session began (66 MiB of tmpfs each)."""
    shm = Path("/dev/shm")
    for f in shm.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*") if shm.is_dir() else []:
        try:
            if f.stat().st_mtime >= _SESSION_START:
                f.unlink()
        except OSError:
            pass


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The last line of every run: how many tests were skipped (CI must show 0)."""
    skipped = len(terminalreporter.stats.get("skipped", []))
    terminalreporter.write_line(f"scaletrain: {skipped} skipped")


def require_or_skip(what: str, reason: str) -> None:
    """A test that needs something of the host (tmpfs, network namespaces, Slurm, sshd) and
    cannot have it: a failure where SCALETRAIN_REQUIRE_<WHAT>=1 (.ci/run sets them all, so CI
    never skips silently), a skip that says why elsewhere."""
    var = f"SCALETRAIN_REQUIRE_{what.upper()}"
    if os.environ.get(var) == "1":
        pytest.fail(f"{var}=1 but {reason}")
    pytest.skip(reason)
