"""One benchmark cell, run on every rank under torchrun: ``torchrun ... -m scaletrain.bench.cell --cell SPEC.json``.

A cell is (preset, resolution, engine variant, micro-batch, world size). It drives the same
pieces the trainer uses (model presets, data pipeline, diffusion objective, engine protocol)
with a timer around each phase of the step, so the split (data, encode, forward, backward,
optimizer) is measured rather than inferred. Each rank writes ``OUT.rank{r}.json``; the
runner merges them. Running out of memory is a result: the rank writes ``status: oom`` and
exits, and torchrun stops the others (a real CUDA OOM can strike mid-collective, where no
clean agreement is possible).

With the spec's ``comm_sweep`` set, the cell instead times all-reduce/all-gather/
reduce-scatter over a size range (``scaletrain.comm.preflight``), for the sizing model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from scaletrain.engines.spec import layout, load_layouts

if TYPE_CHECKING:  # the cell's module is imported by `scaletrain bench` before any process group
    from scaletrain.distributed import DistInfo

# Engine variants of the matrix -> (engine.kind, DeepSpeed JSON), and the engine-section settings
# a variant adds beyond them: each engine's layouts say (engines/spec.py).
ENGINE_VARIANTS: dict[str, tuple[str, str | None]] = {
    name: (lay.kind, lay.ds_config) for name, lay in load_layouts().items() if lay.benched}
ENGINE_SETTINGS: dict[str, dict] = {name: lay.settings for name, lay in load_layouts().items() if lay.settings}
PHASES = ("data", "encode", "forward", "backward", "optimizer")


class MemoryLimitExceeded(RuntimeError):
    """The cell's ``max_memory_gib`` guard: stands in for a device OOM where there is none (CPU)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # phase timers need the GPU's work finished, not just queued
        torch.cuda.synchronize(device)


def memory_snapshot(device: torch.device) -> dict:
    """Peak memory so far: CUDA max allocated/reserved, or this process's peak RSS (CPU)."""
    from scaletrain.train.metrics import peak_memory_gib

    snap = {"peak_gib": peak_memory_gib(device)}
    if device.type == "cuda":
        snap["reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return snap


def run_config(spec: dict, world_size: int):
    """The RunConfig a cell's engine is built from (validated like any recipe)."""
    from scaletrain.checks import validate_config

    kind, ds_json = ENGINE_VARIANTS[spec["engine"]]
    engine = {"kind": kind, "precision": spec.get("precision", "fp32"), **ENGINE_SETTINGS.get(spec["engine"], {})}
    if ds_json:
        engine["deepspeed_config"] = str(Path(spec.get("repo", ".")) / ds_json)
    data = {"run": {"dir": spec.get("run_dir", "/tmp/scaletrain-bench"), "seed": 0},
            "model": {"preset": spec["preset"], "compile": spec.get("compile", False),
                      "compile_backend": spec.get("compile_backend", "inductor"),
                      "activation_checkpointing": spec.get("activation_checkpointing", "none")},
            "data": {"shards": spec["shards"], "num_workers": spec.get("num_workers", 1),
                     "shuffle_buffer": 0, "caption_dropout": 0.1},
            "train": {"stages": [{"name": "bench", "resolution": spec["resolution"],
                                  "steps": spec["warmup"] + spec["reps"], "micro_batch": spec["micro_batch"],
                                  **({"frames": spec["frames"]} if spec.get("frames") else {})}]},
            "engine": engine, "log": {"wandb": "disabled", "progress": False},
            "validate": {"every_steps": 0, "at_end": False}, "sample": {"at_end": False}}
    return validate_config(data, world_size=world_size)


# torch's tracker categories -> the split the bench reports (FSDPMemTracker names, then MemTracker's)
_SPLIT = {"params": ("Sharded Param", "Unsharded Param", "Parameter", "Buffer"),
          "grads": ("Sharded Grad", "Unsharded Grad", "Gradient"),
          "optimizer": ("OptState", "Optstate"),
          # a checkpointed unit's recomputed activations are filed as temporaries
          "activations": ("Activation", "Temp"),
          "comm_buffers": ("All Gather", "Reduce Scatter"),
          "other": ("Inputs", "Other")}


def memory_split(engine, step_fn: Callable[[contextlib.AbstractContextManager], None]) -> dict:
    """Run ``step_fn(tracker)`` (one training step, its engine part inside ``with tracker``;
    the frozen encoders stay outside: their weights take no gradient hooks) under torch's
    memory tracker and return this rank's tensor memory at the step's peak, MiB by category
    (``_SPLIT``) plus ``total``: measured
    tensor by tensor (torch.distributed._tools), not modelled. FSDP2 uses FSDPMemTracker (it
    knows sharded vs gathered parameters and the collective buffers); DDP the plain
    MemTracker. Not for DeepSpeed (see ``run_cell``)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule

    if isinstance(engine.module, FSDPModule):
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

        tracker = FSDPMemTracker(engine.module, engine.optimizer)
    else:
        tracker = MemTracker()
        tracker.track_external(engine.module, engine.optimizer)
    step_fn(tracker)
    by_category: dict[str, float] = {}
    for snapshot in tracker.get_tracker_snapshot("peak").values():  # one device per rank
        for key, value in snapshot.items():
            name = str(getattr(key, "value", key))
            by_category[name] = by_category.get(name, 0) + value / 2**20
    out = {part: sum(by_category.get(c, 0.0) for c in cats) for part, cats in _SPLIT.items()}
    out["total"] = by_category.get("Total", 0.0)
    return out


def run_cell(spec: dict, dist_info: DistInfo) -> dict:
    """Build, warm up, time ``reps`` steps; returns this rank's record."""
    from scaletrain.data.latents import resolve_shards
    from scaletrain.models.registry import stage_frames
    from scaletrain.data.pipeline import LoaderSpec, build_loader
    from scaletrain.diffusion import build_objective
    from scaletrain.train.step import forward_backward, model_inputs
    from scaletrain.engines import build_engine
    from scaletrain.models import build_model, frozen_dtype

    device, limit = dist_info.device, spec.get("max_memory_gib")
    cfg = run_config(spec, dist_info.world_size)

    def guard() -> None:
        if limit is not None and memory_snapshot(device)["peak_gib"] > limit:
            raise MemoryLimitExceeded(f"peak memory above max_memory_gib={limit}")

    # Shards written by `scaletrain data encode` (a folder with <R>px/ inside): the cell trains on
    # the stored posterior and text outputs and builds neither encoder, as the trainer does.
    urls, encoding = resolve_shards(spec["shards"], spec["resolution"], "bench --shards")
    torch.manual_seed(0)
    model = build_model(spec["preset"], dtype=frozen_dtype(cfg.engine.precision),
                        encoders=encoding is None).to(device)
    engine = build_engine(cfg, model.denoiser, dist_info, micro_batch=spec["micro_batch"], grad_accum=1)
    guard()
    after_build = memory_snapshot(device)
    objective = build_objective(cfg.diffusion.objective, cfg.diffusion.params())
    loader = LoaderSpec(shards=urls, resolution=spec["resolution"], micro_batch=spec["micro_batch"],
                        num_workers=cfg.data.num_workers, seed=0, rank=dist_info.rank,
                        world_size=dist_info.world_size, precomputed=encoding is not None,
                        pin_memory=device.type == "cuda", frames=stage_frames(cfg, 0))
    batches = iter(build_loader(loader))
    steps = []

    def train_step(step: int, times: dict, around: contextlib.AbstractContextManager | None = None) -> None:
        """The trainer's step (``train/step.py``) with a timer between phases."""
        t_step = time.perf_counter()
        last = [t_step]

        def mark(phase: str) -> None:
            _sync(device)
            now = time.perf_counter()
            times[phase], last[0] = now - last[0], now

        batch = next(batches)
        mark("data")
        x0, cond = model_inputs(model, batch, device, seed=0, step=step,
                                scaling=encoding.scaling if encoding is not None else None)
        with around or contextlib.nullcontext():
            forward_backward(engine, objective, x0, cond, batch["keys"], step=step, seed=0, is_last=True,
                             mark=mark)  # marks encode (inputs + noising), forward, backward
            engine.step(spec.get("lr", 1e-4))
        mark("optimizer")
        times["step"] = time.perf_counter() - t_step

    for step in range(spec["warmup"] + spec["reps"]):
        times: dict = {}
        train_step(step, times)
        guard()
        if step >= spec["warmup"]:  # warm-up steps (allocator, kernels, DeepSpeed buckets) excluded
            steps.append(times)
    # After the timed steps (the tracker slows the step it watches): one more, measured by category.
    # DeepSpeed allocates its flat ZeRO partitions and reduce buckets outside the tracker's view
    # (measured on ZeRO-2: a 190 MiB reduce bucket read as "gradients" for a 1 M-parameter UNet):
    # no split rather than a misleading one.
    split = None if not layout(spec["engine"]).memory_split else memory_split(
        engine, lambda tracker: train_step(spec["warmup"] + spec["reps"], {}, tracker))
    record = {
        "rank": dist_info.rank, "status": "ok", "steps": steps,
        "params_total": engine.full_param_numel(), "params_local": engine.local_param_numel(),
        "params_frozen": sum(p.numel() for m in model.frozen_modules() for p in m.parameters())
        if model.encoders_built else 0,
        "precomputed": encoding is not None,
        "after_build": after_build, "memory": memory_snapshot(device), "memory_split_mib": split,
        "fp8": engine.float8.report() if engine.float8 is not None else None,  # engine.precision=fp8, as applied
    }
    engine.close()
    return record


def run_comm_sweep(spec: dict, dist_info: DistInfo) -> dict:
    from scaletrain.comm.preflight import measure_collectives, sweep_sizes

    sizes = sweep_sizes(spec.get("min_bytes", 2**12), spec.get("max_bytes", 2**25))
    ops = ["all_reduce", "all_gather", "reduce_scatter"]
    rows = measure_collectives(sizes, ops, torch.float32, spec.get("iters", 10), 2, dist_info.device)
    return {"rank": dist_info.rank, "status": "ok", "collectives": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell", required=True, help="JSON spec written by the runner")
    args = p.parse_args(argv)
    spec = json.loads(Path(args.cell).read_text())
    from scaletrain.distributed import init_distributed, prepare_environment, shutdown_distributed

    prepare_environment()
    kind = ENGINE_VARIANTS.get(spec.get("engine", "ddp"), ("ddp", None))[0]
    dist_info = init_distributed(kind)
    baseline = memory_snapshot(dist_info.device)  # runtime before any model: the constant term
    out = Path(spec["out"]).with_suffix(f".rank{dist_info.rank}.json")
    try:
        if spec.get("comm_sweep"):
            record = run_comm_sweep(spec, dist_info)
        else:
            from scaletrain.models.flops import device_peak_tflops

            peak, source = device_peak_tflops(dist_info.device, spec.get("precision", "fp32"), spec.get("peak_tflops"))
            record = run_cell(spec, dist_info)
            record.update(peak_tflops=peak, peak_source=source)
    except (torch.OutOfMemoryError, MemoryError, MemoryLimitExceeded) as e:
        record = {"rank": dist_info.rank, "status": "oom", "error": f"{type(e).__name__}: {str(e)[:300]}",
                  "memory": memory_snapshot(dist_info.device)}
        record["baseline"] = baseline
        out.write_text(json.dumps(record))
        sys.stdout.flush()
        os._exit(3)  # peers may be stuck in a collective; torchrun stops them when this rank exits
    record["baseline"] = baseline
    record["world_size"] = dist_info.world_size
    record["threads"] = torch.get_num_threads()
    out.write_text(json.dumps(record))
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
