"""The launchers exactly as a user types them: torchrun, the deepspeed launcher with a
hostfile, and plain python. Each leaves a complete run folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import BIN, run_cmd, shard_pattern
from tests.distributed.util import free_port, read_metrics

pytestmark = pytest.mark.e2e


def _small(synth_shards, run_dir, *extra: str) -> list[str]:
    sets = [
        f"data.shards={shard_pattern(synth_shards)}", f"run.dir={run_dir}", "log.wandb=disabled",
        "train.stages.0.steps=3", "train.stages.1.steps=2", "sample.steps=2", *extra,
    ]
    return [x for s in sets for x in ("--set", s)]


def _assert_run_folder(run_dir, steps=5, world=2):
    for name in ("config.yaml", "metrics.jsonl", "samples.png", "summary.json"):
        assert (run_dir / name).is_file(), f"missing {name} in {run_dir}"
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert [m["resolution"] for m in metrics] == [32] * 3 + [64] * 2  # two curriculum stages
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["world_size"] == world
    assert summary["images_seen"] == 3 * 16 + 2 * 8
    assert summary["images_per_second"] > 0 and summary["final_loss"] == metrics[-1]["loss"]


def test_torchrun_two_ranks(synth_shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           "launchers/pretrain.py", "--config", "configs/demo.yaml", *_small(synth_shards, run_dir)]
    r = run_cmd(cmd, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    _assert_run_folder(run_dir)
    # rank 0 alone reports: one banner, one progress bar
    assert r.stdout.count("stage 0 'low-res'") + r.stderr.count("stage 0 'low-res'") == 1
    assert "train:" in r.stderr and "5/5" in r.stderr


def test_plain_python_single_process(synth_shards, tmp_path):
    run_dir = tmp_path / "run"
    # one process keeps the recipe's global batch by accumulating two micro-batches
    cmd = [sys.executable, "launchers/pretrain.py", "--config", "configs/demo.yaml",
           *_small(synth_shards, run_dir, "train.stages.0.grad_accum=2", "train.stages.1.grad_accum=2")]
    r = run_cmd(cmd, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    _assert_run_folder(run_dir, world=1)


def test_quality_recipe_runs_as_make_quality_does(synth_shards, tmp_path):
    """configs/quality.yaml (unet-small, EMA, validation) under torchrun with one process, as
    `make quality` runs it, cut to 4 steps: EMA-weight validation at step 2 and 4, the captioned
    grids enlarged to 128 px tiles, and samples.png from the EMA weights."""
    from PIL import Image

    run_dir = tmp_path / "q"
    sets = [f"data.shards={shard_pattern(synth_shards)}", f"run.dir={run_dir}", "log.wandb=disabled",
            "train.stages.0.steps=4", "validate.every_steps=2", "validate.num_images=4", "validate.steps=2",
            "sample.steps=2", "checkpoint.every_steps=0"]
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "1", "launchers/pretrain.py",
           "--config", "configs/quality.yaml", *[x for s in sets for x in ("--set", s)]]
    r = run_cmd(cmd, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["images_seen"] == 64 and summary["params_total"] == 1_658_403
    vals = [m for m in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()) if m.get("validation")]
    assert [v["step"] for v in vals] == [2, 4] and all(v["val_ema"] for v in vals)
    with Image.open(run_dir / "samples.png") as grid:  # 6 prompts: 3 x 2 tiles of 32 px shown at 128 px
        assert grid.width == 3 * 128 and grid.height > 2 * 128


def _ssh_to_localhost_works() -> bool:
    if not shutil.which("ssh"):
        return False
    r = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=3", "localhost", "hostname"],
                       capture_output=True, timeout=20)
    return r.returncode == 0


def test_deepspeed_launcher_with_hostfile(synth_shards, tmp_path):
    """`deepspeed --hostfile hosts launchers/pretrain.py ...` with `localhost slots=2`.

    DeepSpeed's runner checks passwordless ssh to the first host (.ci/local_sshd.sh sets up
    an sshd on loopback, as a cluster node has); where ssh is not available the same hostfile
    launch runs with --no_ssh_check. --master_addr 127.0.0.1 keeps the rendezvous on
    loopback (otherwise the runner asks the host for `hostname -I`, a non-loopback address).
    """
    run_dir = tmp_path / "run"
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\n")
    launcher = [str(BIN / "deepspeed"), "--hostfile", str(hosts), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    if not _ssh_to_localhost_works():
        if os.environ.get("SCALETRAIN_REQUIRE_SSH") == "1":  # CI: .ci/local_sshd.sh must have started sshd
            pytest.fail("SCALETRAIN_REQUIRE_SSH=1 but ssh to localhost does not work (.ci/local_sshd.sh)")
        print("ssh to localhost unavailable: launching with --no_ssh_check")
        launcher += ["--no_ssh_check"]
    cmd = launcher + ["launchers/pretrain.py", "--config", "configs/demo.yaml",
                      *_small(synth_shards, run_dir, "engine.kind=deepspeed")]
    r = run_cmd(cmd, timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    _assert_run_folder(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engine"] == "deepspeed"
