"""DDPM vs flow matching on the synthetic task at equal steps: the same recipe, seed, data and
model, only ``diffusion.objective`` switched; the FID proxy at each validation and the loss.

Each objective trains configs/demo.yaml (unet-tiny, two curriculum stages, 140 steps) under
torchrun with 2 ranks, exactly as a user would, with validation every --every steps at one
resolution (the FIDs compare across steps and objectives). One run per objective and seed:
the FID proxy on 48 images is noisy, so read differences below ~10 % as ties.

    python benchmarks/objective_compare.py --out benchmarks/results/cpu_objective_compare.json

Writes the JSON and a Markdown table beside it (.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(objective: str, shards: str, run_dir: Path, every: int, seed: int, extra: list[str]) -> dict:
    sets = [f"diffusion.objective={objective}", f"data.shards={shards}", f"run.dir={run_dir}", f"run.seed={seed}",
            "checkpoint.resume=never", "log.wandb=disabled", "log.progress=false", "sample.at_end=false",
            f"validate.every_steps={every}", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "launchers/pretrain.py", "--config", "configs/demo.yaml", *[x for s in sets for x in ("--set", s)]]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{objective} run failed:\n{r.stderr[-3000:]}")
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln]
    vals = [m for m in records if m.get("validation")]
    label = next(k for k in vals[0] if k.startswith("fid"))
    losses = [m["loss"] for m in records if "loss" in m]
    tail = losses[-20:]
    import yaml

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    preset = saved["model"]["preset"]
    stages = ", then ".join(f"{st['steps']} steps at {st['resolution']} px" for st in saved["train"]["stages"])
    return {"objective": objective, "seed": seed, "preset": preset, "stages": stages, "seconds": round(seconds, 1), "fid_label": label,
            "fid": [[m["step"], round(m[label], 3)] for m in vals], "final_loss_mean_last20": sum(tail) / len(tail),
            "steps": len(losses)}


def _markdown(result: dict) -> str:
    runs = result["runs"]
    steps = sorted({s for r in runs for s, _ in r["fid"]})
    head = "| objective | seed | " + " | ".join(f"FID proxy @ step {s}" for s in steps) + " | train seconds |"
    rows = [head, "|" + "---|" * (len(steps) + 3)]
    for r in runs:
        by_step = dict((s, v) for s, v in r["fid"])
        rows.append(f"| {r['objective']} | {r['seed']} | " + " | ".join(f"{by_step.get(s, '-')}" for s in steps)
                    + f" | {r['seconds']} |")
    return "\n".join([
        f"# DDPM vs flow matching, equal steps ({result['cpus']} CPUs, {result['host']})",
        "",
        f"Written by `python {result['command']}`. Recipe: configs/demo.yaml ({runs[0].get('preset', 'unet-tiny')}, "
        f"{runs[0].get('stages', '100 steps at 32 px, then 40 steps at 64 px')}, 2 ranks), validation FID proxy (`" + runs[0]["fid_label"] + "`, 48 images at 32 px, lower "
        "is better); only `diffusion.objective` differs (DDPM: v-prediction, cosine betas, Min-SNR-5, noise "
        "offset 0.05; flow matching: logit-normal sigma, shift 1).",
        "",
        *rows,
        "",
        "Losses are not compared: the two objectives regress different targets (v vs velocity).",
        "",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default=None, help="image shards (default: write the demo's synthetic set)")
    ap.add_argument("--every", type=int, default=35, help="validate every N steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--set", dest="extra", action="append", default=[],
                    help="more recipe overrides, e.g. --set model.preset=mmdit-tiny")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            subprocess.run([str(BIN / "scaletrain"), "data", "synth", "--out", f"{tmp}/synth", "--num-samples", "1024",
                            "--per-shard", "128", "--resolution", "64", "--seed", "0"], check=True, capture_output=True)
            shards = f"{tmp}/synth/shard-{{000000..000007}}.tar"
        runs = [_run(obj, shards, Path(tmp) / f"{obj}-{seed}", args.every, seed, args.extra)
                for seed in args.seeds for obj in ("ddpm", "flow_matching")]
    result = {"runs": runs, "host": platform.node(), "cpus": os.cpu_count(),
              "command": " ".join(["benchmarks/objective_compare.py", *sys.argv[1:]])}
    print(json.dumps(result, indent=1))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
