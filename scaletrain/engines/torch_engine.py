"""The shared half of the FSDP2 and DDP engines: a torch AdamW step and DCP state.

``get_state_dict`` gives the model and optimizer state with the same fully-qualified names
whether the module is FSDP2-sharded, DDP-wrapped or plain, so a checkpoint written by one
engine or world size loads into another: DCP reshards on load.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import torch.distributed.checkpoint as dcp
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from scaletrain.checkpoint.safe_load import load_dcp
from scaletrain.engines.base import (Engine, LocalShard, StepStats, clip_with_norm, norm_value,
                                      replicated_param_shards, set_lr, total_grad_norm, world_mesh)


def save_dcp_state(module: nn.Module, optimizer, path: Path) -> None:
    model_sd, optim_sd = get_state_dict(module, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def async_save_dcp_state(module: nn.Module, optimizer, path: Path, process_group) -> Future:
    """Stage to CPU now (the caller may step the optimizer as soon as this returns), write in
    a background thread. ``process_group`` must be a separate gloo group: the background
    thread's collectives must not interleave with the training loop's on the default group."""
    model_sd, optim_sd = get_state_dict(module, optimizer)
    return dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path),
                          process_group=process_group)


def load_dcp_state(module: nn.Module, optimizer, path: Path) -> None:
    # The current state is the template: DCP fills it in place, each rank reading its shards.
    model_sd, optim_sd = get_state_dict(module, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    load_dcp(state, path)  # restricted readers: DCP's own would unpickle .metadata freely
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


class TorchOptimizerEngine(Engine):
    """Backward, step and checkpoint state for engines that own a torch optimizer.

    Subclasses set ``self.module`` (what the trainer calls), ``self.optimizer`` and
    ``self.state_module`` (the module whose state dict is saved: the FSDP2 root, or the
    module inside the DDP wrapper, so both engines write the same key names).
    """

    optimizer: torch.optim.Optimizer
    state_module: nn.Module

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    _pending_norm: tuple[torch.Tensor, float] | None = None  # grad_norm() result, used by step()

    def grad_norm(self) -> float:
        # FSDP2: the norm of the sharded grads is all-reduced over the mesh; DDP: grads are
        # already all-reduced. Either way every rank holds the same value.
        norm = total_grad_norm(list(self.module.parameters()))
        self._pending_norm = (norm, norm_value(norm))
        return self._pending_norm[1]

    def step(self, lr: float) -> StepStats:
        if self._pending_norm is None:
            self.grad_norm()
        (norm, value), self._pending_norm = self._pending_norm, None
        set_lr(self.optimizer, lr)
        clip_with_norm(list(self.module.parameters()), self.cfg.optim.grad_clip, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(grad_norm=value, lr=lr)

    def skip_step(self, lr: float) -> StepStats:
        # No optimizer.step(): AdamW's moments and step count stay as they were.
        value = self._pending_norm[1] if self._pending_norm is not None else self.grad_norm()
        self._pending_norm = None
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(grad_norm=value, lr=lr, skipped=True)

    def save_state(self, path: Path) -> None:
        save_dcp_state(self.state_module, self.optimizer, path)

    def async_save_state(self, path: Path, process_group) -> Future:
        return async_save_dcp_state(self.state_module, self.optimizer, path, process_group)

    def load_state(self, path: Path) -> None:
        load_dcp_state(self.state_module, self.optimizer, path)

    def unwrapped_parameters(self) -> list[nn.Parameter]:
        return list(self.state_module.parameters())

    def local_param_shards(self, release_gathered: bool = False) -> list[LocalShard]:
        # DDP (and one process): every rank holds whole parameters; each keeps its dim-0 chunk.
        params = list(self.state_module.named_parameters())
        mesh = world_mesh(self, params[0][1].device.type)
        return replicated_param_shards(params, mesh)

    def close(self) -> None:
        self.state_module = None
        super().close()
