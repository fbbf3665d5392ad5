"""The shared half of the FSDP2 and DDP engines: a torch AdamW step and DCP state.

``get_state_dict`` gives the model and optimizer state with the same fully-qualified names
whether the module is FSDP2-sharded, DDP-wrapped or plain, so a checkpoint written by one
engine or world size loads into another: DCP reshards on load.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Future
from pathlib import Path

import torch.distributed.checkpoint as dcp
import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from scaletrain.common.hashed_io import HashingFileSystemWriter
from scaletrain.common.safe_load import load_dcp
from scaletrain.engines.base import (Engine, LocalShard, StepStats, clip_with_norm, lower_new_threads, norm_value,
                                      replicated_param_shards, set_lr, total_grad_norm, world_mesh)


def dcp_writer(path: Path, threads: int) -> FileSystemWriter:
    """DCP's file writer: each rank's items split over ``threads`` files written in parallel
    (per-tensor serialization is CPU work that overlaps the disk writes), each fsynced, each
    hashed as it is written for the checkpoint's checksums (``common.hashed_io``)."""
    return HashingFileSystemWriter(str(path), thread_count=threads, sync_files=True)


def save_dcp_state(module: nn.Module, optimizer, path: Path, extra: dict | None = None, threads: int = 1) -> None:
    model_sd, optim_sd = get_state_dict(module, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, **(extra or {})}, storage_writer=dcp_writer(path, threads))


def dcp_stager() -> DefaultStager:
    """DCP's stager, kept for the run: it copies the state to CPU in its own thread (pinned and
    on a side stream with CUDA) and reuses its buffers from one save to the next, so a save
    neither allocates nor blocks the training thread; the caller waits for the copy only
    before it next changes the state (``Engine.wait_staged``)."""
    cuda = torch.cuda.is_available()
    return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                        use_async_staging=True, use_non_blocking_copy=cuda))


def async_save_dcp_state(module: nn.Module, optimizer, path: Path, process_group, stager: DefaultStager,
                         extra: dict | None = None, threads: int = 1) -> tuple[Future, Future]:
    """(staging future, write future). Staging copies to CPU in the stager's thread; the write
    follows in DCP's background thread. ``process_group`` must be a separate gloo group: the
    background thread's collectives must not interleave with the training loop's."""
    model_sd, optim_sd = get_state_dict(module, optimizer)
    response = dcp.async_save({"model": model_sd, "optim": optim_sd, **(extra or {})},
                              storage_writer=dcp_writer(path, threads), process_group=process_group,
                              async_stager=stager)
    return response.staging_completion, response.upload_completion


def load_dcp_state(module: nn.Module, optimizer, path: Path, extra: dict | None = None) -> dict:
    """Load model + optimizer (+ ``extra`` entries, e.g. the fp16 loss scaler, filled in place
    and returned)."""
    # The current state is the template: DCP fills it in place, each rank reading its shards.
    model_sd, optim_sd = get_state_dict(module, optimizer)
    state = {"model": model_sd, "optim": optim_sd, **(extra or {})}
    load_dcp(state, path)  # restricted readers: DCP's own would unpickle .metadata freely
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return state


class TorchOptimizerEngine(Engine):
    """Backward, step and checkpoint state for engines that own a torch optimizer.

    Subclasses set ``self.module`` (what the trainer calls), ``self.optimizer`` and
    ``self.state_module`` (the module whose state dict is saved: the FSDP2 root, or the
    module inside the DDP wrapper, so both engines write the same key names).
    """

    optimizer: torch.optim.Optimizer
    state_module: nn.Module
    # fp16: torch's dynamic loss scaler (GradScaler for DDP, ShardedGradScaler for FSDP2, whose
    # unscale_ agrees on an overflow across ranks); None in fp32/bf16, which need no scaling.
    scaler: torch.amp.GradScaler | None = None

    @property
    def dynamic_loss_scale(self) -> bool:
        return self.scaler is not None

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss * self.grad_scale / self.grad_accum
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    _pending_norm: tuple[torch.Tensor, float] | None = None  # grad_norm() result, used by step()

    def grad_norm(self) -> float:
        # FSDP2: the norm of the sharded grads is all-reduced over the mesh; DDP: grads are
        # already all-reduced. Either way every rank holds the same value. fp16: of the
        # unscaled gradients (unscale_ once per step; inf when the scaled ones overflowed).
        if self.scaler is not None and self._pending_norm is None:
            self.scaler.unscale_(self.optimizer)
        norm = total_grad_norm(list(self.module.parameters()))
        self._pending_norm = (norm, norm_value(norm))
        return self._pending_norm[1]

    def step(self, lr: float) -> StepStats:
        self.wait_staged()
        if self._pending_norm is None:
            self.grad_norm()
        (norm, value), self._pending_norm = self._pending_norm, None
        set_lr(self.optimizer, lr)
        clip_with_norm(list(self.module.parameters()), self.cfg.optim.grad_clip, norm)
        skipped, scale = False, None
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when unscale_ found an inf/NaN gradient
            skipped = not math.isfinite(value)
            self.scaler.update()  # halves the scale after an overflow, grows it after a clean stretch
            scale = float(self.scaler.get_scale())
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(grad_norm=value, lr=lr, skipped=skipped, loss_scale=scale)

    def skip_step(self, lr: float) -> StepStats:
        # No optimizer.step(): AdamW's moments and step count stay as they were.
        self.wait_staged()
        value = self._pending_norm[1] if self._pending_norm is not None else self.grad_norm()
        self._pending_norm = None
        self.optimizer.zero_grad(set_to_none=True)
        scale = None
        if self.scaler is not None:  # close the scaler's step (its unscale_ ran in grad_norm)
            self.scaler.update()
            scale = float(self.scaler.get_scale())
        return StepStats(grad_norm=value, lr=lr, skipped=True, loss_scale=scale)

    def _extra_state(self) -> dict:
        # The loss scale resumes where it was (a fresh 2^16 would overflow again for a few steps).
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def save_state(self, path: Path) -> None:
        save_dcp_state(self.state_module, self.optimizer, path, self._extra_state(), self._writer_threads())

    _stager: DefaultStager | None = None

    def _writer_threads(self) -> int:
        return self.cfg.checkpoint.writer_threads

    def async_save_state(self, path: Path, process_group) -> Future:
        if self._stager is None:
            self._stager = dcp_stager()
        before = {t.native_id for t in threading.enumerate()}
        staged, written = async_save_dcp_state(self.state_module, self.optimizer, path, process_group,
                                               self._stager, self._extra_state(), self._writer_threads())
        # The stager's and DCP's executor threads (started by the call above) yield the cores
        # to training (checkpoint.async_nice); the stager's keeps that for later saves.
        self.background_threads_lowered += lower_new_threads(before, self.cfg.checkpoint.async_nice)
        self.hold_until_staged(staged)
        return written

    def load_state(self, path: Path) -> None:
        self.wait_staged()
        extra = load_dcp_state(self.state_module, self.optimizer, path, self._extra_state())
        if self.scaler is not None:
            self.scaler.load_state_dict(extra["scaler"])

    def unwrapped_parameters(self) -> list[nn.Parameter]:
        return list(self.state_module.parameters())

    def local_param_shards(self, release_gathered: bool = False) -> list[LocalShard]:
        # DDP (and one process): every rank holds whole parameters; each keeps its dim-0 chunk.
        params = list(self.state_module.named_parameters())
        mesh = world_mesh(self, params[0][1].device.type)
        return replicated_param_shards(params, mesh)

    def close(self) -> None:
        super().close()  # waits for a staging copy first
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        self.state_module = None
