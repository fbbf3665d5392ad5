"""DeepSpeed JSON: "auto" for what the trainer owns, filled from the run config.

The trainer owns batch sizes, accumulation, clipping, precision and (when the JSON names a
DeepSpeed optimizer, e.g. for CPU offload) the optimizer hyper-parameters. A JSON value that
is not "auto" and differs from the config is an error naming both places, never a silent
override (the accelerate ``DeepSpeedPlugin.fill_match`` rule). This module imports no
DeepSpeed so config validation stays cheap and runs before any process group.
"""

from __future__ import annotations

import copy
import math
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scaletrain.config import RunConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_deepspeed_path(path: str) -> Path:
    """A path as given, else relative to the scaletrain checkout (so recipes work from any cwd)."""
    p = Path(path)
    if p.is_file():
        return p
    alt = REPO_ROOT / path
    if not p.is_absolute() and alt.is_file():
        return alt
    raise ValueError(f"engine.deepspeed_config={path!r} does not exist; use one of ds_configs/zero{{1,2,3}}.json")


def load_deepspeed_json(path: str) -> dict:
    p = resolve_deepspeed_path(path)
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"engine.deepspeed_config={path!r} is not valid JSON: {e}") from None


def _fill(node: dict, key: str, value: Any, where: str, owner: str) -> None:
    cur = node.get(key, "auto")
    if cur == "auto":
        node[key] = value
    elif cur != value:
        raise ValueError(
            f"DeepSpeed JSON {where}={cur!r} conflicts with {owner}={value!r}; "
            f'set it to "auto" in the JSON or change {owner}'
        )


# Knobs DeepSpeed reads only at some ZeRO stages; set at another stage it would ignore them silently.
_ZERO3_ONLY = ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "zero_hpz_partition_size",
               "zero_quantized_weights", "zero_quantized_gradients")
_ZERO12_ONLY = ("allgather_bucket_size",)


def _fill_zero_knobs(ds: dict, cfg: "RunConfig") -> None:
    """engine.deepspeed.* into zero_optimization: fill "auto"/absent keys, refuse conflicts and
    knobs the JSON's stage would ignore. An "auto" key the recipe leaves null is dropped, so
    DeepSpeed applies its own default."""
    zero = ds.setdefault("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    for key, value in cfg.engine.deepspeed.model_dump().items():
        owner = f"engine.deepspeed.{key}"
        if value is None:
            if zero.get(key) == "auto":
                del zero[key]
            continue
        noop = value is False or (key == "zero_hpz_partition_size" and value == 1)
        if not noop and (stage == 0 or (key in _ZERO3_ONLY and stage != 3) or (key in _ZERO12_ONLY and stage == 3)):
            want = "3" if key in _ZERO3_ONLY else "1 or 2" if key in _ZERO12_ONLY else "1, 2 or 3"
            raise ValueError(
                f"{owner}={value!r} applies to ZeRO stage {want}, but {cfg.engine.deepspeed_config} has "
                f"zero_optimization.stage={stage}; remove it or pick another engine.deepspeed_config"
            )
        _fill(zero, key, value, f"zero_optimization.{key}", owner)


def fill_deepspeed_config(
    raw: dict, cfg: "RunConfig", *, micro_batch: int, grad_accum: int, world_size: int
) -> dict:
    """Return a copy of ``raw`` with every trainer-owned value filled; raise on conflicts."""
    ds = copy.deepcopy(raw)
    _fill(ds, "train_micro_batch_size_per_gpu", micro_batch, "train_micro_batch_size_per_gpu", "train.stages[].micro_batch")
    _fill(ds, "gradient_accumulation_steps", grad_accum, "gradient_accumulation_steps", "train.stages[].grad_accum")
    _fill(ds, "train_batch_size", micro_batch * grad_accum * world_size, "train_batch_size",
          "micro_batch x grad_accum x world size")
    # DeepSpeed treats 0 as "no clipping", the same meaning as optim.grad_clip=0.
    _fill(ds, "gradient_clipping", float(cfg.optim.grad_clip), "gradient_clipping", "optim.grad_clip")
    bf16 = ds.setdefault("bf16", {})
    _fill(bf16, "enabled", cfg.engine.precision == "bf16", "bf16.enabled", "engine.precision")
    fp16 = ds.setdefault("fp16", {})
    _fill(fp16, "enabled", cfg.engine.precision == "fp16", "fp16.enabled", "engine.precision")
    if cfg.engine.precision == "fp16":  # dynamic loss scaling from engine.fp16_initial_scale
        _fill(fp16, "loss_scale", 0, "fp16.loss_scale", "engine.precision=fp16 (0 = dynamic)")
        _fill(fp16, "initial_scale_power", round(math.log2(cfg.engine.fp16_initial_scale)), "fp16.initial_scale_power",
              "engine.fp16_initial_scale")
    _fill_zero_knobs(ds, cfg)
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        _fill(params, "lr", cfg.optim.lr, "optimizer.params.lr", "optim.lr")
        _fill(params, "weight_decay", cfg.optim.weight_decay, "optimizer.params.weight_decay", "optim.weight_decay")
        _fill(params, "betas", list(cfg.optim.betas), "optimizer.params.betas", "optim.betas")
        _fill(params, "eps", cfg.optim.eps, "optimizer.params.eps", "optim.eps")
    if "scheduler" in ds:
        raise ValueError(
            "DeepSpeed JSON has a 'scheduler' block, but the trainer owns the LR schedule "
            "(optim.schedule, optim.warmup_steps); remove the block"
        )
    ds.setdefault("steps_per_print", 10**9)  # scaletrain logs metrics itself
    ds.setdefault("wall_clock_breakdown", False)
    return ds
