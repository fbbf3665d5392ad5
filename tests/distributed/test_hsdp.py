"""HSDP for real (issue 29, item 2): a 2 x 2 mesh (engine.fsdp.replicate_size=2, shard_size=2)
on 4 ranks through the trainer gives plain FSDP2's 4-rank curve; its checkpoint (with the
sharded EMA) resumes on the same mesh bit for bit, and on 2 ranks as a 2 x 1 and a 1 x 2 mesh
within float tolerance.

4 ranks on the 2-core reference machine: each rank runs one thread; one 4-rank batch launch
holds the 4-rank recipes and one 2-rank batch the two resumes (tests/launch.py says why)."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.conftest import ref_sets
from tests.launch import run_batch, sets

pytestmark = pytest.mark.dist

STEPS, STOP = 6, 3
RTOL = 1e-5  # as tests/distributed/test_engine_equivalence.py: summation order only
HSDP = ("engine.kind=fsdp", "engine.fsdp.replicate_size=2", "engine.fsdp.shard_size=2")
KEEP = ("ema.enabled=true", "checkpoint.every_steps=3", "checkpoint.keep_last=4")


def _recipe(shards, micro: int, accum: int = 1, *extra: str) -> list[str]:
    return ["--config", "configs/demo.yaml", *ref_sets(shards, steps=STEPS, micro=micro, accum=accum), *sets(*extra)]


def _ema(run_dir, step: int) -> dict[str, torch.Tensor]:
    from scaletrain.checkpoint.export import ema_state_dict
    from scaletrain.checkpoint.manager import list_checkpoints

    info = next(c for c in list_checkpoints(run_dir / "checkpoints") if c.step == step and c.complete)
    return ema_state_dict(info)


@pytest.fixture(scope="module")
def runs(synth_shards, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hsdp")
    four = {
        "hsdp": _recipe(synth_shards, 2, 1, *HSDP, *KEEP),  # first: compared bit for bit below
        "hsdp-stop": _recipe(synth_shards, 2, 1, *HSDP, *KEEP, f"run.dir={root / 'resumed'}", f"run.stop_at_step={STOP}"),
        "hsdp-resume": _recipe(synth_shards, 2, 1, *HSDP, *KEEP, f"run.dir={root / 'resumed'}",
                               "checkpoint.resume=auto"),
        "fsdp": _recipe(synth_shards, 2, 1, "engine.kind=fsdp"),
    }
    out = {n: r.ok() for n, r in run_batch(four, root / "four", nproc=4).items()}
    two = {}
    for name, mesh in (("2x1", ("engine.fsdp.replicate_size=2", "engine.fsdp.shard_size=1")),
                       ("1x2", ("engine.fsdp.replicate_size=1", "engine.fsdp.shard_size=2"))):
        d = root / name
        shutil.copytree(out["hsdp"].dir / "checkpoints" / f"step-{STOP:08d}", d / "checkpoints" / f"step-{STOP:08d}")
        two[name] = _recipe(synth_shards, 4, 1, "engine.kind=fsdp", *mesh, *KEEP, f"run.dir={d}", "checkpoint.resume=auto")
    out.update({n: r.ok() for n, r in run_batch(two, root / "two", nproc=2).items()})
    return out


def test_a_2x2_mesh_trains_plain_fsdps_curve_on_4_ranks(runs):
    """The same recipe on FSDP2 over 4 ranks and on the 2 x 2 HSDP mesh: losses within 1e-5,
    grad norms within 1e-3; and the mesh was the run's: each rank holds half of the parameters
    under HSDP (sharded over 2), a quarter under FSDP2 (over 4)."""
    hsdp, fsdp = runs["hsdp"], runs["fsdp"]
    assert len(hsdp.losses) == STEPS
    assert hsdp.losses == pytest.approx(fsdp.losses, rel=RTOL)
    assert [m["grad_norm"] for m in hsdp.metrics] == pytest.approx([m["grad_norm"] for m in fsdp.metrics], rel=1e-3)
    total = hsdp.summary["params_total"]
    assert hsdp.summary["world_size"] == fsdp.summary["world_size"] == 4
    assert hsdp.summary["params_local_rank0"] == pytest.approx(total / 2, rel=0.02)
    assert fsdp.summary["params_local_rank0"] == pytest.approx(total / 4, rel=0.02)


def test_a_2x2_checkpoint_resumes_on_its_mesh_bit_for_bit(runs):
    """Stopped at step 3 and relaunched: steps 4-6 and the final EMA equal the straight run's."""
    straight, resumed = runs["hsdp"], runs["hsdp-resume"]
    assert f"resumed at step {STOP}" in resumed.stdout + resumed.stderr
    assert [m["step"] for m in resumed.metrics] == list(range(1, STEPS + 1))
    assert resumed.losses == straight.losses
    want, got = _ema(straight.dir, STEPS), _ema(resumed.dir, STEPS)
    assert want.keys() == got.keys() and len(want) > 10
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("mesh", ["2x1", "1x2"])
def test_a_2x2_checkpoint_resumes_on_2_ranks_as_2x1_and_1x2(runs, mesh):
    """The step-3 checkpoint of the 2 x 2 run, resumed on 2 ranks (the same global batch) as a
    2 x 1 mesh (replicas only) and a 1 x 2 mesh (shards only): steps 4-6 follow the straight
    4-rank run within 1e-5 and the final EMA within 1e-5."""
    straight, r = runs["hsdp"], runs[mesh]
    assert f"resumed at step {STOP}" in r.stdout + r.stderr
    # the data stream re-split from 4 to 2 data-parallel ranks (micro-batch 2 -> 4), nothing replayed
    assert ("data: stage 0 continues at its checkpointed stream position, re-split from 4 to 2 data-parallel ranks "
            "(3 micro-batches per rank in; none replayed)") in r.stdout, r.stdout[-3000:]
    assert r.summary["world_size"] == 2
    expected_local = r.summary["params_total"] / (1 if mesh == "2x1" else 2)
    assert r.summary["params_local_rank0"] == pytest.approx(expected_local, rel=0.02)
    assert r.losses == pytest.approx(straight.losses[STOP:], rel=RTOL)
    want, got = _ema(straight.dir, STEPS), _ema(r.dir, STEPS)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=1e-7)
