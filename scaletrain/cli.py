"""`scaletrain` command line: train | sft | lora | dpo | data synth | synth-pairs | config check | ckpt ls/export/export-lora | preflight | bench | size | slurm plan.

`launchers/pretrain.py` and `scaletrain train` share `pretrain_main`, so the recipe runs the
same under torchrun, the deepspeed launcher (which passes --local_rank) and plain python.
Flag names avoid prefixes of torchrun's own flags (torchrun parses abbreviations).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import TYPE_CHECKING

from scaletrain.checks import load_run_config
from scaletrain.config import ConfigError, RunConfig, dump_config
from scaletrain.checks import load_config

if TYPE_CHECKING:  # train/step.py imports torch; `scaletrain --help` should not
    from scaletrain.train.step import BatchBuilder, LossFactory


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _refuse_before_launch(message: str, wait_s: float = 60.0) -> int:
    """A recipe refused before the process group exists: rank 0 prints the one line; the other
    ranks wait for the launcher to stop them once rank 0 has exited.

    Every rank finds the same error, but if another rank exits first, torchrun (and the
    deepspeed launcher) SIGTERM rank 0 before it has printed: CI once got a failed launch
    with no ``scaletrain:`` line at all. A rank whose rank 0 never fails (a file only it
    sees) exits after ``wait_s`` on its own, so nothing hangs.
    """
    if _is_rank0():
        print(message, file=sys.stderr, flush=True)
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import time

        time.sleep(wait_s)
    return 2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key, e.g. --set optim.lr=3e-4 (repeatable)")


def _launch(prog: str, description: str, argv: list[str] | None, check=None, loss=None, batches=None) -> int:
    """Every training launcher: parse --config/--set, validate once (plus the launcher's own
    ``check(cfg)``, which may return the recipe completed), print a config error as one line on
    rank 0 (exit 2), else train with the launcher's ``loss`` factory and batch builder (None: the
    trainer's denoising loss and image stream)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    _add_config_args(p)
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment is what we use.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from scaletrain.common.safe_load import CheckpointLoadError

    try:
        cfg = load_run_config(args.config, args.overrides)
        if check is not None:
            cfg = check(cfg) or cfg
    except (ConfigError, ValueError) as e:
        return _refuse_before_launch(f"scaletrain: config error: {e}")
    except CheckpointLoadError as e:  # an init source's file refused or damaged
        return _refuse_before_launch(f"scaletrain: {e}")
    return run_training(cfg, loss, batches)


def pretrain_main(argv: list[str] | None = None) -> int:
    return _launch("pretrain", "Pre-train a diffusion model from a YAML recipe.", argv)


def _posttrain_check(prog: str, require_lora: bool):
    """SFT and LoRA: the pre-training loop from start weights (``init``), optionally with
    adapters (``lora``); the launchers only insist on what makes the run what it is named."""

    def check(cfg: RunConfig) -> None:
        if cfg.init.source is None:
            raise ConfigError(f"{prog} starts from trained weights: set init.from_checkpoint=RUN_DIR or "
                              "init.from_diffusers=EXPORTED_MODEL")
        if require_lora != cfg.lora.enabled:
            raise ConfigError("launchers/lora.py trains adapters: set lora.enabled=true" if require_lora else
                              "launchers/sft.py trains all weights: set lora.enabled=false or use launchers/lora.py")

    return check


def sft_main(argv: list[str] | None = None) -> int:
    """Supervised fine-tuning of all weights (launchers/sft.py)."""
    return _launch("sft", "Fine-tune all weights from a checkpoint or exported model.", argv,
                   _posttrain_check("sft", require_lora=False))


def lora_main(argv: list[str] | None = None) -> int:
    """LoRA fine-tuning, base weights frozen (launchers/lora.py)."""
    return _launch("lora", "Train LoRA adapters on a checkpoint or exported model.", argv,
                   _posttrain_check("lora", require_lora=True))


def dpo_main(argv: list[str] | None = None) -> int:
    """Diffusion-DPO on preference-pair shards (launchers/dpo.py); the recipe's ``dpo`` section
    holds beta, data.shards the pairs."""
    from scaletrain.train.dpo import PreferenceLoss, dpo_recipe, pair_batches

    return _launch("dpo", "Diffusion-DPO post-training from a YAML recipe.", argv, dpo_recipe,
                   loss=PreferenceLoss, batches=pair_batches)


def run_training(cfg: RunConfig, loss: LossFactory | None = None, batches: BatchBuilder | None = None) -> int:
    """Run the Trainer (with a launcher's loss factory and batch builder, ``train/step.py``)
    under the launcher's process group."""
    from scaletrain.distributed import init_distributed, shutdown_distributed
    from scaletrain.train.trainer import Trainer

    from scaletrain.train.health import HealthStop

    from scaletrain.common.safe_load import CheckpointLoadError

    dist_info = init_distributed(cfg.engine.kind)
    try:
        trainer = Trainer(cfg, dist_info, loss=loss, batches=batches)
    except (ConfigError, CheckpointLoadError) as e:  # found at start, alike on every rank (validation
        # shards, a resumed stage's length; a refused checkpoint file is agreed across ranks)
        if dist_info.is_main:
            kind = "config error: " if isinstance(e, ConfigError) else ""
            print(f"scaletrain: {kind}{e}", file=sys.stderr, flush=True)
        shutdown_distributed()
        return 2
    rc = 0
    try:
        trainer.train()
    except HealthStop as e:  # raised on every rank together (the guard's verdict is agreed)
        if dist_info.is_main:
            print(f"scaletrain: {e}", file=sys.stderr, flush=True)
        rc = 3
    except CheckpointLoadError as e:  # a rollback's checkpoint refused, on every rank together
        if dist_info.is_main:
            print(f"scaletrain: {e}", file=sys.stderr, flush=True)
        rc = 2
    trainer.close()
    del trainer  # no DTensor/mesh may outlive the process group (see shutdown_distributed)
    shutdown_distributed()
    return rc


def _synth(args: argparse.Namespace) -> int:
    from scaletrain.data.synth import write_synthetic_shards, write_synthetic_video_shards

    if args.video:
        shards = write_synthetic_video_shards(args.out, num_samples=args.num_samples, samples_per_shard=args.per_shard,
                                              resolution=args.resolution, frames=args.frames, fps=args.fps,
                                              seed=args.seed, video_format=args.video_format)
        print(f"wrote {args.num_samples} clips ({args.frames} frames at {args.fps} fps) in {len(shards)} shards "
              f"to {args.out}")
        return 0
    shards = write_synthetic_shards(args.out, num_samples=args.num_samples, samples_per_shard=args.per_shard,
                                    resolution=args.resolution, seed=args.seed, image_format=args.format,
                                    labels=args.labels, aspect_ratios=args.aspect_ratios)
    labelled = f" labelled {args.labels}" if args.labels else ""
    print(f"wrote {args.num_samples} samples in {len(shards)} shards to {args.out}{labelled}")
    return 0


def _synth_pairs(args: argparse.Namespace) -> int:
    from scaletrain.data.synth_pairs import write_preference_shards

    try:
        shards = write_preference_shards(args.out, num_pairs=args.num_pairs, pairs_per_shard=args.per_shard,
                                         resolution=args.resolution, seed=args.seed, image_format=args.format)
    except ValueError as e:
        print(f"scaletrain: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.num_pairs} preference pairs in {len(shards)} shards to {args.out}")
    return 0


def _encode(args: argparse.Namespace) -> int:
    """``scaletrain data encode``: as one process or under torchrun (each rank its share of shards)."""
    import torch

    from scaletrain.distributed import init_distributed, shutdown_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank0 = _is_rank0()
    if world > 1:
        init_distributed("ddp")
    rc = 0
    try:
        from scaletrain.data.latents import encode_dataset

        cfg = load_config(args.config, args.overrides, check_paths=False)
        shards = args.shards if args.shards is not None else cfg.data.shards
        resolutions = args.resolution or sorted({s.resolution for s in cfg.train.stages})
        device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available()
                  else torch.device("cpu"))
        summary = encode_dataset(cfg, shards, args.out, resolutions, batch_size=args.batch_size, device=device,
                                 progress=not args.no_progress)
        if rank0:
            for r, e in summary["resolutions"].items():
                print(f"data encode {r}px: {e['samples_written']} samples written in {e['shards_written']} shards "
                      f"({e['shards_resumed']} already done), corrupt={e['corrupt']} -> {e['folder']}")
            print(f"train on them with --set data.shards={args.out} (data.precomputed is detected)")
    except (ConfigError, ValueError) as e:
        if rank0:
            print(f"scaletrain: {e}", file=sys.stderr)
        rc = 2
    if world > 1:
        shutdown_distributed()
    return rc


def _config_check(args: argparse.Namespace) -> int:
    try:
        cfg = load_run_config(args.config, args.overrides, world_size=args.world_size)
    except (ConfigError, ValueError) as e:
        print(f"scaletrain: config error: {e}", file=sys.stderr)
        return 2
    print(dump_config(cfg), end="")
    from scaletrain.config import world_size_from_env
    from scaletrain.engines.checks import config_notes

    # what the engine filled in (DeepSpeed: what each "auto" became), as comments after the YAML
    print("".join(f"# {line}\n" for line in config_notes(cfg, args.world_size or world_size_from_env())), end="")
    return 0


def _ckpt(args: argparse.Namespace) -> int:
    from pathlib import Path

    from scaletrain.checkpoint.export import export_diffusers, format_listing
    from scaletrain.common.safe_load import CheckpointLoadError

    try:
        if args.ckpt_cmd == "ls":
            run = Path(args.run)
            print(format_listing(run / "checkpoints" if (run / "checkpoints").is_dir() else run))
            return 0
        if args.ckpt_cmd == "export-lora":
            from scaletrain.checkpoint.export import export_lora

            out, weights, layout = export_lora(args.src, args.out, use_ema=not args.raw, with_base=args.with_base)
        elif args.pipeline:
            from scaletrain.checkpoint.export import export_pipeline

            out, weights, pipeline = export_pipeline(args.src, args.out, use_ema=not args.raw)
        else:
            out, weights, scheduler = export_diffusers(args.src, args.out, use_ema=not args.raw)
    except (ValueError, CheckpointLoadError) as e:
        print(f"scaletrain: {e}", file=sys.stderr)
        return 2
    which = "EMA weights" if weights == "ema" else "raw weights (the checkpoint has no EMA)" if not args.raw else "raw weights"
    if args.ckpt_cmd == "export-lora":
        base = f", base model in {out / 'base'}" if args.with_base else ""
        print(f"exported LoRA adapter ({layout} layout, {which}) to {out}{base}")
        return 0
    if args.pipeline:
        print(f"exported {pipeline} to {out} ({which}): DiffusionPipeline.from_pretrained({str(out)!r}) loads it")
        return 0
    sampler = (f"; sample it with its {scheduler} in {out / 'scheduler'}" if scheduler else
               "; the checkpoint does not record its objective, so no scheduler was written")
    print(f"exported diffusers model to {out} ({which}){sampler}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # `deepspeed --module scaletrain.cli CMD` puts --local_rank=N before CMD; LOCAL_RANK is in the env.
    while argv and re.fullmatch(r"--local[_-]rank=\d+", argv[0]):
        argv.pop(0)
    if argv[:1] == ["preflight"]:  # its own parser, so other commands do not import torch
        from scaletrain.comm.preflight import preflight_main

        return preflight_main(argv[1:])
    if argv[:2] == ["slurm", "plan"]:  # runs in the sbatch script before anything launches
        from scaletrain.slurm import _plan_main

        return _plan_main(argv[2:])
    p = argparse.ArgumentParser(prog="scaletrain", description="Distributed diffusion training toolkit.")
    sub = p.add_subparsers(dest="cmd", required=True)

    tr = sub.add_parser("train", help="run a training recipe (same as launchers/pretrain.py)")
    _add_config_args(tr)
    tr.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    for name, what in (("sft", "fine-tune all weights from init.* (same as launchers/sft.py)"),
                       ("lora", "train LoRA adapters on init.* weights (same as launchers/lora.py)")):
        pt = sub.add_parser(name, help=what)
        _add_config_args(pt)
        pt.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    dp = sub.add_parser("dpo", help="Diffusion-DPO on preference pairs (same as launchers/dpo.py)")
    _add_config_args(dp)
    dp.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_cmd", required=True)
    syn = data.add_parser("synth", help="write synthetic captioned shards (img2dataset layout)")
    syn.add_argument("--out", required=True)
    syn.add_argument("--num-samples", type=int, default=512)
    syn.add_argument("--per-shard", type=int, default=64)
    syn.add_argument("--resolution", type=int, default=64)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--format", choices=["jpg", "png"], default="jpg")
    from scaletrain.data.synth import parse_labels

    syn.add_argument("--labels", type=parse_labels, default=None, metavar="CLASS=RATIO,...",
                     help="add a metadata 'label' field in these proportions (class balancing), e.g. cat=0.9,dog=0.1")
    syn.add_argument("--aspect-ratios", type=float, nargs="+", default=None, metavar="W/H",
                     help="non-square images: width/height ratios cycled over the samples, e.g. 1.0 1.5 0.667")
    syn.add_argument("--video", action="store_true",
                     help="write clips (KEY.mp4) of a shape moving left/right/up/down, captioned with the motion")
    syn.add_argument("--frames", type=int, default=16, help="--video: frames per clip")
    syn.add_argument("--fps", type=int, default=8, help="--video: frame rate")
    syn.add_argument("--video-format", choices=["mp4", "webm"], default="mp4", help="--video: container")

    pairs = data.add_parser("synth-pairs", help="write synthetic preference pairs (KEY.chosen.jpg, "
                            "KEY.rejected.jpg, KEY.txt) for Diffusion-DPO")
    pairs.add_argument("--out", required=True)
    pairs.add_argument("--num-pairs", type=int, default=256)
    pairs.add_argument("--per-shard", type=int, default=32)
    pairs.add_argument("--resolution", type=int, default=32)
    pairs.add_argument("--seed", type=int, default=0)
    pairs.add_argument("--format", choices=["jpg", "png"], default="jpg")

    enc = data.add_parser("encode", help="precompute VAE latents (posterior mean, logvar) and text-encoder "
                          "outputs into shards, per stage resolution (torchrun: each rank its share)")
    _add_config_args(enc)
    enc.add_argument("--out", required=True, help="output folder: OUT/<R>px/ per resolution; a rerun resumes")
    enc.add_argument("--shards", default=None, help="image shards to encode (default: the recipe's data.shards)")
    enc.add_argument("--resolution", type=int, action="append", default=None,
                     help="resolution to encode at (repeatable; default: every stage resolution of the recipe)")
    enc.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    enc.add_argument("--no-progress", action="store_true", help="no progress bar")

    cc = sub.add_parser("config", help="config tools").add_subparsers(dest="config_cmd", required=True)
    chk = cc.add_parser("check", help="validate a recipe and print it resolved")
    _add_config_args(chk)
    chk.add_argument("--world-size", type=int, default=None, help="world size to validate against")
    ref = cc.add_parser("reference", help="print (or --out: write) the recipe reference, every key with its type, "
                        "default and documentation, generated from the schema")
    ref.add_argument("--out", default=None, help="Markdown file to write (docs/reference.md in this repository)")

    ck = sub.add_parser("ckpt", help="checkpoint tools").add_subparsers(dest="ckpt_cmd", required=True)
    ls = ck.add_parser("ls", help="list a run's checkpoints (step, stage, size, complete/partial)")
    ls.add_argument("run", help="run folder (or its checkpoints/ folder)")
    ex = ck.add_parser("export", help="write a diffusers model folder (save_pretrained, safetensors)")
    ex.add_argument("src", help="run folder (latest complete checkpoint) or checkpoints/step-N")
    ex.add_argument("out", help="output folder")
    ex.add_argument("--raw", action="store_true", help="export the raw weights even when the checkpoint holds an EMA")
    ex.add_argument("--pipeline", action="store_true",
                    help="write a whole diffusers pipeline (model_index.json, denoiser, VAE, text encoder, tokenizer, "
                         "scheduler) that DiffusionPipeline.from_pretrained loads (latent UNet presets)")
    el = ck.add_parser("export-lora", help="write a LoRA run's adapter as safetensors (UNet: diffusers "
                       "load_lora_weights layout; DiT: peft adapter folder)")
    el.add_argument("src", help="LoRA run folder (latest complete checkpoint) or checkpoints/step-N")
    el.add_argument("out", help="output folder")
    el.add_argument("--raw", action="store_true", help="export the raw adapter even when the checkpoint holds an EMA")
    el.add_argument("--with-base", action="store_true", help="also write the frozen base model to OUT/base")

    # Listed for --help only: main() hands `slurm plan` and `preflight ...` to their own parsers.
    sub.add_parser("slurm", add_help=False, help="`slurm plan`: a Slurm job's rendezvous as shell exports "
                   "(used by launchers/slurm/*.sbatch)")
    sub.add_parser("preflight", add_help=False, help="sweep all-reduce/all-gather/reduce-scatter, test links, "
                   "recommend bucket sizes (under torchrun -m scaletrain.cli or deepspeed --module scaletrain.cli)")

    from scaletrain.bench.commands import add_bench_parsers, bench_main, size_main

    add_bench_parsers(sub)  # `bench` and `size`

    from scaletrain.curate.commands import add_curate_parsers, curate_main

    add_curate_parsers(sub)  # `curate filter | caption | safety | aesthetic-train | aesthetic-score | rated-synth`

    args = p.parse_args(argv)
    if args.cmd == "curate":
        return curate_main(args)
    if args.cmd == "bench":
        return bench_main(args)
    if args.cmd == "size":
        return size_main(args)
    if args.cmd == "ckpt":
        return _ckpt(args)
    if args.cmd == "train":
        return pretrain_main(["--config", args.config] + [x for o in args.overrides for x in ("--set", o)])
    if args.cmd in ("sft", "lora"):
        entry = sft_main if args.cmd == "sft" else lora_main
        return entry(["--config", args.config] + [x for o in args.overrides for x in ("--set", o)])
    if args.cmd == "dpo":
        return dpo_main(["--config", args.config] + [x for o in args.overrides for x in ("--set", o)])
    if args.cmd == "data" and args.data_cmd == "encode":
        return _encode(args)
    if args.cmd == "data" and args.data_cmd == "synth-pairs":
        return _synth_pairs(args)
    if args.cmd == "data":
        return _synth(args)
    if args.cmd == "config" and args.config_cmd == "reference":
        from pathlib import Path

        from scaletrain.config_reference import render

        text = render()
        if args.out:
            Path(args.out).write_text(text)
        else:
            print(text, end="")
        return 0
    return _config_check(args)


if __name__ == "__main__":
    sys.exit(main())
