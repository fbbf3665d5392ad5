"""Checkpoint save/load throughput against the raw write speed of the same disk, in one run.

Run under a launcher, one process per rank, exactly like training::

    torchrun --standalone --nproc_per_node 2 benchmarks/checkpoint_io.py \
        --engine fsdp --preset unet-sd15-ish --dir /tmp/ckpt-bench --out benchmarks/results/ckpt_io.json

Every number comes from the real code path (scaletrain's CheckpointManager over the chosen
engine, after one optimizer step so the Adam state exists). Per repetition:

- raw: each rank writes its share of the checkpoint's bytes to a plain file in 8 MiB
  chunks and fsyncs it (all ranks at once, like a save): the disk's sequential write speed.
- save: CheckpointManager.save (synchronous): write, barrier, meta.json, rename.
- load: CheckpointManager.load_latest (engine state + RNG + counters). The page cache is
  dropped first when this process may (root, /proc/sys/vm/drop_caches); the report says
  whether it was.
- async (FSDP2/DDP): CheckpointManager.save with async_save: the training stall (until the
  state is staged in CPU memory) as a fraction of the synchronous save time.

Throughput is checkpoint bytes (all ranks) / wall seconds. Medians over --repeats.
"""

from __future__ import annotations

import argparse
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
from scaletrain.config import CheckpointSection, validate_config  # noqa: E402
from scaletrain.distributed import init_distributed, shutdown_distributed  # noqa: E402
from scaletrain.engines import build_engine  # noqa: E402
from scaletrain.models import build_model  # noqa: E402


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


def _timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="fsdp", choices=["fsdp", "ddp", "deepspeed"])
    ap.add_argument("--deepspeed-config", default="ds_configs/zero3.json")
    ap.add_argument("--preset", default="dit-tiny")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/scaletrain-ckpt-bench", help="where checkpoints are written")
    ap.add_argument("--out", default=None, help="JSON results (rank 0); a Markdown table goes beside it")
    args = ap.parse_args()

    cfg = validate_config({
        "model": {"preset": args.preset},
        "train": {"stages": [{"name": "bench", "resolution": args.resolution, "steps": 1, "micro_batch": 1}]},
        "engine": {"kind": args.engine, "deepspeed_config": str(REPO / args.deepspeed_config)},
    }, check_paths=False)
    info = init_distributed(args.engine)
    torch.manual_seed(0)
    model = build_model(args.preset).to(info.device)
    engine = build_engine(cfg, model.denoiser, info, micro_batch=1, grad_accum=1)
    # one real optimizer step so the checkpoint holds Adam moments, as in training
    c, r = model.preset.in_channels, args.resolution // model.preset.vae_factor
    emb, mask = model.encode_text(["a red circle"], info.device)
    with engine.micro_step(is_last=True):
        out = engine.module(torch.randn(1, c, r, r, dtype=engine.input_dtype), torch.tensor([500]),
                            emb.to(engine.input_dtype), mask)
        engine.backward(out.float().pow(2).mean())
    engine.step(1e-4)

    root = Path(args.dir)
    if info.is_main:
        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    sync_cfg = CheckpointSection(dir=str(root / "sync"), keep_last=1, resume="auto")
    manager = CheckpointManager(sync_cfg, root, engine, info)
    state = {"step": 0, "stage": 0, "preset": args.preset}
    rows: dict[str, list[float]] = {"raw_s": [], "save_s": [], "load_s": [], "async_stall_s": [], "async_write_s": []}
    dropped = []
    nbytes = 0
    for rep in range(args.repeats):
        step = rep + 1
        rows["save_s"].append(_timed(lambda: manager.save(step, {**state, "step": step})))
        ckpt = latest_checkpoint(manager.dir)
        nbytes = _dir_bytes(ckpt.path)
        raw_file = root / f"raw-rank{info.rank}.bin"
        rows["raw_s"].append(_timed(lambda: _raw_write(raw_file, nbytes // info.world_size)))
        raw_file.unlink()
        dropped.append(_drop_page_cache() if info.is_main else True)
        rows["load_s"].append(_timed(manager.load_latest))
    if engine.name != "deepspeed":
        async_cfg = CheckpointSection(dir=str(root / "async"), keep_last=1, async_save=True)
        amanager = CheckpointManager(async_cfg, root, engine, info)
        for rep in range(args.repeats):
            records = amanager.save(rep + 1, {**state, "step": rep + 1})
            records += amanager.finalize()
            rows["async_stall_s"] += [m["checkpoint_stall_seconds"] for m in records if "checkpoint_stall_seconds" in m]
            rows["async_write_s"] += [m["checkpoint_write_seconds"] for m in records if "checkpoint_write_seconds" in m]

    if info.is_main:
        med = {k: statistics.median(v) for k, v in rows.items() if v}
        mb = nbytes / 1e6
        result = {
            "engine": engine.name if engine.name != "deepspeed" else f"deepspeed-zero{engine.zero_stage}",
            "preset": args.preset, "world_size": info.world_size, "checkpoint_mb": round(mb, 2),
            "repeats": args.repeats, "median_seconds": {k: round(v, 4) for k, v in med.items()},
            "raw_write_mb_s": round(mb / med["raw_s"], 1),
            "save_mb_s": round(mb / med["save_s"], 1),
            "load_mb_s": round(mb / med["load_s"], 1),
            "save_vs_raw": round(med["raw_s"] / med["save_s"], 3),
            "async_stall_fraction_of_sync_save": (round(med["async_stall_s"] / med["save_s"], 3)
                                                  if "async_stall_s" in med else None),
            "page_cache_dropped_before_load": all(dropped),
            "raw_seconds": rows["raw_s"], "save_seconds": rows["save_s"], "load_seconds": rows["load_s"],
            "async_stall_seconds": rows["async_stall_s"], "async_write_seconds": rows["async_write_s"],
            "host": platform.node(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
            "torch": torch.__version__, "disk": str(root),
            "command": " ".join(sys.argv),
        }
        print(json.dumps(result, indent=1))
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1) + "\n")
        shutil.rmtree(root, ignore_errors=True)
    engine.close()
    del engine, model, manager
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
