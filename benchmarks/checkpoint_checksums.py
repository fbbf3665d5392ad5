"""What checkpoint.checksums costs: save and load of one checkpoint with and without them, in
one run, alternating, on the real code path (CheckpointManager over the chosen engine after a
real optimizer step, so the Adam moments are in it).

    torchrun --standalone --nproc_per_node 2 benchmarks/checkpoint_checksums.py \\
        --engine fsdp --preset dit-b-2 --out benchmarks/results/cpu_checkpoint_checksums.json

Per repetition, in alternating order (neither always runs second), each after os.sync() and
--settle seconds of quiet disk: a save with checksums (the engine's writers hash (XXH3-64) each
file as they write it, the ranks read back only the few small files no writer hashed, rank 0
records them all in meta.json) and one without (plain writers, nothing hashed), each followed by a load of
what it wrote (with checksums: verified first, each rank its share). The page cache is dropped
before each load when this process may (root). Reported: medians over --repeats, and the
overhead ratios (with - without) / without; the goal is at most 5 % of the save time.
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
from scaletrain.checks import validate_config  # noqa: E402
from scaletrain.config import CheckpointSection  # noqa: E402
from scaletrain.distributed import init_distributed, shutdown_distributed  # noqa: E402
from scaletrain.engines import build_engine  # noqa: E402
from scaletrain.models import build_model  # noqa: E402
from scaletrain.train.step import cast_cond  # noqa: E402


def _settle(seconds: float) -> None:
    os.sync()
    dist.barrier()
    time.sleep(seconds)
    dist.barrier()


def _drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _timed(fn, settle: float) -> float:
    _settle(settle)
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="fsdp", choices=["fsdp", "ddp", "deepspeed"])
    ap.add_argument("--deepspeed-config", default="ds_configs/zero3.json")
    ap.add_argument("--preset", default="dit-tiny")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--settle", type=float, default=2.0)
    ap.add_argument("--dir", default="/tmp/scaletrain-checksum-bench")
    ap.add_argument("--out", default=None, help="JSON results (rank 0); a Markdown table goes beside it")
    args = ap.parse_args()

    cfg = validate_config({
        "model": {"preset": args.preset},
        "train": {"stages": [{"name": "bench", "resolution": 32, "steps": 1, "micro_batch": 1}]},
        "engine": {"kind": args.engine, "deepspeed_config": str(REPO / args.deepspeed_config)},
    }, check_paths=False)
    info = init_distributed(args.engine)
    torch.manual_seed(0)
    model = build_model(args.preset).to(info.device)
    engine = build_engine(cfg, model.denoiser, info, micro_batch=1, grad_accum=1)
    c, r = model.preset.in_channels, 32 // model.preset.vae_factor
    cond = cast_cond(model.encode_text(["a red circle"], info.device), engine.input_dtype)
    with engine.micro_step(is_last=True):
        out = engine.module(torch.randn(1, c, r, r, dtype=engine.input_dtype), torch.tensor([500]), cond)
        engine.backward(out.float().pow(2).mean())
    engine.step(1e-4)

    root = Path(args.dir)
    if info.is_main:
        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    managers = {on: CheckpointManager(CheckpointSection(dir=str(root / ("on" if on else "off")), keep_last=1,
                                                        checksums=on), root, engine, info) for on in (True, False)}
    rows: dict[str, list[float]] = {f"{k}_{on}": [] for k in ("save_s", "load_s") for on in ("on", "off")}
    dropped, nbytes, counts = [], 0, {}
    for rep in range(args.repeats):
        order = (True, False) if rep % 2 == 0 else (False, True)
        for on in order:
            m, tag = managers[on], "on" if on else "off"
            step = rep + 1
            rows[f"save_s_{tag}"].append(_timed(lambda: m.save(step, {"step": step, "stage": 0, "preset": args.preset}),
                                                args.settle))
            ckpt = latest_checkpoint(m.dir)
            nbytes = sum(f.stat().st_size for f in ckpt.path.rglob("*") if f.is_file())
            assert ("files" in ckpt.meta) == on
            if on:  # what the commit hashed as written and what it read back (rank 0's view: all ranks')
                counts = dict(m.last_checksums)
            dropped.append(_drop_page_cache() if info.is_main else True)
            rows[f"load_s_{tag}"].append(_timed(m.load_latest, args.settle))
    med = {k: statistics.median(v) for k, v in rows.items()}
    result = {
        "preset": args.preset, "engine": args.engine, "world_size": info.world_size, "repeats": args.repeats,
        "checkpoint_bytes": nbytes, "page_cache_dropped_before_loads": all(dropped),
        "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "median_s": med, "runs_s": rows, "checksum_counts": counts,
        "save_overhead": (med["save_s_on"] - med["save_s_off"]) / med["save_s_off"],
        "load_overhead": (med["load_s_on"] - med["load_s_off"]) / med["load_s_off"],
        "command": "torchrun --standalone --nproc_per_node %d benchmarks/checkpoint_checksums.py %s" % (
            info.world_size, " ".join(sys.argv[1:])),
    }
    if info.is_main:
        print(json.dumps(result, indent=1))
        if args.out:
            out = Path(args.out)
            out.write_text(json.dumps(result, indent=1) + "\n")
            out.with_suffix(".md").write_text(_markdown(result))
    dist.barrier()
    shutdown_distributed()
    return 0


def _markdown(r: dict) -> str:
    m = r["median_s"]
    gb = r["checkpoint_bytes"] / 1e9
    return "\n".join([
        f"# Checkpoint checksums: {r['preset']} on {r['engine']} x{r['world_size']} ({gb:.2f} GB checkpoint)",
        "",
        f"Written by `{r['command']}`; medians of {r['repeats']} alternating repetitions "
        f"(page cache dropped before loads: {r['page_cache_dropped_before_loads']}).",
        "",
        "| | without checksums | with checksums | overhead |",
        "|---|---|---|---|",
        f"| save (s) | {m['save_s_off']:.2f} | {m['save_s_on']:.2f} | {100 * r['save_overhead']:+.1f} % |",
        f"| load (s) | {m['load_s_off']:.2f} | {m['load_s_on']:.2f} | {100 * r['load_overhead']:+.1f} % |",
        "",
        "Hashed as written by the engine's writers: {checksum_written_files} files, {checksum_written_bytes:,} bytes; "
        "read back: {checksum_read_back_files} files, {checksum_read_back_bytes:,} bytes.".format(**r["checksum_counts"]),
        "",
        "Every run (s): " + "; ".join(f"{k} " + ", ".join(f"{x:.2f}" for x in v) for k, v in r["runs_s"].items()),
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
