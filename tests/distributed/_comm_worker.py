"""Worker for test_comm_knobs: run under `torchrun --nproc_per_node 2` (gloo, CPU).

``_comm_worker.py torch`` checks the DDP and FSDP2 knobs, ``_comm_worker.py deepspeed`` the
ZeRO ones. Each check drives scaletrain's engine classes directly on a small MLP (fast; the
knobs do not depend on the model family), compares against what the knob must change, and
prints "OK <check> rank=<r> ..."; any failure raises, so the exit code is the verdict.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch import nn

from scaletrain.checks import validate_config
from scaletrain.distributed import DistInfo, init_distributed, shutdown_distributed

STAGE = {"name": "s", "resolution": 32, "steps": 4, "micro_batch": 2, "grad_accum": 2}


def make_cfg(engine: dict):
    data = {"train": {"stages": [STAGE]}, "engine": engine, "optim": {"grad_clip": 0.0, "warmup_steps": 0}}
    return validate_config(data, world_size=dist.get_world_size(), check_paths=False)


def mlp(width: int = 64) -> nn.Sequential:
    torch.manual_seed(0)  # same initial weights on every rank
    return nn.Sequential(nn.Linear(16, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 8))


def batch(step: int, micro: int, rank: int) -> torch.Tensor:
    """Different data on every rank (so unsynchronised gradients differ across ranks)."""
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randn(4, 16, generator=g)


def info() -> DistInfo:
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=dist.get_rank(),
                    device=torch.device("cpu"), backend="gloo")


def ok(check: str, **extra) -> None:
    print(f"OK {check} rank={dist.get_rank()} " + " ".join(f"{k}={v}" for k, v in extra.items()), flush=True)


def reduce_events(fn) -> int:
    """Run ``fn`` under torch.profiler; count gloo reductions it issued (all-reduce, reduce-scatter,
    reduce). All-gathers are not counted: sharded engines gather parameters on every micro-step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("gloo:") and "reduce" in e.name)


def grads_differ_across_ranks(params) -> bool:
    flat = torch.cat([p.grad.detach().reshape(-1).float() for p in params])
    others = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(others, flat)
    return not all(torch.equal(others[0], o) for o in others[1:])


def reductions_per_micro_step(engine, params=None) -> list[int]:
    """Two micro-steps of accumulation, then a step; gloo reductions issued by each micro-step.
    With ``params``, also check the gradients still differ across ranks after the first."""
    engine.configure_stage(micro_batch=4, grad_accum=2)
    rank = dist.get_rank()
    counts = []
    for micro in range(2):
        def micro_step():
            with engine.micro_step(is_last=micro == 1):
                engine.backward(engine.module(batch(0, micro, rank)).pow(2).mean())
        counts.append(reduce_events(micro_step))
        if micro == 0 and params is not None:
            assert grads_differ_across_ranks(params), "grads were synced on a non-final micro-step"
    engine.step(1e-3)
    return counts


def check_accum_skips_sync(engine, name: str, params=None) -> None:
    """No gradient reduction on the non-final micro-step, one or more on the last."""
    counts = reductions_per_micro_step(engine, params)
    assert counts[0] == 0 and counts[1] > 0, f"{name}: reductions per micro-step {counts}"
    ok(f"accum-{name}", reductions=counts)


# ----------------------------------------------------------------------------- DDP


def ddp_engine(**knobs):
    from scaletrain.engines.ddp import DDPEngine

    return DDPEngine(mlp(), make_cfg({"kind": "ddp", "ddp": knobs}), info())


def train_steps(engine, steps: int, after_backward=None) -> None:
    engine.configure_stage(micro_batch=4, grad_accum=1)
    for step in range(steps):
        with engine.micro_step(is_last=True):
            engine.backward(engine.module(batch(step, 0, dist.get_rank())).pow(2).mean())
        if after_backward is not None:
            after_backward(step)
        engine.step(1e-3)


def grad_storages(engine) -> int:
    return len({p.grad.untyped_storage().data_ptr() for p in engine.module.parameters()})


def check_ddp_buckets() -> None:
    # DDP builds its final buckets (bucket_cap_mb) after the first iteration; with
    # gradient_as_bucket_view every gradient is a view into its bucket, so distinct gradient
    # storages = buckets. Without the view each gradient has its own storage.
    seen = {}
    for cap, view in [(25.0, True), (0.01, True), (25.0, False)]:
        engine = ddp_engine(bucket_cap_mb=cap, gradient_as_bucket_view=view)
        got = []
        train_steps(engine, 2, after_backward=lambda step: got.append(grad_storages(engine)))
        seen[(cap, view)] = got[-1]
        engine.close()
    n_params = len(list(mlp().parameters()))
    assert seen[(25.0, True)] == 1, seen  # the whole MLP (~10k floats) fits one 25 MB bucket
    # 10 kB buckets, filled in reverse order and closed once past the cap: {out layer, 3rd
    # weight 16 kB}, {2nd layer}, {1st layer}.
    assert seen[(0.01, True)] == 3, seen
    assert seen[(25.0, False)] == n_params, seen
    ok("ddp-buckets", storages=seen[(25.0, True)], small=seen[(0.01, True)], noview=seen[(25.0, False)])


class SharedTwice(nn.Module):
    """One layer used twice, each use under reentrant activation checkpointing: its gradient
    hook fires twice per backward, which plain DDP rejects and static_graph allows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pre = nn.Linear(16, 16)  # so the checkpointed inputs require grad
        self.layer = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        x = checkpoint(self.layer, self.pre(x), use_reentrant=True)
        return checkpoint(self.layer, x, use_reentrant=True)


def check_ddp_static_graph() -> None:
    from scaletrain.engines.ddp import DDPEngine

    results = {}
    for static in (False, True):
        engine = DDPEngine(SharedTwice(), make_cfg({"kind": "ddp", "ddp": {"static_graph": static}}), info())
        try:
            train_steps(engine, 2)
            results[static] = "trained"
        except RuntimeError as e:
            results[static] = "refused" if "only once" in str(e) or "ready" in str(e) else f"other: {e}"
        engine.close()
    assert results == {False: "refused", True: "trained"}, results
    ok("ddp-static-graph", **{str(k): v for k, v in results.items()})


def exact_mean_grads(step: int) -> list[torch.Tensor]:
    """fp32 reference: the same model's local gradient, all-reduced in fp32 and averaged."""
    model = mlp()
    model(batch(step, 0, dist.get_rank())).pow(2).mean().backward()
    out = []
    for p in model.parameters():
        g = p.grad.detach().clone()
        dist.all_reduce(g)
        out.append(g / dist.get_world_size())
    return out


def rel_err(engine, ref: list[torch.Tensor], matrices_only: bool = False) -> float:
    errs = [(p.grad - r).abs().max().item() / r.abs().max().item()
            for p, r in zip(engine.module.parameters(), ref) if not matrices_only or r.dim() > 1]
    return max(errs)


def check_ddp_compress_hook() -> None:
    errs = {}
    for hook in ("none", "fp16"):
        engine = ddp_engine(comm_hook=hook)
        train_steps(engine, 1, after_backward=lambda step: errs.__setitem__(hook, rel_err(engine, exact_mean_grads(0))))
        engine.close()
    # fp16 keeps 11 significant bits: elementwise relative error <= 2^-11 of the largest value,
    # twice over (rounding before and after the sum); fp32 is exact to ~1e-7.
    assert errs["none"] < 1e-6, errs
    assert 0 < errs["fp16"] < 2 * 2**-11, errs
    ok("ddp-fp16-hook", fp32=f"{errs['none']:.1e}", fp16=f"{errs['fp16']:.1e}")


def check_ddp_powersgd() -> None:
    # The model's weights stay fixed across steps here (lr 0 via engine.step(0)) so that every
    # step's exact reference is the same function of that step's data.
    engine = ddp_engine(comm_hook="powersgd", powersgd_rank=1, powersgd_start_step=2)
    engine.configure_stage(micro_batch=4, grad_accum=1)
    errs = []
    for step in range(4):
        with engine.micro_step(is_last=True):
            engine.backward(engine.module(batch(step, 0, dist.get_rank())).pow(2).mean())
        errs.append(rel_err(engine, exact_mean_grads(step), matrices_only=True))
        engine.step(0.0)
    state_iter = engine.comm_hook_state.iter
    engine.close()
    # Steps 0-1: exact all-reduce. From step 2 on: rank-1 approximations of 64x64 gradients,
    # far from exact (the first compressed step has no error feedback yet to catch up).
    assert max(errs[:2]) < 1e-6 and min(errs[2:]) > 1e-2, errs
    assert state_iter == 4, state_iter
    ok("ddp-powersgd", errs=",".join(f"{e:.1e}" for e in errs))


# ----------------------------------------------------------------------------- FSDP2


def fsdp_engine(model: nn.Sequential, **knobs):
    from scaletrain.engines.fsdp import FSDPEngine

    units = [m for m in model if isinstance(m, nn.Linear)]
    return FSDPEngine(model, units, make_cfg({"kind": "fsdp", "fsdp": knobs}), info()), units


def full_params(engine) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone()
            for p in engine.module.parameters()]


def check_hsdp_meshes() -> None:
    from torch.distributed.tensor import Replicate, Shard

    world = dist.get_world_size()
    finals = {}
    for shape in [None, (2, 1), (1, 2)]:
        knobs = {} if shape is None else {"replicate_size": shape[0], "shard_size": shape[1]}
        engine, _ = fsdp_engine(mlp(), **knobs)
        weight = next(engine.module.parameters())
        mesh = weight.device_mesh
        if shape is None:
            assert mesh.ndim == 1 and tuple(weight.placements) == (Shard(0),)
        else:
            assert tuple(mesh.shape) == shape and mesh.mesh_dim_names == ("replicate", "shard"), mesh
            assert tuple(weight.placements) == (Replicate(), Shard(0)), weight.placements
        stored = engine.local_param_numel() / engine.full_param_numel()
        want = 1 / world if shape is None else 1 / shape[1]
        assert abs(stored - want) < 0.05, (shape, stored)
        train_steps(engine, 2)
        finals[shape] = full_params(engine)
        engine.close()
        gc.collect()
    # All three layouts average the same gradients: same weights after 2 AdamW steps.
    for shape in [(2, 1), (1, 2)]:
        err = max((a - b).abs().max().item() for a, b in zip(finals[None], finals[shape]))
        assert err < 1e-6, (shape, err)
    ok("fsdp-hsdp", shapes="none,2x1,1x2")


def check_fsdp_prefetch() -> None:
    seen = {}
    for fwd, bwd in ((0, 1), (2, 2)):  # FSDP2's defaults, then two units ahead both ways
        engine, units = fsdp_engine(mlp(), forward_prefetch=fwd, backward_prefetch=bwd)
        # Behaviour: when unit 0's forward body starts, has unit 1's all-gather been issued?
        flags = []
        units[0].register_forward_pre_hook(
            lambda *_: flags.append(units[1]._get_fsdp_state()._fsdp_param_group._all_gather_result is not None))
        fwd_targets = [len(u._get_fsdp_state()._states_to_forward_prefetch) for u in units]
        bwd_targets = [len(u._get_fsdp_state()._states_to_backward_prefetch) for u in units]
        train_steps(engine, 1)
        seen[fwd] = (flags[0], fwd_targets, bwd_targets)
        engine.close()
        gc.collect()
    assert seen[0][0] is False and seen[2][0] is True, seen
    assert seen[0][1] == [0, 0, 0, 0] and seen[2][1] == [2, 2, 1, 0], seen
    # Unit i prefetches units i-1, i-2 in backward; by default none is named (implicit one-ahead).
    assert seen[0][2] == [0, 0, 0, 0] and seen[2][2] == [0, 1, 2, 2], seen
    ok("fsdp-prefetch", seen=seen)


# ----------------------------------------------------------------------------- DeepSpeed


def ds_engine(stage: int, tmp: str, **knobs):
    from scaletrain.engines.deepspeed import DeepSpeedEngine

    path = os.path.join(tmp, f"zero{stage}.json")
    # Every ZeRO knob "auto": the recipe's engine.deepspeed section decides.
    keys = ["reduce_bucket_size", "overlap_comm", "contiguous_gradients"] + (
        ["stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "zero_hpz_partition_size"]
        if stage == 3 else ["allgather_bucket_size"])
    zero = {"stage": stage, **{k: "auto" for k in keys}}
    with open(path, "w") as f:
        json.dump({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                   "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                   "zero_optimization": zero}, f)
    cfg = make_cfg({"kind": "deepspeed", "deepspeed_config": path, "deepspeed": knobs})
    return DeepSpeedEngine(mlp(), cfg, info(), micro_batch=4, grad_accum=1)


def check_deepspeed_knobs(tmp: str) -> None:
    knobs = {"reduce_bucket_size": 123_456, "overlap_comm": False, "contiguous_gradients": False,
             "stage3_prefetch_bucket_size": 7_777, "stage3_param_persistence_threshold": 10**6,
             "zero_hpz_partition_size": 2}
    engine = ds_engine(3, tmp, **knobs)
    landed = engine.ds._config.zero_config.model_dump(by_alias=True)  # the JSON key names
    for k, v in knobs.items():
        assert landed[k] == v, (k, landed[k], v)
    # Behaviour: a persistence threshold above every parameter's size keeps all of them whole
    # on each rank between steps (DeepSpeed's "persistent" parameters); at 0 every parameter
    # is released to an empty placeholder after use and only its 1/world partition stays.
    def whole_after_step(e) -> list[bool]:
        train_steps(e, 1)
        return [p.data.numel() == p.ds_numel for p in e.ds.module.parameters()]

    persistent = whole_after_step(engine)
    engine.close()
    base = ds_engine(3, tmp, stage3_param_persistence_threshold=0)
    released = whole_after_step(base)
    assert base.ds._config.zero_config.reduce_bucket_size != 123_456  # DeepSpeed's default when "auto"+null
    base.close()
    assert all(persistent) and not any(released), (persistent, released)
    two = ds_engine(2, tmp, allgather_bucket_size=54_322, reduce_bucket_size=98_765, overlap_comm=False)
    opt = two.ds.optimizer
    assert (opt.allgather_bucket_size, opt.reduce_bucket_size, opt.overlap_comm) == (54_322, 98_765, False)
    two.close()
    ok("deepspeed-knobs", persistent=sum(persistent), released=len(released) - sum(released))


def check_deepspeed_accum(tmp: str) -> None:
    # ZeRO-1 skips the reduction on non-final micro-steps. ZeRO-2/3 keep only their gradient
    # partition, so DeepSpeed reduce-scatters on every micro-step (its engine.no_sync() refuses
    # those stages); pinned here so a DeepSpeed change in either direction is noticed.
    engine = ds_engine(1, tmp, overlap_comm=False)
    check_accum_skips_sync(engine, "zero1")
    engine.close()
    for stage in (2, 3):
        engine = ds_engine(stage, tmp, overlap_comm=False)
        counts = reductions_per_micro_step(engine)
        engine.close()
        assert counts[0] > 0 and counts[1] > 0, (stage, counts)
        ok(f"accum-zero{stage}-reduces-every-micro-step", reductions=counts)


# ----------------------------------------------------------------------------- main


def main(groups: list[str]) -> None:
    """Run the checks of each group ("torch", "deepspeed") in one launch: start-up is the cost."""
    torch.set_num_threads(1)
    init_distributed("deepspeed" if "deepspeed" in groups else "fsdp")
    try:
        if "torch" in groups:
            check_ddp_buckets()
            check_ddp_static_graph()
            check_ddp_compress_hook()
            check_ddp_powersgd()
            engine = ddp_engine()
            check_accum_skips_sync(engine, "ddp", params=list(engine.module.parameters()))
            engine.close()
            check_hsdp_meshes()
            check_fsdp_prefetch()
            engine, _ = fsdp_engine(mlp())
            check_accum_skips_sync(engine, "fsdp")
            engine.close()
        if "deepspeed" in groups:
            with tempfile.TemporaryDirectory() as tmp:
                check_deepspeed_knobs(tmp)
                check_deepspeed_accum(tmp)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main(sys.argv[1:])
