"""``engine.precision=fp8``: the Linear layers of the model's parallel units train in float8
(torchao's float8 training), everything else as under bf16.

torchao swaps each chosen ``nn.Linear`` for a ``Float8Linear`` (a subclass: same parameter names,
so checkpoints, EMA, LoRA targets and export are unchanged). Its forward casts the input and the
weight, and its backward the output gradient, to fp8 with dynamic scales (``engine.fp8.recipe``:
one per tensor, or one per row) and multiplies them with ``torch._scaled_mm`` on fp8 tensor cores.
With ``tensorwise`` scaling FSDP2 can gather the weights in fp8 too (torchao's weight subclass
casts each shard before the all-gather); after every optimizer step one all-reduce precomputes
all the weights' scales (``FSDPEngine.step``).

Which layers: the Linear layers inside the family's parallel units (the transformer or UNet
blocks: nearly all the FLOPs) whose two dimensions are multiples of 16 (``torch._scaled_mm``'s
rule). Embedders, the caption projection and the final projection sit outside the units and stay
in bf16: they act on one row per sample or set the output's precision, where fp8 gains nothing
and costs accuracy (torchtitan also leaves the output projection out).

On a machine without CUDA the same code runs in torchao's emulation mode: the same casts and
scales, the matmul done in high precision. It proves the wiring and the numerics (the fp8 loss
curve follows bf16's, ``tests/distributed/test_fp8.py``); its speed and memory mean nothing.

Applied by the engine before anything else touches the units (torchao's rule: convert before
``fully_shard`` and ``torch.compile``), on the meta-device shell: the converted layers are
initialised like any other (``models/meta_init.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from scaletrain.config import Fp8Section

# Compute capability of the first NVIDIA GPUs with fp8 tensor cores (Ada: L4, L40S; Hopper 9.0).
FP8_MIN_CAPABILITY = (8, 9)
# torch._scaled_mm wants both dimensions of an fp8 operand to be multiples of 16.
FP8_DIM_MULTIPLE = 16


@contextlib.contextmanager
def _quiet(*names: str):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def import_float8() -> ModuleType:
    """``torchao.float8``, imported without a page of noise: torchao logs a warning for each of its
    CUDA extensions it cannot load (its MX and CUTLASS kernels, which float8 training does not use;
    none load on a CPU build of torch) and torch a deprecation for one of torchao's pytree
    registrations. Nothing else is silenced, and only during the import."""
    with _quiet("torchao", "torch.utils._pytree"):
        import torchao.float8 as float8
    return float8


def device_problem() -> str | None:
    """Why this machine cannot train in fp8, or None: a CUDA GPU older than compute capability 8.9
    has no fp8 tensor cores (torch._scaled_mm refuses). Without CUDA, torchao emulates."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) >= FP8_MIN_CAPABILITY:
        return None
    return (f"{torch.cuda.get_device_name()} has compute capability {major}.{minor}, below 8.9 (L4, L40S, H100, "
            f"H200, B200 and later have them)")


@dataclass
class Float8Plan:
    """What the conversion did, for the start-up line and summary.json (``levers.fp8``)."""

    recipe: str
    all_gather: bool  # FSDP2 gathers the converted weights in fp8
    emulated: bool  # torchao's emulation (no CUDA): same numerics, high-precision matmuls
    linears: int  # Linear layers now Float8Linear
    kept_bf16: int  # Linear layers inside the units left in bf16 (a dimension not a multiple of 16)

    def line(self) -> str:
        where = ("emulated on CPU (torchao's emulation mode: fp8 casts and scales, high-precision matmuls; "
                 "numerics only, no speed-up)" if self.emulated else "on fp8 tensor cores")
        gather = "fp8 all-gather" if self.all_gather else "bf16 all-gather"
        return (f"fp8: {self.linears} Linear layers of the parallel units in float8 ({self.recipe} scaling, "
                f"{gather}); {self.kept_bf16} left in bf16 (a dimension not a multiple of 16) and everything "
                f"else in bf16; {where}")

    def report(self) -> dict:
        return dataclasses.asdict(self)


def _fp8_shaped(module: nn.Module, fqn: str) -> bool:
    return module.in_features % FP8_DIM_MULTIPLE == 0 and module.out_features % FP8_DIM_MULTIPLE == 0


def apply_float8(units: list[nn.Module], knobs: Fp8Section, device: torch.device, *, sharded: bool) -> Float8Plan:
    """Swap the units' fp8-shaped Linear layers for torchao's Float8Linear, in place. ``sharded``:
    the engine shards the units with FSDP2 (only then can the weights be gathered in fp8)."""
    float8 = import_float8()
    from torchao.float8.float8_linear import Float8Linear

    all_gather = knobs.all_gather if knobs.all_gather is not None else sharded and knobs.recipe == "tensorwise"
    emulate = device.type != "cuda"
    config = dataclasses.replace(float8.Float8LinearConfig.from_recipe_name(knobs.recipe), emulate=emulate,
                                 enable_fsdp_float8_all_gather=all_gather)
    linears = [m for u in units for m in u.modules() if isinstance(m, nn.Linear)]
    for unit in units:
        float8.convert_to_float8_training(unit, config=config, module_filter_fn=_fp8_shaped)
    converted = sum(isinstance(m, Float8Linear) for u in units for m in u.modules())
    return Float8Plan(knobs.recipe, all_gather, emulate, converted, len(linears) - converted)


def precompute_scales(module: nn.Module) -> None:
    """After an optimizer step: every fp8-gathered weight's scale from one all-reduce (else each
    weight's pre-all-gather would all-reduce its own amax)."""
    import_float8().precompute_float8_dynamic_scale_for_fsdp(module)


def forget_scales(module: nn.Module) -> None:
    """The weights are about to be written outside an optimizer step (the EMA swap, before and
    after): drop the precomputed scales, so the next all-gathers scale what the weights then hold
    (torchao computes a scale on the fly where none is precomputed). Not collective."""
    from torch.distributed.tensor import DTensor

    for p in module.parameters():
        local = p._local_tensor if isinstance(p, DTensor) else p  # the object torchao sets the scale on
        if getattr(local, "_precomputed_scale", None) is not None:  # torchao's WeightWithDynamicFloat8CastTensor
            local._precomputed_scale = None
