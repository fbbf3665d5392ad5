"""Checkpoint policy and safe loading without a process group: the minutes interval on a fake
clock, step intervals, and the weights-only guard around DeepSpeed's loaders."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from scaletrain.checkpoint import manager as manager_mod
from scaletrain.checkpoint.manager import CheckpointManager
from scaletrain.config import CheckpointSection


def _manager(tmp_path, **cfg) -> CheckpointManager:
    info = SimpleNamespace(is_main=True, rank=0, world_size=1, device=torch.device("cpu"))
    return CheckpointManager(CheckpointSection(**cfg), tmp_path, engine=None, dist_info=info)


def test_every_minutes_follows_the_clock(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(manager_mod.time, "monotonic", lambda: now[0])
    m = _manager(tmp_path, every_minutes=2.0)
    assert not m.minutes_due()
    now[0] += 119.0
    assert not m.minutes_due()
    now[0] += 1.0
    assert m.minutes_due()
    m._last_save_time = now[0]  # what a commit does
    assert not m.minutes_due()
    assert not _manager(tmp_path, every_minutes=0.0).minutes_due()


def test_step_policies(tmp_path):
    m = _manager(tmp_path, every_steps=5, keep_every=7, at_stage_end=True)
    assert [s for s in range(1, 16) if m.due(s, stage_end=False)] == [5, 7, 10, 14, 15]
    assert m.due(3, stage_end=True)
    assert not _manager(tmp_path, at_stage_end=False).due(3, stage_end=True)


class _Evil:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_deepspeed_loads_are_weights_only(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from scaletrain.common.safe_load import UnsafeCheckpointError, weights_only_torch_load

    good, evil = tmp_path / "good.pt", tmp_path / "evil.pt"
    torch.save({"zero_stage": ZeroStageEnum.weights, "w": torch.ones(2)}, good)
    with open(evil, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with weights_only_torch_load():
        # what DeepSpeed's loaders do: ask for weights_only=False explicitly
        assert torch.load(good, weights_only=False)["zero_stage"] == ZeroStageEnum.weights
        with pytest.raises(UnsafeCheckpointError, match="refusing to unpickle"):
            torch.load(evil, weights_only=False)
    assert torch.load is not None and "guarded" not in torch.load.__name__  # restored on exit


def test_zero_dp_world_size_counts_partitions(tmp_path):
    from scaletrain.common.safe_load import zero_dp_world_size

    for r in range(3):
        (tmp_path / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").touch()
        (tmp_path / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").touch()
    assert zero_dp_world_size(tmp_path) == 3


def test_every_file_is_durable_before_the_commit_rename(tmp_path, monkeypatch):
    """The commit fsyncs every file and folder of the checkpoint (engine shards, RNG, trainer
    state, meta.json) before the rename makes it visible, and the parent folder after it."""
    import os

    class _Engine:
        name = "fake"

        def save_state(self, path):
            path.mkdir(parents=True)
            (path / "shard-0.bin").write_bytes(b"x" * 10)

    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(manager_mod.os, "fsync", fsync)
    monkeypatch.setattr(manager_mod.os, "rename", rename)
    m = _manager(tmp_path)
    m.engine = _Engine()
    m.save(3, {"stage": 0, "preset": "unet-tiny"})
    final = tmp_path / "checkpoints" / "step-00000003"
    at = next(i for i, e in enumerate(events) if e == ("rename", str(final)))
    before = {Path(p).relative_to(final.with_name(final.name + ".partial")).as_posix()
              for kind, p in events[:at] if kind == "fsync"}
    assert {"meta.json", "trainer_state.json", "rng-rank0.safetensors", "engine/shard-0.bin", "engine", "."} <= before
    assert ("fsync", str(tmp_path / "checkpoints")) in events[at + 1:]


def test_launches_from_the_suite_see_no_gpu():
    """tests/conftest.py hides GPUs from every launch (a one-GPU host must not put two ranks on it)."""
    import sys

    from tests.conftest import run_cmd

    r = run_cmd([sys.executable, "-c", "import os, torch; print(repr(os.environ['CUDA_VISIBLE_DEVICES']), "
                 "os.environ['DS_ACCELERATOR'], torch.cuda.device_count())"], timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["''", "cpu", "0"], (r.stdout, r.stderr)


def test_background_threads_are_lowered_to_the_async_nice() -> None:
    """checkpoint.async_nice: threads a library started after a snapshot (DCP's stager and
    executor) are given the niceness, counted; a thread-pool initializer lowers its own thread
    (scaletrain's DeepSpeed writer); 0 changes nothing."""
    import os
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from scaletrain.engines.base import lower_new_threads, lower_thread_priority

    before = {t.native_id for t in threading.enumerate()}
    release = threading.Event()
    t = threading.Thread(target=release.wait)
    t.start()
    try:
        assert lower_new_threads(before, 0) == 0
        assert lower_new_threads(before, 19) == 1
        assert os.getpriority(os.PRIO_PROCESS, t.native_id) == 19
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < 19  # the caller is untouched
    finally:
        release.set()
        t.join()
    counter = [0]
    with ThreadPoolExecutor(1, initializer=lower_thread_priority, initargs=(15, counter)) as pool:
        nice = pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    assert nice == 15 and counter == [1]


def test_meta_records_every_files_checksum_and_a_load_verifies_them(tmp_path):
    """checkpoint.checksums: meta.json holds each file's size and XXH3-64 (as `xxhsum -H3`
    recomputes it); a flipped bit or a short file is one CheckpointLoadError naming the file
    before anything is read; a checkpoint of the first checksummed version (CRC-32) still
    verifies, and fails on a flipped bit; checksums=false neither records nor verifies."""
    import zlib

    import xxhash

    from scaletrain.checkpoint.manager import latest_checkpoint, verify_checksums
    from scaletrain.common.safe_load import CheckpointLoadError

    class _Engine:
        name = "fake"

        def save_state(self, path):
            path.mkdir(parents=True)
            (path / "shard-0.bin").write_bytes(bytes(range(256)) * 40)

    m = _manager(tmp_path)
    m.engine = _Engine()
    m.save(3, {"stage": 0, "preset": "unet-tiny"})
    info = latest_checkpoint(tmp_path / "checkpoints")
    files = info.meta["files"]
    assert {"engine/shard-0.bin", "rng-rank0.safetensors", "trainer_state.json"} <= set(files)
    assert "meta.json" not in files and all(p.is_file() for p in (info.path / f for f in files))
    shard = info.path / "engine" / "shard-0.bin"
    assert files["engine/shard-0.bin"] == [10240, f"xxh3_64:{xxhash.xxh3_64(shard.read_bytes()).hexdigest()}"]
    verify_checksums(info)  # intact: no error
    data = bytearray(shard.read_bytes())
    data[5000] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointLoadError) as e:
        verify_checksums(info)
    assert str(e.value).startswith(f"{shard} fails its checksum (xxh3_64:") and "\n" not in str(e.value)
    # the first checksummed version's CRC-32 (8 hex digits): verified as CRC-32
    legacy = replace(info, meta={**info.meta, "files": {"engine/shard-0.bin": [10240, f"{zlib.crc32(bytes(data)):08x}"]}})
    verify_checksums(legacy)
    data[77] ^= 4
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointLoadError, match=r"fails its checksum \([0-9a-f]{8}, meta.json recorded [0-9a-f]{8}\)"):
        verify_checksums(legacy)
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointLoadError, match="has 100 bytes, meta.json recorded 10240"):
        verify_checksums(info)
    off = _manager(tmp_path / "off", checksums=False)
    off.engine = _Engine()
    off.save(3, {"stage": 0, "preset": "unet-tiny"})
    assert "files" not in latest_checkpoint(tmp_path / "off" / "checkpoints").meta


def test_engine_and_ema_files_are_hashed_as_written_not_read_back(tmp_path, monkeypatch):
    """Issue 29 item 6, the lever: the engine's DCP writer (torch_engine.dcp_writer) and the
    DeepSpeed writer (ds_writer._write_file) hash each file as they write it; the commit records
    those hashes and reads back only the files no writer hashed. Counted in the save's metrics
    record, and each recorded hash equals the file's XXH3-64 read from disk."""
    import warnings

    import torch.distributed.checkpoint as dcp
    import xxhash

    from scaletrain.common import hashed_io
    from scaletrain.engines.ds_writer import _write_file
    from scaletrain.engines.torch_engine import dcp_writer

    read_back = []
    real_hash = hashed_io.file_hash
    monkeypatch.setattr(manager_mod, "file_hash", lambda p, *a: read_back.append(Path(p).name) or real_hash(p, *a))

    class _Engine:
        name = "fake"

        def save_state(self, path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # DCP without a process group says so
                dcp.save({"w": torch.randn(256, 64), "n": 3}, storage_writer=dcp_writer(path, 2), no_dist=True)
            _write_file({"zero": torch.randn(128, 32)}, str(path / "zero-states.pt"))
            with open(path / "plain.bin", "wb") as f:  # written by nobody that hashes: read back
                f.write(b"x" * 1000)

    m = _manager(tmp_path)
    m.engine = _Engine()
    (record,) = m.save(2, {"stage": 0, "preset": "unet-tiny"})
    info = manager_mod.latest_checkpoint(tmp_path / "checkpoints")
    files = info.meta["files"]
    written = {"engine/.metadata", "engine/__0_0.distcp", "engine/__0_1.distcp", "engine/zero-states.pt"}
    assert written < set(files)
    for name, (size, digest) in files.items():
        data = (info.path / name).read_bytes()
        assert [size, digest] == [len(data), f"xxh3_64:{xxhash.xxh3_64(data).hexdigest()}"], name
    assert sorted(read_back) == ["plain.bin", "rng-rank0.safetensors", "trainer_state.json"]
    assert record["checksum_written_files"] == 4 and record["checksum_read_back_files"] == 3
    assert record["checksum_written_bytes"] == sum(files[n][0] for n in written)
    assert record["checksum_read_back_bytes"] < record["checksum_written_bytes"] / 10
    manager_mod.verify_checksums(info)
    # checkpoint.checksums=false: the writers write through plain streams (nothing hashed, nothing recorded)
    off = _manager(tmp_path / "off", checksums=False)
    off.engine = _Engine()
    read_back.clear()
    (record,) = off.save(2, {"stage": 0, "preset": "unet-tiny"})
    assert "checksum_written_files" not in record and read_back == []
    assert hashed_io.take_written(tmp_path) == {}
    # A stream that seeks may differ from the bytes it hashed: no record, the file is read back.
    with open(tmp_path / "s.bin", "wb") as raw:
        s = hashed_io.HashingStream(raw, tmp_path / "s.bin")
        s.write(b"abcdef")
        s.seek(0)
        s.write(b"X")
    s.settle()
    assert hashed_io.take_written(tmp_path) == {}
