"""Data headroom: the pipeline's images/s per worker at each stage resolution vs what training consumes.

For every curriculum stage of a recipe, one loader worker's rate is measured in-process
(``num_workers=0``: decode, resize, crop, caption handling, exactly the worker's code path)
and compared with the per-rank consumption rate of the training step, taken from a
``scaletrain bench`` results.json (matching preset/resolution/micro-batch; median img/s per
rank). Headroom = workers x per-worker rate / consumption; below 1 the step waits for data.

    python benchmarks/data_headroom.py --recipe configs/demo.yaml --bench benchmarks/results/cpu_matrix.json \
        --out benchmarks/results/cpu_data_headroom.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scaletrain.checks import load_config  # noqa: E402
from scaletrain.common.tars import expand_shards  # noqa: E402
from scaletrain.data.pipeline import LoaderSpec, build_loader  # noqa: E402
from scaletrain.models.registry import stage_buckets  # noqa: E402


def worker_rate(shards: list[str], resolution: int, micro_batch: int, batches: int, reps: int,
                buckets: tuple[tuple[int, int], ...] = ()) -> list[float]:
    """Images/s of one loader worker (in-process), one value per repetition, first batch excluded
    (it opens the shard). ``buckets``: the stage's aspect-ratio buckets when the recipe has them."""
    spec = LoaderSpec(shards=shards, resolution=resolution, micro_batch=micro_batch, num_workers=0, seed=0,
                      buckets=buckets)
    it = iter(build_loader(spec))
    next(it)
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        rates.append(batches * micro_batch / (time.perf_counter() - t0))
    return rates


def consumption(bench: dict | None, preset: str, resolution: int, micro_batch: int) -> dict | None:
    """Per-rank img/s the step consumes, from the fastest measured engine at this shape."""
    best = None
    for c in (bench or {}).get("cells", []):
        if (c["status"] == "ok" and not c.get("search_probe") and c["preset"] == preset
                and c["resolution"] == resolution and c["micro_batch"] == micro_batch):
            per_rank = c["images_per_second"]["median"] / c["world_size"]
            if best is None or per_rank > best["per_rank"]:
                best = {"per_rank": per_rank, "engine": c["engine"], "world_size": c["world_size"]}
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="configs/demo.yaml")
    p.add_argument("--bench", default=None, help="scaletrain bench results.json for the consumption side")
    p.add_argument("--shards", default=None, help="default: synthetic shards at the largest stage resolution")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--world-size", type=int, default=2, help="the recipe's world size (for its batch identity)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    cfg = load_config(args.recipe, check_paths=False, world_size=args.world_size)
    shards = args.shards
    if shards is None:
        from scaletrain.data.synth import write_synthetic_shards

        shards = str(Path(tempfile.mkdtemp(prefix="headroom-")) / "shards")
        write_synthetic_shards(shards, num_samples=256, samples_per_shard=32,
                               resolution=max(s.resolution for s in cfg.train.stages), seed=0)
    bench = json.loads(Path(args.bench).read_text()) if args.bench else None
    rows = []
    for i, st in enumerate(cfg.train.stages):
        rates = worker_rate(expand_shards(shards), st.resolution, st.micro_batch, args.batches, args.reps,
                            tuple(stage_buckets(cfg, i)))
        rate = statistics.median(rates)
        need = consumption(bench, cfg.model.preset, st.resolution, st.micro_batch)
        row = {"stage": st.name, "resolution": st.resolution, "micro_batch": st.micro_batch,
               "worker_images_per_second": rate, "worker_rate_reps": rates, "num_workers": cfg.data.num_workers}
        if need:
            row.update(step_images_per_second_per_rank=need["per_rank"], measured_on=need,
                       headroom=max(1, cfg.data.num_workers) * rate / need["per_rank"],
                       workers_needed=math.ceil(need["per_rank"] / rate))
        rows.append(row)
        print(f"{st.name} {st.resolution}px: one worker {rate:.0f} img/s"
              + (f"; step consumes {need['per_rank']:.1f} img/s per rank -> headroom {row['headroom']:.1f}x "
                 f"with {cfg.data.num_workers} worker(s)" if need else "; no bench cell for the consumption side"))
    Path(args.out).write_text(json.dumps({"recipe": args.recipe, "preset": cfg.model.preset, "stages": rows,
                                          "loadavg": os.getloadavg(), "command": "python " + " ".join(sys.argv)},
                                         indent=1))


if __name__ == "__main__":
    main()
