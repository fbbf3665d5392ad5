"""CheckpointManager: atomic, complete, resumable checkpoints behind one small interface.

Layout of one checkpoint (a shared filesystem visible to every rank is assumed)::

    CKPT_DIR/step-00000120/          committed: renamed from step-00000120.partial
        engine/                      model + optimizer (DCP shards, or DeepSpeed ZeRO partitions)
        ema/                         the sharded EMA (DCP on every engine), when ema.enabled
        rng-rank{r}.safetensors      each rank's torch (and CUDA) RNG state
        state-rank{r}.json           each rank's own counters: its data stream position per slot
        trainer_state.json           step, stage, images seen, data position, loss EMA, ...
        meta.json                    written last, before the rename: engine, world size, and
                                     every other file's size and XXH3-64 (checkpoint.checksums)

Atomicity: every rank writes into ``step-N.partial`` and fsyncs the files and folders in
it; after a barrier rank 0 writes and fsyncs ``meta.json``, renames the folder and fsyncs
the parent. A rename is atomic and comes after the data is durable, so a crash or power loss
at any point leaves either no ``step-N`` or a complete one, and the previous checkpoint
untouched.
``latest_checkpoint`` only considers committed folders with ``meta.json``; stale
``.partial`` folders are removed when the next run starts.

Checksums: before meta.json is written the ranks hash the folder's files between them (file i
on rank i mod world, XXH3-64 in 16 MiB reads of what is still in the page cache, in a thread
beside the fsync) and rank 0 records them; a load verifies them the same way before reading anything, so a bit flipped
on disk (a tensor that still parses) skips that checkpoint for the previous one, in one line.
A checksum finds corruption, not tampering: what a checkpoint may contain is the restricted
readers' business (below). Checkpoints written without checksums load as before.

Safe loading: every file is read by a restricted reader (common.safe_load): DCP metadata
by an unpickler that admits only DCP's metadata types, DCP entries and DeepSpeed's files
weights-only, RNG from safetensors, counters from JSON. Nothing in a checkpoint is
unpickled beyond plain tensors, containers and those types; a refused or damaged file fails
the load with one line naming it (``CheckpointLoadError``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from scaletrain.config import CheckpointSection
from scaletrain.distributed import DistInfo
from scaletrain.engines.base import Engine
from scaletrain.common.hashed_io import file_hash, forget_written, recorded_algo, set_write_hashing, take_written
from scaletrain.common.safe_load import CheckpointLoadError, raise_agreed, read_json, read_safetensors

_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    complete: bool
    meta: dict
    # why a committed folder cannot be used (its meta.json unreadable); such a folder is
    # neither loaded nor deleted as a stale partial: it is reported and kept for inspection
    error: str | None = None

    @property
    def engine_format(self) -> str:
        """How the engine's state is stored, read from the files: "zero" (DeepSpeed's ZeRO files
        under engine/zero/) or "dcp" (torch distributed checkpoint, engine/.metadata)."""
        return "zero" if (self.path / "engine" / "zero").is_dir() else "dcp"

    @property
    def size_bytes(self) -> int:
        # Walked on demand (only `ckpt ls` needs it), not on every save/prune/load.
        return _dir_size(self.path)


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def list_checkpoints(ckpt_dir: Path) -> list[CheckpointInfo]:
    """Every checkpoint folder, committed or partial, sorted by step."""
    out = []
    if not ckpt_dir.is_dir():
        return out
    for d in ckpt_dir.iterdir():
        name = d.name.removesuffix(".partial")
        m = _STEP_DIR.match(name)
        if not m or not d.is_dir():
            continue
        meta_file = d / "meta.json"
        complete = not d.name.endswith(".partial") and meta_file.is_file()
        meta, error = {}, None
        if meta_file.is_file():
            try:
                meta = read_json(meta_file)
            except CheckpointLoadError as e:
                complete, error = False, str(e)
        out.append(CheckpointInfo(d, int(m.group(1)), complete, meta, error))
    return sorted(out, key=lambda c: (c.step, c.complete))


def latest_checkpoint(ckpt_dir: Path) -> CheckpointInfo | None:
    complete = [c for c in list_checkpoints(ckpt_dir) if c.complete]
    return complete[-1] if complete else None


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


_DELETING = ".deleting"  # suffix of a pruned checkpoint folder being removed


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank (raised on every rank together); the message is one line."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step  # the step whose checkpoint failed (an async one: an earlier step)


def _attempt(fn) -> str | None:
    """Run ``fn``; a filesystem failure becomes its one-line description (None on success).
    DCP wraps a rank's write error in its own exception, raised on every rank together."""
    try:
        fn()
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - DCP's CheckpointException and DeepSpeed's wrappers
        if _has_oserror(e):
            return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        raise
    return None


def _has_oserror(e: BaseException) -> bool:
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) or "No space left" in str(e) or "OSError" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


class CheckpointManager:
    def __init__(self, cfg: CheckpointSection, run_dir: Path, engine: Engine, dist_info: DistInfo, extra_states: dict | None = None) -> None:
        self.cfg = cfg  # the `checkpoint` config section
        self.dir = Path(cfg.dir) if cfg.dir else run_dir / "checkpoints"
        self.engine, self.dist = engine, dist_info
        # Other state that must survive a restart, each in its own DCP folder <ckpt>/<name>/ on
        # every engine (e.g. "ema": train.ema.ShardedEMA). Each has collective save(path) and
        # load(path | None); None = this checkpoint predates it.
        self.extra_states = dict(extra_states or {})
        self._last_save_time = time.monotonic()
        self._last_size: int | None = None  # bytes of the last committed checkpoint (free-space check)
        self._pending = None
        self._pruner: threading.Thread | None = None
        self.last_checksums: dict[str, int] = {}  # the last commit's checksum counts (``_checksums``)
        # Async writes run their collectives from a background thread: give them their own
        # gloo group so they never interleave with the training loop's collectives.
        self._async_group = dist.new_group(backend="gloo") if cfg.async_save and dist.is_initialized() else None
        if dist_info.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            # A .partial folder is a save that never committed (crash, kill): never loadable.
            for c in list_checkpoints(self.dir):
                if not c.complete and c.error is None:
                    shutil.rmtree(c.path, ignore_errors=True)
            for leftover in self.dir.glob(f"step-*{_DELETING}"):  # a prune cut short by a kill
                shutil.rmtree(leftover, ignore_errors=True)
        _barrier()

    # ------------------------------------------------------------------ policy

    def due(self, step: int, *, stage_end: bool) -> bool:
        """Whether to save after ``step``. Callers pass the same values on every rank; the
        time-based rule is decided from rank 0's clock by the trainer's per-step all-reduce."""
        c = self.cfg
        if stage_end and c.at_stage_end:
            return True
        if c.every_steps and step % c.every_steps == 0:
            return True
        return bool(c.keep_every and step % c.keep_every == 0)

    def minutes_due(self) -> bool:
        return bool(self.cfg.every_minutes) and (time.monotonic() - self._last_save_time) >= 60 * self.cfg.every_minutes

    # ------------------------------------------------------------------ save / load

    def save(self, step: int, trainer_state: dict, rank_state: dict | None = None) -> list[dict]:
        """Collective. Returns records for the metrics log (timings of this and earlier saves).

        Synchronous: returns once the checkpoint is committed. Async (checkpoint.async_save on
        an engine that supports it): returns once the state is staged in CPU memory; the
        write goes on in a background thread and commits at the next save or ``finalize``.

        A save that cannot complete -- too little free space for a checkpoint the size of the
        last one, or an ``OSError`` (ENOSPC, EIO, a permission) on any rank while writing or
        committing -- raises ``CheckpointSaveError`` on every rank together, after its
        ``.partial`` folder is removed; the previous checkpoints are untouched. Each phase ends
        in an agreement (a small all-gather that also serves as the barrier), so a rank that
        failed never leaves the others waiting in a collective.
        """
        records = self.finalize()  # the caller finalizes first (Trainer.save_checkpoint): a failed
        # earlier async write is reported on its own, and this save still runs
        t0 = time.perf_counter()
        final = self.dir / f"step-{step:08d}"
        tmp = final.with_name(final.name + ".partial")
        error = None
        if self.dist.is_main:
            self.join_prune()  # the room it frees counts in the space check
            error = self._space_error()
            if error is None:
                error = _attempt(lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True)))
        forget_written(tmp)  # records of an earlier, failed save into the same folder
        set_write_hashing(self.cfg.checksums)  # the engine's and EMA's writers hash only if recorded
        self._agree(error, step, tmp)
        self._agree(_attempt(lambda: self._write_small(tmp, trainer_state, rank_state)), step, tmp)
        # Extra states are written synchronously, also when the engine's write is async: a
        # second async DCP write would need its own process group to stay ordered. The EMA is
        # 1/world of the fp32 weights per rank, a third of what the weights + AdamW moments write.
        for name, state in self.extra_states.items():
            self._agree(_attempt(lambda: state.save(tmp / name)), step, tmp)
        future = None
        if self._async_group is not None:
            box: list = []
            self._agree(_attempt(lambda: box.append(self.engine.async_save_state(tmp / "engine", self._async_group))),
                        step, tmp)
            future = box[0] if box else None
        if future is None:
            self._agree(_attempt(lambda: self.engine.save_state(tmp / "engine")), step, tmp)
            _test_stall(step)
            self._commit(tmp, final, step, trainer_state)
            records.append({"checkpoint_step": step, "checkpoint_seconds": time.perf_counter() - t0,
                            **self.last_checksums})
            return records
        done_at: list[float] = []
        future.add_done_callback(lambda _: done_at.append(time.perf_counter()))
        self.engine.pop_staging_wait()
        self._pending = (future, done_at, t0, time.perf_counter() - t0, tmp, final, step, trainer_state)
        records.append({"checkpoint_step": step})
        return records

    def _write_small(self, tmp: Path, trainer_state: dict, rank_state: dict | None) -> None:
        save_file(_rng_state(self.dist.device), str(tmp / f"rng-rank{self.dist.rank}.safetensors"))
        if rank_state is not None:  # this rank's own counters (its data stream position)
            (tmp / f"state-rank{self.dist.rank}.json").write_text(json.dumps(rank_state))
        if self.dist.is_main:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))

    def _space_error(self) -> str | None:
        """Rank 0, before a save: the free space must hold another checkpoint the size of the
        last one (or, before the first, the engine's fp32 weights + AdamW moments + EMA)."""
        if self._last_size is None:
            last = latest_checkpoint(self.dir)
            self._last_size = _dir_size(last.path) if last is not None else None
        numel = getattr(self.engine, "full_param_numel", lambda: 0)()
        need = self._last_size or numel * 16
        try:
            free = shutil.disk_usage(self.dir).free
        except OSError as e:
            return f"cannot read the free space of {self.dir}: {e}"
        if free < need:
            return (f"{free / 2**20:.1f} MiB free under {self.dir} but a checkpoint needs about "
                    f"{need / 2**20:.1f} MiB (the size of the last one); free space or lower checkpoint.keep_last")
        return None

    def _agree(self, error: str | None, step: int, tmp: Path) -> None:
        """Collective, on every rank at the same point: if any rank failed, remove the partial
        folder and raise ``CheckpointSaveError`` everywhere (rank 0's message first)."""
        errors: list = [None] * self.dist.world_size
        if dist.is_initialized() and self.dist.world_size > 1:
            dist.all_gather_object(errors, error)
        else:
            errors = [error]
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if not failed:
            return
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        rank, why = failed[0]
        raise CheckpointSaveError(f"checkpoint at step {step} failed on rank {rank}: {why}; removed {tmp.name}", step)

    def finalize(self) -> list[dict]:
        """Collective. Wait for a pending async write and commit it (no-op when none)."""
        if self._pending is None:
            return []
        future, done_at, t0, call_seconds, tmp, final, step, trainer_state = self._pending
        self._pending = None
        # The stall is what training waited for: the save call, plus any wait for the staging
        # copy before the next optimizer step (the engine times it).
        stall = call_seconds + self.engine.pop_staging_wait()
        # A failed background write (re-raised by result()) is agreed like a synchronous one.
        # Waiting here is time the write took beyond the save interval: reported on its own.
        t_wait = time.perf_counter()
        self._agree(_attempt(future.result), step, tmp)
        write_seconds = (done_at[0] if done_at else time.perf_counter()) - t0
        behind = max(0.0, (done_at[0] if done_at else time.perf_counter()) - t_wait)
        _test_stall(step)
        self._commit(tmp, final, step, trainer_state)
        return [{"checkpoint_committed_step": step, "checkpoint_stall_seconds": stall,
                 "checkpoint_write_seconds": write_seconds, "checkpoint_write_behind_seconds": behind,
                 **self.last_checksums}]

    def _commit(self, tmp: Path, final: Path, step: int, trainer_state: dict) -> None:
        # Durable before visible: a rename can reach the disk before the data it names, so a
        # power loss could leave a "complete" checkpoint of empty files. Every rank flushes what
        # is in the folder (its own files among them: on a shared filesystem only the writer's
        # fsync counts; a clean file's fsync costs a syscall), then meta.json, then the rename,
        # then the parent folder.
        # Every file is written (the write was agreed). The engine's and the EMA's writers hashed
        # their files as they wrote them (common.hashed_io): those hashes are gathered, and only
        # the files nobody hashed (RNG and trainer state, a few KB) are read back, each rank its
        # share, beside the fsync. Reading everything back cost +9 to +14 % of a 1.4 GB save
        # (benchmarks/results/cpu_checkpoint_checksums.md).
        hashing = None
        if self.cfg.checksums:
            known = self._gather_written(tmp)
            hashing = _Background(lambda: (known, file_checksums(tmp, self.dist.rank, self.dist.world_size, known)))
        self._agree(_attempt(lambda: _fsync_tree(tmp)), step, tmp)  # every rank's shards are on disk
        files = self._checksums(hashing, step, tmp) if hashing is not None else None
        error = None
        if self.dist.is_main:
            meta = {"step": step, "engine": self.engine.name, "world_size": self.dist.world_size,
                    "stage": trainer_state.get("stage"), "preset": trainer_state.get("preset"),
                    "time": time.time()}
            if files is not None:
                meta["files"] = files

            def publish() -> None:
                _write_durably(tmp / "meta.json", json.dumps(meta))
                _fsync_dir(tmp)
                if final.exists():  # re-saving the same step (e.g. stage end == interval)
                    shutil.rmtree(final)
                os.rename(tmp, final)
                _fsync_dir(self.dir)

            error = _attempt(publish)
            if error is None:
                self._last_size = _dir_size(final)
                self._prune()
        self._agree(error, step, tmp)
        self._last_save_time = time.monotonic()

    def _gather_written(self, folder: Path) -> dict[str, list]:
        """Collective: {relative path: [size, hash]} of the files under ``folder`` that any rank
        hashed as it wrote them."""
        mine = take_written(folder)
        parts = [mine]
        if self.dist.world_size > 1:
            parts = [None] * self.dist.world_size
            dist.all_gather_object(parts, mine)  # between this job's own ranks
        return {k: v for part in parts for k, v in part.items()}

    def _checksums(self, hashing: "_Background", step: int, folder: Path) -> dict[str, list]:
        """Collective: {relative path: [size, hash]} of every file in ``folder``: those hashed as
        written, plus the rest, each rank having read back its share (``hashing``); every rank
        gets the whole map. Counts both kinds in ``last_checksums`` (bytes hashed as written,
        bytes read back), which the save's metrics record carries."""
        known: dict[str, list] = {}
        mine: dict[str, list] = {}

        def take() -> None:
            k, m = hashing.result()
            known.update(k)
            mine.update(m)

        self._agree(_attempt(take), step, folder)
        parts = [mine]
        if self.dist.world_size > 1:
            parts = [None] * self.dist.world_size
            dist.all_gather_object(parts, mine)  # between this job's own ranks
        read_back = {k: v for part in parts for k, v in part.items()}
        self.last_checksums = {"checksum_written_files": len(known),
                               "checksum_written_bytes": sum(v[0] for v in known.values()),
                               "checksum_read_back_files": len(read_back),
                               "checksum_read_back_bytes": sum(v[0] for v in read_back.values())}
        return dict(sorted({**known, **read_back}.items()))

    def load_latest(self, report=None) -> dict | None:
        """Collective. Loads the newest complete checkpoint that loads into the engine and RNG;
        returns the trainer state (None when there is nothing to resume).

        Self-healing: a checkpoint whose meta.json is unreadable, or whose load fails
        (``CheckpointLoadError``: a damaged or refused file, agreed across ranks), is
        reported in one line (``report``, on rank 0) and the previous complete one is tried;
        nothing is deleted. When checkpoints exist but none loads, raises
        ``CheckpointLoadError`` listing each one's failure: never a silent fresh start."""
        if self.cfg.resume == "never":
            return None
        report = report or (lambda line: print(line, file=sys.stderr, flush=True))
        found = list_checkpoints(self.dir)
        failures = [c.error for c in found if c.error is not None]  # each names its meta.json
        for line in failures:
            if self.dist.is_main:
                report(f"scaletrain: skipping checkpoint {line}")
        for info in reversed([c for c in found if c.complete]):
            try:
                return self.load(info)
            except CheckpointLoadError as e:
                failures.append(str(e))
                if self.dist.is_main:
                    report(f"scaletrain: skipping checkpoint {info.path} (trying the previous one): {e}")
        if failures:
            raise CheckpointLoadError(f"no checkpoint under {self.dir} loads ({len(failures)} tried): "
                                      + " | ".join(failures))
        return None

    def load_step(self, step: int) -> dict:
        """Collective. Load the committed checkpoint of ``step`` (the health guard's rollback),
        whatever ``checkpoint.resume`` says."""
        found = [c for c in list_checkpoints(self.dir) if c.complete and c.step == step]
        if not found:
            raise FileNotFoundError(f"no complete checkpoint for step {step} under {self.dir}")
        return self.load(found[0])

    def load(self, info: CheckpointInfo) -> dict:
        """Collective. Load one checkpoint into the engine, extra states and RNG; returns the
        trainer state. A file that is refused or unreadable on any rank raises
        ``CheckpointLoadError`` on every rank (one line naming the file)."""
        rng_file = info.path / f"rng-rank{self.dist.rank}.safetensors"
        # At another world size a rank may have no RNG file of its own; rank-local RNG only
        # drives dropout-like noise inside models, never the objective's noise (keyed per sample).
        rank_file = info.path / f"state-rank{self.dist.rank}.json"
        rng, rank_state, error = None, {}, None
        try:  # the checksums and the small files first, agreed across ranks, before any collective load
            if self.cfg.checksums:
                verify_checksums(info, self.dist.rank, self.dist.world_size)
            state = read_json(info.path / "trainer_state.json")
            if rng_file.is_file() and info.meta.get("world_size") == self.dist.world_size:
                rng = read_safetensors(rng_file)
            if rank_file.is_file() and info.meta.get("world_size") == self.dist.world_size:
                rank_state = read_json(rank_file)
            elif isinstance(info.meta.get("world_size"), int) and info.meta["world_size"] != self.dist.world_size:
                # another world size: every old rank's counters (data/reslot.py re-splits the stream)
                olds = [info.path / f"state-rank{r}.json" for r in range(info.meta["world_size"])]
                state["_old_rank_states"] = [read_json(f) if f.is_file() else None for f in olds]
        except CheckpointLoadError as e:
            error = e
        raise_agreed(error)
        self.engine.load_state(info.path / "engine")
        for name, extra in self.extra_states.items():
            extra.load(info.path / name if (info.path / name).is_dir() else None)
        if rng is not None:
            _set_rng_state(rng, self.dist.device)
        state["_rank_state"] = rank_state  # {} at another world size: rank-local state does not carry over
        state["_resumed_from"] = str(info.path)
        state["_resumed_world_size"] = info.meta.get("world_size")
        return state

    def _prune(self) -> None:
        """Keep the last K committed checkpoints, plus every keep_every-th step forever.

        Each old folder is renamed to ``<name>.deleting`` (atomic: it stops being a checkpoint
        at once) and removed in a background thread: unlinking a GB-sized checkpoint takes a
        noticeable part of a save, and training need not wait for it. The next save (whose
        free-space check needs the room) joins the thread; a start-up removes leftovers."""
        complete = [c for c in list_checkpoints(self.dir) if c.complete]
        keep_every = self.cfg.keep_every
        doomed = []
        for c in complete[: max(0, len(complete) - self.cfg.keep_last)]:
            if not (keep_every and c.step % keep_every == 0):
                target = c.path.with_name(c.path.name + _DELETING)
                try:
                    os.rename(c.path, target)
                except OSError:
                    continue  # removed by hand meanwhile; the next prune sees it again otherwise
                doomed.append(target)
        if doomed:
            self._pruner = threading.Thread(target=lambda: [shutil.rmtree(p, ignore_errors=True) for p in doomed],
                                            name="scaletrain-prune")
            self._pruner.start()

    def join_prune(self) -> None:
        if self._pruner is not None:
            self._pruner.join()
            self._pruner = None


def _test_stall(step: int) -> None:
    """Test hook for the kill-mid-save fault tests: SCALETRAIN_TEST_SAVE_STALL="STEP:SECONDS"
    holds the save of STEP open (shards written, not yet committed; for an async save, when it
    is about to commit) so a test can kill a rank inside it deterministically. Unset in normal
    runs."""
    spec = os.environ.get("SCALETRAIN_TEST_SAVE_STALL")
    if spec:
        at, _, seconds = spec.partition(":")
        if int(at) == step:
            time.sleep(float(seconds))


class _Background:
    """A function run in a thread; ``result()`` joins it and returns its value or raises its error."""

    def __init__(self, fn) -> None:
        self._value, self._error = None, None

        def run() -> None:
            try:
                self._value = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in result()
                self._error = e

        self._thread = threading.Thread(target=run, name="scaletrain-checksums", daemon=True)
        self._thread.start()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def _share(folder: Path, rank: int, world: int, known=()) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "meta.json"
                   and p.relative_to(folder).as_posix() not in known)
    return files[rank::world]


def file_checksums(folder: Path, rank: int = 0, world: int = 1, known=()) -> dict[str, list]:
    """{relative path: [size, "xxh3_64:<hex>"]} of this rank's share of ``folder``'s files (all of
    them at world 1), read back from disk; meta.json and the relative paths in ``known`` (hashed
    as they were written) aside. ``common.hashed_io`` says why XXH3."""
    return {p.relative_to(folder).as_posix(): [p.stat().st_size, file_hash(p)]
            for p in _share(folder, rank, world, known)}


def verify_checksums(info: CheckpointInfo, rank: int = 0, world: int = 1) -> None:
    """Raise ``CheckpointLoadError`` (one line naming the file) when a file of this rank's share
    does not match its recorded size and hash (XXH3-64, or CRC-32 in checkpoints of the first
    checksummed version), or a recorded file is gone. No-op for a checkpoint saved without them."""
    recorded = info.meta.get("files")
    if not isinstance(recorded, dict):
        return
    names = sorted(recorded)
    for name in names[rank::world]:
        path = info.path / name
        size, digest = recorded[name]
        if not path.is_file():
            raise CheckpointLoadError(f"{path} is missing (meta.json records it)")
        if path.stat().st_size != size:
            raise CheckpointLoadError(f"{path} has {path.stat().st_size} bytes, meta.json recorded {size}")
        got = file_hash(path, recorded_algo(digest))
        if got != digest:
            raise CheckpointLoadError(f"{path} fails its checksum ({got}, meta.json recorded {digest}): the file "
                                      "changed after it was saved")


def _fsync_tree(path: Path) -> None:
    """fsync every file under ``path``, then every folder, deepest first."""
    entries = sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for p in entries:
        if p.is_file() and not p.is_symlink():
            _fsync_file(p)
    for p in entries + [path]:
        if p.is_dir() and not p.is_symlink():
            _fsync_dir(p)


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
