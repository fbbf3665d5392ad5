"""The engine section against the world size and this machine, each engine's own knobs (the
only place outside an engine's module where its name decides anything); at launch, the
DeepSpeed JSON filled for every stage.

Part of the recipe checks (``scaletrain/checks.py`` gathers them): ``recipe(cfg, ctx)`` checks
the recipe as data (and the paths it names when ``ctx.check_paths``), and ``launch(cfg, ctx)`` what lies on disk; each failure is a
ValueError whose message is one line naming the key and the fix.
"""

from __future__ import annotations

from scaletrain.config import CheckContext, RunConfig


def recipe(cfg: RunConfig, ctx: CheckContext) -> None:
    _check_engine_knobs(cfg, ctx.world_size)
    if (cfg.engine.context_parallel > 1 and cfg.engine.kind == "fsdp"
            and cfg.engine.fsdp.mesh_shape(ctx.world_size) is not None):
        raise ValueError("engine.context_parallel > 1 with engine.fsdp.shard_size/replicate_size (HSDP) is not "
                         "supported; drop the HSDP sizes (FSDP2 then shards over all ranks)")


def launch(cfg: RunConfig, ctx: CheckContext) -> None:
    zero_stage(cfg, ctx.world_size)


def zero_stage(cfg: RunConfig, world: int) -> int | None:
    """The ZeRO stage the DeepSpeed JSON gives (filled for every stage, each raising on a
    conflict with the recipe); None on the torch engines."""
    if cfg.engine.kind != "deepspeed":
        return None
    from scaletrain.engines.ds_config import fill_deepspeed_config, load_deepspeed_json

    raw = load_deepspeed_json(cfg.engine.deepspeed_config)
    stage = None
    for st in cfg.train.stages:
        filled = fill_deepspeed_config(raw, cfg, micro_batch=st.micro_batch, grad_accum=st.grad_accum, world_size=world)
        stage = int(filled.get("zero_optimization", {}).get("stage", 0))
    return stage


def sizing_label(cfg: RunConfig, world: int) -> str:
    """The engine as ``scaletrain size`` names it: fsdp, ddp, or zero1/2/3 from the DeepSpeed JSON."""
    if cfg.engine.kind != "deepspeed":
        return cfg.engine.kind
    return f"zero{zero_stage(cfg, world) or 3}"


def _check_engine_knobs(cfg: RunConfig, world: int) -> None:
    """Knobs that cannot work at this world size or on this machine fail here, not silently."""
    import torch

    e = cfg.engine
    if e.kind == "fsdp":
        e.fsdp.mesh_shape(world)
    if e.precision == "fp16" and e.kind == "deepspeed" and not torch.cuda.is_available():
        raise ValueError("engine.precision=fp16 under DeepSpeed needs CUDA GPUs (DeepSpeed's CPU accelerator runs "
                         "fp32 and bf16 only); use engine.precision=bf16, or engine.kind=fsdp/ddp for fp16")
    if e.kind == "ddp" and e.ddp.comm_hook == "bf16" and not torch.cuda.is_available():
        raise ValueError("engine.ddp.comm_hook='bf16' needs CUDA GPUs with NCCL (torch refuses it on gloo); "
                         "use fp16 or powersgd on this machine")
    if e.kind == "deepspeed":
        ds = e.deepspeed
        for key in ("zero_quantized_weights", "zero_quantized_gradients"):
            if getattr(ds, key) and not torch.cuda.is_available():
                raise ValueError(f"engine.deepspeed.{key}=true needs CUDA GPUs (DeepSpeed's quantizer has no "
                                 f"CPU kernels); set it to false on this machine")
        hpz = ds.zero_hpz_partition_size
        if hpz is not None and world % hpz:
            raise ValueError(f"engine.deepspeed.zero_hpz_partition_size={hpz} does not divide the world size "
                             f"{world}; use the number of ranks per node")
