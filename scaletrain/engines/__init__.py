"""Engines: one protocol (``base.Engine``), three implementations (FSDP2, DeepSpeed ZeRO, DDP)."""

from __future__ import annotations

from torch import nn

from scaletrain.config import RunConfig
from scaletrain.distributed import DistInfo
from scaletrain.engines.base import Engine, StepStats


def build_engine(cfg: RunConfig, denoiser: nn.Module, dist_info: DistInfo, *, micro_batch: int, grad_accum: int) -> Engine:
    """Wrap the trainable denoiser in the engine ``cfg.engine.kind`` names."""
    kind, k = cfg.engine.kind, cfg.engine.context_parallel
    # A denoiser built on meta (models/meta_init.py): FSDP2 shards the shell and initialises each
    # rank's shards (engines/fsdp.py); DeepSpeed builds it under its own start-up (ZeRO-3:
    # zero.Init, partitioned as constructed) and DDP whole, both before anything wraps its units.
    if getattr(denoiser, "pending_init", None) is not None and kind != "fsdp":
        if kind == "deepspeed":
            from scaletrain.engines.deepspeed import materialize_for_deepspeed

            materialize_for_deepspeed(denoiser, cfg, dist_info, micro_batch, grad_accum)
        else:
            denoiser.materialize(dist_info.device)
    if k > 1:  # before checkpointing, compile and sharding wrap the units (models/context_parallel.py)
        from scaletrain.models.context_parallel import enable_context_parallel

        enable_context_parallel(denoiser, k, dist_info.device)
    if kind == "fsdp":  # FSDP2 shards the meta shell and initialises each rank's shards only
        from scaletrain.engines.fsdp import FSDPEngine
        from scaletrain.models import parallel_units

        engine: Engine = FSDPEngine(denoiser, parallel_units(denoiser), cfg, dist_info)
    elif kind == "ddp":
        from scaletrain.engines.ddp import DDPEngine
        from scaletrain.models.parallelize import parallelize

        parallelize(denoiser, cfg.model)  # checkpointing and compile; DDP replicates, no sharding
        engine = DDPEngine(denoiser, cfg, dist_info)
    elif kind == "deepspeed":
        from scaletrain.engines.deepspeed import DeepSpeedEngine
        from scaletrain.models.parallelize import parallelize

        parallelize(denoiser, cfg.model)  # checkpointing and compile; ZeRO partitions on its own
        engine = DeepSpeedEngine(denoiser, cfg, dist_info, micro_batch, grad_accum)
    else:  # config validation makes this unreachable
        raise ValueError(f"engine.kind={kind!r} is unknown; use fsdp, deepspeed or ddp")
    engine.grad_scale = float(k)  # the engines average over all ranks; a context group's K hold one sample's parts
    engine.configure_stage(micro_batch, grad_accum)
    return engine


__all__ = ["Engine", "StepStats", "build_engine"]
