"""FSDP2 engine: the model family's parallel plan (models/parallelize.py) with ``fully_shard`` per unit, then the root."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from scaletrain.config import RunConfig
from scaletrain.distributed import DistInfo
from scaletrain.engines.spec import (GRAD_NORM, Collective, EngineSpec, Layout, compute_bytes, register_engine,
                                     register_layout)
from scaletrain.engines.base import LocalShard, StepStats, build_adamw, replicated_param_shards, world_mesh
from scaletrain.engines.torch_engine import TorchOptimizerEngine
from scaletrain.models.parallelize import parallelize_units


class FSDPEngine(TorchOptimizerEngine):
    name = "fsdp"

    def __init__(self, denoiser: nn.Module, units: list[nn.Module], cfg: RunConfig, dist_info: DistInfo) -> None:
        super().__init__()
        self.cfg = cfg
        mp = mixed_precision_policy(cfg.engine.precision)
        knobs = cfg.engine.fsdp
        mesh = build_fsdp_mesh(dist_info.device.type, dist_info.world_size, knobs.mesh_shape(dist_info.world_size))
        reshard = knobs.reshard_after_forward
        if cfg.engine.precision == "fp8":  # torchao's Float8Linear swapped in first: before compile and fully_shard
            from scaletrain.engines.fp8 import apply_float8

            self.float8 = apply_float8(units, cfg.engine.fp8, dist_info.device, sharded=True)
        # Checkpointing and compile per unit, then fully_shard per unit, then the root. The root
        # is resharded too: its own parameters (embeddings, in/out convs) are small, and keeping
        # them gathered would break the "about 1/world per rank" storage promise.
        offload = offload_policy(knobs.offload, dist_info.device)
        parallelize_units(denoiser, units, cfg.model,
                          lambda m: fully_shard(m, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard,
                                                offload_policy=offload))
        apply_prefetch(denoiser, units, forward=knobs.forward_prefetch, backward=knobs.backward_prefetch)
        if getattr(denoiser, "pending_init", None) is not None:  # built on meta: allocate and fill the local shards
            denoiser.materialize(dist_info.device)
        self.module = self.state_module = denoiser
        self.optimizer = build_adamw(denoiser.parameters(), cfg.optim)
        if cfg.engine.precision == "fp16":
            # ShardedGradScaler: unscale_ works on the DTensor gradient shards and all-reduces
            # "found inf", so every rank skips an overflowed step together.
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(dist_info.device.type, init_scale=cfg.engine.fp16_initial_scale)

    def _sync_context(self, is_last: bool) -> contextlib.AbstractContextManager:
        return _gradient_sync(self.module, is_last)

    @property
    def _fp8_gather(self) -> bool:
        return self.float8 is not None and self.float8.all_gather

    def step(self, lr: float) -> StepStats:
        stats = super().step(lr)
        if self._fp8_gather and not stats.skipped:  # the new weights' fp8 scales, one all-reduce for all
            from scaletrain.engines.fp8 import precompute_scales

            precompute_scales(self.module)
        return stats

    def load_state(self, path: Path) -> None:
        super().load_state(path)
        if self._fp8_gather:  # collective, like the load: scales of the loaded weights
            from scaletrain.engines.fp8 import precompute_scales

            precompute_scales(self.module)

    def prepare_frozen(self, module: nn.Module, units: list[nn.Module]) -> nn.Module:
        """Shard a frozen module like the trainable one: same mesh, same units, same precision,
        so a DPO reference costs 1/world of its size per rank. Every unit reshards after its
        forward: with no backward to come, a gathered copy would only hold memory."""
        module.requires_grad_(False).eval()
        mesh = next(iter(self.module.parameters())).device_mesh  # the policy's (FSDP or HSDP) mesh
        mp = mixed_precision_policy(self.cfg.engine.precision)
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
        fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
        return module

    def local_param_numel(self) -> int:
        return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in self.module.parameters())

    def local_param_shards(self, release_gathered: bool = False) -> list[LocalShard]:
        # A module left unsharded (reshard_after_forward=False, or a forward without backward)
        # computes from its gathered copy, which would ignore writes to the shards.
        if release_gathered:
            for m in self.module.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()
            if self._fp8_gather:  # the caller writes the shards (EMA swap): scales from what they will hold
                from scaletrain.engines.fp8 import forget_scales

                forget_scales(self.module)
        out, plain = [], []
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            if isinstance(p, DTensor):  # the local tensor is a view of FSDP2's sharded storage
                out.append(LocalShard(name, p.to_local().detach(), p.device_mesh, tuple(p.placements),
                                      p.shape, p.shape))
            else:  # a parameter outside every fully_shard unit stays whole on each rank
                plain.append((name, p))
        if plain:
            out += replicated_param_shards(plain, world_mesh(self, plain[0][1].device.type))
        return out


def offload_policy(mode: str, device: torch.device) -> OffloadPolicy:
    """``engine.fsdp.offload``: params -> CPUOffloadPolicy (pinned host memory on CUDA, so the
    per-unit host-to-device copies are asynchronous); none -> FSDP2's default (no offload)."""
    if mode == "params":
        return CPUOffloadPolicy(pin_memory=device.type == "cuda")
    return OffloadPolicy()


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    # Parameters are stored in fp32; bf16/fp16 is the compute dtype and gradients are reduced
    # in fp32 so the all-reduce does not lose the small per-rank contributions (nor overflow fp16).
    # fp8 computes in bf16 outside its Float8Linear layers (engines/fp8.py).
    if precision in ("bf16", "fp16", "fp8"):
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def build_fsdp_mesh(device_type: str, world: int, shape: tuple[int, int] | None) -> DeviceMesh:
    """1-D mesh over all ranks (FSDP), or a 2-D (replicate, shard) mesh (HSDP): fully_shard
    then shards over "shard" and all-reduces gradients over "replicate". Ranks of one shard
    group are consecutive, so shard_size = ranks per node keeps all-gathers inside a node."""
    if shape is None:
        return init_device_mesh(device_type, (world,))
    return init_device_mesh(device_type, shape, mesh_dim_names=("replicate", "shard"))


def apply_prefetch(root: nn.Module, units: list[nn.Module], *, forward: int, backward: int) -> None:
    """Explicit all-gather prefetch over the plan's units (which are in forward order).

    forward=N: each unit (and the root, for the first units) issues the next N units'
    all-gathers as it starts, instead of each unit gathering on entry. backward=N > 1: each
    unit prefetches the N units that run after it in backward; 1 keeps FSDP2's implicit
    one-ahead prefetch. Earlier gathers overlap more but hold more unsharded parameters.
    """
    if forward > 0:
        root.set_modules_to_forward_prefetch(units[:forward])
        for i, unit in enumerate(units):
            nxt = units[i + 1 : i + 1 + forward]
            if nxt:
                unit.set_modules_to_forward_prefetch(nxt)
    if backward > 1:
        for i, unit in enumerate(units):
            prev = list(reversed(units[max(0, i - backward) : i]))
            if prev:
                unit.set_modules_to_backward_prefetch(prev)


@contextlib.contextmanager
def _gradient_sync(module: nn.Module, enabled: bool):
    # Non-final micro-steps keep unsharded gradients local (no reduce-scatter) and accumulate.
    assert isinstance(module, FSDPModule)
    module.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


# ----------------------------------------------------------------------------- sizing entries


@register_layout
class FSDPLayout(Layout):
    """FSDP2 over all ranks: 16 P / N (fp32 weights, grads, Adam, sharded) + the largest unit
    gathered (W) with its unsharded grads (4); each unit gathered in forward and again in
    backward, fp32 grads reduce-scattered. At start-up (meta-device init) the fp32 shard only."""

    label = kind = "fsdp"

    def state_bytes(self, facts, world, precision="fp32", host_is_device=True):
        return 16 * facts.params / world + facts.largest_unit * (compute_bytes(precision) + 4) * (world > 1)

    def startup_bytes(self, facts, world, precision="fp32"):
        return 4 * facts.params / world

    def step_comms(self, facts, precision, gpus_per_node, world):
        P, w, u = facts.params, compute_bytes(precision), facts.fsdp_units
        return [Collective("all_gather", 2 * w * P, 2 * u, "global", "gather"),
                Collective("reduce_scatter", 4 * P, u, "global", "grad"), GRAD_NORM]


@register_layout
class HSDPLayout(FSDPLayout):
    """FSDP2 on a (replicas x node) mesh (engine.fsdp.shard_size = GPUs per node): shards inside
    a node, replicas across nodes; the gradient shards all-reduced across nodes."""

    label = "hsdp"
    compute_like = "fsdp"

    def state_world(self, world, gpus_per_node):
        return min(world, gpus_per_node)

    def step_comms(self, facts, precision, gpus_per_node, world):
        P, w, u = facts.params, compute_bytes(precision), facts.fsdp_units
        g = max(1, min(gpus_per_node, world))
        return [Collective("all_gather", 2 * w * P, 2 * u, "intra", "gather"),
                Collective("reduce_scatter", 4 * P, u, "intra", "grad"),
                Collective("all_reduce", 4 * P / g, u, "inter", "grad"), GRAD_NORM]


@register_layout
class FSDPOffloadLayout(FSDPLayout):
    """A bench variant: FSDP2 with its parameters offloaded to host memory (engine.fsdp.offload)."""

    label = "fsdp-offload"
    compute_like = "fsdp"
    settings = {"fsdp": {"offload": "params"}}
    sized = False


@register_engine
class FSDPSpec(EngineSpec):
    kind = "fsdp"
    trains_fp8 = True

    def check_recipe(self, cfg, world):
        mesh = cfg.engine.fsdp.mesh_shape(world)  # raises on sizes that do not tile the world
        if cfg.engine.context_parallel > 1 and mesh is not None:
            raise ValueError("engine.context_parallel > 1 with engine.fsdp.shard_size/replicate_size (HSDP) is not "
                             "supported; drop the HSDP sizes (FSDP2 then shards over all ranks)")
