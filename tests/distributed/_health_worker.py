"""Worker for test_health: run under `torchrun --nproc_per_node 2` (gloo, CPU).

For each engine named on the command line (fsdp, ddp, zero1, zero2, zero3; test_health runs all
but zero1, which shares ZeRO-2's optimizer code) it checks the skip half of the engine protocol
on a tiny UNet:

1. ``grad_norm()`` before the step is the norm the step itself reports, on every rank alike;
2. a NaN loss on rank 1 only gives a non-finite norm on *both* ranks, and ``skip_step``
   leaves the weights, the optimizer's master weights and its moments bit-identical;
3. ``skip_step`` on finite gradients (a spike skip) does the same;
4. the next normal step gives bit-for-bit the weights of a run that never had steps 2-3,
   so a skip drops the gradients and leaves no trace in the optimizer or its counters.

Prints "OK <engine> ..." per engine; any failure raises, so the exit code is the verdict.
"""

from __future__ import annotations

import gc
import math
import sys

import torch
import torch.distributed as dist

from scaletrain.checks import validate_config
from scaletrain.distributed import init_distributed
from scaletrain.engines import build_engine
from scaletrain.engines.base import chunk_bounds
from scaletrain.models import build_model

DS_JSON = {"zero1": "ds_configs/zero1.json", "zero2": "ds_configs/zero2.json", "zero3": "ds_configs/zero3.json"}


def _engine(kind: str, dist_info):
    eng = {"kind": "deepspeed", "deepspeed_config": DS_JSON[kind]} if kind in DS_JSON else {"kind": kind}
    cfg = validate_config(
        {"train": {"stages": [{"name": "s", "resolution": 16, "steps": 4, "micro_batch": 2}]}, "engine": eng,
         "optim": {"lr": 1e-2, "grad_clip": 1.0}},
        world_size=dist_info.world_size, check_paths=False,
    )
    torch.manual_seed(0)
    model = build_model("unet-tiny")
    return model, build_engine(cfg, model.denoiser, dist_info, micro_batch=2, grad_accum=1)


def _backward(model, engine, step: int, rank: int, *, nan: bool = False) -> None:
    g = torch.Generator().manual_seed(1000 * step + rank)  # a different batch per step and rank
    x, target = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    cond = model.encode_text(["a red circle", "a blue square"], "cpu")
    with engine.micro_step(is_last=True):
        pred = engine.module(x.to(engine.input_dtype), t,
                             {k: v.to(engine.input_dtype) if v.is_floating_point() else v for k, v in cond.items()})
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        engine.backward(loss * float("nan") if nan else loss)


def _step_and_close(model, engine, step: int, rank: int) -> list[torch.Tensor]:
    """One real step, then the state snapshot; the engine is closed before the next run builds one."""
    _backward(model, engine, step, rank)
    engine.step(1e-2)
    snapshot = _snapshot(engine)
    engine.close()
    del model, engine
    gc.collect()
    return snapshot


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def _z3_partition(p: torch.Tensor) -> torch.Tensor:
    # A ZeRO-3 partition ends in uninitialised padding on the last rank; compare real elements.
    start, end = chunk_bounds(p.ds_numel, dist.get_rank(), dist.get_world_size())
    return p.ds_tensor.view(-1)[: end - start]


def _snapshot(engine) -> list[torch.Tensor]:
    """This rank's weights, the optimizer's (master) parameters and every optimizer state tensor."""
    if engine.name == "deepspeed":
        inner = engine.ds.optimizer.optimizer  # the torch AdamW over ZeRO's fp32 partitions
        params = [_z3_partition(p) if hasattr(p, "ds_tensor") else p for p in engine.ds.module.parameters()]
    else:
        inner, params = engine.optimizer, list(engine.module.parameters())
    out = [_local(p) for p in params] + [_local(p) for g in inner.param_groups for p in g["params"]]
    for state in inner.state.values():
        out += [_local(v) for _, v in sorted(state.items()) if torch.is_tensor(v)]
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _agreed(value: float) -> list[float]:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def check(kind: str, dist_info) -> None:
    rank = dist_info.rank
    # Run A: step 1, NaN step 2 (rank 1 only) skipped, finite step 3 skipped, step 4.
    model, engine = _engine(kind, dist_info)
    _backward(model, engine, 1, rank)
    norm = engine.grad_norm()
    stats = engine.step(1e-2)
    assert math.isfinite(norm) and math.isclose(stats.grad_norm, norm, rel_tol=1e-5), (kind, norm, stats)
    assert len(set(_agreed(norm))) == 1, (kind, _agreed(norm))
    before = _snapshot(engine)
    assert any(t.numel() for t in before[len(before) // 2:]), f"{kind}: optimizer state is empty"

    _backward(model, engine, 2, rank, nan=rank == 1)
    norm = engine.grad_norm()
    assert all(not math.isfinite(v) for v in _agreed(norm)), (kind, _agreed(norm))
    stats = engine.skip_step(1e-2)
    assert stats.skipped and not math.isfinite(stats.grad_norm)
    assert _same(before, _snapshot(engine)), f"{kind}: a NaN skip changed weights or optimizer state"

    _backward(model, engine, 3, rank)
    norm = engine.grad_norm()
    assert math.isfinite(norm)
    stats = engine.skip_step(1e-2)
    assert stats.skipped and stats.grad_norm == norm
    assert _same(before, _snapshot(engine)), f"{kind}: a spike skip changed weights or optimizer state"
    if engine.name == "deepspeed":
        assert engine.ds.skipped_steps == 2, engine.ds.skipped_steps

    after_a = _step_and_close(model, engine, 4, rank)

    # Run B: the same step 1 and step 4, nothing in between.
    model, engine = _engine(kind, dist_info)
    _backward(model, engine, 1, rank)
    engine.step(1e-2)
    after_b = _step_and_close(model, engine, 4, rank)
    assert _same(after_a, after_b), f"{kind}: the step after skips differs from a run without them"
    assert all(torch.isfinite(t).all() for t in after_a if t.is_floating_point())
    print(f"OK {kind} rank={rank} tensors={len(after_a)}", flush=True)


def main() -> None:
    kinds = sys.argv[1:]
    dist_info = init_distributed("deepspeed" if any(k in DS_JSON for k in kinds) else "fsdp")
    for kind in kinds:
        check(kind, dist_info)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
