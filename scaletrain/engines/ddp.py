"""DDP engine: the replicated baseline every sharded engine is compared against."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scaletrain.engines.dcp_state import async_save_dcp_state, load_dcp_state, save_dcp_state
from scaletrain.engines.base import Engine, StepStats, build_adamw, clip_and_norm, set_lr


class DDPEngine(Engine):
    name = "ddp"

    def __init__(self, denoiser: nn.Module, cfg, dist_info) -> None:
        super().__init__()
        self.cfg = cfg
        self.device_type = dist_info.device.type
        ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        self.module = DistributedDataParallel(denoiser, device_ids=ids)
        self.optimizer = build_adamw(self.module.parameters(), cfg.optim)

    def _sync_context(self, is_last: bool) -> contextlib.AbstractContextManager:
        # no_sync must wrap the forward too: DDP decides in forward whether to all-reduce.
        return contextlib.nullcontext() if is_last else self.module.no_sync()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.engine.precision == "bf16":
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self, lr: float) -> StepStats:
        set_lr(self.optimizer, lr)
        norm = clip_and_norm(list(self.module.parameters()), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(grad_norm=norm, lr=lr)

    def local_param_numel(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def save_state(self, path: Path) -> None:
        save_dcp_state(self.module.module, self.optimizer, path)

    def async_save_state(self, path: Path, process_group):
        return async_save_dcp_state(self.module.module, self.optimizer, path, process_group)

    def load_state(self, path: Path) -> None:
        load_dcp_state(self.module.module, self.optimizer, path)

    def unwrapped_parameters(self) -> list[nn.Parameter]:
        return list(self.module.module.parameters())
