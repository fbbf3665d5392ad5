"""engine.precision=fp8 on 2 CPU ranks under FSDP2: torchao's float8 training in its emulation mode
(the same casts and scales as on fp8 tensor cores, matmuls in high precision). The Linear layers of
dit-tiny's units are converted (counted on the module, said in one start-up line, recorded in
summary.json), tensorwise with the fp8 all-gather (which works on gloo: no fallback needed) and
rowwise without it; both loss curves follow bf16's; a tensorwise run cut at a checkpoint and
resumed continues exactly as the run never cut (the fp8 weight subclass survives DCP, and the
precomputed scales are rebuilt after the load). One batch launch (tests/launch.py)."""

from __future__ import annotations

import pytest

from tests.conftest import ref_sets
from tests.launch import run_batch, sets

pytestmark = pytest.mark.dist

STEPS = 8
# dit-tiny's 4 blocks x (attention q/k/v/out, cross-attention q/k/v/out, feed-forward in/out) = 40.
LINEARS = 40
# Max relative loss gap to bf16 over a run. Measured on this machine (2026-12-07, dit-tiny, 2 ranks,
# global batch 8, lr 1e-3, cosine over the run): these 8 steps, tensorwise 2.79e-3, rowwise 1.74e-3;
# 5 steps 2.67e-3 / 1.69e-3; 20 steps at run.seed 0/1/2, tensorwise 2.44e-3 / 2.05e-3 / 1.99e-3,
# rowwise 1.72e-3 / 3.02e-3 / 1.40e-3, each largest in the first 3 steps (no drift after); bf16
# itself is 6.6e-4 from fp32 at most. The fp8 gap is e4m3's rounding (3 mantissa bits) averaged
# over dot products of 64-256 terms. 1e-2 leaves 3.3x over the worst seen; a stale scale (x10
# weights cast with the old one: a 27x smaller output, the last test) moves the loss by far more.
RTOL_FP8 = 1e-2


@pytest.fixture(scope="module")
def runs(synth_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp8")
    common = ["--config", "configs/demo.yaml", *ref_sets(synth_shards, steps=STEPS), *sets("model.preset=dit-tiny")]
    fp8 = sets("engine.precision=fp8", "ema.enabled=true")  # EMA reads the fp8 weight subclass's shards
    cut = sets("checkpoint.every_steps=4", f"run.dir={tmp / 'cut'}")
    recipes = {
        "bf16": common + sets("engine.precision=bf16"),
        "tensorwise": common + fp8,
        "rowwise": common + fp8 + sets("engine.fp8.recipe=rowwise"),
        "cut": common + fp8 + cut + sets("run.stop_at_step=4"),
        "resumed": common + fp8 + cut + sets("checkpoint.resume=auto"),
    }
    return {name: r.ok() for name, r in run_batch(recipes, tmp).items()}


def _gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def test_the_linear_layers_train_in_fp8_emulated_and_follow_bf16(runs) -> None:
    bf16 = runs["bf16"].losses
    assert len(bf16) == STEPS and runs["bf16"].summary["fp8"] is None
    for recipe, gather in (("tensorwise", True), ("rowwise", False)):
        run = runs[recipe]
        assert run.summary["fp8"] == {"recipe": recipe, "all_gather": gather, "emulated": True,
                                      "linears": LINEARS, "kept_bf16": 0}
        lines = [ln for ln in run.stdout.splitlines() if ln.startswith("fp8: ")]
        assert len(lines) == 1 and f"{LINEARS} Linear layers" in lines[0] and "emulated on CPU" in lines[0], lines
        assert "Failed to load" not in run.stderr  # torchao's import noise (CUDA extensions) is kept out
        gap = _gap(run.losses, bf16)
        # fp8 changes the numbers (the layers really compute in fp8), and not by more than measured
        assert 1e-5 < gap < RTOL_FP8, (recipe, gap, run.losses, bf16)


def test_an_fp8_run_resumes_on_the_same_curve(runs) -> None:
    assert "resumed at step 4" in runs["resumed"].stdout
    # The cut and resumed runs share one folder: its metrics are steps 1-4 of the cut, 5-8 resumed.
    assert runs["resumed"].losses == runs["tensorwise"].losses


_STALE_SCALES = """
import os, torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from scaletrain.config import Fp8Section
from scaletrain.engines.fp8 import apply_float8, forget_scales, precompute_scales
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
torch.manual_seed(0)
net = nn.Sequential(nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64)))
apply_float8([net[0]], Fp8Section(), torch.device("cpu"), sharded=True)
mp, mesh = MixedPrecisionPolicy(param_dtype=torch.bfloat16), init_device_mesh("cpu", (1,))
fully_shard(net[0], mesh=mesh, mp_policy=mp)
fully_shard(net, mesh=mesh, mp_policy=mp)
x = torch.randn(8, 64)
precompute_scales(net)
with torch.no_grad():  # a write outside the optimizer (the EMA swap, a load): weights x10
    for name, p in net.named_parameters():
        if name.endswith("weight"):
            p._local_tensor.mul_(10)
stale = net(x).float().sum().item()
net.reshard()
net[0].reshard()
forget_scales(net)
fresh = net(x).float().sum().item()
precompute_scales(net)
print("RESULT", stale, fresh, net(x).float().sum().item())
"""


def test_scales_are_taken_again_after_the_weights_are_written_outside_a_step() -> None:
    """The fp8 all-gather casts each weight with the scale precomputed after the last optimizer
    step. Weights written otherwise (the EMA swap writes the shards) would be cast with the old
    scale and saturate: here x10 weights give a 27x smaller output. ``forget_scales`` (called by
    ``FSDPEngine.local_param_shards(release_gathered=True)``, which the EMA swap calls before and
    after) makes the next gather scale what the weights hold, as a fresh precompute does."""
    from tests.launch import ENV, free_port, python, run

    r = run(python("-c", _STALE_SCALES), env={**ENV, "PORT": str(free_port())}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    stale, fresh, precomputed = map(float, r.stdout.split("RESULT")[1].split())
    assert fresh == precomputed and abs(stale) < abs(fresh) / 10, (stale, fresh, precomputed)
