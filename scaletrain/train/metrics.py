"""Training metrics sinks: console progress bar, JSONL, wandb (offline by default).

Only rank 0 writes; other ranks get a logger whose calls do nothing, so the loop never
asks which rank it is on.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class LossEMA:
    """Bias-corrected exponential moving average (Adam-style correction), for loss and grad norm."""

    def __init__(self, decay: float) -> None:
        self.decay, self.value, self.count = decay, 0.0, 0

    def update(self, x: float) -> float:
        if not math.isfinite(x):
            return self.get()
        self.count += 1
        self.value = self.decay * self.value + (1 - self.decay) * x
        return self.get()

    def get(self) -> float:
        return self.value / (1 - self.decay**self.count) if self.count else float("nan")


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, wandb_mode: str, project: str, config: dict,
                 total_steps: int, progress: bool, run_name: str | None = None) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            # offline needs no login and no network; `wandb sync` uploads later if wanted.
            self._wandb = wandb.init(project=project, name=run_name, dir=str(run_dir), mode=wandb_mode,
                                     config=config, reinit="finish_previous")
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def progress(self, n: int, postfix: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix(postfix, refresh=False)

    def event(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()


def peak_memory_gib(device) -> float:
    """CUDA max allocated on GPUs; peak resident set size (RSS) of this process on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class StepMetrics:
    """A step's record as a component of the loop: loss and its EMA, grad norm, LR, throughput,
    data wait, the comm profiler's split on sampled steps, bucket sizes, data counters, the loss's
    own metrics; on logged steps rank 0 adds TFLOP/s, MFU and peak memory. A skipped step's loss
    stays out of the EMA."""

    def __init__(self, loss_ema: LossEMA) -> None:
        self.loss_ema = loss_ema

    def log(self, trainer: Any, index: int, stage: Any, loss: float, stats: Any, dt: float, wait: float,
            skipped: int, global_batch: int, objective_sums: list[float] = ()) -> None:
        ema = self.loss_ema.get() if stats.skipped else self.loss_ema.update(loss)  # a bad step stays out
        record = {
            "step": trainer.step, "stage": index, "resolution": stage.resolution, "loss": loss, "loss_ema": ema,
            "grad_norm": stats.grad_norm, "lr": stats.lr, "images_seen": trainer.images_seen,
            "images_per_second": global_batch / dt, "step_seconds": dt, "data_wait_seconds": wait,
            "skipped_samples": skipped, "skipped_step": stats.skipped,
        }
        if stats.loss_scale is not None:  # fp16: the dynamic loss scale after this step
            record["loss_scale"] = stats.loss_scale
        record.update(trainer.comm_profiler.record(dt, wait))  # compute / exposed comm, sampled steps
        if trainer.cfg.data.buckets.enabled:  # rank 0's micro-batch sizes this step, one bucket each
            record["bucket_sizes"] = [f"{hw[1]}x{hw[0]}" for hw in trainer.step_image_sizes]
        record.update(trainer.data_counts.record())  # filtered_samples, source_frac/*, class_frac/*
        record.update(trainer.loss.metrics(objective_sums))  # e.g. DPO's implicit accuracy and reward margin
        if stats.skipped or trainer.step % trainer.cfg.log.every == 0 or trainer.step == trainer.total_steps:
            if trainer.dist.is_main:  # only rank 0 writes, so only it pays for the FLOP count
                record.update(self.throughput(trainer, stage.resolution, global_batch / dt))
            trainer.logger.log(record)
        trainer.logger.progress(1, {"stage": index, "loss": f"{loss:.4f}", "ema": f"{ema:.4f}",
                                    "img/s": f"{global_batch / dt:.1f}"})

    @staticmethod
    def throughput(trainer: Any, resolution: int, images_per_second: float) -> dict:
        """Per-device TFLOP/s and MFU from the analytic FLOP count (scaletrain.models.flops), and
        peak memory (CUDA max allocated; process RSS on CPU) of this rank. ``images_per_second``
        counts the loss's samples (DPO: pairs), each ``loss.images_per_sample`` images of compute."""
        from scaletrain.models.flops import device_peak_tflops, train_flops_per_image

        cfg = trainer.cfg
        # Mean over this rank's micro-batches (their sizes differ under data.buckets; the FLOPs depend
        # on the area, which the buckets keep within a few % of resolution^2 on every rank).
        sizes = trainer.step_image_sizes or [(resolution, resolution)]
        flops = sum(train_flops_per_image(cfg.model.preset, tuple(hw[:2]), *hw[2:]) for hw in sizes) / len(sizes)
        tflops = flops * images_per_second * trainer.loss.images_per_sample / trainer.dist.world_size / 1e12
        peak, _ = device_peak_tflops(trainer.device, cfg.engine.precision, cfg.log.peak_tflops)
        return {"tflops_per_device": tflops, "mfu": tflops / peak, "peak_memory_gib": peak_memory_gib(trainer.device)}


def truncate_metrics(path: Path, step: int) -> None:
    """Fresh run: no metrics file. Resumed run: keep records up to the checkpoint's step, so
    steps re-run after a crash are not logged twice."""
    if step == 0 or not path.is_file():
        path.unlink(missing_ok=True)
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def run_summary(trainer: Any) -> dict:
    """What summary.json records of a run: counters, throughput, the loss, data counts, the engine and
    its parameters, memory, the stages, health and checkpoint outcomes, the levers as applied, the
    frozen encoders' layout, start-up, and the loss's own figures."""
    from scaletrain.models.parallelize import lever_report
    from scaletrain.train.startup import frozen_encoders_report

    return {
        "steps": trainer.step,
        "images_seen": trainer.images_seen,
        "images_per_second": trainer.images_seen / trainer.train_seconds if trainer.train_seconds else 0.0,
        "train_seconds": trainer.train_seconds,
        "final_loss": trainer.last_loss,
        "final_loss_ema": trainer.loss_ema.get(),
        "skipped_samples": trainer.skipped_samples,
        "filtered_samples": sum(trainer.data_counts.filtered_total.values()),
        "filtered_by_rule": dict(trainer.data_counts.filtered_total),
        "data_issues": dict(trainer.data_counts.issues_total),  # bad data counted per kind (not raised)
        "engine": trainer.engine.name,
        "world_size": trainer.dist.world_size,
        "params_total": trainer.engine.full_param_numel(),
        "params_trainable": trainer.engine.trainable_param_numel(),
        "params_local_rank0": trainer.engine.local_param_numel(),
        "peak_memory_gib_rank0": peak_memory_gib(trainer.device),
        "stages": trainer.stage_summaries,
        "stopped_early": trainer.stopped_early,
        "bad_steps": trainer.health.bad_steps,
        # async saves: background threads that took checkpoint.async_nice (0 without async saves)
        "checkpoint_background_threads_lowered": trainer.engine.background_threads_lowered,
        "checkpoint_save_failures": trainer.checkpoints.failures,
        "rollbacks": trainer.health.rollbacks,
        "lr_scale": trainer.health.lr_scale,
        "levers": lever_report(trainer.model.denoiser),  # checkpointing/compile as applied, counted
        # engine.precision=fp8: Linear layers converted, recipe, fp8 all-gather, emulated (engines/fp8.py)
        "fp8": trainer.engine.float8.report() if trainer.engine.float8 is not None else None,
        "frozen_encoders": frozen_encoders_report(trainer),
        "startup": trainer.startup,  # peak host (device) memory per rank and seconds at the first step
        **trainer.loss.summary(),
    }
