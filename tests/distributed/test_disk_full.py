"""Full disks and bad run folders (issue 16 part 3), on a small size-limited tmpfs, 2 ranks:
a save without room for another checkpoint is refused by the free-space check on FSDP2 and
ZeRO-3 alike, reported in one line per save, its .partial removed, and training goes on; a disk
that fills during a save (ENOSPC while committing) is agreed on every rank, and with
checkpoint.on_save_error=stop every rank stops together (exit 3) and the run resumes from the
last complete checkpoint once there is room again. A write error on one rank only (ZeRO-3, sync
and async) is agreed the same way, never a hang. An unwritable or non-folder run.dir is a
config-time error."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require_or_skip, REPO, run_cmd, shard_pattern
from tests.distributed.util import free_port, one_error_line, read_metrics

pytestmark = pytest.mark.dist

# One unet-tiny checkpoint is 14.6 MB on FSDP2 (fp32 weights + AdamW moments + RNG/state) and
# about 12 MB on ZeRO-3 (master weights + moments): these sizes hold two of them, not three.
TMPFS_MIB = {"fsdp": 40, "deepspeed": 30}


@contextlib.contextmanager
def tmpfs(path: Path, size_mib: int, *options: str):
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join((f"size={size_mib}m", *options))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:  # CI runs as root on this machine type; elsewhere say why it did not run
        require_or_skip("tmpfs", f"cannot mount a tmpfs here ({r.stderr.strip()}); run as root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _cmd(synth_shards, run_dir: Path, ckpt_dir: Path, steps: int, *extra: str) -> list[str]:
    sets = [f"data.shards={shard_pattern(synth_shards)}", "data.split=sample", "data.shuffle_buffer=0",
            "data.num_workers=0", f"run.dir={run_dir}", f"checkpoint.dir={ckpt_dir}", "checkpoint.every_steps=1",
            "log.wandb=disabled", "log.progress=false", "sample.at_end=false", "validate.every_steps=0",
            "validate.at_end=false", f"train.stages=[{{name: s, resolution: 32, steps: {steps}, micro_batch: 4}}]",
            *extra]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "launchers/pretrain.py", "--config", "configs/demo.yaml",
            *[x for s in sets for x in ("--set", s)]]


def _steps(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir())


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_no_room_for_another_checkpoint_is_reported_and_training_goes_on(synth_shards, tmp_path, engine):
    with tmpfs(tmp_path / "disk", TMPFS_MIB[engine]) as disk:
        run_dir = tmp_path / "run"
        r = run_cmd(_cmd(synth_shards, run_dir, disk / "ckpt", 4, f"engine.kind={engine}",
                         "engine.deepspeed_config=ds_configs/zero3.json"), timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        sizes = [sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in (disk / "ckpt").iterdir()]
        assert _steps(disk / "ckpt") == ["step-00000001", "step-00000002"], sizes  # no .partial left
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("scaletrain: checkpoint at step")]
        assert [ln.split()[4] for ln in lines] == ["3", "4"], r.stderr[-3000:]
        assert "MiB free under" in lines[0] and "training continues (checkpoint.on_save_error=continue)" in lines[0]
        records = read_metrics(run_dir, steps_only=False)
        assert [m["checkpoint_failed_step"] for m in records if "checkpoint_failed_step" in m] == [3, 4]
        assert [m["step"] for m in records if "loss" in m] == [1, 2, 3, 4]  # every step trained
        assert json.loads((run_dir / "summary.json").read_text())["checkpoint_save_failures"] == 2


def test_disk_filling_during_a_save_stops_every_rank_and_resumes_later(synth_shards, tmp_path):
    with tmpfs(tmp_path / "disk", TMPFS_MIB["fsdp"]) as disk:
        run_dir, ckpt = tmp_path / "run", disk / "ckpt"
        cmd = _cmd(synth_shards, run_dir, ckpt, 4, "checkpoint.on_save_error=stop")
        # The step-2 save is held open after its shards are written (the existing stall hook);
        # meanwhile the disk fills up, so committing it (meta.json) fails with ENOSPC on rank 0.
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "SCALETRAIN_TEST_SAVE_STALL": "2:6"})
        filler = disk / "filler"
        try:
            deadline = time.time() + 300
            while not (ckpt / "step-00000002.partial" / "engine" / ".metadata").exists():
                assert proc.poll() is None and time.time() < deadline, "the step-2 save never started"
                time.sleep(0.1)
            with open(filler, "wb") as f:  # fill every byte that is left
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * 65536)
            out, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode != 0
        line = one_error_line(err, "checkpoint at step 2 failed on rank 0: ")
        assert "No space left on device" in line and "stopping (checkpoint.on_save_error=stop)" in line
        assert _steps(ckpt) == ["step-00000001"]  # the failed save left nothing behind
        # Room again (and one checkpoint kept, so every later save fits): the same command resumes
        # from step 1 and finishes.
        filler.unlink()
        r = run_cmd(cmd + ["--set", "checkpoint.keep_last=1"], timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "resumed at step 1" in r.stdout + r.stderr
        assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]
        assert _steps(ckpt) == ["step-00000004"]


@pytest.mark.parametrize("async_save", [False, True])
def test_deepspeed_write_error_on_one_rank_is_agreed_and_training_goes_on(synth_shards, tmp_path, async_save):
    """ZeRO-3: rank 1's write of its step-2 optimizer file fails with ENOSPC (injected: the one
    rank whose disk filled), rank 0's writes succeed. DeepSpeed's own writer would raise between
    its barriers and leave rank 0 waiting there; scaletrain's writer records the error, every rank
    reaches the end of the save, and the failure is agreed: one line naming rank 1, the partial
    folder removed, training goes on, and the next saves succeed. Async: the same error surfaces
    from the background write and is agreed at the commit."""
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    cmd = _cmd(synth_shards, run_dir, ckpt, 4, "engine.kind=deepspeed", "engine.deepspeed_config=ds_configs/zero3.json",
               f"checkpoint.async_save={str(async_save).lower()}")
    r = run_cmd(cmd, timeout=600, env={"SCALETRAIN_TEST_WRITE_ERROR": "1:step-00000002.partial/engine/zero/zero_pp_rank_1"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("scaletrain: checkpoint at step")]
    assert len(lines) == 1 and "checkpoint at step 2 failed on rank 1: " in lines[0], r.stderr[-3000:]
    assert "No space left on device" in lines[0] and "zero_pp_rank_1" in lines[0], lines[0]
    assert _steps(ckpt) == ["step-00000001", "step-00000003", "step-00000004"]
    records = read_metrics(run_dir, steps_only=False)
    assert [m["checkpoint_failed_step"] for m in records if "checkpoint_failed_step" in m] == [2]
    assert [m["step"] for m in records if "loss" in m] == [1, 2, 3, 4]


def test_unwritable_or_non_folder_run_dir_is_a_config_error(synth_shards, tmp_path):
    from scaletrain.config import ConfigError
    from scaletrain.checks import load_run_config as load_config

    base = [f"data.shards={shard_pattern(synth_shards)}", "train.stages.0.global_batch=null", "train.stages.1.global_batch=null"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"run.dir=.*afile/run'.*afile exists and is not a folder"):
        load_config("configs/demo.yaml", [*base, f"run.dir={tmp_path / 'afile' / 'run'}"])
    with tmpfs(tmp_path / "ro", 1, "ro") as ro:
        with pytest.raises(ConfigError, match=r"checkpoint.dir=.*is not writable by this user"):
            load_config("configs/demo.yaml", [*base, f"checkpoint.dir={ro / 'ckpt'}"])
