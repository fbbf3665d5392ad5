"""Trainer overhead: the full trainer's step time vs a bare loop, same model, engine and data, same run.

The bare loop is the benchmark cell (``scaletrain.bench.cell``: next batch, encode, forward,
backward, engine.step, nothing else). The trainer adds what a real run needs: the LR
schedule, the per-step loss/counter all-reduces, metrics, checkpoint and signal checks.
Runs alternate (bare, trainer, bare, trainer, ...) so load drift on a shared machine hits
both sides alike; the ratio of median step times is the result (target <= 1.03).

    python benchmarks/overhead.py --out benchmarks/results/cpu_overhead.json \
        --preset unet-tiny --resolution 32 --micro-batch 8 --engine fsdp --world-size 2 --steps 24 --pairs 4

Defaults are chosen against this 2-core machine's noise: the loader runs in the training
process (--num-workers 0; a worker process per rank competes with the ranks for the cores and
its timing differs between the two sides), 4 warm-up steps (2-rank steps stay slow for ~3
steps after start), and 20 timed steps per run in 4 alternating pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scaletrain.bench.cell import ENGINE_VARIANTS  # noqa: E402
from scaletrain.bench.runner import launch  # noqa: E402


def trainer_steps(args: argparse.Namespace, shards: str, run_dir: Path) -> list[float]:
    """Step seconds of a real trainer run (launchers/pretrain.py under torchrun), warm-up dropped."""
    kind, ds_json = ENGINE_VARIANTS[args.engine]
    sets = [f"data.shards={shards}", f"data.num_workers={args.num_workers}", "data.shuffle_buffer=0",
            f"run.dir={run_dir}", "log.wandb=disabled", "log.progress=false", "sample.at_end=false",
            "checkpoint.at_stage_end=false", "checkpoint.resume=never", f"engine.kind={kind}",
            f"model.preset={args.preset}",
            f"train.stages=[{{name: b, resolution: {args.resolution}, steps: {args.steps}, micro_batch: {args.micro_batch}}}]"]
    if ds_json:
        sets.append(f"engine.deepspeed_config={ds_json}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.world_size),
           "launchers/pretrain.py", "--config", "configs/demo.yaml", *[x for s in sets for x in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"trainer run failed:\n{r.stderr[-3000:]}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [x["step_seconds"] for x in recs if "loss" in x][args.warmup:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="unet-tiny")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--engine", default="fsdp", choices=list(ENGINE_VARIANTS))
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--num-workers", type=int, default=0)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="overhead-"))
    from scaletrain.data.synth import write_synthetic_shards

    write_synthetic_shards(work / "shards", num_samples=256, samples_per_shard=32, resolution=args.resolution, seed=0)
    shards = str(work / "shards")
    load_before = os.getloadavg()
    bare, trainer, pairs = [], [], []
    for i in range(args.pairs):
        spec = {"preset": args.preset, "resolution": args.resolution, "engine": args.engine,
                "micro_batch": args.micro_batch, "warmup": args.warmup, "reps": args.steps - args.warmup,
                "num_workers": args.num_workers, "shards": shards, "run_dir": str(work / "cellrun")}
        recs = launch(spec, args.world_size, work / "cells", 1800)
        if any(r["status"] != "ok" for r in recs):
            raise RuntimeError(f"bare loop failed: {recs[0]}")
        b = [max(r["steps"][k]["step"] for r in recs) for k in range(len(recs[0]["steps"]))]
        t = trainer_steps(args, shards, work / f"run{i}")
        bare += b
        trainer += t
        pairs.append(statistics.median(t) / statistics.median(b))
    result = {
        "what": "full trainer step time / bare engine loop step time (same model, engine, data; alternating runs)",
        "config": vars(args), "bare_step_seconds": bare, "trainer_step_seconds": trainer,
        "bare_median": statistics.median(bare), "trainer_median": statistics.median(trainer),
        "ratio": statistics.median(trainer) / statistics.median(bare), "ratio_per_pair": pairs,
        "ratio_median_of_pairs": statistics.median(pairs),
        "target": 1.03, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "command": "python " + " ".join(sys.argv),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"trainer/bare step time: {result['ratio']:.3f} (per pair {', '.join(f'{x:.3f}' for x in pairs)}); "
          f"bare {result['bare_median']:.3f} s, trainer {result['trainer_median']:.3f} s")


if __name__ == "__main__":
    main()
