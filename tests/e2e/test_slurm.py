"""launchers/slurm/*.sbatch against a real Slurm: Debian's slurmctld + two slurmd (node1,
node2; one host, Slurm's multiple-slurmd mode) started by tools/local_slurm/start.sh.

The same pre-training recipe and seed run as a plain 2-rank torchrun (the reference) and as
2-node Slurm jobs (one task per node, one rank each): with the torchrun template, with the
deepspeed template (ZeRO-3), pre-empted by the USR1 that `#SBATCH --signal=B:USR1@N` sends
before a time limit (delivered at once here with `scancel -b -s USR1`: Slurm itself checks
time limits only every ~30 s), and requeued from outside with `scontrol requeue`. Each job
must complete with the reference's per-step losses; the interrupted ones after exactly one
requeue that resumed from a checkpoint. A bad hostfile fails the job with one line before
anything launches.

Needs root and the slurm-wlm packages (.ci/run installs them and sets
SCALETRAIN_REQUIRE_SLURM=1, which turns a missing Slurm into a failure); skips otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require_or_skip, REPO, run_cmd, shard_pattern
from tests.distributed.util import free_port, read_metrics

pytestmark = pytest.mark.e2e

STEPS = 30
RTOL = 1e-5  # as tests/distributed/test_engine_equivalence.py: summation order only
SLURM_DIR = Path("/tmp/scaletrain-slurm")
CONF = SLURM_DIR / "etc" / "slurm.conf"


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (the daemons run as root)"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "no slurmctld and no apt-get to install it"
    return None


@pytest.fixture(scope="module")
def slurm():
    reason = _unavailable()
    if reason:
        require_or_skip("slurm", f"Slurm cannot run here: {reason}")
    env = {**os.environ, "SLURM_PROTO_DIR": str(SLURM_DIR), "SLURM_NUM_NODES": "2", "SLURM_NODE_CPUS": "2"}
    r = subprocess.run(["bash", "tools/local_slurm/start.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    yield {**os.environ, "SLURM_CONF": str(CONF)}
    subprocess.run(["bash", "tools/local_slurm/stop.sh"], cwd=REPO, env=env, capture_output=True, timeout=120)


def _sets(synth_shards, run_dir: Path, *extra: str) -> list[str]:
    sets = [f"data.shards={shard_pattern(synth_shards)}", "data.split=sample", "data.shuffle_buffer=0",
            "data.num_workers=0", f"run.dir={run_dir}", "log.wandb=disabled", "log.progress=false",
            "sample.at_end=false", "validate.every_steps=0", "validate.at_end=false", "checkpoint.every_steps=5",
            f"train.stages=[{{name: s0, resolution: 32, steps: {STEPS}, micro_batch: 4, grad_accum: 1, "
            "global_batch: 8}]", *extra]
    return ["--config", "configs/demo.yaml", *[x for s in sets for x in ("--set", s)]]


def _submit(env: dict, template: str, args: list[str], out: Path, **extra_env: str) -> str:
    r = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--cpus-per-task=1", f"--output={out}",
                        f"launchers/slurm/{template}", *args], cwd=REPO, env={**env, **extra_env},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def _job(env: dict, job: str) -> dict[str, str]:
    r = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True, timeout=30)
    return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)


def _wait(env: dict, job: str, timeout: float = 300) -> dict[str, str]:
    """Poll (sbatch --wait checks only every 32 s): the job's final record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _job(env, job)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=env, timeout=30)
    raise AssertionError(f"job {job} did not finish in {timeout}s: {_job(env, job)}")


def _wait_for(path: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout}s"
        time.sleep(0.2)


def _losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir)]


def _node_logs(job: str) -> str:
    return "".join(p.read_text() for p in sorted((REPO / "logs" / f"slurm-{job}").glob("node-*.out")))


@pytest.fixture(scope="module")
def reference(synth_shards, tmp_path_factory) -> list[float]:
    run_dir = tmp_path_factory.mktemp("slurm-ref")
    r = run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                 "--master_port", str(free_port()), "launchers/pretrain.py", *_sets(synth_shards, run_dir)],
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    losses = _losses(run_dir)
    assert len(losses) == STEPS
    return losses


@pytest.mark.parametrize("template,extra", [("pretrain_torchrun.sbatch", ()),
                                            ("pretrain_deepspeed.sbatch", ("engine.kind=deepspeed",))])
def test_sbatch_template_runs_the_recipe_on_two_nodes(slurm, synth_shards, reference, tmp_path, template, extra):
    run_dir = tmp_path / "run"
    job = _submit(slurm, template, _sets(synth_shards, run_dir, *extra), tmp_path / "job.out")
    info = _wait(slurm, job)
    out = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["NumNodes"] == "2", out
    assert "on 2 node(s) [node1 node2], 1 rank(s) each, rendezvous node1:" in out
    assert _losses(run_dir) == pytest.approx(reference, rel=RTOL)
    logs = sorted(p.name for p in (REPO / "logs" / f"slurm-{job}").glob("node-*.out"))
    assert [n.split("-")[1] for n in logs] == ["0", "1"], logs  # one log per node
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["engine"] == ("deepspeed" if extra else "fsdp")


@pytest.mark.parametrize("how", ["usr1", "requeue"])
def test_preempted_job_requeues_and_resumes_to_the_same_curve(slurm, synth_shards, reference, tmp_path, how):
    """usr1: the signal `--signal=B:USR1@N` sends before a time limit; the batch script asks every
    rank to stop (they save at the end of the current step) and requeues the job.
    requeue: `scontrol requeue` from outside; Slurm SIGTERMs the job, the ranks save the same way.
    Either way the job runs again under the same id and resumes from that checkpoint."""
    run_dir = tmp_path / "run"
    job = _submit(slurm, "pretrain_torchrun.sbatch", _sets(synth_shards, run_dir), tmp_path / "job.out")
    _wait_for(run_dir / "checkpoints" / "step-00000005" / "meta.json")
    cmd = ["scancel", "--batch", "--signal=USR1", job] if how == "usr1" else ["scontrol", "requeue", job]
    subprocess.run(cmd, env=slurm, check=True, timeout=30)
    info = _wait(slurm, job)
    out = (tmp_path / "job.out").read_text()  # --open-mode=append: both runs' lines
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out
    assert "(restart 0)" in out and "(restart 1)" in out
    if how == "usr1":
        assert "USR1 (time limit or pre-emption ahead): checkpointing, then requeue" in out
        assert f"requeueing job {job}" in out
    logs = _node_logs(job)
    stopped = [ln for ln in logs.splitlines() if ln.startswith("stopping at step ")]
    resumed = [ln for ln in logs.splitlines() if ln.startswith("resumed at step ")]
    assert len(stopped) == 1 and "SIGTERM (pre-emption)" in stopped[0], logs[-3000:]
    step = int(stopped[0].split()[3])
    assert 5 <= step < STEPS and len(resumed) == 1 and resumed[0].startswith(f"resumed at step {step} "), resumed
    assert _losses(run_dir) == pytest.approx(reference, rel=RTOL)


def test_a_bad_hostfile_fails_the_job_before_launch(slurm, synth_shards, tmp_path):
    bad = tmp_path / "hosts"
    bad.write_text("node1 slots=1\nnode2 slots 1\n")
    job = _submit(slurm, "pretrain_deepspeed.sbatch", _sets(synth_shards, tmp_path / "run"), tmp_path / "job.out",
                  DS_HOSTFILE=str(bad))
    info = _wait(slurm, job, timeout=60)
    out = (tmp_path / "job.out").read_text()
    lines = [ln for ln in out.splitlines() if ln.startswith("scaletrain")]
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", out
    assert lines == [f"scaletrain: DS_HOSTFILE={str(bad)!r} line 2 'node2 slots 1' is not 'HOST slots=N' (N >= 1)"]
    assert not (tmp_path / "run").exists()
