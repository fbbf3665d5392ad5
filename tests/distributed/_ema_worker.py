"""Worker for test_ema: run under `torchrun --nproc_per_node 2` (gloo, CPU).

For each engine named on the command line (fsdp, ddp, zero3, zero3-bf16: bf16 weights with
fp32 masters, small parameters kept whole on every rank) it trains a tiny model whose
parameters shard unevenly over 2 ranks (a 3x7 weight, a 3-element bias, a 1-element
parameter, a 5x3 weight) for a few AdamW steps with a real loss, and keeps beside
the ShardedEMA a reference EMA of the *gathered* full parameters (gathered in this test
only). Checks, each raising on failure (the exit code is the verdict):

1. the sharded EMA, gathered, equals the reference within 1e-6 after every step;
2. an update makes no collective (CommDebugMode counts 0; it counts the gather, so it sees);
3. each rank stores only its part: ranks' EMA elements sum to the parameter count;
4. inside ``swapped()`` the module computes with the EMA weights (its output equals the
   reference model's with the reference EMA), and the training weights come back bit-exact;
5. save/load through DCP restores the EMA bit-exactly; a ZeRO-3 EMA loads an FSDP2 one
   (another layout) and matches its own within float tolerance.
Prints "OK <engine> ..." per engine.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor.debug import CommDebugMode

from scaletrain.checks import validate_config
from scaletrain.distributed import init_distributed
from scaletrain.train.ema import ShardedEMA, ema_decay

DECAY, STEPS, LR = 0.9, 6, 0.05
REPO = Path(__file__).resolve().parents[2]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(7, 3)  # weight 21 elements (odd), bias 3: uneven over 2 ranks
        self.scale = nn.Parameter(torch.tensor([1.5]))  # 1 element: fewer than the ranks
        self.c = nn.Linear(3, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.a(x)) * self.scale)


def build(kind: str, dist_info, out: Path):
    if kind == "zero3-bf16":
        # Also DeepSpeed's default of keeping small params whole on every rank ("persistent"):
        # the bias and the scale persist, the two weights are partitioned.
        ds_json = json.loads((REPO / "ds_configs/zero3.json").read_text())
        ds_json["zero_optimization"]["stage3_param_persistence_threshold"] = 10
        # One file per rank: two ranks writing one path race (a reader saw it empty in CI).
        (out / f"zero3_persist_rank{dist_info.rank}.json").write_text(json.dumps(ds_json))
    torch.manual_seed(0)  # same init on every rank and for every engine
    model = Tiny()
    engine_cfg = {"fsdp": {"kind": "fsdp"}, "ddp": {"kind": "ddp"},
                  "zero3": {"kind": "deepspeed", "deepspeed_config": "ds_configs/zero3.json"},
                  "zero3-bf16": {"kind": "deepspeed", "deepspeed_config": str(out / f"zero3_persist_rank{dist_info.rank}.json"),
                                 "precision": "bf16"}}[kind]
    cfg = validate_config({"train": {"stages": [{"name": "s", "resolution": 32, "steps": STEPS, "micro_batch": 2}]},
                           "engine": engine_cfg, "optim": {"lr": LR, "grad_clip": 0.0, "weight_decay": 0.0}},
                          world_size=dist_info.world_size, check_paths=False)
    if kind == "fsdp":
        from scaletrain.engines.fsdp import FSDPEngine

        engine = FSDPEngine(model, [model.a], cfg, dist_info)
    elif kind == "ddp":
        from scaletrain.engines.ddp import DDPEngine

        engine = DDPEngine(model, cfg, dist_info)
    else:
        from scaletrain.engines.deepspeed import DeepSpeedEngine

        engine = DeepSpeedEngine(model, cfg, dist_info, micro_batch=2, grad_accum=1)
    return engine


def gathered_params(engine, kind: str) -> dict[str, torch.Tensor]:
    """Full fp32 parameters by the most direct route per engine (test-only gather)."""
    if kind == "fsdp":
        return {n: p.full_tensor().clone() for n, p in engine.module.named_parameters()}
    if kind == "ddp":
        return {n: p.detach().clone() for n, p in engine.state_module.named_parameters()}
    from deepspeed.utils import safe_get_full_fp32_param
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    named = list(engine.ds.module.named_parameters())
    if kind == "zero3-bf16":  # the EMA averages the optimizer's fp32 master weights
        return {n: safe_get_full_fp32_param(p).clone() for n, p in named}
    with GatheredParameters([p for _, p in named]):
        return {n: p.detach().clone() for n, p in named}


def module_weights(engine, kind: str) -> dict[str, torch.Tensor]:
    """The weights the module computes with (bf16 under zero3-bf16)."""
    if kind == "zero3-bf16":
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        named = list(engine.ds.module.named_parameters())
        with GatheredParameters([p for _, p in named]):
            return {n: p.detach().clone() for n, p in named}
    return gathered_params(engine, kind)


def max_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def check_engine(kind: str, dist_info, out: Path) -> None:
    rank, world = dist_info.rank, dist_info.world_size
    engine = build(kind, dist_info, out)
    ema = ShardedEMA(engine, DECAY, warmup="ratio")
    tol = 1e-6
    ref = gathered_params(engine, kind)  # the reference starts where the engine starts (bf16: rounded)
    assert max_err(ema.full_state_dict(), ref) == 0.0, "EMA must start at the weights"

    # 3. storage: this rank's part only, nothing duplicated across ranks.
    local = sum(t.to_local().numel() for t in ema.averages.values())
    counts = torch.tensor([local])
    dist.all_reduce(counts)
    full = sum(p.numel() for p in ref.values())
    assert counts.item() == full and local < full, (kind, local, counts.item(), full)

    dtype = engine.input_dtype
    for step in range(1, STEPS + 1):
        g = torch.Generator().manual_seed(100 * step + rank)
        x, y = torch.randn(2, 7, generator=g), torch.randn(2, 5, generator=g)
        with engine.micro_step(is_last=True):
            loss = nn.functional.mse_loss(engine.module(x.to(dtype)).float(), y)
            engine.backward(loss)
        engine.step(LR)
        with CommDebugMode() as comm:  # 2. no collective in the update
            assert ema.maybe_update(step)
        assert comm.get_total_counts() == 0, (kind, comm.get_comm_counts())
        d = ema_decay(step - 1, DECAY, "ratio")
        params = gathered_params(engine, kind)
        ref = {n: d * ref[n] + (1 - d) * params[n].float() for n in ref}
        err = max_err(ema.full_state_dict(), ref)  # 1. equals the full-model reference
        assert err < tol, (kind, step, err)

    with CommDebugMode() as comm:  # the counter does see the gather (so a 0 above means none)
        ema_full = ema.full_state_dict()
    assert comm.get_total_counts() > 0, kind
    raw = gathered_params(engine, kind)
    moved = max_err(ema_full, raw)
    assert moved > 1e-4, (kind, moved)  # the EMA really differs from the raw weights

    # 4. swapped: compute with the EMA weights, then restore the training weights bit-exactly.
    before = module_weights(engine, kind)
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(7))
    plain = Tiny()
    plain.load_state_dict({n: t.to(dtype) for n, t in ref.items()})
    with torch.no_grad():
        want = plain.to(dtype)(x.to(dtype)).float()
    with ema.swapped(), engine.eval_mode():
        inside = module_weights(engine, kind)
        got = engine.module(x.to(dtype)).float()
    swap_err = max_err(inside, {n: t.to(inside[n].dtype) for n, t in ema_full.items()})
    out_err = (got - want).abs().max().item()
    assert swap_err == 0.0, (kind, swap_err)
    assert out_err < (1e-6 if dtype == torch.float32 else 2e-2), (kind, out_err)
    assert max_err(module_weights(engine, kind), before) == 0.0, "training weights not restored"
    assert max_err(gathered_params(engine, kind), raw) == 0.0, "master weights changed"

    # 5. checkpoint: bit-exact round trip through DCP.
    path = out / f"ema-{kind}"
    saved_locals = {n: t.to_local().clone() for n, t in ema.averages.items()}
    ema.save(path)
    ema.reset()
    assert ema.num_updates == 0 and max_err(ema.full_state_dict(), raw) == 0.0
    ema.load(path)
    assert ema.num_updates == STEPS, ema.num_updates
    for n, t in ema.averages.items():
        assert torch.equal(t.to_local(), saved_locals[n]), (kind, n)
    cross = ""
    if kind == "zero3" and (out / "ema-fsdp").is_dir():
        # FSDP2 saved (3, 7)-shaped shards, ZeRO-3 keeps flat partitions: load across layouts.
        ema.load(out / "ema-fsdp")
        cross_err = max_err(ema.full_state_dict(), ema_full)
        assert cross_err < 1e-5, cross_err
        cross = f" cross_layout_err={cross_err:.1e}"
    if rank == 0:
        print(f"OK {kind} rank={rank} world={world} ema_err={err:.1e} ema_vs_raw={moved:.2e} "
              f"local={local}/{full} swap_out_err={out_err:.1e}{cross}", flush=True)
    dist.barrier()
    del ema, engine, ema_full, saved_locals
    gc.collect()


def main(out: str, kinds: list[str]) -> None:
    torch.set_num_threads(1)
    # deepspeed.init_distributed makes the same gloo group torch would; every engine runs on it.
    dist_info = init_distributed("deepspeed" if any(k.startswith("zero") for k in kinds) else "fsdp")
    try:
        for kind in kinds:
            check_engine(kind, dist_info, Path(out))
    finally:
        gc.collect()  # FINDINGS: free DTensors/mesh refs before the group goes, or exits abort
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
