"""The loss seam (train/step.py): a post-training method is a ``TrainingLoss`` factory plus an
optional batch builder handed to the unchanged ``Trainer``. This file defines a toy one with
its own batches and metrics, runs the real Trainer in this process (1 rank, FSDP2 on gloo),
and checks that each piece of the seam reached the loop: the batch requests, the loss's sums
through the step's all-reduce, its metrics and summary, its FLOPs factor in the throughput
record, and ``close``."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from scaletrain.checks import load_run_config
from scaletrain.train.step import BatchRequest, LossContext, TrainingLoss


class ToyLoss(TrainingLoss):
    """Shrink the denoiser's output on random pixels; counts samples and their error."""

    name = "toy"
    images_per_sample = 3.0
    closed = False

    def __init__(self, ctx: LossContext) -> None:
        self.model, self.device = ctx.model, ctx.device
        self._sums = [0.0, 0.0]

    def describe(self) -> str:
        return "toy loss: shrink the output"

    def __call__(self, engine, objective, batch, *, step, seed, is_last, on_loss=None):
        x = batch["pixels"].to(self.device)
        cond = self.model.encode_text(batch["captions"], self.device)
        t = torch.full((x.shape[0],), 500, dtype=torch.long)
        with engine.micro_step(is_last=is_last):
            per_sample = engine.module(x, t, cond).float().pow(2).flatten(1).mean(1)
            loss = per_sample.mean()
            engine.backward(loss if on_loss is None else on_loss(loss))
        self._sums = [self._sums[0] + x.shape[0], self._sums[1] + float(per_sample.detach().sum())]
        return loss.detach()

    def local_sums(self):
        sums, self._sums = self._sums, [0.0, 0.0]
        return sums

    def metrics(self, sums):
        return {"toy_samples": sums[0], "toy_error": sums[1] / sums[0]}

    def summary(self):
        return {"toy": "yes"}

    def close(self):
        ToyLoss.closed = True


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, synth_shards):
    from scaletrain.distributed import init_distributed, shutdown_distributed
    from scaletrain.train.trainer import Trainer
    from tests.conftest import shard_pattern
    from tests.distributed.util import free_port

    run_dir = tmp_path_factory.mktemp("toy") / "run"
    cfg = load_run_config("configs/demo.yaml", [
        f"data.shards={shard_pattern(synth_shards)}", f"run.dir={run_dir}", "train.stages.0.steps=3",
        "train.stages.1.steps=2", "train.stages.0.grad_accum=2",
        "train.stages.1.grad_accum=2", "validate.every_steps=0", "validate.at_end=false", "sample.at_end=false",
        "log.wandb=disabled", "log.progress=false", "data.num_workers=0"], world_size=1)
    requests: list[BatchRequest] = []

    def batches(req: BatchRequest):
        requests.append(req)
        g = torch.Generator().manual_seed(req.stage_index)
        while True:
            yield {"pixels": torch.rand(req.micro_batch, 3, req.resolution, req.resolution, generator=g) * 2 - 1,
                   "captions": ["a red circle"] * req.micro_batch,
                   "keys": [f"k{i}" for i in range(req.micro_batch)]}

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    dist_info = init_distributed("fsdp")
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):  # the run log (MetricsLogger.event)
            trainer = Trainer(cfg, dist_info, loss=ToyLoss, batches=batches)
            summary = trainer.train()
        trainer.close()
        del trainer
    finally:
        shutdown_distributed()
        mp.undo()
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return cfg, requests, summary, [r for r in records if "grad_norm" in r], out.getvalue()


def test_the_trainer_asks_the_batch_builder_for_each_stage(toy_run) -> None:
    cfg, requests, *_ = toy_run
    assert [(r.stage_index, r.resolution, r.micro_batch, r.skip, r.world_size) for r in requests] == [
        (0, 32, 8, 0, 1), (1, 64, 4, 0, 1)]


def test_the_losses_sums_metrics_and_summary_reach_the_record(toy_run) -> None:
    _, _, summary, records, log = toy_run
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["toy_samples"] for r in records] == [16, 16, 16, 8, 8]  # summed over the step's micro-batches
    # the loss it returned is the mean of the per-sample errors it summed (one micro-batch per step)
    assert all(r["toy_error"] == pytest.approx(r["loss"], rel=1e-5) for r in records)
    assert records[2]["toy_error"] < records[0]["toy_error"]  # it trains
    assert summary["toy"] == "yes" and summary["steps"] == 5 and ToyLoss.closed
    assert "toy loss: shrink the output" in log


def test_throughput_counts_the_losses_flops_per_sample(toy_run) -> None:
    from scaletrain.models.flops import train_flops_per_image

    cfg, _, _, records, _ = toy_run
    r = records[-1]
    per_image = train_flops_per_image(cfg.model.preset, (64, 64))
    assert r["tflops_per_device"] * 1e12 == pytest.approx(per_image * 3.0 * r["images_per_second"], rel=1e-9)
