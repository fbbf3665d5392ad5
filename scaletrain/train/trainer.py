"""The training loop: curriculum stages over one engine, with named override points.

``Trainer.train`` walks the stages; ``run_stage`` is the ~45-line loop. A micro-batch's math is
a ``TrainingLoss`` (``train/step.py``): the denoising loss by default, a preference loss for
DPO, which also hands the trainer its own batch builder (preference pairs; otherwise the image
stream, ``train/batches.py``). The loop never asks which engine it has (see ``engines.base``)
nor which loss it runs. Its side tasks are components called at their hook points: the step's
record (``train/metrics.py``), the health rollback (``train/health.py``), checkpoint cadence
(``train/checkpointing.py``), start-up (``train/startup.py``), and watchers (EMA, comm
profiler: ``train/watchers.py``; validation, samples: ``eval/watchers.py``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Iterator

import torch

from scaletrain.checkpoint.manager import CheckpointManager
from scaletrain.config import RunConfig, StageSection, dump_config
from scaletrain.data.latents import check_precomputed
from scaletrain.diffusion import build_objective
from scaletrain.distributed import DistInfo, all_reduce_sum
from scaletrain.engines import build_engine
from scaletrain.eval.watchers import SamplesWatcher, ValidationWatcher, check_validation_reference
from scaletrain.models import build_model, frozen_dtype
from scaletrain.models.registry import stage_buckets, stage_frames
from scaletrain.train.ema import build_ema
from scaletrain.train.batches import ImageStream
from scaletrain.train.checkpointing import CheckpointCadence
from scaletrain.train.health import HealthGuard, Rollback, poison
from scaletrain.train.comm_profile import CommProfiler
from scaletrain.train.step import (
    Agreed, BatchBuilder, BatchRequest, DenoisingLoss, LossContext, LossFactory, MicroBatches, StagePlan, TrainingLoss,
    model_inputs,
)
from scaletrain.train.curriculum import planned_stage_steps, planned_total_steps, stage_length_text, stage_objective
from scaletrain.train.data_stats import DataCounts
from scaletrain.train.metrics import LossEMA, MetricsLogger, StepMetrics, run_summary, truncate_metrics
from scaletrain.train.schedule import lr_at
from scaletrain.train.startup import (lay_out_frozen_encoders, prepare_denoiser, start_lines, startup_line,
                                      startup_report)
from scaletrain.train.watchers import CommProfileWatcher, EMAWatcher, StepOutcome, Watcher


class Trainer:
    def __init__(self, cfg: RunConfig, dist_info: DistInfo, loss: LossFactory | None = None,
                 batches: BatchBuilder | None = None) -> None:
        """``loss`` builds the micro-batch loss once the engine exists (default: the objective's
        denoising loss); ``batches`` replaces the image stream (e.g. DPO's preference pairs)."""
        self.cfg, self.dist = cfg, dist_info
        # Data parallelism is over context groups (engine.context_parallel = K): ranks r..r+K-1
        # read the same samples, so the stream's rank and world are the group's.
        k = cfg.engine.context_parallel
        self.data_rank, self.data_world = dist_info.rank // k, max(dist_info.world_size // k, 1)
        self.context_leader = dist_info.rank % k == 0  # counts its group's data once
        self.batch_builder = batches
        self.device = dist_info.device
        self.run_dir = Path(cfg.run.dir)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        check_validation_reference(cfg)  # fail now, not at the first validation days later
        # Same seed on every rank: identical initial weights before the engine shards them.
        torch.manual_seed(cfg.run.seed)
        # Precomputed latents (scaletrain data encode): no VAE or text encoder is built for training;
        # a sample grid or validation builds them on first use (the same weights: own seed).
        self.encoding = check_precomputed(cfg)
        if cfg.data.num_workers > 0:  # loader workers fork from a server that never held the model
            from scaletrain.data.pipeline import warm_worker_context

            warm_worker_context()
        self.model = build_model(
            cfg.model.preset, text_encoder_path=cfg.model.text_encoder_path, vae_path=cfg.model.vae_path,
            dtype=frozen_dtype(cfg.engine.precision), encoders=self.encoding is None, encoder_seed=cfg.run.seed,
            seed=cfg.run.seed, defer_init=True,
        )
        self.frozen_mesh = None  # model.frozen_encoders=shard: the ranks the encoders are sharded over
        lay_out_frozen_encoders(self)  # on the host, before .to: only the shards reach the device
        self.model.to(self.device)  # a deferred denoiser stays on meta: the engine initialises it where it keeps it
        # The training objective (diffusion/: ddpm, flow_matching); each stage may change its keys.
        self.objective = build_objective(cfg.diffusion.objective, cfg.diffusion.params())
        self.base_objective = self.objective
        self.comm_profiler = CommProfiler(cfg.engine.comm_profile_every, self.device)  # off at 0
        self.init_note: str | None = None
        self.init_source = None  # start weights the engine reads where it keeps them (checkpoint/sources.py)
        prepare_denoiser(self)  # post-training start weights and LoRA, before the engine wraps it
        first = cfg.train.stages[0]
        self.engine = build_engine(
            cfg, self.model.denoiser, dist_info, micro_batch=first.micro_batch, grad_accum=first.grad_accum
        )
        # Sharded EMA beside the engine's shards (None when ema.enabled is false); built before
        # the checkpoint manager so a resume loads it too.
        self.ema = build_ema(self.engine, cfg.ema)
        self.stage_images_seen = 0  # of the current stage: re-plans an images-length stage on resume
        self.step = 0
        self.images_seen = 0
        self.skipped_samples = 0
        self.train_seconds = 0.0
        self.loss_ema = LossEMA(cfg.log.loss_ema_decay)
        self.data_counts = DataCounts()  # realised samples per source/class, filter drops (checkpointed)
        self.last_loss = float("nan")
        self.resumed_from: str | None = None
        self.stage_summaries: list[dict] = []
        self.stage_index, self.step_in_stage = 0, 0  # where the loop (re)starts
        # The image stream (a batch builder, train/batches.py) keeps this rank's stream position,
        # saved per rank in each checkpoint; a resume continues from it instead of replaying.
        self.stream = ImageStream(preset=self.model.preset, encoding=self.encoding, device=self.device,
                                  logger=None, data_counts=self.data_counts)
        self.step_image_sizes: list[tuple[int, ...]] = []  # (H, W[, F]) of this rank's micro-batches
        self.stopped_early = False
        self.startup: dict | None = None  # train/startup.py, filled right before the first step
        self._sigterm = False
        self.health, self.recovery = HealthGuard(cfg.health), Rollback()
        # Optimizer-step attempts, never rewound by a rollback (the test hook counts these).
        self.attempt = 0
        self.ckpt = CheckpointManager(cfg.checkpoint, self.run_dir, self.engine, dist_info,
                                      extra_states={"ema": self.ema} if self.ema is not None else None)
        self.checkpoints = CheckpointCadence(self.ckpt)
        resumed = self.ckpt.load_latest()
        if resumed is not None:
            self.restore(resumed)
            self.checkpoints.good_step = self.attempt = self.step
        self.total_steps = planned_total_steps(cfg, dist_info.world_size, step=self.step, stage_index=self.stage_index,
                                               step_in_stage=self.step_in_stage, stage_images_seen=self.stage_images_seen)
        if dist_info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
            truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        if cfg.checkpoint.on_sigterm:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        self.watchers = self.build_watchers()
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
        self.stream.logger = self.logger
        self.metrics = StepMetrics(self.loss_ema)
        if self.encoding is not None:
            built = "built" if self.model.encoders_built else "not built"
            self.logger.event(f"training on precomputed latents ({self.encoding.folder.parent}): VAE and text "
                              f"encoder {built}")
        context = LossContext(cfg=cfg, model=self.model, engine=self.engine, device=self.device)
        self.loss: TrainingLoss = loss(context) if loss is not None else DenoisingLoss(self.model_inputs)
        if (line := self.loss.describe()) is not None:
            self.logger.event(line)

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        for line in start_lines(self):  # what was built and from where (train/startup.py)
            self.logger.event(line)
        # Right before the first step: what reaching it cost, per rank (train/startup.py).
        self.startup = startup_report(self.dist)
        self.logger.event(startup_line(self.startup))
        stages = self.cfg.train.stages
        index = self.stage_index
        if self.cfg.run.stop_at_step == 0:  # start-up only
            self.stopped_early = True
            self.logger.event("stopping before the first step (run.stop_at_step=0)")
            index = len(stages)
        while index < len(stages):
            if not self.run_stage(index, stages[index]):
                break
            index = self.stage_index  # the next stage, or after a rollback the checkpoint's
        self.checkpoints.finalize(self)  # commit a pending async checkpoint
        if not self.stopped_early:
            for w in self.watchers:
                w.at_end(self)  # end-of-run validation, the sample grid
        summary = run_summary(self)
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self.logger.event(
                f"done: {summary['steps']} steps, {summary['images_seen']} images, "
                f"{summary['images_per_second']:.1f} img/s, final loss {summary['final_loss']:.4f} "
                f"(EMA {summary['final_loss_ema']:.4f}) -> {self.run_dir}"
            )
        return summary

    def run_stage(self, index: int, stage: StageSection) -> bool:
        """Train one curriculum stage from ``self.step_in_stage``; False when the run must stop.
        The loop only: EMA, comm profiler, validation and samples are watchers (train/watchers.py)."""
        plan = self.begin_stage(index, stage)
        stage_clock = time.perf_counter()
        for step_in_stage in range(plan.start, plan.steps):
            for w in self.watchers:
                w.before_step(self, self.step + 1)
            t0 = time.perf_counter()
            lr = plan.lr(step_in_stage) * self.health.lr_scale
            micro = self.accumulate(plan.batches, stage.grad_accum)
            if step_in_stage == plan.start > 0:  # a resume: what reaching the position cost (0 = no replay)
                self.logger.event(f"data: {self.stream.decoded_before} samples decoded before this rank's first "
                                  "batches of the stage that they do not hold")
            agreed = self.agree(micro, stage.grad_accum)
            # The health guard judges the all-reduced loss and the global grad norm, so every rank
            # reaches the same verdict; a bad step is skipped by the engine on all ranks. fp16: an
            # overflow (non-finite norm, finite loss) is the loss scaler's business, not the guard's.
            overflow = self.engine.dynamic_loss_scale and not math.isfinite(agreed.norm) and math.isfinite(agreed.loss)
            verdict = (self.health.check(self.attempt + 1, agreed.loss, agreed.norm)
                       if self.cfg.health.enabled and not overflow else None)
            stats = self.engine.skip_step(lr) if verdict and verdict.bad else self.engine.step(lr)
            self.attempt += 1
            for w in self.watchers:
                w.after_update(self, stats)
            dt = time.perf_counter() - t0
            for w in self.watchers:
                w.after_timing(self)
            self.count_step(plan, step_in_stage, dt, agreed, stats)
            self.metrics.log(self, index, stage, agreed.loss, stats, dt, agreed.wait, agreed.skipped,
                             plan.global_batch, agreed.objective_sums)
            if verdict and verdict.bad and self.recovery.on_bad_step(self, index, stage, verdict, agreed.norm,
                                                                      micro.keys, micro.local_loss):
                return True  # rolled back: train() re-enters at the checkpoint's stage and step
            stage_end = self.step_in_stage == plan.steps
            stop = agreed.sigterm or self.step == self.cfg.run.stop_at_step
            if stage_end:
                self.end_stage(index, stage, plan, time.perf_counter() - stage_clock)
            if stop or agreed.minutes_due or self.ckpt.due(self.step, stage_end=stage_end):
                self.checkpoints.save(self)
            outcome = StepOutcome(self.step, index, stage.resolution, stats, stop, stage_end)
            for w in self.watchers:
                stage_clock += w.after_step(self, outcome)  # e.g. validation: not training time
            if stop:
                return self.stop_run(agreed.sigterm)
        return True

    def build_watchers(self) -> list[Watcher]:
        """What hangs off the loop, in hook order (train/watchers.py)."""
        watchers: list[Watcher] = [CommProfileWatcher(self.comm_profiler)]
        if self.ema is not None:
            watchers.append(EMAWatcher(self.ema))
        v = self.cfg.validate
        if v.every_steps or v.at_end:
            watchers.append(ValidationWatcher(self.cfg))
        if self.cfg.sample.at_end:
            watchers.append(SamplesWatcher())
        return watchers

    def begin_stage(self, index: int, stage: StageSection) -> StagePlan:
        """Set the engine, data stream, length and objective up for stage ``index``; log its line."""
        cfg, world = self.cfg, self.dist.world_size
        start = self.step_in_stage if index == self.stage_index else 0
        self.stage_index, self.step_in_stage = index, start
        self.engine.configure_stage(stage.micro_batch, stage.grad_accum)
        # Resume mid-stage: skip the micro-batches this stage already consumed (exact for a
        # deterministic stream at the same global batch; see data.pipeline).
        # After a health rollback the stream also skips the stretch rolled back over (data_skip).
        builder = self.batch_builder or self.stream  # DPO's pairs, or the image stream (train/batches.py)
        batches = builder(BatchRequest(
            cfg=cfg, stage_index=index, rank=self.data_rank, world_size=self.data_world, resolution=stage.resolution,
            micro_batch=stage.micro_batch, skip=start * stage.grad_accum + self.health.data_skip.get(index, 0),
            fresh=start == 0))
        global_batch = cfg.stage_global_batch(index, world)
        if start == 0 or self.stage_images_seen is None:  # None: a checkpoint from before this counter
            self.stage_images_seen = start * global_batch
        # Stage length (steps, or images re-planned from those left) and objective (curriculum.py).
        steps = planned_stage_steps(cfg, index, world, steps_done=start, images_done=self.stage_images_seen)
        self.objective = stage_objective(self.base_objective, cfg, index)
        warmup = cfg.optim.warmup_steps if stage.warmup_steps is None else stage.warmup_steps
        lr = functools.partial(lr_at, total_steps=steps, base_lr=stage.lr or cfg.optim.lr, warmup_steps=warmup,
                               schedule=cfg.optim.schedule, min_lr_ratio=cfg.optim.min_lr_ratio)
        buckets = stage_buckets(cfg, index)
        length = stage_length_text(cfg, index, world, steps, steps_done=start, images_done=self.stage_images_seen)
        self.logger.event(f"stage {index} '{stage.name}': {stage.resolution}px, {length}, "
                          f"global batch {global_batch} = {stage.micro_batch} x {stage.grad_accum} x {self.data_world}"
                          + (f" (data-parallel groups of {cfg.engine.context_parallel} context-parallel ranks)"
                             if cfg.engine.context_parallel > 1 else "")
                          + (f", {stage_frames(cfg, index)}-frame clips"
                             + (f" at {stage.fps:g} fps" if stage.fps else "") if stage_frames(cfg, index) else "")
                          + ", "
                          f"{self.objective.describe()}"
                          + (f", buckets (WxH) {' '.join(f'{w}x{h}' for w, h in buckets)}" if buckets else ""))
        return StagePlan(start=start, steps=steps, batches=batches, global_batch=global_batch, lr=lr)

    def accumulate(self, batches: Iterator[dict], grad_accum: int) -> MicroBatches:
        """The step's micro-batches through forward/backward; data wait, skips and positions recorded."""
        out = MicroBatches()
        self.step_image_sizes = []
        for micro in range(grad_accum):
            tw = time.perf_counter()
            batch = next(batches)
            out.wait += time.perf_counter() - tw
            self.stream.record(batch)  # this rank's stream position, for the next checkpoint
            out.skipped += int(batch.get("skipped", 0))
            self.data_counts.add_batch(batch)
            out.keys += list(batch.get("keys", []))
            if "pixels" in batch:  # with data.buckets the size changes from batch to batch
                px = batch["pixels"]  # (B, 3, H, W), or clips (B, 3, F, H, W): F rides along for the FLOPs
                self.step_image_sizes.append(tuple(px.shape[-2:]) + ((px.shape[2],) if px.ndim == 5 else ()))
            elif "latents" in batch:
                f = self.model.preset.vae_factor
                self.step_image_sizes.append(tuple(n * f for n in batch["latents"].shape[-2:]))
            out.loss_sum += self.loss(self.engine, self.objective, batch, step=self.step, seed=self.cfg.run.seed,
                                      is_last=micro == grad_accum - 1, on_loss=self._fault_hooks)
        out.local_loss = float(out.loss_sum) / grad_accum  # the step's one device-to-host copy of the loss
        return out

    def agree(self, micro: MicroBatches, grad_accum: int) -> Agreed:
        """One small collective a step, before the optimizer step: the loss, data wait and norm
        (summed, then / world: the mean) and the counters and every rank's stop/save signals
        (summed), so the health verdict and the stop decision are the same on all ranks (a SIGTERM
        may reach only some of them). Each extra collective would be one more point where every
        rank waits for the slowest. The loss's own sums (DPO's pair counts and rewards) ride along."""
        world = self.dist.world_size
        norm = self.engine.grad_norm() if self.cfg.health.enabled else float("nan")
        minutes_due = self.dist.is_main and self.ckpt.minutes_due()
        local_counts, local_objective = self.data_counts.local_vector(), self.loss.local_sums()
        if not self.context_leader:  # the group's other ranks read the same samples: count them once
            local_counts, skipped_here = [0.0] * len(local_counts), 0
        else:
            skipped_here = micro.skipped
        loss, wait, norm, skipped, sigterm, minutes_due, *rest = all_reduce_sum(
            [micro.local_loss, micro.wait, norm, skipped_here, self._sigterm, minutes_due, *local_counts,
             *local_objective], self.device)
        self.data_counts.commit(rest[:len(local_counts)])
        return Agreed(loss=loss / world, wait=wait / world, norm=norm / world, skipped=int(skipped),
                      sigterm=bool(sigterm), minutes_due=bool(minutes_due), objective_sums=rest[len(local_counts):])

    def count_step(self, plan: StagePlan, step_in_stage: int, dt: float, agreed: Agreed, stats) -> None:
        self.step += 1
        self.images_seen += plan.global_batch
        self.stage_images_seen += plan.global_batch
        plan.images += plan.global_batch
        self.skipped_samples += agreed.skipped
        self.train_seconds += dt
        if not stats.skipped:
            self.last_loss = agreed.loss
        self.step_in_stage = step_in_stage + 1

    def end_stage(self, index: int, stage: StageSection, plan: StagePlan, elapsed: float) -> None:
        self.stage_summaries.append({"stage": stage.name, "resolution": stage.resolution, "steps": plan.steps,
                                     "images": plan.images, "images_per_second": plan.images / elapsed,
                                     **self.data_counts.stage_summary()})
        self.stage_index, self.step_in_stage = index + 1, 0

    def stop_run(self, sigterm: bool) -> bool:
        self.stopped_early = True
        why = "SIGTERM (pre-emption)" if sigterm else f"run.stop_at_step={self.cfg.run.stop_at_step}"
        self.logger.event(f"stopping at step {self.step} after a checkpoint: {why}; "
                          "relaunch the same command to resume")
        return False

    def state_dict(self) -> dict:
        """Trainer counters for the checkpoint (engine state and RNG are saved by the manager)."""
        return {
            "step": self.step, "stage": self.stage_index, "step_in_stage": self.step_in_stage,
            "images_seen": self.images_seen, "skipped_samples": self.skipped_samples,
            "train_seconds": self.train_seconds, "last_loss": self.last_loss,
            "stage_images_seen": self.stage_images_seen,
            "loss_ema": [self.loss_ema.value, self.loss_ema.count], "stage_summaries": self.stage_summaries,
            "health": self.health.state_dict(), "data_counts": self.data_counts.state_dict(),
            "world_size": self.dist.world_size, "engine": self.engine.name, "preset": self.cfg.model.preset,
            # what `ckpt export-lora` needs to rebuild the adapter; None for a full-parameter run
            "lora": self.cfg.lora.model_dump(mode="json") if self.cfg.lora.enabled else None,
            # what `ckpt export` writes the scheduler from, and what a DPO reference is checked
            # against: the current (at the end: the last) stage's objective
            "objective": {"name": self.objective.name, "params": self.objective.params.model_dump(mode="json")},
            # what `ckpt export --pipeline` rebuilds the frozen text encoder and VAE from
            "encoders": {"text_encoder_path": self.cfg.model.text_encoder_path, "vae_path": self.cfg.model.vae_path,
                         "seed": self.cfg.run.seed},
        }

    def restore(self, state: dict) -> None:
        self.step, self.stage_index, self.step_in_stage = state["step"], state["stage"], state["step_in_stage"]
        self.images_seen, self.skipped_samples = state["images_seen"], state["skipped_samples"]
        self.train_seconds, self.last_loss = state["train_seconds"], state["last_loss"]
        self.stage_images_seen = state.get("stage_images_seen")  # None: run_stage assumes the global batch
        self.loss_ema.value, self.loss_ema.count = state["loss_ema"]
        self.stage_summaries = state["stage_summaries"]
        self.resumed_from = state["_resumed_from"]
        if "health" in state:  # LR scale, data skips and counters survive a restart
            self.health.load_state_dict(state["health"])
        self.data_counts.load_state_dict(state.get("data_counts", {}))  # realised source/class counts
        self.stream.resume_from = (state.get("_rank_state") or {}).get("data_position")
        olds = state.get("_old_rank_states")  # at another world size: every old rank's, to re-split the stream
        if olds is not None:
            self.stream.reslot_from = [(s or {}).get("data_position") for s in olds]

    def _on_sigterm(self, signum, frame) -> None:
        self._sigterm = True  # acted on at the end of the current step, on every rank together

    def _fault_hooks(self, loss: torch.Tensor) -> torch.Tensor:
        if self.health.inject_nan(self.attempt + 1, self.dist.rank):  # test hook, one rank only
            loss = poison(loss)
        if self.health.inject_spike(self.attempt + 1, self.dist.rank):  # test hook: loss x 1000, one rank
            loss = loss * 1000.0
        return loss

    def model_inputs(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(x0 in the denoiser's space, conditioning) of a batch, on the device: from
        the precomputed posterior and text outputs, or by running the frozen encoders. A latent
        preset draws its posterior sample from per-key generators on both paths."""
        return model_inputs(self.model, batch, self.device, seed=self.cfg.run.seed, step=self.step,
                            scaling=self.encoding.scaling if "latents" in batch else None)

    def close(self) -> None:
        self.loss.close()  # e.g. a sharded reference: DTensors on the mesh
        self.loss = None
        self.logger.close()
        self.ema = None  # its DTensors hold the device mesh; drop them before the process group
        self.engine.close()
        self.engine = None
        self.model = self.frozen_mesh = None
