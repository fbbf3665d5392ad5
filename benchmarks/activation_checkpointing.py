"""Activation checkpointing: activation memory and step time with and without it, in one run.

Run under a launcher, one process per rank, exactly like training::

    torchrun --standalone --nproc_per_node 2 benchmarks/activation_checkpointing.py \\
        --preset unet-small --resolution 64 --micro-batch 8 --reps 8 \\
        --out benchmarks/results/cpu_activation_checkpointing.json

Every rank builds one FSDP2 engine per lever (``model.activation_checkpointing`` none, full,
selective; same seed, same weights) through scaletrain's own ``build_engine``, then times
training steps round-robin: rep 1 none, full, selective; rep 2 none, full, ... so that every
ratio compares steps taken seconds apart on the same noisy host. Step time is rank 0's
wall time per step (forward, backward, optimizer; a barrier closes each step), and a
ratio is the median of the per-rep ratios against ``none`` in the same rep.

Memory is measured, not modelled: one extra step per lever under torch's
``FSDPMemTracker`` (torch.distributed._tools), which attributes every live tensor to a
category (sharded/unsharded parameters and gradients, activations, temporaries, optimizer
state, all-gather and reduce-scatter buffers) and keeps the snapshot at the step's peak.
Activation memory is that snapshot's activation plus temporary bytes, per rank: with
checkpointing, the unit being recomputed holds its activations again during its backward,
and the tracker files those as temporaries; counting only the "Activation" category would
flatter checkpointing. The peak total (everything) is reported beside it. A Markdown
summary is written next to the JSON (same name, .md).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scaletrain.checks import validate_config  # noqa: E402
from scaletrain.distributed import init_distributed, shutdown_distributed  # noqa: E402
from scaletrain.engines import build_engine  # noqa: E402
from scaletrain.models import build_model  # noqa: E402

LEVERS = ("none", "full", "selective")


def _engine(preset: str, resolution: int, micro: int, lever: str, dist_info):
    cfg = validate_config({"model": {"preset": preset, "activation_checkpointing": lever},
                           "train": {"stages": [{"name": "b", "resolution": resolution, "steps": 1,
                                                 "micro_batch": micro}]},
                           "engine": {"kind": "fsdp"}, "log": {"wandb": "disabled"}},
                          world_size=dist_info.world_size, check_paths=False)
    torch.manual_seed(0)
    model = build_model(preset)
    engine = build_engine(cfg, model.denoiser, dist_info, micro_batch=micro, grad_accum=1)
    return model, engine


def _step(engine, batch) -> None:
    x, ts, cond = batch
    with engine.micro_step(is_last=True):
        loss = engine.module(x, ts, cond).float().pow(2).mean()
        engine.backward(loss)
    engine.step(1e-4)


def _peak_split(engine, batch) -> dict[str, float]:
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    tracker = FSDPMemTracker(engine.module, engine.optimizer)
    tracker.track_inputs(batch)
    with tracker:
        _step(engine, batch)
    (snapshot,) = tracker.get_tracker_snapshot("peak").values()  # one device
    return {str(getattr(k, "value", k)): v / 2**20 for k, v in snapshot.items()}


def _markdown(r: dict) -> str:
    lines = [f"# Activation checkpointing: {r['preset']} at {r['resolution']} px, micro-batch {r['micro_batch']}, "
             f"{r['world_size']} ranks, FSDP2", "", f"Command: `{r['command']}`", "",
             f"Host: {r['host']['platform']}, torch {r['host']['torch']}, {r['host']['cpu_threads']} thread(s) "
             f"per rank; {r['reps']} round-robin reps.", "",
             "| lever | step time vs none (median of per-rep ratios) | activation MiB/rank (act + temp at peak) "
             "| vs none | peak total MiB/rank | vs none |", "|---|---|---|---|---|---|"]
    for lever in LEVERS:
        lines.append(f"| {lever} | {r['step_time_ratio_vs_none'][lever]:.3f} | "
                     f"{max(r['activation_mib_per_rank'][lever]):.1f} | {r['activation_ratio_vs_none'][lever]:.3f} | "
                     f"{max(r['peak_total_mib_per_rank'][lever]):.1f} | {r['peak_total_ratio_vs_none'][lever]:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="unet-small")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist_info = init_distributed("fsdp")
    built = {lever: _engine(args.preset, args.resolution, args.micro_batch, lever, dist_info) for lever in LEVERS}
    model = built["none"][0]
    g = torch.Generator().manual_seed(dist_info.rank)
    cond = model.encode_text(["a red circle on the left"] * args.micro_batch, dist_info.device)
    batch = (torch.randn(args.micro_batch, model.preset.in_channels, args.resolution, args.resolution, generator=g),
             torch.randint(0, 1000, (args.micro_batch,), generator=g), cond)
    for lever in LEVERS:
        for _ in range(args.warmup):
            _step(built[lever][1], batch)
    times: dict[str, list[float]] = {lever: [] for lever in LEVERS}
    for _ in range(args.reps):
        for lever in LEVERS:
            dist.barrier()
            t0 = time.perf_counter()
            _step(built[lever][1], batch)
            dist.barrier()
            times[lever].append(time.perf_counter() - t0)
    memory = {lever: _peak_split(built[lever][1], batch) for lever in LEVERS}
    gathered = [None] * dist_info.world_size
    dist.all_gather_object(gathered, memory)
    if dist_info.is_main:
        act = {lever: [m[lever]["Activation"] + m[lever]["Temp"] for m in gathered] for lever in LEVERS}
        total = {lever: [m[lever]["Total"] for m in gathered] for lever in LEVERS}
        result = {
            "command": "torchrun --standalone --nproc_per_node %d benchmarks/activation_checkpointing.py %s"
                       % (dist_info.world_size, " ".join(sys.argv[1:])),
            "host": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
                     "torch": torch.__version__},
            "preset": args.preset, "resolution": args.resolution, "micro_batch": args.micro_batch,
            "world_size": dist_info.world_size, "engine": "fsdp", "reps": args.reps,
            "step_seconds": {lever: times[lever] for lever in LEVERS},
            "step_time_ratio_vs_none": {lever: statistics.median(t / b for t, b in zip(times[lever], times["none"]))
                                        for lever in LEVERS},
            "peak_memory_mib_per_rank": memory, "peak_memory_mib_all_ranks": gathered,
            "activation_mib_per_rank": act,
            "activation_ratio_vs_none": {lever: max(a / b for a, b in zip(act[lever], act["none"]))
                                         for lever in LEVERS},
            "peak_total_mib_per_rank": total,
            "peak_total_ratio_vs_none": {lever: max(a / b for a, b in zip(total[lever], total["none"]))
                                         for lever in LEVERS},
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(_markdown(result))
        print(_markdown(result))
    del built, model
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
