"""DDP engine: the replicated baseline every sharded engine is compared against."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scaletrain.engines.base import build_adamw
from scaletrain.engines.torch_engine import TorchOptimizerEngine


class DDPEngine(TorchOptimizerEngine):
    name = "ddp"

    def __init__(self, denoiser: nn.Module, cfg, dist_info) -> None:
        super().__init__()
        self.cfg = cfg
        self.device_type = dist_info.device.type
        ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        self.module = DistributedDataParallel(denoiser, device_ids=ids)
        self.state_module = denoiser
        self.optimizer = build_adamw(self.module.parameters(), cfg.optim)

    def _sync_context(self, is_last: bool) -> contextlib.AbstractContextManager:
        # no_sync must wrap the forward too: DDP decides in forward whether to all-reduce.
        return contextlib.nullcontext() if is_last else self.module.no_sync()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.engine.precision == "bf16":
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def local_param_numel(self) -> int:
        return sum(p.numel() for p in self.module.parameters())
