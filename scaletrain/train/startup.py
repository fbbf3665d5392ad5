"""What start-up cost: the ``start-up:`` line rank 0 prints right before the first step, and
``summary.json["startup"]``.

A model that fits no single device must reach its first step sharded; this is where a run
shows whether it did: each rank's peak host memory so far (peak resident set size), on a GPU
its peak device memory, and the seconds from the rank's process start.
"""

from __future__ import annotations

import resource
import time

import torch

from scaletrain.distributed import DistInfo


def _process_seconds() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


def local_startup(device: torch.device) -> list[float]:
    """[peak host GiB, peak device GiB (0 without a GPU), seconds since this process started]."""
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    dev = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return [host, dev, _process_seconds()]


def startup_report(dist_info: DistInfo) -> dict:
    """Every rank's figures (one all-gather), for rank 0's line and the summary."""
    import torch.distributed as dist

    mine = torch.tensor(local_startup(dist_info.device), dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist_info.world_size > 1:
        # gloo and NCCL alike: the tensor lives where the backend wants it
        dev = dist_info.device if dist_info.device.type == "cuda" else torch.device("cpu")
        out = [torch.zeros(3, dtype=torch.float64, device=dev) for _ in range(dist_info.world_size)]
        dist.all_gather(out, mine.to(dev))
        rows = [t.cpu().tolist() for t in out]
    else:
        rows = [mine.tolist()]
    report = {"peak_host_gib": [round(r[0], 3) for r in rows], "seconds": round(max(r[2] for r in rows), 2)}
    if dist_info.device.type == "cuda":
        report["peak_device_gib"] = [round(r[1], 3) for r in rows]
    return report


def startup_line(report: dict) -> str:
    line = (f"start-up: {report['seconds']:.1f} s; peak host memory per rank "
            + " ".join(f"{g:.2f}" for g in report["peak_host_gib"]) + " GiB")
    if "peak_device_gib" in report:
        line += "; peak device memory per rank " + " ".join(f"{g:.2f}" for g in report["peak_device_gib"]) + " GiB"
    return line


# ----------------------------------------------------------------------------- the model's start-up
# (the trainer's denoiser and frozen encoders, before the engine wraps them)


def prepare_denoiser(trainer) -> None:
    """Post-training set-up of the denoiser, on every rank before the engine shards it:
    start weights from ``init`` (skipped when the run resumes a checkpoint of its own, which
    the engine loads afterwards), then LoRA adapters (``lora``; freezes the base weights).

    The denoiser arrives on the meta device (``build_model(defer_init=True)``). Diffusers
    safetensors become its start weights' source: the engine reads them where it keeps them
    (FSDP2: each rank its slices; ZeRO-3: module by module); so does a DCP checkpoint under
    FSDP2 and DDP (one collective load into the shards). DeepSpeed checkpoints, a pickled
    .bin and LoRA need the whole module first: it is initialised whole here."""
    from scaletrain.checkpoint.init import checkpoint_source, diffusers_source, load_init_weights, own_checkpoint

    cfg, denoiser = trainer.cfg, trainer.model.denoiser
    if cfg.init.source is not None:
        own = own_checkpoint(cfg)
        found = None
        if own is None and not cfg.lora.enabled:
            from scaletrain.engines.spec import engine_spec

            collective = engine_spec(cfg.engine.kind).reads_dcp_start_weights
            found = diffusers_source(cfg.init) or checkpoint_source(cfg.init, collective)
        if own is not None:
            trainer.init_note = (f"init: skipped ({cfg.init.source} not loaded): resuming this run's own "
                              f"checkpoint {own.path}")
        elif found is not None and denoiser.pending_init is not None:
            denoiser.pending_init.source, denoiser.pending_init.source_what, trainer.init_note = found
            trainer.init_source = found[0]
        else:
            denoiser.materialize(trainer.device)
            trainer.init_note = load_init_weights(denoiser, cfg.init, cfg.model.preset)
    if cfg.lora.enabled:
        from scaletrain.models.lora import apply_lora

        denoiser.materialize(trainer.device)  # adapters go on real base weights
        apply_lora(denoiser, cfg.lora)


def lay_out_frozen_encoders(trainer) -> None:
    """``model.frozen_encoders=shard`` at more than one rank: the text encoder and VAE are
    FSDP2-sharded over all ranks (``models.parallelize.shard_frozen``) on every engine, now
    or when first built; a 1-D mesh of their own (the engine's may be 2-D, HSDP, or not
    exist yet), dropped at close before the process group."""
    if trainer.cfg.model.frozen_encoders != "shard" or trainer.dist.world_size == 1:
        return
    from functools import partial

    from torch.distributed.device_mesh import init_device_mesh

    from scaletrain.models.parallelize import shard_frozen

    trainer.frozen_mesh = init_device_mesh(trainer.device.type, (trainer.dist.world_size,))
    trainer.model.lay_out_encoders(partial(shard_frozen, mesh=trainer.frozen_mesh))


def frozen_encoders_report(trainer) -> dict | None:
    """How the frozen encoders sit on this rank (None while they are not built): the layout
    and the parameters held here against all of theirs (a shard holds about 1/world)."""
    if not trainer.model.encoders_built:
        return None
    local, total = trainer.model.frozen_numel()
    sharded = trainer.cfg.model.frozen_encoders == "shard" and trainer.dist.world_size > 1
    layout = f"sharded over {trainer.dist.world_size} ranks (FSDP2)" if sharded else "whole on every rank"
    return {"layout": layout, "params_local": local, "params_total": total}


def start_lines(trainer) -> list[str]:
    """The run log's lines before the start-up line: the model on its engine (and its fp8 layers),
    the trainable share (LoRA), where the start weights came from (and what rank 0 read of them),
    how the frozen encoders sit, where a resume picked up."""
    lines: list[str] = []
    lines.append(
        f"scaletrain: {trainer.cfg.model.preset} on {trainer.engine.name} x{trainer.dist.world_size} "
        + (f"(context parallel {trainer.cfg.engine.context_parallel}) " if trainer.cfg.engine.context_parallel > 1 else "")
        + f"({trainer.dist.backend}), {trainer.engine.full_param_numel() / 1e6:.2f}M params, "
        f"{trainer.engine.local_param_numel() / 1e6:.2f}M stored on rank 0, {trainer.total_steps} steps"
    )
    if trainer.engine.float8 is not None:  # engine.precision=fp8: what was converted, and whether emulated
        lines.append(trainer.engine.float8.line())
    trainable, total = trainer.engine.trainable_param_numel(), trainer.engine.full_param_numel()
    if trainable != total:  # LoRA: only the adapters train
        lines.append(f"trainable: {trainable / 1e6:.4f}M of {total / 1e6:.2f}M parameters "
                     f"({100 * trainable / total:.2f}%)")
    if trainer.init_note:
        src = trainer.init_source
        read = (f"; rank 0 read {src.bytes_read / 2**20:.1f} of {src.total_bytes / 2**20:.1f} MiB"
                if src is not None and src.total_bytes else "")
        lines.append(trainer.init_note + read)
    if trainer.model.encoders_built:
        frozen = frozen_encoders_report(trainer)
        lines.append(f"frozen encoders: {frozen['layout']}, {frozen['params_local'] / 1e6:.2f}M of "
                     f"{frozen['params_total'] / 1e6:.2f}M parameters on rank 0")
    if trainer.step:
        lines.append(f"resumed at step {trainer.step} (stage {trainer.stage_index}, "
                     f"step {trainer.step_in_stage} of it) from {trainer.resumed_from}")
    return lines
