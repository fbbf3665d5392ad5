"""`scaletrain` command line: train | data synth | config check | ckpt ls/export | preflight | bench | size.

`launchers/pretrain.py` and `scaletrain train` share `pretrain_main`, so the recipe runs the
same under torchrun, the deepspeed launcher (which passes --local_rank) and plain python.
Flag names avoid prefixes of torchrun's own flags (torchrun parses abbreviations).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from scaletrain.config import ConfigError, dump_config, load_config


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key, e.g. --set optim.lr=3e-4 (repeatable)")


def pretrain_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pretrain", description="Pre-train a diffusion model from a YAML recipe.")
    _add_config_args(p)
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment is what we use.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, ValueError) as e:
        if _is_rank0():
            print(f"scaletrain: config error: {e}", file=sys.stderr)
        return 2
    return run_training(cfg)


def run_training(cfg) -> int:
    from scaletrain.distributed import init_distributed, shutdown_distributed
    from scaletrain.train.trainer import Trainer

    from scaletrain.train.health import HealthStop

    dist_info = init_distributed(cfg.engine.kind)
    trainer = Trainer(cfg, dist_info)
    rc = 0
    try:
        trainer.train()
    except HealthStop as e:  # raised on every rank together (the guard's verdict is agreed)
        if dist_info.is_main:
            print(f"scaletrain: {e}", file=sys.stderr, flush=True)
        rc = 3
    trainer.close()
    del trainer  # no DTensor/mesh may outlive the process group (see shutdown_distributed)
    shutdown_distributed()
    return rc


def _synth(args: argparse.Namespace) -> int:
    from scaletrain.data.synth import write_synthetic_shards

    shards = write_synthetic_shards(args.out, num_samples=args.num_samples, samples_per_shard=args.per_shard,
                                    resolution=args.resolution, seed=args.seed, image_format=args.format)
    print(f"wrote {args.num_samples} samples in {len(shards)} shards to {args.out}")
    return 0


def _config_check(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides, world_size=args.world_size)
    except (ConfigError, ValueError) as e:
        print(f"scaletrain: config error: {e}", file=sys.stderr)
        return 2
    print(dump_config(cfg), end="")
    return 0


def _ckpt(args: argparse.Namespace) -> int:
    from pathlib import Path

    from scaletrain.checkpoint.export import export_diffusers, format_listing

    if args.ckpt_cmd == "ls":
        run = Path(args.run)
        print(format_listing(run / "checkpoints" if (run / "checkpoints").is_dir() else run))
        return 0
    try:
        out, weights = export_diffusers(args.src, args.out, use_ema=not args.raw)
    except ValueError as e:
        print(f"scaletrain: {e}", file=sys.stderr)
        return 2
    which = "EMA weights" if weights == "ema" else "raw weights (the checkpoint has no EMA)" if not args.raw else "raw weights"
    print(f"exported diffusers model to {out} ({which})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # `deepspeed --module scaletrain.cli CMD` puts --local_rank=N before CMD; LOCAL_RANK is in the env.
    while argv and re.fullmatch(r"--local[_-]rank=\d+", argv[0]):
        argv.pop(0)
    if argv[:1] == ["preflight"]:  # its own parser, so other commands do not import torch
        from scaletrain.comm.preflight import preflight_main

        return preflight_main(argv[1:])
    p = argparse.ArgumentParser(prog="scaletrain", description="Distributed diffusion training toolkit.")
    sub = p.add_subparsers(dest="cmd", required=True)

    tr = sub.add_parser("train", help="run a training recipe (same as launchers/pretrain.py)")
    _add_config_args(tr)
    tr.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_cmd", required=True)
    syn = data.add_parser("synth", help="write synthetic captioned shards (img2dataset layout)")
    syn.add_argument("--out", required=True)
    syn.add_argument("--num-samples", type=int, default=512)
    syn.add_argument("--per-shard", type=int, default=64)
    syn.add_argument("--resolution", type=int, default=64)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--format", choices=["jpg", "png"], default="jpg")

    cc = sub.add_parser("config", help="config tools").add_subparsers(dest="config_cmd", required=True)
    chk = cc.add_parser("check", help="validate a recipe and print it resolved")
    _add_config_args(chk)
    chk.add_argument("--world-size", type=int, default=None, help="world size to validate against")

    ck = sub.add_parser("ckpt", help="checkpoint tools").add_subparsers(dest="ckpt_cmd", required=True)
    ls = ck.add_parser("ls", help="list a run's checkpoints (step, stage, size, complete/partial)")
    ls.add_argument("run", help="run folder (or its checkpoints/ folder)")
    ex = ck.add_parser("export", help="write a diffusers model folder (save_pretrained, safetensors)")
    ex.add_argument("src", help="run folder (latest complete checkpoint) or checkpoints/step-N")
    ex.add_argument("out", help="output folder")
    ex.add_argument("--raw", action="store_true", help="export the raw weights even when the checkpoint holds an EMA")

    # Listed for --help only: main() hands `preflight ...` to its own parser before this one runs.
    sub.add_parser("preflight", add_help=False, help="sweep all-reduce/all-gather/reduce-scatter, test links, "
                   "recommend bucket sizes (under torchrun -m scaletrain.cli or deepspeed --module scaletrain.cli)")

    from scaletrain.bench.commands import add_bench_parsers, bench_main, size_main

    add_bench_parsers(sub)  # `bench` and `size`

    args = p.parse_args(argv)
    if args.cmd == "bench":
        return bench_main(args)
    if args.cmd == "size":
        return size_main(args)
    if args.cmd == "ckpt":
        return _ckpt(args)
    if args.cmd == "train":
        return pretrain_main(["--config", args.config] + [x for o in args.overrides for x in ("--set", o)])
    if args.cmd == "data":
        return _synth(args)
    return _config_check(args)


if __name__ == "__main__":
    sys.exit(main())
