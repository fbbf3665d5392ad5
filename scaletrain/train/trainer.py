"""The training loop: curriculum stages over one engine, with named override points.

``Trainer.train`` walks the stages; ``run_stage`` is the ~45-line loop. A micro-batch's math is
a ``TrainingLoss`` (``train/step.py``): the denoising loss by default, a preference loss for
DPO, which also hands the trainer its own batch builder (preference pairs). The loop never
asks which engine it has (see ``engines.base``) nor which loss it runs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from scaletrain.checkpoint.manager import CheckpointManager, CheckpointSaveError, latest_checkpoint
from scaletrain.common.tars import expand_shards
from scaletrain.config import RunConfig, StageSection, dump_config
from scaletrain.data.mixing import Balance, Source
from scaletrain.data.latents import check_precomputed, resolve_shards
from scaletrain.data.pipeline import LoaderSpec, build_loader, loader_identity, plan_streams
from scaletrain.diffusion import build_objective
from scaletrain.distributed import DistInfo, all_reduce_sum
from scaletrain.engines import StepStats, build_engine
from scaletrain.eval.samples import generate_samples, save_image_grid, save_video_grid
from scaletrain.models import build_model, frozen_dtype
from scaletrain.models.registry import stage_buckets, stage_frames, validation_frames
from scaletrain.models.parallelize import lever_report
from scaletrain.train.ema import build_ema
from scaletrain.train.health import HealthGuard, HealthStop, poison, quarantine
from scaletrain.train.comm_profile import CommProfiler
from scaletrain.train.step import (
    BatchBuilder, BatchRequest, DenoisingLoss, LossContext, LossFactory, TrainingLoss, model_inputs,
)
from scaletrain.train.curriculum import planned_stage_steps, stage_length_text, stage_objective
from scaletrain.train.data_stats import DataCounts
from scaletrain.train.metrics import LossEMA, MetricsLogger
from scaletrain.train.schedule import lr_at
from scaletrain.train.startup import startup_line, startup_report
from scaletrain.train.watchers import (
    CommProfileWatcher, EMAWatcher, SamplesWatcher, StepOutcome, ValidationWatcher, Watcher,
)


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


@dataclass
class StagePlan:
    """One stage at this launch: where it starts, how long it runs, its data and LR schedule."""

    start: int  # step_in_stage the loop starts from (resume)
    steps: int
    batches: Iterator[dict]
    global_batch: int
    lr: Callable[[int], float]  # step_in_stage -> LR before the health guard's scale
    images: int = 0  # trained at this launch (the stage's img/s)


@dataclass
class MicroBatches:
    """This rank's side of one optimizer step."""

    loss_sum: float | torch.Tensor = 0.0
    local_loss: float = 0.0
    wait: float = 0.0
    skipped: int = 0
    keys: list[str] = field(default_factory=list)


@dataclass
class Agreed:
    """The step's figures after the one all-reduce: the same on every rank."""

    loss: float
    wait: float
    norm: float
    skipped: int
    sigterm: bool
    minutes_due: bool
    objective_sums: list[float]


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
        self.check_validation_reference()  # fail now, not at the first validation days later
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
        self.lay_out_frozen_encoders()  # on the host, before .to: only the shards reach the device
        self.model.to(self.device)  # a deferred denoiser stays on meta: the engine initialises it where it keeps it
        # The training objective (diffusion/: ddpm, flow_matching); each stage may change its keys.
        self.objective = build_objective(cfg.diffusion.objective, cfg.diffusion.params())
        self.base_objective = self.objective
        self.comm_profiler = CommProfiler(cfg.engine.comm_profile_every, self.device)  # off at 0
        self.init_note: str | None = None
        self.init_source = None  # start weights the engine reads where it keeps them (checkpoint/sources.py)
        self.prepare_denoiser()  # post-training start weights and LoRA, before the engine wraps it
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
        # This rank's data stream position per loader slot (batch["position"]), saved per rank in
        # each checkpoint; a resume continues from it instead of replaying the stage.
        self.data_position: dict = {}
        self.data_identity: str | None = None
        self._resume_position: dict | None = None
        self.stopped_early = False
        self.startup: dict | None = None  # train/startup.py, filled right before the first step
        self.save_failures = 0  # checkpoints that could not be written (reported, run went on)
        self._sigterm = False
        self.health = HealthGuard(cfg.health)
        # Optimizer-step attempts, never rewound by a rollback (the test hook counts these).
        self.attempt = 0
        self.good_ckpt_step: int | None = None  # the checkpoint a rollback returns to
        self.ckpt = CheckpointManager(cfg.checkpoint, self.run_dir, self.engine, dist_info,
                                      extra_states={"ema": self.ema} if self.ema is not None else None)
        resumed = self.ckpt.load_latest()
        if resumed is not None:
            self.restore(resumed)
            self.good_ckpt_step = self.attempt = self.step
        self.total_steps = self.plan_total_steps()
        if dist_info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        if cfg.checkpoint.on_sigterm:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        self.validator = None  # built at the first validation (scaletrain.eval.validate)
        self.last_validated_step = -1
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
        self.logger.event(
            f"scaletrain: {self.cfg.model.preset} on {self.engine.name} x{self.dist.world_size} "
            + (f"(context parallel {self.cfg.engine.context_parallel}) " if self.cfg.engine.context_parallel > 1 else "")
            + f"({self.dist.backend}), {self.engine.full_param_numel() / 1e6:.2f}M params, "
            f"{self.engine.local_param_numel() / 1e6:.2f}M stored on rank 0, {self.total_steps} steps"
        )
        trainable, total = self.engine.trainable_param_numel(), self.engine.full_param_numel()
        if trainable != total:  # LoRA: only the adapters train
            self.logger.event(f"trainable: {trainable / 1e6:.4f}M of {total / 1e6:.2f}M parameters "
                              f"({100 * trainable / total:.2f}%)")
        if self.init_note:
            src = self.init_source
            read = (f"; rank 0 read {src.bytes_read / 2**20:.1f} of {src.total_bytes / 2**20:.1f} MiB"
                    if src is not None and src.total_bytes else "")
            self.logger.event(self.init_note + read)
        if self.model.encoders_built:
            frozen = self.frozen_encoders_report()
            self.logger.event(f"frozen encoders: {frozen['layout']}, {frozen['params_local'] / 1e6:.2f}M of "
                              f"{frozen['params_total'] / 1e6:.2f}M parameters on rank 0")
        if self.step:
            self.logger.event(f"resumed at step {self.step} (stage {self.stage_index}, "
                              f"step {self.step_in_stage} of it) from {self.resumed_from}")
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
        self.finalize_checkpoint()  # commit a pending async checkpoint
        if not self.stopped_early:
            for w in self.watchers:
                w.at_end(self)  # end-of-run validation, the sample grid
        summary = self.summary()
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
            self.log_step(index, stage, agreed.loss, stats, dt, agreed.wait, agreed.skipped, plan.global_batch,
                          agreed.objective_sums)
            if verdict and verdict.bad and self.on_bad_step(index, stage, verdict, agreed.norm, micro.keys,
                                                            micro.local_loss):
                return True  # rolled back: train() re-enters at the checkpoint's stage and step
            stage_end = self.step_in_stage == plan.steps
            stop = agreed.sigterm or self.step == self.cfg.run.stop_at_step
            if stage_end:
                self.end_stage(index, stage, plan, time.perf_counter() - stage_clock)
            if stop or agreed.minutes_due or self.ckpt.due(self.step, stage_end=stage_end):
                self.save_checkpoint()
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
            watchers.append(ValidationWatcher(v.every_steps, v.at_end))
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
        batches = self.build_batches(stage.resolution, stage.micro_batch,
                                     skip=start * stage.grad_accum + self.health.data_skip.get(index, 0))
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
        self.step_image_sizes: list[tuple[int, int]] = []  # (H, W) of this rank's micro-batches
        for micro in range(grad_accum):
            tw = time.perf_counter()
            batch = next(batches)
            out.wait += time.perf_counter() - tw
            pos = batch.pop("position", None)
            if pos is not None:
                self.data_position[str(pos["slot"])] = {"done": pos["done"], "state": pos["state"]}
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

    def plan_total_steps(self) -> int:
        """Steps of the whole run at this launch: those before the current stage, plus the current
        and later stages' planned steps (curriculum.planned_stage_steps; images-length stages
        depend on the world size)."""
        cfg, world, stages = self.cfg, self.dist.world_size, self.cfg.train.stages
        if self.stage_index >= len(stages):
            return self.step
        gb = cfg.stage_global_batch(self.stage_index, world)
        images_done = self.stage_images_seen if self.stage_images_seen is not None else self.step_in_stage * gb
        current = planned_stage_steps(cfg, self.stage_index, world, steps_done=self.step_in_stage,
                                      images_done=images_done)
        later = sum(cfg.stage_steps(i, world) for i in range(self.stage_index + 1, len(stages)))
        return self.step - self.step_in_stage + current + later

    def check_validation_reference(self) -> None:
        """Validation needs validate.num_images decodable images in its shards; count them now
        (every rank reads the same prefix, so all fail together) rather than at the first
        validation. Raises ConfigError (one line)."""
        v = self.cfg.validate
        if not (v.every_steps or v.at_end):
            return
        from scaletrain.config import ConfigError
        from scaletrain.eval.validate import count_reference_images

        shards = expand_shards(v.shards or self.default_shards())
        frames = validation_frames(self.cfg)
        found = count_reference_images(shards, v.num_images, frames, self.cfg.validation_fps())
        if found < v.num_images:
            where = "validate.shards" if v.shards else "the training shards (validate.shards is unset)"
            what = f"{frames}-frame clips (or images)" if frames else "images"
            raise ConfigError(f"validate.num_images={v.num_images} but {where} hold only {found} decodable {what}; "
                              f"lower validate.num_images or point validate.shards at a larger set")

    def save_checkpoint(self) -> None:
        rank_state = {"data_position": {"stage": self.stage_index, "identity": self.data_identity,
                                        "slots": self.data_position}}
        # A pending async write commits (or fails, reported with its own step) before this save.
        self._checkpoint_records(self.ckpt.finalize)
        if self._checkpoint_records(lambda: self.ckpt.save(self.step, self.state_dict(), rank_state)):
            self.good_ckpt_step = self.step  # skipped steps leave weights untouched: still good
            if self.cfg.health.enabled:  # what a rollback to this checkpoint must bring back
                self.logger.log({"step": self.step, "checkpoint_weights_fingerprint": self.weights_fingerprint()})

    def weights_fingerprint(self) -> float:
        """Collective: sum over every rank's parameter shards of sum(w^2 + w) in float64. Changes
        with any update, and is equal after loading the same weights on the same layout; the
        rollback record shows both, so a rollback that did not really reload is visible."""
        total = torch.zeros((), dtype=torch.float64)
        for shard in self.engine.local_param_shards():
            x = shard.local.detach().to("cpu", torch.float64)
            total += (x * x + x).sum()
        return all_reduce_sum([float(total)], self.device)[0]

    def finalize_checkpoint(self) -> None:
        """Commit a pending async checkpoint (its failure is handled like a failed save)."""
        self._checkpoint_records(self.ckpt.finalize)

    def _checkpoint_records(self, fn) -> bool:
        """Run a collective save/finalize and log its records; a failed save (CheckpointSaveError,
        agreed on every rank) is reported and either skipped or turned into a clean stop."""
        try:
            records = fn()
        except CheckpointSaveError as e:  # agreed: raised on every rank together, .partial removed
            self.save_failures += 1
            last = latest_checkpoint(self.ckpt.dir)  # an async save counted good may be the one lost
            self.good_ckpt_step = last.step if last is not None else None
            failed = e.step if e.step is not None else self.step
            self.logger.log({"step": self.step, "checkpoint_failed_step": failed})
            if self.cfg.checkpoint.on_save_error == "stop":
                raise HealthStop(f"{e}; stopping (checkpoint.on_save_error=stop): resume from the last complete "
                                 "checkpoint once there is room") from None
            if self.dist.is_main:
                print(f"scaletrain: {e}; training continues (checkpoint.on_save_error=continue), the next save "
                      "tries again", file=sys.stderr, flush=True)
            return False
        for record in records:
            self.logger.log({"step": self.step, **record})
        return True

    def on_bad_step(self, index: int, stage: StageSection, verdict, norm: float, keys: list[str], local_loss: float) -> bool:
        """Collective (every rank has the same verdict): quarantine the step's batch keys, and
        roll back when the window is full. True when the loop must restart from a checkpoint."""
        path = self.run_dir / "quarantine.jsonl"
        quarantine(path, {"step": self.step, "attempt": self.attempt, "stage": index, "reason": verdict.reason,
                          "grad_norm": norm}, keys=keys, loss=local_loss, rank=self.dist.rank,
                   is_main=self.dist.is_main)
        self.logger.event(f"health: step {self.step} skipped on every rank ({verdict.reason}); "
                          f"its batch keys are in {path}")
        if not verdict.rollback:
            return False
        h = self.cfg.health
        why = (f"{h.max_bad_in_window} bad steps within {h.window} at step {self.step}; check {path} for the "
               f"batches and lower optim.lr (LR scale now {self.health.lr_scale:g})")
        if not self.health.can_roll_back:
            raise HealthStop(f"health guard stopped the run after {self.health.rollbacks} rollback(s) "
                             f"(health.max_rollbacks={h.max_rollbacks}): {why}")
        self.finalize_checkpoint()  # a pending async save is the newest good state
        if self.good_ckpt_step is None:
            raise HealthStop(f"health guard found no checkpoint to roll back to: {why}; "
                             f"set checkpoint.every_steps")
        self.rollback(index, stage)
        return True

    def rollback(self, index: int, stage: StageSection) -> None:
        """Collective: reload the last good checkpoint (weights, optimizer, EMA, RNG, counters),
        keep the guard's live counters, scale the LR by health.lr_factor, and make stage
        ``index``'s stream skip every micro-batch consumed since that checkpoint, so the re-run
        steps see new data rather than the batches that went bad."""
        from_step, consumed = self.step, self.step_in_stage
        live = self.health.state_dict()
        before = self.weights_fingerprint()
        state = self.ckpt.load_step(self.good_ckpt_step)
        self.restore(state)
        after = self.weights_fingerprint()
        self.health.load_state_dict(live)
        back = state["step_in_stage"] if state["stage"] == index else 0
        skip = (consumed - back) * stage.grad_accum
        self.health.begin_rollback(index, skip)
        self.logger.log({"step": from_step, "rollback": True, "to_step": self.step, "lr_scale": self.health.lr_scale,
                         "skipped_micro_batches": skip, "stage": index,
                         "weights_fingerprint_before": before, "weights_fingerprint_after": after})
        self.logger.event(f"health: rollback {self.health.rollbacks} from step {from_step} to the checkpoint at "
                          f"step {self.step}; LR scale {self.health.lr_scale:g}; stage {index}'s data moves on "
                          f"past {skip} micro-batches per rank")

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
        self._resume_position = (state.get("_rank_state") or {}).get("data_position")

    def prepare_denoiser(self) -> None:
        """Post-training set-up of the denoiser, on every rank before the engine shards it:
        start weights from ``init`` (skipped when the run resumes a checkpoint of its own, which
        the engine loads afterwards), then LoRA adapters (``lora``; freezes the base weights).

        The denoiser arrives on the meta device (``build_model(defer_init=True)``). Diffusers
        safetensors become its start weights' source: the engine reads them where it keeps them
        (FSDP2: each rank its slices; ZeRO-3: module by module); so does a DCP checkpoint under
        FSDP2 and DDP (one collective load into the shards). DeepSpeed checkpoints, a pickled
        .bin and LoRA need the whole module first: it is initialised whole here."""
        from scaletrain.checkpoint.init import checkpoint_source, diffusers_source, load_init_weights, own_checkpoint

        cfg, denoiser = self.cfg, self.model.denoiser
        if cfg.init.source is not None:
            own = own_checkpoint(cfg)
            found = None
            if own is None and not cfg.lora.enabled:
                from scaletrain.engines.spec import engine_spec

                collective = engine_spec(cfg.engine.kind).reads_dcp_start_weights
                found = diffusers_source(cfg.init) or checkpoint_source(cfg.init, collective)
            if own is not None:
                self.init_note = (f"init: skipped ({cfg.init.source} not loaded): resuming this run's own "
                                  f"checkpoint {own.path}")
            elif found is not None and denoiser.pending_init is not None:
                denoiser.pending_init.source, denoiser.pending_init.source_what, self.init_note = found
                self.init_source = found[0]
            else:
                denoiser.materialize(self.device)
                self.init_note = load_init_weights(denoiser, cfg.init, cfg.model.preset)
        if cfg.lora.enabled:
            from scaletrain.models.lora import apply_lora

            denoiser.materialize(self.device)  # adapters go on real base weights
            apply_lora(denoiser, cfg.lora)

    def lay_out_frozen_encoders(self) -> None:
        """``model.frozen_encoders=shard`` at more than one rank: the text encoder and VAE are
        FSDP2-sharded over all ranks (``models.parallelize.shard_frozen``) on every engine, now
        or when first built; a 1-D mesh of their own (the engine's may be 2-D, HSDP, or not
        exist yet), dropped at close before the process group."""
        if self.cfg.model.frozen_encoders != "shard" or self.dist.world_size == 1:
            return
        from functools import partial

        from torch.distributed.device_mesh import init_device_mesh

        from scaletrain.models.parallelize import shard_frozen

        self.frozen_mesh = init_device_mesh(self.device.type, (self.dist.world_size,))
        self.model.lay_out_encoders(partial(shard_frozen, mesh=self.frozen_mesh))

    def frozen_encoders_report(self) -> dict | None:
        """How the frozen encoders sit on this rank (None while they are not built): the layout
        and the parameters held here against all of theirs (a shard holds about 1/world)."""
        if not self.model.encoders_built:
            return None
        local, total = self.model.frozen_numel()
        sharded = self.cfg.model.frozen_encoders == "shard" and self.dist.world_size > 1
        layout = f"sharded over {self.dist.world_size} ranks (FSDP2)" if sharded else "whole on every rank"
        return {"layout": layout, "params_local": local, "params_total": total}

    def _on_sigterm(self, signum, frame) -> None:
        self._sigterm = True  # acted on at the end of the current step, on every rank together

    def _fault_hooks(self, loss: torch.Tensor) -> torch.Tensor:
        if self.health.inject_nan(self.attempt + 1, self.dist.rank):  # test hook, one rank only
            loss = poison(loss)
        if self.health.inject_spike(self.attempt + 1, self.dist.rank):  # test hook: loss x 1000, one rank
            loss = loss * 1000.0
        return loss

    def model_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0 in the denoiser's space, text emb, text mask) of a batch, float32 on the device: from
        the precomputed posterior and text outputs, or by running the frozen encoders. A latent
        preset draws its posterior sample from per-key generators on both paths."""
        return model_inputs(self.model, batch, self.device, seed=self.cfg.run.seed, step=self.step,
                            scaling=self.encoding.scaling if "latents" in batch else None)

    def build_batches(self, resolution: int, micro_batch: int, skip: int = 0) -> Iterator[dict]:
        """The stage's batches: the batch builder's when the run has one, else the image stream."""
        if self.batch_builder is not None:
            return self.batch_builder(BatchRequest(
                cfg=self.cfg, stage_index=self.stage_index, rank=self.data_rank, world_size=self.data_world,
                resolution=resolution, micro_batch=micro_batch, skip=skip))
        d = self.cfg.data
        spec = LoaderSpec(
            resolution=resolution, micro_batch=micro_batch,
            caption_dropout=d.caption_dropout, num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer,
            seed=self.cfg.run.seed, split=d.split, rank=self.data_rank, world_size=self.data_world,
            skip_batches=skip, **self.stage_data_fields(resolution),
            frames=stage_frames(self.cfg, self.stage_index), fps=self.cfg.train.stages[self.stage_index].fps,
            buckets=tuple(d.buckets.sizes(resolution, self.model.preset.downsample_factor) if d.buckets.enabled else ()),
            precomputed=self.encoding is not None, pin_memory=self.device.type == "cuda",
            bad_captions=d.bad_captions, max_image_pixels=d.max_image_pixels, max_member_bytes=d.max_member_bytes,
            allow_pipe_shards=d.allow_pipe_shards,
            empty_text=self.encoding.empty_caption() if self.encoding is not None else None,
        )
        # Resume from the stream position the checkpoint stored for this rank (O(1): nothing read
        # before it is decoded), when it belongs to this stage and the same stream; else replay.
        self.data_identity = loader_identity(spec)
        position, self._resume_position = self._resume_position, None
        usable = bool(position) and position.get("stage") == self.stage_index and \
            position.get("identity") == self.data_identity
        resume = position["slots"] if usable else None
        self.data_position = dict(resume or {})
        if skip:
            if usable:
                self.logger.event(f"data: stage {self.stage_index} continues at its checkpointed stream position "
                                  f"({skip} micro-batches per rank in; none replayed)")
            else:
                why = ("the checkpoint stored none for this rank" if not position else
                       "the data, split, batch or layout differ from the checkpoint's")
                self.logger.event(f"data: stage {self.stage_index} replays {skip} micro-batches per rank to resume "
                                  f"({why})")
        loader = build_loader(replace(spec, resume=resume))
        self.begin_data_counts(spec)
        return iter(loader)

    def stage_data_fields(self, resolution: int) -> dict:
        """LoaderSpec fields for the current stage's data: shards or weighted sources, filters
        and class balance (data.* with the stage's override, config.RunConfig.stage_data); an
        encoded folder stands for its subfolder at ``resolution`` (data/latents.py)."""
        eff = self.cfg.stage_data(self.stage_index)
        b = eff.balance

        def urls(shards, where: str) -> list[str]:
            return resolve_shards(shards, resolution, where)[0]

        return {
            "shards": urls(eff.shards, "data.shards") if eff.sources is None else [],
            "sources": tuple(Source(s.name, tuple(urls(s.shards, f"data.sources {s.name!r}")), s.weight, s.filters)
                             for s in eff.sources or ()),
            "filters": eff.filters,
            "balance": None if b is None else Balance(b.field, b.weights if b.mode == "weights" else None),
        }

    def begin_data_counts(self, spec: LoaderSpec) -> None:
        """Name the counters of this stage's sources and classes (the same on every rank) and reset
        them at a stage's first step; a mid-stage restart keeps the checkpointed counts."""
        streams = plan_streams(spec)  # the class scan is cached: the loader just ran it
        self.data_counts.begin_stage(list(dict.fromkeys(s.source for s in streams)),
                                     sorted({s.label for s in streams if s.label is not None}),
                                     log_sources=bool(spec.sources), fresh=self.step_in_stage == 0)

    def default_shards(self) -> str | list[str]:
        """Validation's reference shards when validate.shards is unset: data.shards, or the first
        source's shards when data.sources replaces them."""
        sources = self.cfg.data.sources
        return sources[0].shards if sources else self.cfg.data.shards

    # ------------------------------------------------------------------ observers

    def log_step(self, index: int, stage: StageSection, loss: float, stats: StepStats, dt: float, wait: float,
                 skipped: int, global_batch: int, objective_sums: list[float] = ()) -> None:
        ema = self.loss_ema.get() if stats.skipped else self.loss_ema.update(loss)  # a bad step stays out
        record = {
            "step": self.step, "stage": index, "resolution": stage.resolution, "loss": loss, "loss_ema": ema,
            "grad_norm": stats.grad_norm, "lr": stats.lr, "images_seen": self.images_seen,
            "images_per_second": global_batch / dt, "step_seconds": dt, "data_wait_seconds": wait,
            "skipped_samples": skipped, "skipped_step": stats.skipped,
        }
        if stats.loss_scale is not None:  # fp16: the dynamic loss scale after this step
            record["loss_scale"] = stats.loss_scale
        record.update(self.comm_profiler.record(dt, wait))  # compute / exposed comm, sampled steps
        if self.cfg.data.buckets.enabled:  # rank 0's micro-batch sizes this step, one bucket each
            record["bucket_sizes"] = [f"{hw[1]}x{hw[0]}" for hw in getattr(self, "step_image_sizes", [])]
        record.update(self.data_counts.record())  # filtered_samples, source_frac/*, class_frac/*
        record.update(self.loss.metrics(objective_sums))  # e.g. DPO's implicit accuracy and reward margin
        if stats.skipped or self.step % self.cfg.log.every == 0 or self.step == self.total_steps:
            if self.dist.is_main:  # only rank 0 writes, so only it pays for the FLOP count
                record.update(self.throughput_metrics(stage.resolution, global_batch / dt))
            self.logger.log(record)
        self.logger.progress(1, {"stage": index, "loss": f"{loss:.4f}", "ema": f"{ema:.4f}",
                                 "img/s": f"{global_batch / dt:.1f}"})

    def throughput_metrics(self, resolution: int, images_per_second: float) -> dict:
        """Per-device TFLOP/s and MFU from the analytic FLOP count (scaletrain.models.flops), and
        peak memory (CUDA max allocated; process RSS on CPU) of this rank. ``images_per_second``
        counts the loss's samples (DPO: pairs), each ``loss.images_per_sample`` images of compute."""
        from scaletrain.models.flops import device_peak_tflops, train_flops_per_image

        # Mean over this rank's micro-batches (their sizes differ under data.buckets; the FLOPs depend
        # on the area, which the buckets keep within a few % of resolution^2 on every rank).
        sizes = getattr(self, "step_image_sizes", None) or [(resolution, resolution)]
        flops = sum(train_flops_per_image(self.cfg.model.preset, tuple(hw[:2]), *hw[2:]) for hw in sizes) / len(sizes)
        tflops = flops * images_per_second * self.loss.images_per_sample / self.dist.world_size / 1e12
        peak, _ = device_peak_tflops(self.device, self.cfg.engine.precision, self.cfg.log.peak_tflops)
        return {"tflops_per_device": tflops, "mfu": tflops / peak, "peak_memory_gib": peak_memory_gib(self.device)}

    def validate(self, resolution: int) -> float:
        """Collective: FID and a sample grid on the EMA weights (raw weights without EMA);
        rank 0 logs them. Returns the seconds it took. Training RNG streams are untouched."""
        from scaletrain.eval.validate import SamplingSpec, Validator, validation_record

        t0 = time.perf_counter()
        v = self.cfg.validate
        if self.validator is None:
            sampling = SamplingSpec(
                encode_text=lambda captions: self.model.encode_text(captions, self.device),
                decode=self.model.decode, in_channels=self.model.preset.in_channels,
                latent_factor=self.model.preset.vae_factor,
                objective=self.objective,
                frames=validation_frames(self.cfg),
                latent_frames=self.model.preset.latent_frames(max(validation_frames(self.cfg), 1)),
                fps=self.cfg.validation_fps(),
            )
            self.validator = Validator(v, grid_prompts=list(self.cfg.sample.prompts), grid_seed=self.cfg.sample.seed,
                                       default_shards=self.default_shards(), sampling=sampling,
                                       rank=self.dist.rank, world_size=self.dist.world_size, device=self.device)
        resolution = v.resolution or resolution
        self.validator.sampling.objective = self.objective  # the stage's (e.g. its flow shift)
        dtype, module = self.engine.input_dtype, self.engine.module

        def denoise(x, t, emb, mask):
            return module(x.to(dtype), t, emb.to(dtype), mask).float()

        ema = getattr(self, "ema", None)
        with (ema.swapped() if ema else contextlib.nullcontext()), self.engine.eval_mode():
            grid = self.run_dir / "validation" / f"step-{self.step:06d}.png"
            value = self.validator.run(denoise, resolution, grid)
        seconds = time.perf_counter() - t0
        label = self.validator.label
        self.logger.log(validation_record(self.step, label, value, seconds, v.num_images, resolution, ema is not None,
                                          self.validator.metrics))
        frames = validation_frames(self.cfg)
        what = f"{frames}-frame clips, per-frame" if frames > 1 else "images"
        extra = "".join(f", {k.removeprefix('validation/')}={x:.4f}" for k, x in self.validator.metrics.items()
                        if k.startswith("validation/temporal"))
        shown = grid.with_suffix(".gif") if frames > 1 else grid
        self.logger.event(f"validation at step {self.step}: {label}={value:.4f} ({v.num_images} {what} at "
                          f"{resolution}px, {'EMA' if ema else 'raw'} weights, {seconds:.1f}s){extra} -> {shown}")
        self.last_validated_step = self.step
        return seconds

    def write_samples(self, path: Path) -> None:
        """Sample grid from the EMA weights when there is an EMA (the raw weights otherwise); every
        rank runs the same forwards (sharded models)."""
        s = self.cfg.sample
        resolution = s.resolution or self.cfg.train.stages[-1].resolution
        dtype = self.engine.input_dtype
        module = self.engine.module

        def denoise(x, t, emb, mask):
            return module(x.to(dtype), t, emb.to(dtype), mask).float()

        preset, last = self.model.preset, self.cfg.train.stages[-1]
        frames = (s.frames or stage_frames(self.cfg, len(self.cfg.train.stages) - 1)) if preset.video else 0
        ema = self.ema
        with (ema.swapped() if ema is not None else contextlib.nullcontext()), self.engine.eval_mode():
            images = generate_samples(
                denoise,
                lambda captions: self.model.encode_text(captions, self.device),
                self.model.decode,
                prompts=list(s.prompts),
                resolution=resolution,
                in_channels=self.model.preset.in_channels,
                latent_factor=self.model.preset.vae_factor,
                objective=self.objective,  # the current (at the end: the last) stage's
                num_inference_steps=s.steps,
                guidance_scale=s.guidance_scale,
                seed=s.seed,
                device=self.device,
                frames=preset.latent_frames(frames) if frames > 1 else 0,
            )
        if self.dist.is_main:
            if images.ndim == 5:
                path = save_video_grid(images, path.with_suffix(".gif"), fps=last.fps or 8.0, captions=list(s.prompts))
            else:
                save_image_grid(images, path, captions=list(s.prompts))
            self.logger.event(f"samples: {path}")

    def summary(self) -> dict:
        return {
            "steps": self.step,
            "images_seen": self.images_seen,
            "images_per_second": self.images_seen / self.train_seconds if self.train_seconds else 0.0,
            "train_seconds": self.train_seconds,
            "final_loss": self.last_loss,
            "final_loss_ema": self.loss_ema.get(),
            "skipped_samples": self.skipped_samples,
            "filtered_samples": sum(self.data_counts.filtered_total.values()),
            "filtered_by_rule": dict(self.data_counts.filtered_total),
            "data_issues": dict(self.data_counts.issues_total),  # bad data counted per kind (not raised)
            "engine": self.engine.name,
            "world_size": self.dist.world_size,
            "params_total": self.engine.full_param_numel(),
            "params_trainable": self.engine.trainable_param_numel(),
            "params_local_rank0": self.engine.local_param_numel(),
            "peak_memory_gib_rank0": peak_memory_gib(self.device),
            "stages": self.stage_summaries,
            "stopped_early": self.stopped_early,
            "bad_steps": self.health.bad_steps,
            # async saves: background threads that took checkpoint.async_nice (0 without async saves)
            "checkpoint_background_threads_lowered": self.engine.background_threads_lowered,
            "checkpoint_save_failures": self.save_failures,
            "rollbacks": self.health.rollbacks,
            "lr_scale": self.health.lr_scale,
            "levers": lever_report(self.model.denoiser),  # checkpointing/compile as applied, counted
            "frozen_encoders": self.frozen_encoders_report(),
            "startup": self.startup,  # peak host (device) memory per rank and seconds at the first step
            **self.loss.summary(),
        }

    def close(self) -> None:
        self.loss.close()  # e.g. a sharded reference: DTensors on the mesh
        self.loss = None
        self.logger.close()
        self.ema = None  # its DTensors hold the device mesh; drop them before the process group
        self.engine.close()
        self.engine = None
        self.model = self.frozen_mesh = None
