"""FSDP2 engine: ``fully_shard`` on each unit of the model family's parallel plan, then the root."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from scaletrain.engines.base import build_adamw
from scaletrain.engines.torch_engine import TorchOptimizerEngine


class FSDPEngine(TorchOptimizerEngine):
    name = "fsdp"

    def __init__(self, denoiser: nn.Module, units: list[nn.Module], cfg, dist_info) -> None:
        super().__init__()
        self.cfg = cfg
        # Parameters are stored in fp32; bf16 is the compute dtype and gradients are reduced
        # in fp32 so the all-reduce does not lose the small per-rank contributions.
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if cfg.engine.precision == "bf16"
            else MixedPrecisionPolicy()
        )
        mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
        reshard = cfg.engine.fsdp.reshard_after_forward
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        # The root is resharded too: its own parameters (embeddings, in/out convs) are small,
        # and keeping them gathered would break the "about 1/world per rank" storage promise.
        fully_shard(denoiser, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        self.module = self.state_module = denoiser
        self.optimizer = build_adamw(denoiser.parameters(), cfg.optim)

    def _sync_context(self, is_last: bool) -> contextlib.AbstractContextManager:
        return _gradient_sync(self.module, is_last)

    def local_param_numel(self) -> int:
        return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in self.module.parameters())


@contextlib.contextmanager
def _gradient_sync(module: nn.Module, enabled: bool):
    # Non-final micro-steps keep unsharded gradients local (no reduce-scatter) and accumulate.
    assert isinstance(module, FSDPModule)
    module.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
