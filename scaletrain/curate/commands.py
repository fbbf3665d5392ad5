"""``scaletrain curate filter | caption | safety | aesthetic-train | aesthetic-score | rated-synth``.

The shard commands run as one process or under torchrun (``torchrun --nproc_per_node N -m
scaletrain.cli curate ...``): input shards are split across ranks, rank 0 merges the report.
Every shard command also takes the metadata filter flags (or ``--config recipe.yaml`` for its
``data.filters``); the filter runs after the command's own stage, so it can cut on the scores
that stage just wrote (``aesthetic-score --min-aesthetic 5``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from scaletrain.data.filters import FilterSpec

# flag -> FilterSpec field; flag names avoid prefixes of torchrun's own flags.
_FILTER_FLAGS = {
    "--min-aesthetic": ("min_aesthetic", float), "--max-punsafe": ("max_punsafe", float),
    "--max-pwatermark": ("max_pwatermark", float), "--min-width": ("min_original_width", int),
    "--min-height": ("min_original_height", int), "--min-caption-chars": ("min_caption_chars", int),
    "--max-caption-chars": ("max_caption_chars", int),
}


def _shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="input shards: path, brace pattern, glob or folder of *.tar")
    p.add_argument("--out", required=True, help="output folder (written as OUT.partial, then renamed)")
    p.add_argument("--per-shard", type=int, default=None,
                   help="samples per output shard (default: one output shard per input shard)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--config", default=None, help="recipe YAML whose data.filters to apply (flags override it)")
    for flag, (field, typ) in _FILTER_FLAGS.items():
        p.add_argument(flag, dest=field, type=typ, default=None, help=f"data.filters.{field}")


def add_curate_parsers(sub: argparse._SubParsersAction) -> None:
    cur = sub.add_parser("curate", help="data curation: filter, caption, safety, aesthetic scorer")
    cs = cur.add_subparsers(dest="curate_cmd", required=True)

    f = cs.add_parser("filter", help="write a filtered shard set + report (kept/dropped per rule)")
    _shard_args(f)

    c = cs.add_parser("caption", help="rewrite captions with a captioner; the old one stays in json original_caption")
    _shard_args(c)
    c.add_argument("--captioner", required=True, help="'offline' (image statistics) or a local transformers "
                   "image-to-text model folder (AutoModelForImageTextToText + AutoProcessor)")
    c.add_argument("--prompt", default=None, help="text prompt for captioners that need one")
    c.add_argument("--max-new-tokens", type=int, default=40)

    s = cs.add_parser("safety", help="score p(nsfw) into json safety_nsfw; drop flagged (> --threshold)")
    _shard_args(s)
    s.add_argument("--model", required=True, help="local AutoModelForImageClassification folder, or 'tiny' (tests)")
    s.add_argument("--threshold", type=float, default=0.5)
    s.add_argument("--nsfw-labels", default=None, help="comma-separated NSFW label names of the model")
    s.add_argument("--keep-flagged", action="store_true", help="score and report, but keep flagged samples")

    t = cs.add_parser("aesthetic-train", help="train the aesthetic MLP head on rated images")
    t.add_argument("--rated", required=True,
                   help='JSONL of {"image": PATH, "rating": X}, or a folder with ratings.jsonl')
    t.add_argument("--out", required=True, help="head folder (head.safetensors + head.json)")
    t.add_argument("--encoder", required=True, help="local CLIP/vision model folder, or 'tiny' (offline)")
    t.add_argument("--heldout", type=float, default=0.2, help="held-out fraction")
    t.add_argument("--epochs", type=int, default=150)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)

    a = cs.add_parser("aesthetic-score", help="write json aesthetic with a trained head (torchrun: distributed)")
    _shard_args(a)
    a.add_argument("--head", required=True, help="folder from aesthetic-train")
    a.add_argument("--encoder", default=None, help="override the head's stored encoder folder")

    r = cs.add_parser("rated-synth", help="write a synthetic rated image set (rating = colourfulness)")
    r.add_argument("--out", required=True)
    r.add_argument("--num-images", type=int, default=256)
    r.add_argument("--resolution", type=int, default=32)
    r.add_argument("--seed", type=int, default=0)


def filter_spec(args: argparse.Namespace) -> FilterSpec:
    """``data.filters`` from ``--config`` (if any), overridden by the flags that were given."""
    values: dict[str, Any] = {}
    if args.config:
        import yaml

        raw = yaml.safe_load(Path(args.config).read_text()) or {}
        values = dict(((raw.get("data") or {}).get("filters")) or {})
    values.update({f: getattr(args, f) for f, _ in _FILTER_FLAGS.values() if getattr(args, f) is not None})
    return FilterSpec(**values)


def _device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _stage(args: argparse.Namespace, device) -> tuple[list, dict[str, Any]]:
    """The command's own stage(s) and the settings recorded in the report."""
    cmd = args.curate_cmd
    if cmd == "caption":
        from scaletrain.curate.caption import CaptionStage, build_captioner

        kw = {} if args.captioner == "offline" else {"device": device, "prompt": args.prompt,
                                                     "max_new_tokens": args.max_new_tokens}
        return [CaptionStage(build_captioner(args.captioner, **kw), args.captioner)], {"captioner": args.captioner}
    if cmd == "safety":
        from scaletrain.curate.safety import SafetyStage, build_safety_classifier

        labels = [x.strip() for x in args.nsfw_labels.split(",")] if args.nsfw_labels else None
        clf = build_safety_classifier(args.model, nsfw_labels=labels, device=device)
        return ([SafetyStage(clf, args.threshold, keep_flagged=args.keep_flagged, label=args.model)],
                {"model": args.model, "threshold": args.threshold})
    if cmd == "aesthetic-score":
        from scaletrain.curate.aesthetic import AestheticStage, load_head

        head, embedder = load_head(args.head, encoder=args.encoder, device=device)
        return [AestheticStage(head, embedder, args.head)], {"head": args.head, "encoder": embedder.spec}
    return [], {}


def _run_shard_command(args: argparse.Namespace) -> int:
    from scaletrain.curate.shards import MetadataFilter, rewrite_shards
    from scaletrain.distributed import init_distributed, shutdown_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank0 = os.environ.get("RANK", "0") == "0"
    if world > 1:
        init_distributed("ddp")
    rc = 0
    try:
        spec = filter_spec(args)
        stages, settings = _stage(args, _device())
        stages.append(MetadataFilter(spec))
        report = rewrite_shards(args.shards, args.out, stages, command=args.curate_cmd, batch_size=args.batch_size,
                                per_shard=args.per_shard, overwrite=args.overwrite,
                                settings={**settings, "filters": spec.model_dump(exclude_none=True)})
        if rank0:
            dropped = ", ".join(f"{k}={v}" for k, v in report["dropped"].items()) or "none"
            print(f"curate {args.curate_cmd}: {report['input']['samples']} in, {report['kept']} kept, dropped: "
                  f"{dropped}, corrupt={report['corrupt']} -> {args.out} (report.json, report.md)")
    except ValueError as e:  # pydantic's ValidationError is one too
        if rank0:
            print(f"scaletrain: {_one_line(e)}", file=sys.stderr)
        rc = 2
    if world > 1:
        shutdown_distributed()
    return rc


def _one_line(e: ValueError) -> str:
    from pydantic import ValidationError

    if isinstance(e, ValidationError):  # a bad data.filters value from --config or a flag
        return "; ".join(f"data.filters.{'.'.join(map(str, err['loc']))}={err.get('input')!r}: {err['msg']}"
                         for err in e.errors())
    return str(e)


def _aesthetic_train(args: argparse.Namespace) -> int:
    from scaletrain.curate.aesthetic import ImageEmbedder, embed_rated, read_rated, save_head, train_head

    try:
        pairs = read_rated(args.rated)
        embedder = ImageEmbedder(args.encoder, device=_device())
    except ValueError as e:
        print(f"scaletrain: {e}", file=sys.stderr)
        return 2
    emb, ratings = embed_rated(embedder, pairs)
    head, report = train_head(emb, ratings, heldout_fraction=args.heldout, epochs=args.epochs, lr=args.lr,
                              seed=args.seed)
    save_head(head, args.out, args.encoder, report)
    print(json.dumps(report, indent=2))
    print(f"held-out MSE {report['heldout_loss_before']:.4f} -> {report['heldout_loss_after']:.4f} "
          f"(mean predictor {report['heldout_loss_mean_predictor']:.4f}); head in {args.out}")
    return 0


def curate_main(args: argparse.Namespace) -> int:
    if args.curate_cmd == "aesthetic-train":
        return _aesthetic_train(args)
    if args.curate_cmd == "rated-synth":
        from scaletrain.curate.aesthetic import write_synthetic_rated_set

        path = write_synthetic_rated_set(args.out, num_images=args.num_images, resolution=args.resolution,
                                         seed=args.seed)
        print(f"wrote {args.num_images} rated images to {path}")
        return 0
    return _run_shard_command(args)
