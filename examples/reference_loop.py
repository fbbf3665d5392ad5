"""The numerics reference: a whole single-process diffusion training loop in plain PyTorch.

No engine, no config tree, no process group: the model presets, the data pipeline and the
diffusion objective are used directly, and everything else (accumulation, clipping, AdamW,
warm-up + cosine LR) is written out here. `tests/distributed/test_reference_loop.py` checks that the
full trainer reproduces this loop's losses, so a change in the trainer or an engine that
alters the math shows up as a difference from these ~70 lines.

    python examples/reference_loop.py --shards 'data/synth/shard-{000000..000007}.tar' --steps 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scaletrain.common.tars import expand_shards  # noqa: E402
from scaletrain.data.pipeline import LoaderSpec, build_loader  # noqa: E402
from scaletrain.diffusion import build_objective  # noqa: E402
from scaletrain.models import build_model  # noqa: E402
from scaletrain.train.schedule import lr_at  # noqa: E402


def train(args: argparse.Namespace) -> list[float]:
    torch.manual_seed(args.seed)
    model = build_model(args.preset, encoder_seed=args.seed)  # random-init encoders: their own seed, as the trainer
    net = model.denoiser
    objective = build_objective("ddpm", {"prediction_type": args.prediction_type, "min_snr_gamma": args.min_snr_gamma})
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01, foreach=False)
    spec = LoaderSpec(shards=expand_shards(args.shards), resolution=args.resolution, micro_batch=args.micro_batch,
                      caption_dropout=args.caption_dropout, num_workers=0, split="sample", seed=args.seed)
    batches = iter(build_loader(spec))
    losses = []
    for step in range(args.steps):
        total = 0.0
        for _ in range(args.grad_accum):
            batch = next(batches)
            x0 = model.encode_images(batch["pixels"])
            cond = model.encode_text(batch["captions"], "cpu")
            tb = objective.training_batch(x0, batch["keys"], step=step, seed=args.seed)
            loss, _ = objective.loss(net(tb.noisy, tb.timesteps, cond).float(), tb)
            (loss / args.grad_accum).backward()
            total += loss.item() / args.grad_accum
        torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total_steps=args.steps, base_lr=args.lr, warmup_steps=args.warmup_steps)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--preset", default="unet-tiny")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--prediction-type", default="epsilon")
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    print(json.dumps({"losses": train(p.parse_args())}))


if __name__ == "__main__":
    main()
