"""The training loop: curriculum stages over one engine, with named override points.

``Trainer.train`` walks the stages; ``run_stage`` is the ~40-line loop; the diffusion math
lives in ``forward_backward_step`` so post-training objectives (SFT, DPO) override that one
method. The loop never asks which engine it has (see ``engines.base``).
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Iterator

import torch

from scaletrain.checkpoint.manager import CheckpointManager
from scaletrain.config import RunConfig, dump_config
from scaletrain.data.pipeline import LoaderSpec, build_loader, expand_shards
from scaletrain.diffusion.objective import (
    ObjectiveConfig,
    build_noise_scheduler,
    diffusion_loss,
    prepare_training_batch,
)
from scaletrain.distributed import DistInfo, all_reduce_mean, all_reduce_sum
from scaletrain.engines import build_engine
from scaletrain.eval.samples import generate_samples, save_image_grid
from scaletrain.models import build_model
from scaletrain.train.metrics import LossEMA, MetricsLogger
from scaletrain.train.schedule import lr_at


def peak_memory_gib(device: torch.device) -> float:
    """CUDA max allocated on GPUs; peak resident set size (RSS) of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _truncate_metrics(path: Path, step: int) -> None:
    """Fresh run: no metrics file. Resumed run: keep records up to the checkpoint's step, so
    steps re-run after a crash are not logged twice."""
    if step == 0 or not path.is_file():
        path.unlink(missing_ok=True)
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


class Trainer:
    def __init__(self, cfg: RunConfig, dist_info: DistInfo) -> None:
        self.cfg, self.dist = cfg, dist_info
        self.device = dist_info.device
        self.run_dir = Path(cfg.run.dir)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        # Same seed on every rank: identical initial weights before the engine shards them.
        torch.manual_seed(cfg.run.seed)
        self.model = build_model(
            cfg.model.preset, text_encoder_path=cfg.model.text_encoder_path, vae_path=cfg.model.vae_path
        ).to(self.device)
        self.objective = ObjectiveConfig(
            prediction_type=cfg.diffusion.prediction_type,
            num_train_timesteps=cfg.diffusion.num_train_timesteps,
            beta_schedule=cfg.diffusion.beta_schedule,
            noise_offset=cfg.diffusion.noise_offset,
            min_snr_gamma=cfg.diffusion.min_snr_gamma,
        )
        self.noise_scheduler = build_noise_scheduler(self.objective)
        first = cfg.train.stages[0]
        self.engine = build_engine(
            cfg, self.model.denoiser, dist_info, micro_batch=first.micro_batch, grad_accum=first.grad_accum
        )
        self.shards = expand_shards(cfg.data.shards)
        self.total_steps = sum(s.steps for s in cfg.train.stages)
        self.step = 0
        self.images_seen = 0
        self.skipped_samples = 0
        self.train_seconds = 0.0
        self.loss_ema = LossEMA(cfg.log.loss_ema_decay)
        self.last_loss = float("nan")
        self.resumed_from: str | None = None
        self.stage_summaries: list[dict] = []
        self.stage_index, self.step_in_stage = 0, 0  # where the loop (re)starts
        self.stopped_early = False
        self._sigterm = False
        self.ckpt = CheckpointManager(cfg.checkpoint, self.run_dir, self.engine, dist_info)
        resumed = self.ckpt.load_latest()
        if resumed is not None:
            self.restore(resumed)
        if dist_info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        if cfg.checkpoint.on_sigterm:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        self.logger = MetricsLogger(
            self.run_dir,
            enabled=dist_info.is_main,
            wandb_mode=cfg.log.wandb,
            project=cfg.log.wandb_project,
            config=cfg.model_dump(mode="json"),
            total_steps=self.total_steps,
            progress=cfg.log.progress,
            run_name=cfg.run.name,
        )

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        self.logger.event(
            f"scaletrain: {self.cfg.model.preset} on {self.engine.name} x{self.dist.world_size} "
            f"({self.dist.backend}), {self.engine.full_param_numel() / 1e6:.2f}M params, "
            f"{self.engine.local_param_numel() / 1e6:.2f}M stored on rank 0, {self.total_steps} steps"
        )
        if self.step:
            self.logger.event(f"resumed at step {self.step} (stage {self.stage_index}, "
                              f"step {self.step_in_stage} of it) from {self.resumed_from}")
        for index, stage in enumerate(self.cfg.train.stages):
            if index < self.stage_index:
                continue
            if not self.run_stage(index, stage):
                break
        for record in self.ckpt.finalize():  # commit a pending async checkpoint
            self.logger.log({"step": self.step, **record})
        if self.cfg.sample.at_end and not self.stopped_early:
            self.write_samples(self.run_dir / "samples.png")
        summary = self.summary()
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self.logger.event(
                f"done: {summary['steps']} steps, {summary['images_seen']} images, "
                f"{summary['images_per_second']:.1f} img/s, final loss {summary['final_loss']:.4f} "
                f"(EMA {summary['final_loss_ema']:.4f}) -> {self.run_dir}"
            )
        return summary

    def run_stage(self, index: int, stage) -> bool:
        """Train one curriculum stage from ``self.step_in_stage``; False when the run must stop."""
        cfg, world = self.cfg, self.dist.world_size
        start = self.step_in_stage if index == self.stage_index else 0
        self.stage_index, self.step_in_stage = index, start
        self.engine.configure_stage(stage.micro_batch, stage.grad_accum)
        # Resume mid-stage: skip the micro-batches this stage already consumed (exact for a
        # deterministic stream at the same global batch; see data.pipeline).
        batches = self.build_batches(stage.resolution, stage.micro_batch, skip=start * stage.grad_accum)
        global_batch = stage.micro_batch * stage.grad_accum * world
        base_lr = stage.lr or cfg.optim.lr
        warmup = cfg.optim.warmup_steps if stage.warmup_steps is None else stage.warmup_steps
        self.logger.event(f"stage {index} '{stage.name}': {stage.resolution}px, {stage.steps} steps, "
                          f"global batch {global_batch} = {stage.micro_batch} x {stage.grad_accum} x {world}")
        stage_start, stage_images = time.perf_counter(), 0
        for step_in_stage in range(start, stage.steps):
            t0 = time.perf_counter()
            lr = lr_at(step_in_stage, total_steps=stage.steps, base_lr=base_lr, warmup_steps=warmup,
                       schedule=cfg.optim.schedule, min_lr_ratio=cfg.optim.min_lr_ratio)
            loss_sum, wait, skipped = 0.0, 0.0, 0
            for micro in range(stage.grad_accum):
                tw = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - tw
                skipped += int(batch.get("skipped", 0))
                loss_sum += self.forward_backward_step(batch, is_last=micro == stage.grad_accum - 1)
            stats = self.engine.step(lr)
            loss, wait = all_reduce_mean([loss_sum / stage.grad_accum, wait], self.device)
            # One collective carries the counters and every rank's stop/save signals, so the
            # decision is the same on all ranks (a SIGTERM may reach only some of them).
            minutes_due = self.dist.is_main and self.ckpt.minutes_due()
            skipped, sigterm, minutes_due = all_reduce_sum([skipped, self._sigterm, minutes_due], self.device)
            skipped = int(skipped)
            dt = time.perf_counter() - t0
            self.step += 1
            self.images_seen += global_batch
            stage_images += global_batch
            self.skipped_samples += skipped
            self.train_seconds += dt
            self.last_loss = loss
            self.step_in_stage = step_in_stage + 1
            self.log_step(index, stage, loss, stats, dt, wait, skipped, global_batch)
            stage_end = self.step_in_stage == stage.steps
            stop = bool(sigterm) or self.step == cfg.run.stop_at_step
            if stage_end:
                elapsed = time.perf_counter() - stage_start
                self.stage_summaries.append({"stage": stage.name, "resolution": stage.resolution,
                                             "steps": stage.steps, "images": stage_images,
                                             "images_per_second": stage_images / elapsed})
                self.stage_index, self.step_in_stage = index + 1, 0
            if stop or minutes_due or self.ckpt.due(self.step, stage_end=stage_end):
                self.save_checkpoint()
            if stop:
                self.stopped_early = True
                why = "SIGTERM (pre-emption)" if sigterm else f"run.stop_at_step={cfg.run.stop_at_step}"
                self.logger.event(f"stopping at step {self.step} after a checkpoint: {why}; "
                                  "relaunch the same command to resume")
                return False
        return True

    def save_checkpoint(self) -> None:
        for record in self.ckpt.save(self.step, self.state_dict()):
            self.logger.log({"step": self.step, **record})

    def state_dict(self) -> dict:
        """Trainer counters for the checkpoint (engine state and RNG are saved by the manager)."""
        return {
            "step": self.step, "stage": self.stage_index, "step_in_stage": self.step_in_stage,
            "images_seen": self.images_seen, "skipped_samples": self.skipped_samples,
            "train_seconds": self.train_seconds, "last_loss": self.last_loss,
            "loss_ema": [self.loss_ema.value, self.loss_ema.count], "stage_summaries": self.stage_summaries,
            "world_size": self.dist.world_size, "engine": self.engine.name, "preset": self.cfg.model.preset,
        }

    def restore(self, state: dict) -> None:
        self.step, self.stage_index, self.step_in_stage = state["step"], state["stage"], state["step_in_stage"]
        self.images_seen, self.skipped_samples = state["images_seen"], state["skipped_samples"]
        self.train_seconds, self.last_loss = state["train_seconds"], state["last_loss"]
        self.loss_ema.value, self.loss_ema.count = state["loss_ema"]
        self.stage_summaries = state["stage_summaries"]
        self.resumed_from = state["_resumed_from"]

    def _on_sigterm(self, signum, frame) -> None:
        self._sigterm = True  # acted on at the end of the current step, on every rank together

    def forward_backward_step(self, batch: dict, *, is_last: bool) -> float:
        """One micro-batch: encode, noise, predict, weighted loss, backward. Returns the loss."""
        x0 = self.model.encode_images(batch["pixels"].to(self.device))
        emb, mask = self.model.encode_text(batch["captions"], self.device)
        noisy, timesteps, target = prepare_training_batch(
            x0, batch["keys"], step=self.step, seed=self.cfg.run.seed,
            scheduler=self.noise_scheduler, cfg=self.objective,
        )
        dtype = self.engine.input_dtype
        with self.engine.micro_step(is_last=is_last):
            pred = self.engine.module(noisy.to(dtype), timesteps, emb.to(dtype), mask)
            loss, _ = diffusion_loss(pred.float(), target, timesteps, self.noise_scheduler, self.objective)
            self.engine.backward(loss)
        return float(loss.detach())

    def build_batches(self, resolution: int, micro_batch: int, skip: int = 0) -> Iterator[dict]:
        d = self.cfg.data
        spec = LoaderSpec(
            shards=self.shards, resolution=resolution, micro_batch=micro_batch,
            caption_dropout=d.caption_dropout, num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer,
            seed=self.cfg.run.seed, split=d.split, rank=self.dist.rank, world_size=self.dist.world_size,
            skip_batches=skip,
        )
        return iter(build_loader(spec))

    # ------------------------------------------------------------------ observers

    def log_step(self, index, stage, loss, stats, dt, wait, skipped, global_batch) -> None:
        ema = self.loss_ema.update(loss)
        record = {
            "step": self.step, "stage": index, "resolution": stage.resolution, "loss": loss, "loss_ema": ema,
            "grad_norm": stats.grad_norm, "lr": stats.lr, "images_seen": self.images_seen,
            "images_per_second": global_batch / dt, "step_seconds": dt, "data_wait_seconds": wait,
            "skipped_samples": skipped,
        }
        if self.step % self.cfg.log.every == 0 or self.step == self.total_steps:
            self.logger.log(record)
        self.logger.progress(1, {"stage": index, "loss": f"{loss:.4f}", "ema": f"{ema:.4f}",
                                 "img/s": f"{global_batch / dt:.1f}"})

    def write_samples(self, path: Path) -> None:
        """Sample grid from the current weights; every rank runs the same forwards (sharded models)."""
        s = self.cfg.sample
        resolution = s.resolution or self.cfg.train.stages[-1].resolution
        dtype = self.engine.input_dtype
        module = self.engine.module

        def denoise(x, t, emb, mask):
            return module(x.to(dtype), t, emb.to(dtype), mask).float()

        with self.engine.eval_mode():
            images = generate_samples(
                denoise,
                lambda captions: self.model.encode_text(captions, self.device),
                self.model.decode,
                prompts=list(s.prompts),
                resolution=resolution,
                in_channels=self.model.preset.in_channels,
                latent_factor=8 if self.model.preset.latent else 1,
                noise_scheduler_config=dict(self.noise_scheduler.config),
                prediction_type=self.objective.prediction_type,
                num_inference_steps=s.steps,
                guidance_scale=s.guidance_scale,
                seed=s.seed,
                device=self.device,
            )
        if self.dist.is_main:
            save_image_grid(images, path, captions=list(s.prompts))

    def summary(self) -> dict:
        return {
            "steps": self.step,
            "images_seen": self.images_seen,
            "images_per_second": self.images_seen / self.train_seconds if self.train_seconds else 0.0,
            "train_seconds": self.train_seconds,
            "final_loss": self.last_loss,
            "final_loss_ema": self.loss_ema.get(),
            "skipped_samples": self.skipped_samples,
            "engine": self.engine.name,
            "world_size": self.dist.world_size,
            "params_total": self.engine.full_param_numel(),
            "params_local_rank0": self.engine.local_param_numel(),
            "peak_memory_gib_rank0": peak_memory_gib(self.device),
            "stages": self.stage_summaries,
            "stopped_early": self.stopped_early,
        }

    def close(self) -> None:
        self.logger.close()
        self.engine.close()
        self.engine = None
        self.model = None
