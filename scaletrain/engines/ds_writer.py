"""The writer DeepSpeed's ``save_checkpoint`` uses, replaced (``engine.checkpoint_engine``).

DeepSpeed's own ``TorchCheckpointEngine`` calls ``torch.save`` and lets an ``OSError`` escape:
a rank whose disk fills mid-save raises while the other ranks wait in DeepSpeed's closing
barrier until the launcher kills them. This writer keeps DeepSpeed's file layout and its
planning (which state goes to which file) and changes only how each file is written:

- a failure is recorded, not raised, so every rank reaches DeepSpeed's barriers; the engine
  raises the first recorded error after ``save_checkpoint`` returns, and the checkpoint
  manager agrees on it across ranks like any other failed save;
- every file is fsynced when written (the manager's commit then finds clean files) and hashed
  as it is written (the checkpoint's checksums, ``common.hashed_io``: nothing is read back);
- ``background=True`` (``checkpoint.async_save``): ``save`` returns at once; one worker
  thread copies the state to CPU memory (DCP's stager, which keeps shared storages shared
  and reuses its buffers between saves), signals that the copy is done, then writes. The
  engine waits for the copy only before the next optimizer step changes the state.

DeepSpeed has writers of its own for this (``FastCheckpointEngine`` and the decoupled one),
but they need its ``async_io`` op (libaio) and a CUDA device; this one is plain Python I/O
and works wherever ``torch.save`` does, CPU included.
"""

from __future__ import annotations

import errno
import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from scaletrain.common.hashed_io import HashingStream, hashing_stream


def _test_write_error(path: str) -> None:
    """Test hook for the one-rank write-failure test: SCALETRAIN_TEST_WRITE_ERROR="RANK:TEXT"
    makes that rank's write of any file whose path contains TEXT fail with ENOSPC, as a disk
    filling up under one rank does. Unset in normal runs."""
    spec = os.environ.get("SCALETRAIN_TEST_WRITE_ERROR")
    if spec:
        rank, _, text = spec.partition(":")
        if int(rank) == int(os.environ.get("RANK", "0")) and text in str(path):
            raise OSError(errno.ENOSPC, "No space left on device (SCALETRAIN_TEST_WRITE_ERROR)", str(path))


def _write_file(state_dict, path: str) -> None:
    _test_write_error(path)
    with open(path, "wb") as raw:
        f = hashing_stream(raw, path)  # the checkpoint's checksum of this file, taken as written
        torch.save(state_dict, f)
        f.flush()
        os.fsync(f.fileno())
    if isinstance(f, HashingStream):
        f.settle()


def _describe(e: OSError, path: str) -> str:
    return f"{type(e).__name__}: {e}" if str(path) in str(e) else f"{type(e).__name__}: {e} (writing {path})"


class RecordingCheckpointEngine(TorchCheckpointEngine):
    """Loads like DeepSpeed's (``torch.load``, which scaletrain runs weights-only); saves as above."""

    def __init__(self, background: bool = False, nice: int = 0) -> None:
        super().__init__(None)
        self.nice = nice  # the background thread's niceness (checkpoint.async_nice)
        self.threads_lowered = [0]  # counted by the thread itself when it lowered its priority
        self.name = "ScaletrainCheckpointEngine"
        self.background = background  # set per save by the engine
        self.errors: list[str] = []
        self._executor: ThreadPoolExecutor | None = None
        self._stager = None
        self._last_staged: Future | None = None

    def makedirs(self, path, exist_ok=False):
        try:
            os.makedirs(path, exist_ok=exist_ok)
        except OSError as e:
            self.errors.append(_describe(e, path))

    def save(self, state_dict, path: str):
        if self.errors:
            return  # this save already failed here: write nothing more
        if not self.background:
            try:
                _write_file(state_dict, path)
            except OSError as e:
                self.errors.append(_describe(e, path))
            return
        staged: Future = Future()
        if self._executor is None:
            from scaletrain.engines.base import lower_thread_priority

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ds-ckpt",
                                                initializer=lower_thread_priority,
                                                initargs=(self.nice, self.threads_lowered))
        self._executor.submit(self._stage_and_write, state_dict, path, staged)
        self._last_staged = staged

    def _stage_and_write(self, state_dict, path: str, staged: Future) -> None:
        try:
            if self._stager is None:
                from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

                self._stager = DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(),
                                                            use_shared_memory=False, use_async_staging=False,
                                                            use_non_blocking_copy=False))
            copy = self._stager.stage(state_dict)
        except Exception as e:  # noqa: BLE001 - reported by finish(), like a write error
            self.errors.append(f"{type(e).__name__}: {e} (staging {path})")
            return
        finally:
            staged.set_result(None)  # the training thread may change the state from here on
        del state_dict
        if self.errors:
            return
        try:
            _write_file(copy, path)
        except OSError as e:
            self.errors.append(_describe(e, path))

    def staged(self) -> Future | None:
        """Done when every state handed to ``save`` so far is copied (the worker runs in order)."""
        staged, self._last_staged = self._last_staged, None
        return staged

    def finish(self) -> Future:
        """A future that completes when every queued write has, raising the first error."""
        done: Future = Future()

        def settle() -> None:
            errors, self.errors = self.errors, []
            if errors:
                done.set_exception(OSError(errors[0]))
            else:
                done.set_result(None)

        if self._executor is None:
            settle()
        else:
            self._executor.submit(settle)
        return done

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._stager is not None:
            self._stager.close()
            self._stager = None
