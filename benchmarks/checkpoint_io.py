"""Checkpoint save/load throughput against the raw write speed of the same disk, in one run.

Run under a launcher, one process per rank, exactly like training::

    torchrun --standalone --nproc_per_node 2 benchmarks/checkpoint_io.py \
        --engine fsdp --preset unet-sd15-ish --dir /tmp/ckpt-bench --out benchmarks/results/ckpt_io.json

Every number comes from the real code path (scaletrain's CheckpointManager over the chosen
engine, after real optimizer steps so the Adam state exists). Per repetition:

- raw: each rank writes its share of the checkpoint's bytes to a plain file in 8 MiB
  chunks and fsyncs it (all ranks at once, like a save): the disk's sequential write speed.
- save: CheckpointManager.save (synchronous): write, barrier, meta.json, rename.
  raw and save alternate in order, and each starts after os.sync() and --settle seconds, so
  neither pays for the other's writes still being flushed by a VM's host.
  save_vs_raw is the median of the per-repetition ratios raw/save.
- load: CheckpointManager.load_latest (engine state + RNG + counters). The page cache is
  dropped first when this process may (root, /proc/sys/vm/drop_caches); the report says
  whether it was.
- async (every engine): CheckpointManager.save with async_save, then training steps until
  every rank's background write is done (agreed each step), then the commit. The headline is
  the training time one async save costs -- the stall the manager reports (the save call plus
  the optimizer step's wait for the staging copy), plus each step's excess over the median
  plain step while the write runs beside it, plus any wait for the write at the commit -- as a
  fraction of a synchronous save. ``--async-nice`` sets checkpoint.async_nice (the background
  threads' niceness; 0: the writer competes with training as an equal).

Throughput is checkpoint bytes (all ranks) / wall seconds. Medians over --repeats.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scaletrain.checkpoint.manager import CheckpointManager, latest_checkpoint  # noqa: E402
from scaletrain.config import CheckpointSection  # noqa: E402
from scaletrain.checks import validate_config  # noqa: E402
from scaletrain.distributed import init_distributed, shutdown_distributed  # noqa: E402
from scaletrain.engines import build_engine  # noqa: E402
from scaletrain.models import build_model  # noqa: E402
from scaletrain.train.step import cast_cond  # noqa: E402


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _raw_write(path: Path, nbytes: int) -> None:
    chunk = os.urandom(8 << 20)
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            f.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
        os.fsync(f.fileno())


def _timed(fn, settle: float) -> float:
    # Each timed write starts from a quiet disk: on a VM the host keeps flushing the previous
    # write for a while after the guest's fsync returned, and whatever runs next pays for it.
    os.sync()
    time.sleep(settle)
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def _markdown(r: dict) -> str:
    med = r["median_seconds"]
    secs = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    return "\n".join([
        f"# Checkpoint I/O: {r['engine']}, {r['preset']}, {r['world_size']} ranks ({r['cpus']} CPUs, "
        f"{r.get('torch_threads_per_rank', '?')} torch thread(s) per rank, torch {r['torch']})",
        "",
        f"Written by `torchrun --standalone --nproc_per_node {r['world_size']} {r['command']}`.",
        f"{r['repeats']} repetitions; raw and save alternate in order, each after os.sync() and {r['settle_seconds']} s; "
        f"page cache dropped before each load: {r['page_cache_dropped_before_load']}.",
        "",
        "| checkpoint MB | raw write MB/s | save MB/s | load MB/s | save / raw (median of pairs) "
        "| **training time lost per async save / sync save** | async stall / sync save "
        "| step after an async save / plain step | async_nice |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {r['checkpoint_mb']} | {r['raw_write_mb_s']} | {r['save_mb_s']} | {r['load_mb_s']} | {r['save_vs_raw']} "
        f"| **{r['async_lost_fraction_of_sync_save']}** ({med['async_lost_s']:.3f} s) "
        f"| {r['async_stall_fraction_of_sync_save']} ({med['async_stall_s']:.3f} s) "
        f"| {r['step_after_async_save_vs_plain_step']} | {r['async_nice']} |",
        "",
        "Training time lost per async save: the stall, plus each step's excess over the median plain step "
        "while the background write runs beside it (steps until every rank's write is done), plus any wait "
        "for the write at the commit.",
        "",
        f"- raw seconds: {secs(r['raw_seconds'])}",
        f"- save seconds: {secs(r['save_seconds'])}",
        f"- load seconds: {secs(r['load_seconds'])}",
        f"- async stall seconds: {secs(r['async_stall_seconds'])}; background write seconds: "
        f"{secs(r['async_write_seconds'])}",
        f"- plain step seconds: {secs(r['plain_step_seconds'])}; step right after an async save: "
        f"{secs(r['step_after_async_save_seconds'])}",
        f"- training seconds lost per async save: {secs(r['async_lost_seconds'])}; steps beside the write: "
        f"{', '.join(str(n) for n in r['steps_beside_write'])}",
        f"- writer threads (DCP): {r['writer_threads']}; load average at the end: "
        f"{', '.join(f'{x:.1f}' for x in r['loadavg'])}",
        "",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="fsdp", choices=["fsdp", "ddp", "deepspeed"])
    ap.add_argument("--deepspeed-config", default="ds_configs/zero3.json")
    ap.add_argument("--preset", default="dit-tiny")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--writer-threads", type=int, default=None, help="checkpoint.writer_threads (FSDP2/DDP)")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds of quiet disk before each timed write")
    ap.add_argument("--async-nice", type=int, default=0, help="checkpoint.async_nice for the async saves")
    ap.add_argument("--dir", default="/tmp/scaletrain-ckpt-bench", help="where checkpoints are written")
    ap.add_argument("--out", default=None, help="JSON results (rank 0); a Markdown table goes beside it")
    args = ap.parse_args()
    timed = functools.partial(_timed, settle=args.settle)
    ckpt_knobs = {} if args.writer_threads is None else {"writer_threads": args.writer_threads}

    cfg = validate_config({
        "model": {"preset": args.preset},
        "train": {"stages": [{"name": "bench", "resolution": args.resolution, "steps": 1, "micro_batch": 1}]},
        "engine": {"kind": args.engine, "deepspeed_config": str(REPO / args.deepspeed_config)},
        "checkpoint": {**ckpt_knobs, "async_nice": args.async_nice},
    }, check_paths=False)
    info = init_distributed(args.engine)
    torch.manual_seed(0)
    model = build_model(args.preset).to(info.device)
    engine = build_engine(cfg, model.denoiser, info, micro_batch=1, grad_accum=1)
    # real optimizer steps so the checkpoint holds Adam moments, as in training
    c, r = model.preset.in_channels, args.resolution // model.preset.vae_factor
    cond = cast_cond(model.encode_text(["a red circle"], info.device), engine.input_dtype)

    def train_step() -> float:
        t0 = time.perf_counter()
        with engine.micro_step(is_last=True):
            out = engine.module(torch.randn(1, c, r, r, dtype=engine.input_dtype), torch.tensor([500]), cond)
            engine.backward(out.float().pow(2).mean())
        engine.step(1e-4)
        return time.perf_counter() - t0

    train_step()

    root = Path(args.dir)
    if info.is_main:
        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    sync_cfg = CheckpointSection(dir=str(root / "sync"), keep_last=1, resume="auto", **ckpt_knobs)
    manager = CheckpointManager(sync_cfg, root, engine, info)
    state = {"step": 0, "stage": 0, "preset": args.preset}
    rows: dict[str, list[float]] = {"raw_s": [], "save_s": [], "load_s": [], "async_stall_s": [], "async_write_s": [],
                                    "plain_step_s": [], "step_after_async_save_s": []}
    dropped = []
    nbytes = 0
    for rep in range(args.repeats):
        step = rep + 1
        raw_file = root / f"raw-rank{info.rank}.bin"
        if rep % 2 == 0 or not nbytes:  # the order alternates: neither always runs second
            rows["save_s"].append(timed(lambda: manager.save(step, {**state, "step": step})))
            nbytes = _dir_bytes(latest_checkpoint(manager.dir).path)
            rows["raw_s"].append(timed(lambda: _raw_write(raw_file, nbytes // info.world_size)))
        else:
            rows["raw_s"].append(timed(lambda: _raw_write(raw_file, nbytes // info.world_size)))
            rows["save_s"].append(timed(lambda: manager.save(step, {**state, "step": step})))
        raw_file.unlink()
        dropped.append(_drop_page_cache() if info.is_main else True)
        rows["load_s"].append(timed(manager.load_latest))
    # Async: save, then one training step as the loop would run it (its optimizer step waits
    # for the staging copy if that is not done), then commit. The stall is what the manager
    # reports: the save call plus that wait. The step's own slowdown against plain steps is
    # reported beside it (on a 2-core CPU the copy and the write compete with the compute).
    plain = [train_step() for _ in range(3)]
    async_cfg = CheckpointSection(dir=str(root / "async"), keep_last=1, async_save=True, async_nice=args.async_nice,
                                  **ckpt_knobs)
    amanager = CheckpointManager(async_cfg, root, engine, info)
    plain += [train_step() for _ in range(3)]
    plain_median = statistics.median(plain)
    rows["async_lost_s"], rows["steps_beside_write"] = [], []
    for rep in range(args.repeats):
        records = amanager.save(rep + 1, {**state, "step": rep + 1})
        done_at = amanager._pending[1]  # set by the write's own thread when it finishes
        beside = []
        while len(beside) < 200:  # steps until every rank's write is done (one tiny all-reduce each)
            beside.append(train_step())
            flag = torch.tensor([0.0 if done_at else 1.0])
            dist.all_reduce(flag)
            if flag.item() == 0:
                break
        rows["step_after_async_save_s"].append(beside[0])
        records += amanager.finalize()
        stall = sum(m["checkpoint_stall_seconds"] for m in records if "checkpoint_stall_seconds" in m)
        behind = sum(m.get("checkpoint_write_behind_seconds", 0.0) for m in records)
        rows["async_stall_s"].append(stall)
        rows["async_write_s"] += [m["checkpoint_write_seconds"] for m in records if "checkpoint_write_seconds" in m]
        rows["async_lost_s"].append(stall + sum(max(0.0, t - plain_median) for t in beside) + behind)
        rows["steps_beside_write"].append(len(beside))
        rows["plain_step_s"].append(train_step())
    rows["plain_step_s"] += plain

    if info.is_main:
        med = {k: statistics.median(v) for k, v in rows.items() if v}
        mb = nbytes / 1e6
        result = {
            "engine": engine.name if engine.name != "deepspeed" else f"deepspeed-zero{engine.zero_stage}",
            "preset": args.preset, "world_size": info.world_size,
            "writer_threads": cfg.checkpoint.writer_threads if engine.name != "deepspeed" else None,
            "settle_seconds": args.settle, "checkpoint_mb": round(mb, 2),
            "repeats": args.repeats, "median_seconds": {k: round(v, 4) for k, v in med.items()},
            "raw_write_mb_s": round(mb / med["raw_s"], 1),
            "save_mb_s": round(mb / med["save_s"], 1),
            "load_mb_s": round(mb / med["load_s"], 1),
            # pair by pair (raw and save of one repetition ran back to back), then the median
            "save_vs_raw": round(statistics.median(r / s for r, s in zip(rows["raw_s"], rows["save_s"])), 3),
            "async_stall_fraction_of_sync_save": round(med["async_stall_s"] / med["save_s"], 3),
            # the headline: training time lost per async save (stall + slowdown beside the write)
            "async_lost_fraction_of_sync_save": round(med["async_lost_s"] / med["save_s"], 3),
            "async_nice": args.async_nice,
            "async_lost_seconds": rows["async_lost_s"], "steps_beside_write": rows["steps_beside_write"],
            "step_after_async_save_vs_plain_step": round(med["step_after_async_save_s"] / med["plain_step_s"], 3),
            "page_cache_dropped_before_load": all(dropped),
            "raw_seconds": rows["raw_s"], "save_seconds": rows["save_s"], "load_seconds": rows["load_s"],
            "async_stall_seconds": rows["async_stall_s"], "async_write_seconds": rows["async_write_s"],
            "plain_step_seconds": rows["plain_step_s"], "step_after_async_save_seconds": rows["step_after_async_save_s"],
            "host": platform.node(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
            "torch_threads_per_rank": torch.get_num_threads(),
            "torch": torch.__version__, "disk": str(root),
            "command": " ".join(sys.argv),
        }
        print(json.dumps(result, indent=1))
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1) + "\n")
            out.with_suffix(".md").write_text(_markdown(result))
        shutil.rmtree(root, ignore_errors=True)
    engine.close()
    del engine, model, manager, amanager
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
