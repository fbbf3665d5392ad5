"""Latent path: training step time online (VAE + text encoder every step) vs from precomputed
latents, and regional compile vs eager on the precomputed path, in one run.

Run under a launcher, one process per rank, exactly like training::

    torchrun --standalone --nproc_per_node 2 benchmarks/latent_path.py \\
        --preset unet-tiny-latent --resolution 64 --micro-batch 8 --reps 10 \\
        --out benchmarks/results/cpu_latent_path.json

Every rank builds one FSDP2 engine per variant through scaletrain's ``build_engine`` (same
seed, same weights; ``compile`` with ``model.compile: true``) and times whole training steps
round-robin: rep 1 online, precomputed, compile; rep 2 ... so each ratio compares steps taken
seconds apart on the same noisy host. A step is what the trainer's ``DenoisingLoss`` +
``engine.step`` do for one micro-batch: online, the frozen VAE encodes the pixels and the
text encoder the captions, then a keyed posterior sample, noise, forward, loss, backward,
AdamW; precomputed, the posterior sample is drawn from the stored mean/logvar and the stored
text embedding is used (what ``scaletrain data encode`` writes, computed here once from the
same pixels). Data loading is not in the step (both batches are in memory). Step time is
rank 0's wall time (a barrier closes each step); a ratio is the median of per-rep ratios.
Compile's warm-up (the first steps, which trace and compile each unit) is reported apart.
A Markdown summary is written next to the JSON (same name, .md).
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
from scaletrain.diffusion import build_objective  # noqa: E402
from scaletrain.diffusion.seeding import posterior_generators  # noqa: E402
from scaletrain.distributed import init_distributed, shutdown_distributed  # noqa: E402
from scaletrain.engines import build_engine  # noqa: E402
from scaletrain.models import build_model  # noqa: E402

VARIANTS = ("online", "precomputed", "compile")


def _engine(preset: str, resolution: int, micro: int, compile_: bool, dist_info):
    cfg = validate_config({"model": {"preset": preset, "compile": compile_},
                           "train": {"stages": [{"name": "b", "resolution": resolution, "steps": 1,
                                                 "micro_batch": micro}]},
                           "engine": {"kind": "fsdp"}, "log": {"wandb": "disabled"}},
                          world_size=dist_info.world_size, check_paths=False)
    torch.manual_seed(0)
    model = build_model(preset, encoders=not compile_)  # the compile variant never runs the encoders
    engine = build_engine(cfg, model.denoiser, dist_info, micro_batch=micro, grad_accum=1)
    return model, engine


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="unet-tiny-latent")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--no-compile", action="store_true",
                   help="skip the compile variant (a real-size preset's second engine may not fit in host memory)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    variants = VARIANTS[:2] if args.no_compile else VARIANTS
    dist_info = init_distributed("fsdp")
    built = {"online": _engine(args.preset, args.resolution, args.micro_batch, False, dist_info)}
    if "compile" in variants:
        built["compile"] = _engine(args.preset, args.resolution, args.micro_batch, True, dist_info)
    built["precomputed"] = built["online"]  # same module: the variants differ only in their inputs
    model = built["online"][0]
    objective = build_objective("ddpm", {"prediction_type": "epsilon", "min_snr_gamma": 5.0})
    g = torch.Generator().manual_seed(dist_info.rank)
    pixels = torch.rand(args.micro_batch, 3, args.resolution, args.resolution, generator=g) * 2 - 1
    captions = [f"a red circle number {i} on the left" for i in range(args.micro_batch)]
    keys = [f"r{dist_info.rank}-{i}" for i in range(args.micro_batch)]
    mean, logvar = model.encode_posterior(pixels)  # what `data encode` stores
    stored = model.encode_text(captions, dist_info.device)
    step_no = [0]

    def step(variant: str) -> None:
        engine = built[variant][1]
        step_no[0] += 1
        gens = posterior_generators(0, step_no[0], keys)
        if variant == "online":
            x0 = model.encode_images(pixels, gens)
            cond = model.encode_text(captions, dist_info.device)
        else:
            x0 = model.latents_from_posterior(mean, logvar, gens)
            cond = stored
        batch = objective.training_batch(x0, keys, step=step_no[0], seed=0)
        with engine.micro_step(is_last=True):
            pred = engine.module(batch.noisy, batch.timesteps, cond)
            loss, _ = objective.loss(pred.float(), batch)
            engine.backward(loss)
        engine.step(1e-4)

    warm: dict[str, float] = {}
    for variant in variants:
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step(variant)
        dist.barrier()
        warm[variant] = time.perf_counter() - t0
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.reps):
        for variant in variants:
            dist.barrier()
            t0 = time.perf_counter()
            step(variant)
            dist.barrier()
            times[variant].append(time.perf_counter() - t0)
    if dist_info.is_main:
        def ratio(a: str, b: str) -> float:
            return statistics.median(x / y for x, y in zip(times[a], times[b]))

        result = {
            "command": "torchrun --standalone --nproc_per_node %d benchmarks/latent_path.py %s"
                       % (dist_info.world_size, " ".join(sys.argv[1:])),
            "host": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
                     "torch": torch.__version__},
            "preset": args.preset, "resolution": args.resolution, "micro_batch": args.micro_batch,
            "world_size": dist_info.world_size, "engine": "fsdp", "reps": args.reps, "warmup_steps": args.warmup,
            "step_seconds": times, "warmup_seconds": warm,
            "median_step_seconds": {v: statistics.median(t) for v, t in times.items()},
            "precomputed_vs_online": ratio("precomputed", "online"),
            "compile_vs_eager": ratio("compile", "precomputed") if "compile" in variants else None,
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        md = _markdown(result)
        out.with_suffix(".md").write_text(md)
        print(md)
    del built, model
    shutdown_distributed()
    return 0


def _markdown(r: dict) -> str:
    m = r["median_step_seconds"]
    return "\n".join([
        f"# Latent path: {r['preset']} at {r['resolution']} px, micro-batch {r['micro_batch']}, "
        f"{r['world_size']} rank(s), FSDP2", "", f"Command: `{r['command']}`", "",
        f"Host: {r['host']['platform']}, torch {r['host']['torch']}, {r['host']['cpu_threads']} thread(s) per rank; "
        f"{r['reps']} round-robin reps after {r['warmup_steps']} warm-up steps each.", "",
        "| variant | median step s | vs online | vs precomputed (eager) | warm-up s |", "|---|---|---|---|---|",
        f"| online (VAE + text encoder every step) | {m['online']:.4f} | 1.000 | - | {r['warmup_seconds']['online']:.1f} |",
        f"| precomputed latents | {m['precomputed']:.4f} | {r['precomputed_vs_online']:.3f} | 1.000 | "
        f"{r['warmup_seconds']['precomputed']:.1f} |",
        *([f"| precomputed + regional compile | {m['compile']:.4f} | - | {r['compile_vs_eager']:.3f} | "
           f"{r['warmup_seconds']['compile']:.1f} |"] if "compile" in m else []), ""])


if __name__ == "__main__":
    sys.exit(main())
