"""Context (sequence) parallelism: each sample's tokens split over K ranks (``engine.context_parallel``).

Built on diffusers' own context parallelism. A diffusers model class with a ``_cp_plan`` (Wan,
among others) says where its token axis is split (the first block's input and the rotary
table, after the patch embedding) and gathered (after ``proj_out``); its attention processors
then run Ulysses attention over the group: an all-to-all turns (all heads, N/K tokens) into
(H/K heads, all N tokens), attention runs, and a second all-to-all turns it back. All-to-all
works on gloo, so the CPU tests run the same code as an NCCL cluster.

Written here, and why:
- the mesh: ranks r..r+K-1 form one context group (neighbours, so the all-to-alls stay inside
  a node), groups are the data-parallel replicas: a (data, ring, ulysses) = (W/K, 1, K) mesh,
  whose (ring, ulysses) part goes to diffusers;
- ``ParallelConfig.setup`` and the plan are applied directly rather than through
  ``ModelMixin.enable_parallelism``, which picks the device as ``rank %
  torch.accelerator.device_count()``: a division by zero on a CPU-only host (diffusers 0.42);
- the gradient scale: every rank of a group computes the same loss on the gathered output,
  and backward through the split gives each rank the gradient of its own tokens' part; the
  engines average gradients over all W ranks, so the loss is scaled by K before backward
  (engines: ``Engine.grad_scale``) and the average over W becomes the average over the W/K
  data-parallel replicas.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

MESH_DIMS = ("data", "ring", "ulysses")


def has_context_parallel_plan(net: nn.Module) -> bool:
    return getattr(net, "_cp_plan", None) is not None


def context_mesh(device_type: str, world: int, degree: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world // degree, 1, degree), mesh_dim_names=MESH_DIMS)


def enable_context_parallel(denoiser: nn.Module, degree: int, device: torch.device) -> Any:
    """Split ``denoiser.net``'s tokens over context groups of ``degree`` ranks (collective:
    every rank calls it). Call before checkpointing, compile and sharding (the plan's hooks
    wrap the modules' forwards; FSDP2's hooks stay outside them). Returns the mesh, kept on the
    denoiser (``_context_mesh``) so it is dropped with the model."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ParallelConfig

    net = denoiser.net
    if not has_context_parallel_plan(net):
        raise ValueError(f"engine.context_parallel={degree}: diffusers has no context-parallel plan for "
                         f"{type(net).__name__}; use a preset whose network has one (wan-*) or engine.context_parallel=1")
    mesh = context_mesh(device.type, dist.get_world_size(), degree)
    cp_mesh = mesh["ring", "ulysses"]
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=degree, mesh=cp_mesh))
    config.setup(dist.get_rank(), dist.get_world_size(), device, mesh=cp_mesh)
    net._parallel_config = config
    for module in net.modules():  # what enable_parallelism does: the processors read the group from it
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    # scaletrain passes one timestep per sample (B,): the plan's entry that splits per-token
    # timesteps (B, N) (Wan 2.2 TI2V) would only log "split will not be applied" at each forward.
    plan = {name: spec for name, spec in net._cp_plan.items()
            if not (name == "" and isinstance(spec, dict) and set(spec) == {"timestep"})}
    # diffusers 0.42 gathers with funcol.all_gather_tensor, which torch 2.13 deprecates (a
    # FutureWarning per call site); the result is the same.
    warnings.filterwarnings("ignore", message=r".*all_gather_tensor.* is deprecated", category=FutureWarning)
    apply_context_parallel(net, config.context_parallel_config, plan)
    denoiser._context_mesh = mesh
    return mesh


def check_context_parallel(preset: Any, degree: int, token_counts: list[tuple[str, int]]) -> None:
    """One-line errors before launch: a network without a plan, heads or tokens K does not divide.
    ``token_counts``: (where, tokens per sample) for every shape the run feeds the denoiser."""
    from scaletrain.models.family import get_family

    if degree == 1:
        return
    fam = get_family(preset.family)
    if not has_context_parallel_plan(fam.net_class):
        raise ValueError(f"engine.context_parallel={degree}: diffusers has no context-parallel plan for "
                         f"{fam.net_class.__name__} (model.preset={preset.name!r}); use a preset whose network "
                         "has one (wan-*) or engine.context_parallel=1")
    heads = preset.denoiser_config.get("num_attention_heads")
    if isinstance(heads, int) and heads % degree:
        raise ValueError(f"engine.context_parallel={degree} does not divide the {heads} attention heads of "
                         f"model.preset={preset.name!r} (Ulysses gives each rank heads/K); use a divisor of {heads}")
    for where, tokens in token_counts:
        if tokens % degree:
            raise ValueError(f"engine.context_parallel={degree} does not divide the {tokens} tokens per sample of "
                             f"{where}; change its frames or resolution, or use a divisor of {tokens}")
