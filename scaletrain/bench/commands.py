"""`scaletrain bench` and `scaletrain size`: argument parsing and the two entry points."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scaletrain.config import ConfigError


def add_bench_parsers(sub) -> None:
    b = sub.add_parser("bench", help="throughput/memory matrix: preset x resolution x engine x micro-batch x ranks")
    b.add_argument("--presets", nargs="+", default=["unet-tiny"])
    b.add_argument("--resolutions", nargs="+", type=int, default=None, help="default: 32 64, or the recipe's stages")
    b.add_argument("--recipe", default=None, help="take the resolutions from this recipe's curriculum stages")
    b.add_argument("--engines", nargs="+", default=["ddp", "fsdp", "zero2", "zero3"])
    b.add_argument("--micro-batches", nargs="+", type=int, default=[4])
    b.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2])
    b.add_argument("--search", action="store_true", help="also find the largest micro-batch that fits")
    b.add_argument("--search-max", type=int, default=64)
    b.add_argument("--precision", choices=["fp32", "bf16", "fp16", "fp8"], default="fp32",
                   help="engine.precision; fp8: FSDP2 cells only, engine.fp8 defaults (tensorwise, fp8 all-gather), "
                        "MFU against the bf16 peak")
    b.add_argument("--activation-checkpointing", choices=["none", "full", "selective"], default="none",
                   help="model.activation_checkpointing for every cell")
    b.add_argument("--compile", action="store_true", help="model.compile (regional) for every cell")
    b.add_argument("--compile-backend", choices=["inductor", "aot_eager"], default="inductor",
                   help="model.compile_backend: aot_eager traces the same regions without code generation")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--reps", type=int, default=5)
    b.add_argument("--num-workers", type=int, default=1)
    b.add_argument("--max-memory-gib", type=float, default=None,
                   help="treat peak memory above this as out-of-memory (CPU stand-in for a card's capacity)")
    b.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (default: GPU table or measured)")
    b.add_argument("--cell-timeout", type=float, default=600.0)
    b.add_argument("--no-comm-sweep", action="store_true")
    b.add_argument("--no-loaded", action="store_true",
                   help="skip timing each 1-rank cell again with max(--world-sizes) copies at once")
    b.add_argument("--rounds", type=int, default=1,
                   help="measure every cell this many times, a group's 1-rank, loaded and N-rank runs back to back "
                        "in each round, and pool the repetitions (for hosts whose speed drifts between minutes)")
    b.add_argument("--shards", default=None, help="default: synthetic shards written into --out")
    b.add_argument("--frames", nargs="+", type=int, default=None,
                   help="video presets: frames per clip as an axis, e.g. 1 9 17 (default synthetic clips written "
                        "into --out)")
    b.add_argument("--out", required=True, help="folder for results.json, results.md, *.png")

    s = sub.add_parser("size", help="memory per GPU, nodes needed, img/s, time and cost for a curriculum")
    s.add_argument("--preset", required=True)
    s.add_argument("--recipe", default=None, help="curriculum from a recipe: images = steps x global batch")
    s.add_argument("--stage", action="append", default=[], metavar="RES[:IMAGES[:MICRO[:GLOBAL]]]",
                   help="a curriculum stage, e.g. 256:200000000:64:2048 (repeatable): MICRO is the largest "
                        "micro-batch per GPU, GLOBAL the global batch kept fixed at every node count "
                        "(default: MICRO on every GPU of the largest --nodes); IMAGES left out (256, or "
                        "256::64:2048): throughput only, no time or cost; a video preset's stage is "
                        "RES:CLIPS[:MICRO[:FRAMES[:GLOBAL]]], e.g. 480:2000000:1:81:512 (FRAMES 1: images)")
    s.add_argument("--gpu", default="H100")
    s.add_argument("--gpus-per-node", type=int, default=8)
    s.add_argument("--price", type=float, default=None, help="USD per GPU-hour (left out: no cost columns)")
    s.add_argument("--nodes", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    s.add_argument("--engines", nargs="+", default=["ddp", "fsdp", "zero2", "zero3"],
                   help="ddp fsdp hsdp zero1 zero2 zero3 zero3-hpz zero3-offload")
    s.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    s.add_argument("--bench", default=None, help="results.json of `scaletrain bench` on this GPU type")
    s.add_argument("--comm", default=None, help="a `scaletrain preflight --json` report or bench results.json: "
                   "the intra-node link when it ran on one node (its world size <= --gpus-per-node), else inter")
    s.add_argument("--busbw-gbps", "--inter-busbw-gbps", dest="busbw_gbps", type=float, default=None,
                   help="given bus bandwidth between nodes, per GPU (GB/s)")
    s.add_argument("--latency-us", "--inter-latency-us", dest="latency_us", type=float, default=4.0,
                   help="given latency per ring hop between nodes (with --busbw-gbps)")
    s.add_argument("--intra-busbw-gbps", type=float, default=None, help="given bus bandwidth inside a node (GB/s)")
    s.add_argument("--intra-latency-us", type=float, default=1.5, help="given latency per ring hop inside a node")
    s.add_argument("--overlap", "--eta", dest="eta", type=float, default=None,
                   help="fraction of compute time during which collectives proceed (default: fitted on the "
                        "bench file's multi-rank cells, else 0.8 assumed)")
    s.add_argument("--measured", action="append", default=[], metavar="GPUS:IMG_S@RES[:ENGINE]",
                   help="a measured throughput (repeatable): 1 GPU sets the compute speed, more GPUs calibrate the "
                        "link they crossed (inside a node or between nodes)")
    s.add_argument("--plot", default=None, metavar="FILE.png", help="img/s and scaling efficiency vs GPUs")
    s.add_argument("--out", default=None, metavar="FILE.md",
                   help="also write the report to this Markdown file, headed by the command that made it")
    s.add_argument("--mfu", type=float, default=0.35, help="assumed MFU where no throughput was measured")
    s.add_argument("--act-gib-per-image", default=None, metavar="GIB@RES")
    s.add_argument("--baseline-gib", type=float, default=1.5, help="assumed runtime memory where not measured")
    s.add_argument("--frozen-encoders", choices=("replicate", "shard"), default="replicate",
                   help="model.frozen_encoders: shard keeps 1/N of the text encoder and VAE on each GPU")
    s.add_argument("--precomputed", action="store_true",
                   help="the run trains on precomputed latents (scaletrain data encode): no encoders on the GPUs")


def bench_main(args: argparse.Namespace) -> int:
    from scaletrain.bench.runner import MatrixSpec, run_matrix

    resolutions = args.resolutions
    if args.recipe:
        from scaletrain.checks import load_config

        cfg = load_config(args.recipe, check_paths=False)
        resolutions = sorted({st.resolution for st in cfg.train.stages})
    spec = MatrixSpec(presets=args.presets, resolutions=resolutions or [32, 64], engines=args.engines,
                      micro_batches=args.micro_batches, world_sizes=args.world_sizes, search=args.search,
                      search_max=args.search_max, precision=args.precision, warmup=args.warmup, reps=args.reps,
                      activation_checkpointing=args.activation_checkpointing, compile=args.compile,
                      compile_backend=args.compile_backend,
                      num_workers=args.num_workers, max_memory_gib=args.max_memory_gib,
                      peak_tflops=args.peak_tflops, timeout_s=args.cell_timeout,
                      comm_sweep=not args.no_comm_sweep, loaded=not args.no_loaded,
                      rounds=args.rounds, shards=args.shards, frames=args.frames or [])
    run_matrix(spec, Path(args.out))
    print(Path(args.out, "results.md").read_text())
    return 0


def _parse_measured(texts: list[str]) -> list[tuple[int, float, int, str | None]]:
    import re

    out = []
    for text in texts:
        m = re.fullmatch(r"(\d+):([\d.]+)@(\d+)(?::([\w-]+))?", text)
        if not m or int(m.group(1)) < 1 or float(m.group(2)) <= 0:
            raise ConfigError(f"--measured {text!r} is not GPUS:IMG_S@RES[:ENGINE]; write e.g. --measured 8:5200@256")
        out.append((int(m.group(1)), float(m.group(2)), int(m.group(3)), m.group(4)))
    return out


def _parse_stages(args: argparse.Namespace) -> list[tuple[int, ...]]:
    from scaletrain.models.registry import stage_frames

    stages = []
    if args.recipe:
        import yaml

        from scaletrain.checks import load_config

        # Validate at the world size the recipe's global batches were written for (the first
        # stage that states one), not this process's: a recipe is not launched here.
        raw = yaml.safe_load(Path(args.recipe).read_text()) or {}
        stated = [st for st in (raw.get("train") or {}).get("stages", []) if isinstance(st, dict)
                  and st.get("global_batch") and st.get("micro_batch")]
        world = (stated[0]["global_batch"] // (stated[0]["micro_batch"] * stated[0].get("grad_accum", 1))
                 if stated else None)
        cfg = load_config(args.recipe, check_paths=False, world_size=world or None)
        for i, st in enumerate(cfg.train.stages):
            # The recipe's global batch where it states one; else one node's worth. A stage given
            # in images is that many images at any batch (RunConfig.stage_images).
            world = st.global_batch // (st.micro_batch * st.grad_accum) if st.global_batch else args.gpus_per_node
            gb = st.global_batch or st.micro_batch * st.grad_accum * world
            stages.append((st.resolution, cfg.stage_images(i, world), st.micro_batch, gb, stage_frames(cfg, i)))
    from scaletrain.models import get_preset

    video = get_preset(args.preset).video
    form = "RES[:CLIPS[:MICRO[:FRAMES[:GLOBAL]]]]" if video else "RES[:IMAGES[:MICRO[:GLOBAL]]]"
    example = "--stage 480:2000000:1:81:512" if video else "--stage 256:200000000:64:2048"
    for text in args.stage:
        parts = text.split(":")
        if len(parts) == 1:
            parts.append("")
        if (len(parts) not in ((2, 3, 4, 5) if video else (2, 3, 4))
                or not all(p.isdigit() or (i == 1 and p == "") for i, p in enumerate(parts))):
            raise ConfigError(f"--stage {text!r} is not {form}; write e.g. {example}")
        parts[1] = parts[1] or "0"  # no image count: throughput only
        micro = int(parts[2]) if len(parts) >= 3 else (1 if video else 16)
        if video:  # a video preset's 4th field is the clip's frames (1: images), the 5th the global batch
            frames = int(parts[3]) if len(parts) >= 4 else 1
            stages.append((int(parts[0]), int(parts[1]), micro, int(parts[4]) if len(parts) == 5 else 0, frames))
        else:
            stages.append((int(parts[0]), int(parts[1]), micro, int(parts[3]) if len(parts) == 4 else 0, 0))
    if not stages:
        raise ConfigError(f"size needs a curriculum: pass --recipe FILE or --stage {form}")
    return stages


def size_main(args: argparse.Namespace) -> int:
    from scaletrain.bench.sizing import SizeInputs, comm_from_sweep, comm_given, size_report

    try:
        stages = _parse_stages(args)
        bench = json.loads(Path(args.bench).read_text()) if args.bench else None
        comm = intra = None
        if args.comm:
            rep = json.loads(Path(args.comm).read_text())
            colls = rep.get("collectives") or rep.get("comm")
            world = rep.get("world_size") or max(c["world_size"] for c in rep["cells"])
            from scaletrain.bench.scaling import per_hop

            swept = per_hop(comm_from_sweep(colls, world), world)
            swept.source = f"measured: {world}-rank sweep ({args.comm}), latency per ring hop"
            if world <= args.gpus_per_node:
                intra = swept
            else:
                comm = swept
        if args.busbw_gbps:
            comm = comm_given(args.busbw_gbps, args.latency_us, 0.0)
        if args.intra_busbw_gbps:
            intra = comm_given(args.intra_busbw_gbps, args.intra_latency_us, 0.0)
        act = None
        if args.act_gib_per_image:
            gib, _, res = args.act_gib_per_image.partition("@")
            act = (float(gib), int(res))
        report = size_report(SizeInputs(
            preset=args.preset, stages=stages, gpu=args.gpu, gpus_per_node=args.gpus_per_node,
            price_per_gpu_hour=args.price, engines=args.engines, nodes=args.nodes, precision=args.precision,
            bench=bench, comm=comm, act_gib_per_image=act, assumed_mfu=args.mfu, assumed_baseline_gib=args.baseline_gib,
            precomputed=args.precomputed, frozen_encoders=args.frozen_encoders, intra=intra, eta=args.eta, measured=_parse_measured(args.measured),
            plot=args.plot))
    except (ConfigError, ValueError, OSError) as e:
        print(f"scaletrain: size: {e}", file=sys.stderr)
        return 2
    print(report, end="")
    if args.out:
        import shlex

        argv = sys.argv[2:] if sys.argv[1:2] == ["size"] else ["..."]  # `scaletrain size ...` as typed
        Path(args.out).write_text("# Sizing report\n\nWritten by:\n\n```bash\nscaletrain size "
                                  + " ".join(shlex.quote(a) for a in argv) + f"\n```\n\n```text\n{report}```\n")
    return 0
