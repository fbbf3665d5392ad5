"""Where one training step's time goes: torch.profiler over a few steps of a preset on one
device (DDP engine at world size 1, bf16 on GPUs), printed as the top kernels by self device
time and the step's exposed host time (wall time the device sat idle).

    python3 benchmarks/profile_step.py --preset unet-sd2 --resolution 256 --micro-batch 32 --out prof.txt

Inputs are random latents/embeddings of the preset's shapes (no data loading, no VAE or text
encoder): this profiles the denoiser step the engine runs, which is what the levers change.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scaletrain.checks import validate_config  # noqa: E402
from scaletrain.distributed import init_distributed, shutdown_distributed  # noqa: E402
from scaletrain.engines import build_engine  # noqa: E402
from scaletrain.models import build_model, frozen_dtype  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="unet-tiny")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--activation-checkpointing", default="none", choices=["none", "full", "selective"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29555"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                       ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    dist_info = init_distributed("ddp")
    cuda = dist_info.device.type == "cuda"
    cfg = validate_config({"model": {"preset": args.preset, "compile": args.compile,
                                     "activation_checkpointing": args.activation_checkpointing},
                           "train": {"stages": [{"name": "p", "resolution": args.resolution, "steps": 1,
                                                 "micro_batch": args.micro_batch}]},
                           "engine": {"kind": "ddp", "precision": "bf16" if cuda else "fp32"},
                           "log": {"wandb": "disabled"}}, world_size=1, check_paths=False)
    torch.manual_seed(0)
    model = build_model(args.preset, dtype=frozen_dtype(cfg.engine.precision)).to(dist_info.device)
    engine = build_engine(cfg, model.denoiser, dist_info, micro_batch=args.micro_batch, grad_accum=1)
    side = args.resolution // model.preset.vae_factor
    x = torch.randn(args.micro_batch, model.preset.in_channels, side, side, device=dist_info.device)
    cond = {k: v.to(engine.input_dtype) if v.is_floating_point() else v
            for k, v in model.encode_text(["a photo"] * args.micro_batch, dist_info.device).items()}
    ts = torch.randint(0, 1000, (args.micro_batch,), device=dist_info.device)

    def step() -> None:
        with engine.micro_step(is_last=True):
            loss = engine.module(x.to(engine.input_dtype), ts, cond).float().pow(2).mean()
            engine.backward(loss)
        engine.step(1e-4)

    for _ in range(3):  # warm-up (and compile)
        step()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.steps
    events = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=25)
    device_busy = sum(e.self_device_time_total for e in events) / 1e6 / args.steps if cuda else wall
    lines = [f"# {args.preset} {args.resolution} px, micro-batch {args.micro_batch}, "
             f"{'bf16 ' + torch.cuda.get_device_name() if cuda else 'fp32 CPU'}, levers: activation checkpointing "
             f"{args.activation_checkpointing}, compile {args.compile}",
             f"step wall {wall:.4f} s; device busy {device_busy:.4f} s; exposed host/idle {max(0.0, wall - device_busy):.4f} s "
             f"({max(0.0, 1 - device_busy / wall):.1%} of the step)", "", table]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:2]))
    engine.close()
    del engine, model
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
