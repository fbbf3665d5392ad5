"""The full trainer (config, engine, launcher, 2 ranks) reproduces the plain reference loop."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import run_cmd, shard_pattern
from tests.distributed.util import free_port, read_metrics

pytestmark = pytest.mark.dist


def test_trainer_matches_reference_loop(synth_shards, tmp_path):
    ref = run_cmd([sys.executable, "examples/reference_loop.py", "--shards", shard_pattern(synth_shards),
                   "--steps", "5", "--micro-batch", "4", "--grad-accum", "2", "--warmup-steps", "2",
                   "--prediction-type", "v_prediction"], env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_losses = json.loads(ref.stdout.strip().splitlines()[-1])["losses"]

    run_dir = tmp_path / "run"
    sets = [f"data.shards={shard_pattern(synth_shards)}", "data.split=sample", "data.shuffle_buffer=0",
            "data.num_workers=0", f"run.dir={run_dir}", "log.wandb=disabled", "log.progress=false",
            "sample.at_end=false", "validate.every_steps=0", "validate.at_end=false", "optim.lr=1e-3", "optim.warmup_steps=2", "diffusion.prediction_type=v_prediction",
            "diffusion.beta_schedule=scaled_linear", "diffusion.noise_offset=0.0", "engine.kind=fsdp",
            "train.stages=[{name: s, resolution: 32, steps: 5, micro_batch: 4, grad_accum: 1}]"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "launchers/pretrain.py", "--config", "configs/demo.yaml",
           *[x for s in sets for x in ("--set", s)]]
    r = run_cmd(cmd, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [m["loss"] for m in read_metrics(run_dir)]
    # 2 ranks x micro 4 vs 1 process x micro 4 x accum 2: same global batch of 8
    assert losses == pytest.approx(ref_losses, rel=1e-5)
