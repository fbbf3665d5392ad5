"""DeepSpeed JSON: "auto" for what the trainer owns, filled from the run config.

The trainer owns batch sizes, accumulation, clipping, precision, the LR schedule and (when the
JSON names a DeepSpeed optimizer, e.g. for CPU offload) the optimizer hyper-parameters. A JSON
value that is not "auto" and differs from the config is an error naming both places, never a
silent override (the accelerate ``DeepSpeedPlugin.fill_match`` rule). So the templates users
have (accelerate's and transformers' zero2/zero3 JSONs, "auto" almost everywhere) run as
they are:
- ``scheduler``: the trainer sets the LR every step from ``optim.*`` and each stage's own
  LR and warm-up, which no DeepSpeed scheduler expresses; the block is dropped (said in one
  line) when its values are "auto" or agree with the recipe, and refused when they differ;
- ``reduce_bucket_size``, ``stage3_prefetch_bucket_size``, ``stage3_param_persistence_threshold``
  "auto": from the model's hidden size h as accelerate does (h^2, 0.9 h^2, 10 h), h from the
  model family (``ModelFamily.hidden_size``), unless ``engine.deepspeed.*`` sets them;
- ``stage3_gather_16bit_weights_on_model_save`` "auto": false (scaletrain saves and exports
  through its own checkpoint path, never DeepSpeed's 16-bit save).
Any "auto" left after that is an error naming its key. This module imports no DeepSpeed so
config validation stays cheap and runs before any process group.
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


def _fill(node: dict, key: str, value: Any, where: str, owner: str, shown: Any = None) -> None:
    """``shown``: the recipe's value as the user wrote it, when ``value`` is derived from it."""
    cur = node.get(key, "auto")
    if cur == "auto":
        node[key] = value
    elif cur != value:
        raise ValueError(
            f"DeepSpeed JSON {where}={cur!r} conflicts with {owner}={value if shown is None else shown!r}; "
            f'set it to "auto" in the JSON or change {owner}'
        )


# Knobs DeepSpeed reads only at some ZeRO stages; set at another stage it would ignore them silently.
_ZERO3_ONLY = ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "zero_hpz_partition_size",
               "zero_quantized_weights", "zero_quantized_gradients")
_ZERO12_ONLY = ("allgather_bucket_size",)


def _hidden_size_buckets(cfg: "RunConfig") -> dict[str, int]:
    """accelerate's "auto" bucket sizes (``Accelerator._prepare_deepspeed``) from the width of
    ``model.preset``'s network; its rule is written out here because it needs a transformers
    ``model.config.hidden_size``, which diffusers networks do not have."""
    from scaletrain.models.registry import get_family, get_preset

    preset = get_preset(cfg.model.preset)
    try:
        h = get_family(preset.family).hidden_size(preset.denoiser_config)
    except ValueError as e:
        raise ValueError(f"{e}, so the DeepSpeed JSON's \"auto\" bucket sizes cannot be derived; give numbers "
                         "in the JSON or set engine.deepspeed.reduce_bucket_size and friends") from None
    return {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
            "stage3_param_persistence_threshold": 10 * h}


def _fill_zero_knobs(ds: dict, cfg: "RunConfig", notes: list[str] | None) -> None:
    """engine.deepspeed.* into zero_optimization: fill "auto"/absent keys, refuse conflicts and
    knobs the JSON's stage would ignore. An "auto" key the recipe leaves null takes the
    hidden-size rule (the three bucket keys) or is dropped, so DeepSpeed applies its default."""
    zero = ds.setdefault("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    by_width, filled = None, []
    for key, value in cfg.engine.deepspeed.model_dump().items():
        owner = f"engine.deepspeed.{key}"
        if value is None:
            if zero.get(key) == "auto":
                if key == "reduce_bucket_size" or (stage == 3 and key.startswith("stage3_")):
                    by_width = by_width or _hidden_size_buckets(cfg)
                    zero[key] = by_width[key]
                    filled.append(f"{key}={by_width[key]}")
                else:
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
    if filled and notes is not None:
        notes.append(f"DeepSpeed JSON \"auto\" buckets from {cfg.model.preset}'s hidden size "
                     f"{int(by_width['stage3_param_persistence_threshold'] / 10)} (accelerate's rule): {', '.join(filled)}")


def fill_deepspeed_config(
    raw: dict, cfg: "RunConfig", *, micro_batch: int, grad_accum: int, world_size: int,
    notes: list[str] | None = None,
) -> dict:
    """Return a copy of ``raw`` with every trainer-owned value filled; raise on conflicts.
    What was dropped rather than filled (a scheduler block) is appended to ``notes``."""
    ds = copy.deepcopy(raw)
    _fill(ds, "train_micro_batch_size_per_gpu", micro_batch, "train_micro_batch_size_per_gpu", "train.stages[].micro_batch")
    _fill(ds, "gradient_accumulation_steps", grad_accum, "gradient_accumulation_steps", "train.stages[].grad_accum")
    _fill(ds, "train_batch_size", micro_batch * grad_accum * world_size, "train_batch_size",
          "micro_batch x grad_accum x world size")
    # DeepSpeed treats 0 as "no clipping", the same meaning as optim.grad_clip=0.
    _fill(ds, "gradient_clipping", float(cfg.optim.grad_clip), "gradient_clipping", "optim.grad_clip")
    bf16 = ds.setdefault("bf16", {})
    _fill(bf16, "enabled", cfg.engine.precision == "bf16", "bf16.enabled", "engine.precision", cfg.engine.precision)
    fp16 = ds.setdefault("fp16", {})
    _fill(fp16, "enabled", cfg.engine.precision == "fp16", "fp16.enabled", "engine.precision", cfg.engine.precision)
    if cfg.engine.precision == "fp16":  # dynamic loss scaling from engine.fp16_initial_scale
        _fill(fp16, "loss_scale", 0, "fp16.loss_scale", "engine.precision=fp16 (0 = dynamic)")
        _fill(fp16, "initial_scale_power", round(math.log2(cfg.engine.fp16_initial_scale)), "fp16.initial_scale_power",
              "engine.fp16_initial_scale")
    _fill_zero_knobs(ds, cfg, notes)
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        _fill(params, "lr", cfg.optim.lr, "optimizer.params.lr", "optim.lr")
        _fill(params, "weight_decay", cfg.optim.weight_decay, "optimizer.params.weight_decay", "optim.weight_decay")
        _fill(params, "betas", list(cfg.optim.betas), "optimizer.params.betas", "optim.betas")
        _fill(params, "eps", cfg.optim.eps, "optimizer.params.eps", "optim.eps")
    zero = ds["zero_optimization"]
    if zero.get("stage3_gather_16bit_weights_on_model_save") == "auto":
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if "scheduler" in ds:
        line = _drop_scheduler(ds.pop("scheduler"), cfg)
        if notes is not None:
            notes.append(line)
    left = _auto_keys(ds)
    if left:
        raise ValueError(f"DeepSpeed JSON {left[0]}=\"auto\" is not a value scaletrain fills; give a number or "
                         f"remove the key" + (f" (also {', '.join(left[1:])})" if left[1:] else ""))
    ds.setdefault("steps_per_print", 10**9)  # scaletrain logs metrics itself
    ds.setdefault("wall_clock_breakdown", False)
    return ds


# What a DeepSpeed LR scheduler's params mean in the recipe (WarmupLR, WarmupDecayLR,
# WarmupCosineLR): the trainer's warm-up goes from 0 to optim.lr over optim.warmup_steps.
def _scheduler_meaning(cfg: "RunConfig") -> dict[str, tuple[Any, str]]:
    return {
        "warmup_min_lr": (0.0, "0 (the trainer's warm-up starts at 0)"),
        "warmup_max_lr": (cfg.optim.lr, "optim.lr"),
        "warmup_num_steps": (cfg.optim.warmup_steps, "optim.warmup_steps"),
        "warmup_type": ("linear", "the trainer's warm-up, which is linear"),
        "cos_min_ratio": (cfg.optim.min_lr_ratio, "optim.min_lr_ratio"),
    }


def _drop_scheduler(block: Any, cfg: "RunConfig") -> str:
    """The JSON's LR scheduler, dropped: one line for the log, or a one-line error when a value
    says something the recipe does not."""
    kind = block.get("type", "?") if isinstance(block, dict) else "?"
    params = block.get("params", {}) if isinstance(block, dict) else {}
    meaning = _scheduler_meaning(cfg)
    for key, value in params.items():
        if value == "auto" or key in ("total_num_steps", "last_batch_iteration"):
            continue  # total steps: the trainer's own, per stage
        if key in meaning:
            want, owner = meaning[key]
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if (value != want) if isinstance(want, str) else not (number and float(value) == float(want)):
                raise ValueError(f"DeepSpeed JSON scheduler.params.{key}={value!r} conflicts with {owner}={want!r}; "
                                 f'set it to "auto" in the JSON or change {owner}')
            continue
        raise ValueError(f"DeepSpeed JSON scheduler.params.{key}={value!r} ({kind}) has no equivalent in the recipe: "
                         "the trainer owns the LR schedule (optim.schedule, optim.warmup_steps, per-stage lr); "
                         "remove the scheduler block or set its values to \"auto\"")
    return (f"DeepSpeed JSON scheduler {kind} dropped: the trainer sets the LR each step "
            f"(optim.schedule={cfg.optim.schedule}, optim.lr={cfg.optim.lr:g}, warm-up {cfg.optim.warmup_steps} steps, "
            "per-stage lr and warm-up)")


def _auto_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _auto_keys(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "auto" else []
