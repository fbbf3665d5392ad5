"""DDP engine: the replicated baseline every sharded engine is compared against."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scaletrain.config import RunConfig
from scaletrain.distributed import DistInfo
from scaletrain.engines.base import build_adamw
from scaletrain.engines.spec import GRAD_NORM, Collective, EngineSpec, Layout, register_engine, register_layout
from scaletrain.engines.torch_engine import TorchOptimizerEngine


class DDPEngine(TorchOptimizerEngine):
    name = "ddp"

    def __init__(self, denoiser: nn.Module, cfg: RunConfig, dist_info: DistInfo) -> None:
        super().__init__()
        self.cfg = cfg
        self.device_type = dist_info.device.type
        ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        knobs = cfg.engine.ddp
        self.module = DistributedDataParallel(
            denoiser,
            device_ids=ids,
            bucket_cap_mb=knobs.bucket_cap_mb,
            gradient_as_bucket_view=knobs.gradient_as_bucket_view,
            static_graph=knobs.static_graph,
        )
        self.comm_hook_state = apply_comm_hook(self.module, knobs)
        self.state_module = denoiser
        self.optimizer = build_adamw(self.module.parameters(), cfg.optim)
        if cfg.engine.precision == "fp16":  # autocast fp16 + dynamic loss scaling
            self.scaler = torch.amp.GradScaler(self.device_type, init_scale=cfg.engine.fp16_initial_scale)

    def _sync_context(self, is_last: bool) -> contextlib.AbstractContextManager:
        # no_sync must wrap the forward too: DDP decides in forward whether to all-reduce.
        return contextlib.nullcontext() if is_last else self.module.no_sync()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.engine.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.cfg.engine.precision == "bf16" else torch.float16
            return torch.autocast(self.device_type, dtype=dtype)
        return contextlib.nullcontext()

    def local_param_numel(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def apply_comm_hook(ddp: DistributedDataParallel, knobs) -> object | None:
    """Register ``engine.ddp.comm_hook`` on ``ddp``; returns the hook state (PowerSGD's counts
    optimizer steps and holds its error-feedback buffers), None for the stateless hooks.

    The hooks are torch's own (``ddp_comm_hooks``). PowerSGD's state is not checkpointed: after
    a resume it runs ``powersgd_start_step`` exact steps again and rebuilds its error feedback.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if knobs.comm_hook == "none":
        return None
    if knobs.comm_hook in ("fp16", "bf16"):
        hook = default_hooks.fp16_compress_hook if knobs.comm_hook == "fp16" else default_hooks.bf16_compress_hook
        ddp.register_comm_hook(None, hook)  # None: the default process group
        return None
    state = powerSGD_hook.PowerSGDState(
        process_group=None,
        matrix_approximation_rank=knobs.powersgd_rank,
        start_powerSGD_iter=knobs.powersgd_start_step,
    )
    ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    return state


# ----------------------------------------------------------------------------- sizing entry

DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP's bucket_cap_mb default


@register_layout
class DDPLayout(Layout):
    """Replicated: 4 weights + 4 grads + 4 DDP bucket copy + 8 Adam = 20 P on every rank; fp32
    gradient buckets all-reduced under backward."""

    label = kind = "ddp"
    whole_params = True

    def state_bytes(self, facts, world, precision="fp32", host_is_device=True):
        return 20 * facts.params

    def startup_bytes(self, facts, world, precision="fp32"):
        return 4 * facts.params

    def step_comms(self, facts, precision, gpus_per_node, world):
        P = facts.params
        return [Collective("all_reduce", 4 * P, 1 + math.ceil(4 * P / DDP_BUCKET_BYTES), "global", "grad"), GRAD_NORM]


@register_engine
class DDPSpec(EngineSpec):
    kind = "ddp"

    def check_recipe(self, cfg, world):
        if cfg.engine.ddp.comm_hook == "bf16" and not torch.cuda.is_available():
            raise ValueError("engine.ddp.comm_hook='bf16' needs CUDA GPUs with NCCL (torch refuses it on gloo); "
                             "use fp16 or powersgd on this machine")
