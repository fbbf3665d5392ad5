"""The recipe's schema: one typed config tree for a run, and nothing else.

A recipe is a YAML file; the command line overrides dotted keys (``--set optim.lr=3e-4``).
Every section forbids unknown keys and checks its own types, ranges and per-section rules.
The rules across sections and against the components (batch identity, resolutions the
preset takes, shard paths, the DeepSpeed JSON, ...) belong to the components, each in its own
``checks.py`` (``recipe(cfg, ctx)``, and ``launch(cfg, ctx)`` for what lies on disk), and
``scaletrain/checks.py`` runs them all once at load time, so a bad recipe fails with one line
naming the field, the value and the fix, before any process group starts. This module imports
no other scaletrain module but the data specs it types.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from scaletrain.data.buckets import BucketSpec
from scaletrain.data.filters import FilterSpec


class ConfigError(ValueError):
    """A user-facing configuration problem; its message is one line."""


@dataclass(frozen=True)
class CheckContext:
    """What a component's recipe checks see besides the recipe (``scaletrain/checks.py``)."""

    world_size: int = 1
    check_paths: bool = True  # also check the paths the recipe names (shards, run.dir, weights)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class RunSection(_Section):
    dir: str = "runs/demo"
    seed: int = 0
    name: str | None = None
    # Stop this launch after this global step (checkpointing first), e.g. to fit a job into a
    # scheduler's time slot; relaunching the same command resumes. None = run to the end.
    # 0 = stop right after the start-up line (no step, no checkpoint): what start-up costs, per
    # rank, before any GPU-hour is spent on steps (benchmarks/startup_memory.py).
    stop_at_step: int | None = Field(None, ge=0)


class CheckpointSection(_Section):
    dir: str | None = None  # default: RUN_DIR/checkpoints
    every_steps: int = Field(0, ge=0)  # 0 = no step interval
    every_minutes: float = Field(0.0, ge=0.0)  # 0 = no time interval
    keep_last: int = Field(3, ge=1)
    keep_every: int = Field(0, ge=0)  # keep checkpoints at multiples of this step forever; 0 = off
    at_stage_end: bool = True
    on_sigterm: bool = True  # pre-emption: save, then exit
    resume: Literal["auto", "never"] = "auto"  # auto: continue from the latest complete checkpoint
    # Copy the state to CPU memory and write it in background threads (FSDP2/DDP: dcp.async_save
    # with DCP's stager; DeepSpeed: scaletrain's writer for its ZeRO files): training waits only
    # if the copy is not done by the next optimizer step; the checkpoint commits at the next
    # save or at the end of the run.
    async_save: bool = False
    # Niceness of the async save's background threads (the copy and the write; Linux, per
    # thread, 0-19; 19 yields the cores to training). On the 2-core CPU VM it changed nothing
    # measurable: the training time an async save costs was 0.64 of a sync save at 0 and 0.71
    # at 19 (FSDP2, benchmarks/results/checkpoint_io_async_*): the steps beside the write lose
    # time to memory bandwidth and the kernel's writeback, which niceness does not govern. So
    # the default leaves the writer as it was; measure on your host before setting it.
    async_nice: int = Field(0, ge=0, le=19)
    # FSDP2/DDP: threads (and files) per rank that DCP writes with (its FileSystemWriter's
    # thread_count). Serializing tensors is CPU work that more threads overlap with the disk
    # writes; on the 2-core CPU VM a 1.4 GB save took the same time with 1 and 2 on a settled
    # disk (benchmarks/results/checkpoint_io.md), so DCP's default stays.
    writer_threads: int = Field(1, ge=1, le=64)
    # A save that fails (disk full, any OSError, or too little free space for a checkpoint the
    # size of the last one) is agreed across ranks, its .partial removed and reported; then
    # training goes on (continue: the next save tries again) or every rank stops (stop, exit 3).
    on_save_error: Literal["continue", "stop"] = "continue"
    # Record every file's hash (XXH3-64) and size in meta.json at save (the engine's and EMA's
    # writers hash what they write; the few small files left are read back) and verify them before
    # a load: a checkpoint with a flipped bit that still parses is skipped for the previous one, in one line.
    checksums: bool = True


class ModelSection(_Section):
    preset: str = "unet-tiny"
    text_encoder_path: str | None = None
    vae_path: str | None = None
    # The frozen text encoder and VAE on each rank: whole (replicate), or sharded across the
    # ranks with FSDP2 on every engine (shard: 1/world of their parameters per rank, gathered
    # block by block for each forward, the same embeddings). A T5-XXL-class encoder is 9.4 GB
    # in bf16 on every GPU under replicate. Not built at all on precomputed latents.
    frozen_encoders: Literal["replicate", "shard"] = "replicate"
    # Memory and speed levers, applied per parallel unit on every engine (models/parallelize.py).
    # full: every unit recomputes its activations in backward; selective: the units
    # activation_checkpointing_selective picks do: every activation_checkpointing_every-th
    # one, or those holding attention (a UNet's cross-attention blocks, where activations scale
    # with tokens^2; its plain ResNet blocks keep theirs).
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    activation_checkpointing_selective: Literal["every", "attention"] = "every"
    activation_checkpointing_every: int = Field(2, ge=2)
    compile: bool = False  # regional: each unit's forward compiled (torch.compile), not the whole graph
    # torch.compile's backend: inductor generates kernels (the speed); aot_eager traces the same
    # regions through dynamo and AOT autograd without code generation, the usual first step when
    # a compiled run misbehaves (and what the suite uses to prove the wiring under each engine
    # at a fraction of inductor's CPU compile time).
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"


DEFAULT_SHARDS = "data/synth/shard-{000000..000007}.tar"


class SourceSection(_Section):
    """One weighted data source (data/mixing.py): each sample's source is drawn with probability
    weight / sum(weights), and its name is the sample's provenance in batches and metrics."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # used in metric keys: source_frac/NAME
    # Required in data.sources; in a stage override it may be left out to reuse the shards of
    # the data.sources entry with the same name (e.g. to change only the weight).
    shards: str | list[str] | None = None
    weight: float = Field(1.0, gt=0.0)
    filters: FilterSpec | None = None  # replaces data.filters for this source


class BalanceSection(_Section):
    """Class-balanced sampling over a metadata field: each class is its own stream, drawn with
    equal probability (uniform; classes found by one metadata scan) or with ``weights``."""

    field: str = "label"
    mode: Literal["uniform", "weights"] = "uniform"
    weights: dict[str, float] | None = None  # class value (as text) -> weight > 0; mode=weights

    @model_validator(mode="after")
    def _weights(self) -> "BalanceSection":
        if self.mode == "weights" and not self.weights:
            raise ValueError("data.balance.mode=weights needs data.balance.weights, e.g. {cat: 1, dog: 1}")
        if self.mode == "uniform" and self.weights is not None:
            raise ValueError("data.balance.weights is set but data.balance.mode=uniform; set mode: weights "
                             "or remove the weights")
        bad = {c: w for c, w in (self.weights or {}).items() if not w > 0}
        if bad:
            raise ValueError(f"data.balance.weights={bad} must be > 0; drop a class by leaving it out")
        return self


def _check_sources(sources: list[SourceSection] | None, where: str) -> None:
    if sources is None:
        return
    if not sources:
        raise ValueError(f"{where}.sources is empty; list at least one {{name, shards, weight}} or remove it")
    names = [s.name for s in sources]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{where}.sources has the name {dup[0]!r} twice; give every source its own name")


class DataSection(_Section):
    # A path, a brace pattern, a directory of .tar files, a URL, or a list of those.
    shards: str | list[str] = DEFAULT_SHARDS
    num_workers: int = Field(1, ge=0)
    caption_dropout: float = Field(0.1, ge=0.0, le=1.0)
    shuffle_buffer: int = Field(0, ge=0)
    split: Literal["auto", "shard", "sample"] = "auto"
    # Metadata filters applied on the fly (data/filters.py); drops are counted, per rule.
    filters: FilterSpec | None = None
    # Weighted sources with provenance; when set they replace data.shards (docs/data.md, "Data sources").
    sources: list[SourceSection] | None = None
    balance: BalanceSection | None = None
    # Aspect-ratio buckets per stage resolution (data/buckets.py); off = square center crops.
    buckets: BucketSpec = BucketSpec()
    # Bad data is counted per kind (metrics data_issues/*, summary data_issues), never raised: a
    # missing or non-UTF-8 caption trains as "" (empty) or is dropped (skip); images above
    # max_image_pixels (from the header, before decoding; PIL's own bomb limit is 179M) and tar
    # members above max_member_bytes (never read) drop their sample.
    bad_captions: Literal["empty", "skip"] = "empty"
    max_image_pixels: int = Field(64_000_000, gt=0)
    max_member_bytes: int = Field(64 * 2**20, gt=0)
    # `pipe:CMD` shard URLs run CMD in a shell (webdataset's gopen): refused unless set.
    allow_pipe_shards: bool = False
    # Image members are decoded by PIL's JPEG, PNG and WebP decoders only, whatever their name
    # says; add GIF, BMP, TIFF, PPM or TGA here (never EPS/PS: PIL runs Ghostscript for those).
    image_formats: list[str] = []
    # Train on VAE latents + text embeddings written by `scaletrain data encode` (data/latents.py):
    # no VAE or text encoder is built. null = detect from the shards; true/false = assert it.
    precomputed: bool | None = None

    @model_validator(mode="after")
    def _sources(self) -> "DataSection":
        _check_sources(self.sources, "data")
        if self.sources is not None:
            if "shards" in self.model_fields_set and self.shards != DEFAULT_SHARDS:
                raise ValueError("data.shards and data.sources are both set; data.sources replaces data.shards, "
                                 "so move those shards into a source and remove data.shards")
            missing = [s.name for s in self.sources if s.shards is None]
            if missing:
                raise ValueError(f"data.sources {missing[0]!r} has no shards; add shards: PATH to it")
        return self


class StageDataSection(_Section):
    """Per-stage override of data.shards / sources / filters / balance: a key given here replaces
    the top-level one for this stage (filters or balance given as null turn it off); stage
    shards or sources replace both of data's."""

    shards: str | list[str] | None = None
    sources: list[SourceSection] | None = None
    filters: FilterSpec | None = None
    balance: BalanceSection | None = None


class DiffusionSection(BaseModel):
    """``objective`` names a registered training objective (scaletrain/diffusion/objectives/:
    ddpm, flow_matching). Its keys sit flat in this section or in a subsection named after it;
    each objective checks its own (its Params model, ``diffusion/checks.py``), so an objective
    brings its keys in its own file, and a recipe can hold settings for several and switch with
    ``--set diffusion.objective=...``. DDPM: prediction_type, betas, noise_offset,
    min_snr_gamma; flow matching: timestep_sampling, shift, dynamic_shift, weighting, ..."""

    model_config = ConfigDict(extra="allow")
    objective: str = "ddpm"

    def params(self) -> dict[str, Any]:
        """The selected objective's keys: its subsection, then the flat keys over it. Objectives'
        keys are scalars, so a mapping is a subsection (checked with the recipe: every mapping
        names an objective, and every key belongs to it)."""
        extra = dict(self.model_extra or {})
        flat = {k: v for k, v in extra.items() if not isinstance(v, dict)}
        return {**dict(extra.get(self.objective) or {}), **flat}


class OptimSection(_Section):
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0 disables clipping (the norm is still logged)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)


class StageSection(_Section):
    name: str
    resolution: int = Field(gt=0)
    # Length: exactly one of steps, or images (steps = ceil(images / global batch), see
    # RunConfig.stage_steps).
    steps: int | None = Field(None, gt=0)
    images: int | None = Field(None, gt=0)
    micro_batch: int = Field(gt=0)
    grad_accum: int = Field(1, gt=0)
    # Optional: when given it must equal micro_batch * grad_accum * world size.
    global_batch: int | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0.0)
    warmup_steps: int | None = Field(None, ge=0)
    data: StageDataSection | None = None  # this stage's shards/sources/filters/balance
    noise_offset: float | None = Field(None, ge=0.0)  # None = diffusion.noise_offset
    # This stage's changes to the objective's keys, flat or under the objective's name (e.g.
    # {flow_matching: {shift: 3.0}} for a higher resolution), checked like diffusion's own.
    diffusion: dict[str, Any] | None = None
    # Video: frames per clip and their frame rate (None: each video's own). A video family's
    # stage without frames trains 1-frame clips (images); image families take no frames.
    frames: int | None = Field(None, gt=0)
    fps: float | None = Field(None, gt=0.0)


class TrainSection(_Section):
    stages: list[StageSection] = Field(min_length=1)


class FSDPSection(_Section):
    """FSDP2 communication knobs (docs/engines.md has the table with the reasons)."""

    # Free gathered parameters after each unit's forward (re-gather in backward): memory for comm.
    reshard_after_forward: bool = True
    # Units whose all-gather a unit issues explicitly in forward (set_modules_to_forward_prefetch);
    # 0 = FSDP2's implicit one-ahead overlap. More = earlier gathers, more memory held.
    forward_prefetch: int = Field(0, ge=0)
    # Units prefetched in backward (set_modules_to_backward_prefetch); 1 is FSDP2's own implicit
    # one-ahead prefetch, which cannot be turned off.
    backward_prefetch: int = Field(1, ge=1)
    # HSDP: a (replicate_size x shard_size) mesh, sharding within groups of shard_size ranks
    # (a node) and all-reducing across replicas. Both None = shard over all ranks (plain FSDP).
    shard_size: int | None = Field(None, gt=0)
    replicate_size: int | None = Field(None, gt=0)
    # params: FSDP2's CPUOffloadPolicy keeps sharded parameters, gradients and AdamW state in
    # host memory (the optimizer steps on the CPU); units are copied to the device per forward.
    # "optimizer" alone is not an FSDP2 mode: the validator below says what to use instead.
    offload: Literal["none", "optimizer", "params"] = "none"

    @field_validator("offload")
    @classmethod
    def _offload_mode(cls, v: str) -> str:
        if v == "optimizer":
            raise ValueError("engine.fsdp.offload=optimizer: FSDP2 offloads parameters, gradients and optimizer "
                             "state together; use engine.fsdp.offload=params, or DeepSpeed with "
                             "ds_configs/zero3_offload.json (optimizer only)")
        return v

    def mesh_shape(self, world: int) -> tuple[int, int] | None:
        """(replicate, shard) for HSDP, or None for a 1-D mesh over all ranks; raises on a mismatch."""
        if self.shard_size is None and self.replicate_size is None:
            return None
        shard = self.shard_size or world // (self.replicate_size or 1)
        replicate = self.replicate_size or world // shard
        if replicate * shard != world:
            raise ValueError(
                f"engine.fsdp.replicate_size={self.replicate_size} x engine.fsdp.shard_size={self.shard_size} "
                f"must equal the world size {world}; set one of them and leave the other null"
            )
        return replicate, shard


class DDPSection(_Section):
    """DistributedDataParallel knobs; defaults are torch's, so a plain recipe is plain DDP."""

    bucket_cap_mb: float = Field(25.0, gt=0.0)  # gradient bucket size: fewer, larger all-reduces vs earlier overlap
    gradient_as_bucket_view: bool = False  # True: grads alias the buckets (saves one gradient copy of memory)
    static_graph: bool = False  # True: same used parameters every step (allows reentrant checkpointing)
    # none = fp32 all-reduce; fp16/bf16 halve the bytes (bf16 needs NCCL); powersgd = low-rank.
    comm_hook: Literal["none", "fp16", "bf16", "powersgd"] = "none"
    powersgd_rank: int = Field(1, ge=1)  # matrix_approximation_rank
    # Optimizer steps of exact all-reduce before compression starts (torch requires >= 2).
    powersgd_start_step: int = Field(1000, ge=2)


class DeepSpeedSection(_Section):
    """ZeRO communication knobs, filled into the JSON's zero_optimization block.

    None = whatever the JSON says (or DeepSpeed's default). A value set here and a different
    concrete value in the JSON is a config error (engines/ds_config.py)."""

    reduce_bucket_size: int | None = Field(None, gt=0)
    allgather_bucket_size: int | None = Field(None, gt=0)  # ZeRO-1/2 only
    overlap_comm: bool | None = None
    contiguous_gradients: bool | None = None
    stage3_prefetch_bucket_size: int | None = Field(None, ge=0)  # ZeRO-3 only
    stage3_param_persistence_threshold: int | None = Field(None, ge=0)  # ZeRO-3 only
    # ZeRO++ (ZeRO-3 only): hpZ secondary partition size, qwZ, qgZ. qwZ/qgZ need CUDA kernels.
    zero_hpz_partition_size: int | None = Field(None, ge=1)
    zero_quantized_weights: bool | None = None
    zero_quantized_gradients: bool | None = None

    @model_validator(mode="after")
    def _even_allgather_bucket(self) -> "DeepSpeedSection":
        # ZeRO-1/2 assert this deep inside deepspeed.initialize (nccl_start_alignment_factor).
        n = self.allgather_bucket_size
        if n is not None and n % 2:
            raise ValueError(f"engine.deepspeed.allgather_bucket_size={n} must be even (DeepSpeed aligns "
                             f"buckets to 2 elements); use {n + 1}")
        return self


class Fp8Section(_Section):
    """engine.precision=fp8: how torchao's float8 training scales the Linear layers (engines/fp8.py)."""

    # tensorwise: one scale per tensor (fastest; torchao's fp8 all-gather needs it); rowwise: one
    # scale per row (more accurate where a few rows carry outliers, somewhat slower).
    recipe: Literal["tensorwise", "rowwise"] = "tensorwise"
    # FSDP2 gathers the converted Linear weights in fp8 (half the bytes of bf16). None = on with
    # tensorwise, off with rowwise (torchao gathers tensorwise only: true with rowwise is an error).
    all_gather: bool | None = None

    @model_validator(mode="after")
    def _gather_needs_tensorwise(self) -> "Fp8Section":
        if self.all_gather and self.recipe != "tensorwise":
            raise ValueError(f"engine.fp8.all_gather=true needs engine.fp8.recipe=tensorwise (torchao gathers fp8 "
                             f"weights with one scale per tensor only, not {self.recipe}); set engine.fp8.all_gather="
                             f"false or engine.fp8.recipe=tensorwise")
        return self


class EngineSection(_Section):
    kind: Literal["fsdp", "deepspeed", "ddp"] = "fsdp"
    # fp16 (V100/T4-class GPUs, no bf16): autocast / FSDP2 param dtype fp16 with dynamic loss
    # scaling (torch GradScaler, FSDP2 ShardedGradScaler, DeepSpeed's own); an overflowed step is
    # skipped by the engine and the scale halved (logged as loss_scale), not counted as bad.
    # fp8 (compute capability 8.9+: L4, L40S, H100, H200, B200): the Linear layers of the
    # model's parallel units train in float8 (torchao), everything else as bf16; on a CPU in
    # torchao's emulation (same numerics, no speed-up). FSDP2 only; see engine.fp8.
    precision: Literal["fp32", "bf16", "fp16", "fp8"] = "fp32"
    fp16_initial_scale: float = Field(2.0**16, gt=0.0)  # the loss scale fp16 starts from
    fp8: Fp8Section = Fp8Section()
    deepspeed_config: str = "ds_configs/zero3.json"
    fsdp: FSDPSection = FSDPSection()
    ddp: DDPSection = DDPSection()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    # Profile one step in every N (torch.profiler) and log its split into compute, exposed
    # communication and data wait (train/comm_profile.py); 0 = off (no overhead).
    comm_profile_every: int = Field(0, ge=0)
    # Context (sequence) parallelism: each sample's tokens split over groups of K neighbouring
    # ranks (Ulysses all-to-all attention, diffusers' plan for the network; models/context_parallel.py).
    # The W ranks are W/K data-parallel replicas: global batch = micro x accum x W/K.
    context_parallel: int = Field(1, ge=1)


class LogSection(_Section):
    every: int = Field(1, gt=0)
    wandb: Literal["offline", "disabled", "online"] = "offline"
    wandb_project: str = "scaletrain"

    @field_validator("wandb", mode="before")
    @classmethod
    def _yaml_booleans(cls, v: Any) -> Any:
        # YAML reads `off`/`no`/`false` as False and `on`/`yes`/`true` as True.
        if v is False:
            return "disabled"
        if v is True:
            raise ValueError("log.wandb=true is ambiguous; use online, offline or disabled")
        return v
    progress: bool = True
    loss_ema_decay: float = Field(0.9, gt=0.0, lt=1.0)
    # Per-device peak TFLOP/s that MFU divides by; None = the GPU data-sheet table
    # (scaletrain.models.flops), else a measured matmul ceiling (CPU, unknown GPUs).
    peak_tflops: float | None = Field(None, gt=0.0)


class SampleSection(_Section):
    prompts: list[str] = ["a red circle on the left", "a blue square in the center"]
    steps: int = Field(20, gt=0)
    guidance_scale: float = Field(3.0, ge=1.0)
    seed: int = 0
    resolution: int | None = Field(None, gt=0)  # default: the last stage's resolution
    # Video presets: frames per sampled clip (default: the last stage's), written as an animated
    # GIF (samples.gif) at the last stage's fps (8 when it names none).
    frames: int | None = Field(None, gt=0)
    at_end: bool = True

    @model_validator(mode="after")
    def _prompts_for_the_grid(self) -> "SampleSection":
        # Found at the end of a run otherwise, as a tokenizer traceback after hours of training.
        if self.at_end and not self.prompts:
            raise ValueError("sample.prompts is empty: list at least one prompt or set sample.at_end=false")
        return self


class EMASection(_Section):
    """Sharded EMA of the weights (scaletrain/train/ema.py): used for end-of-run samples and
    validation, saved in checkpoints, exported instead of the raw weights when present."""

    enabled: bool = False
    decay: float = Field(0.9999, gt=0.0, lt=1.0)
    # Cap on the decay early in training: ratio = min(decay, (1+n)/(10+n)); power =
    # min(decay, 1-(1+n)^-power); none = constant decay (n = updates made so far).
    warmup: Literal["ratio", "power", "none"] = "ratio"
    power: float = Field(2 / 3, gt=0.0)
    update_every: int = Field(1, gt=0)  # optimizer steps between EMA updates


# The recipe section `validate` shadows pydantic's deprecated v1 classmethod BaseModel.validate,
# which nothing here calls; the warning would print in every process at import.
warnings.filterwarnings("ignore", message='Field name "validate" in "RunConfig" shadows', category=UserWarning)


class ValidateSection(_Section):
    """Validation on the EMA weights (raw weights without EMA), distributed across ranks:
    FID against real images from the shards, plus a sample grid (scaletrain/eval/validate.py)."""

    every_steps: int = Field(0, ge=0)  # 0 = off; else after every N-th global step
    at_end: bool = False  # also once after the last step (skipped if that step was just validated)
    # Reference set: the first num_images decodable samples of `shards` (default: data.shards;
    # point it at a held-out set, e.g. `scaletrain data synth --seed 1`). Split across ranks.
    num_images: int = Field(64, ge=2)
    shards: str | list[str] | None = None
    resolution: int | None = Field(None, gt=0)  # default: the current stage's resolution
    steps: int = Field(20, gt=0)  # DDIM steps
    guidance_scale: float = Field(3.0, ge=1.0)
    seed: int = 0  # generated image i starts from noise seeded seed + i
    batch_size: int = Field(32, gt=0)  # images per sampling call on each rank
    # offline: scaletrain's deterministic extractor (metric fid_offline-gridorient), no download;
    # inception: torch-fidelity InceptionV3 from inception_weights (metric fid_inception-v3).
    feature_extractor: Literal["offline", "inception"] = "offline"
    inception_weights: str | None = None
    # NSFW gate on the generated validation images (scaletrain/curate/safety.py): a local
    # AutoModelForImageClassification folder ('tiny' = seeded test model); logs
    # validation/nsfw_flagged_rate (share with p(nsfw) > safety_threshold). None = off.
    safety_model: str | None = None
    safety_threshold: float = Field(0.5, ge=0.0, le=1.0)
    safety_nsfw_labels: list[str] | None = None  # default: labels containing nsfw/porn/hentai/sexy/...
    # Video presets: frames per validation clip (default: the last stage's) at fps (default: the
    # last stage's; null: the videos' own). FID is per frame (every frame of the generated clips
    # against every frame of the reference clips; image shards give 1-frame references), and
    # validation/temporal_consistency is the mean feature cosine of consecutive frames.
    frames: int | None = Field(None, gt=0)
    fps: float | None = Field(None, gt=0.0)


class HealthSection(_Section):
    """Training-health guard (scaletrain/train/health.py): a step whose all-reduced loss or
    global grad norm is non-finite or spikes over its EMA is skipped on every rank; too many
    bad steps in a window roll back to the last checkpoint with a lower LR."""

    enabled: bool = True
    # A step is bad when loss > loss_spike_factor x loss EMA, or grad norm > grad_spike_factor x
    # grad-norm EMA (0 = no spike check on that signal; non-finite values are always bad).
    loss_spike_factor: float = Field(3.0, ge=0.0)
    grad_spike_factor: float = Field(5.0, ge=0.0)
    ema_decay: float = Field(0.98, gt=0.0, lt=1.0)
    min_steps: int = Field(20, ge=0)  # good steps in the EMAs before spike checks start
    window: int = Field(20, gt=0)  # steps
    max_bad_in_window: int = Field(3, gt=0)  # this many bad steps within `window` -> roll back
    lr_factor: float = Field(0.5, gt=0.0, le=1.0)  # LR multiplier applied at each rollback
    max_rollbacks: int = Field(3, ge=0)  # one more rollback than this stops the run
    # Test hook: make the loss NaN on rank inject_nan_rank at these steps (counted without
    # rollbacks: a step re-run after a rollback keeps counting up). Leave empty in real runs.
    inject_nan_steps: list[int] = []
    inject_spike_steps: list[int] = []  # likewise: the loss x 1000 on that rank (a spike, finite)
    inject_nan_rank: int = Field(1, ge=0)


class InitSection(_Section):
    """Start weights for post-training (SFT, LoRA, DPO): weights only, with a fresh optimizer,
    step counter and LR schedule. Ignored once the run has a checkpoint of its own (a relaunch
    resumes that). scaletrain/checkpoint/init.py."""

    # A scaletrain run folder (its latest complete checkpoint), its checkpoints/ folder, or one
    # checkpoints/step-N folder; FSDP2/DDP (DCP) or DeepSpeed checkpoints of model.preset.
    from_checkpoint: str | None = None
    # A diffusers model folder (`scaletrain ckpt export`, or save_pretrained of model.preset's class).
    from_diffusers: str | None = None
    use_ema: bool = True  # from_checkpoint: its EMA weights when it holds an EMA

    @property
    def source(self) -> str | None:
        return self.from_checkpoint or self.from_diffusers


class LoraSection(_Section):
    """LoRA adapters (peft) on the denoiser; base weights frozen (scaletrain/models/lora.py)."""

    enabled: bool = False
    rank: int = Field(8, ge=1)
    alpha: float | None = Field(None, gt=0.0)  # None = rank (scale 1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # Module-name suffixes to adapt; None = the family's attention projections (to_q, to_k,
    # to_v, to_out.0), plus the feed-forward projections (ff.net.0.proj, ff.net.2) for the DiT.
    target_modules: list[str] | None = Field(None, min_length=1)


class DPOSection(_Section):
    """Diffusion-DPO post-training (launchers/dpo.py, scaletrain/train/dpo.py) on preference
    pairs (data.shards hold KEY.chosen.jpg + KEY.rejected.jpg + KEY.txt). The reference model
    is the start weights, frozen: a copy sharded like the policy, or under LoRA the same
    network with its adapters turned off."""

    # KL strength: loss = -log sigmoid(-beta/2 * (model_diff - ref_diff)), diffs of per-sample
    # mean squared errors (scaletrain/diffusion/dpo.py). 5000 is the authors' SD1.5/SDXL value.
    beta: float = Field(5000.0, gt=0.0)


class RunConfig(_Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    diffusion: DiffusionSection = DiffusionSection()
    optim: OptimSection = OptimSection()
    train: TrainSection
    engine: EngineSection = EngineSection()
    log: LogSection = LogSection()
    sample: SampleSection = SampleSection()
    checkpoint: CheckpointSection = CheckpointSection()
    ema: EMASection = EMASection()
    validate: ValidateSection = ValidateSection()
    health: HealthSection = HealthSection()
    dpo: DPOSection | None = None  # read by launchers/dpo.py only
    init: InitSection = InitSection()  # post-training start weights
    lora: LoraSection = LoraSection()

    def stage_global_batch(self, index: int, world_size: int) -> int:
        s = self.train.stages[index]
        return s.micro_batch * s.grad_accum * self.data_parallel_size(world_size)

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel replicas at ``world_size`` ranks: the ranks of a context group
        (engine.context_parallel) see the same samples."""
        return max(world_size // self.engine.context_parallel, 1)

    def stage_steps(self, index: int, world_size: int) -> int:
        """Optimizer steps of stage ``index`` for a run launched at ``world_size``: its ``steps``,
        or ceil(images / global batch), so an images-length stage trains on at least ``images``
        images (the last step's batch is whole). The one place this rounding lives."""
        s = self.train.stages[index]
        if s.steps is not None:
            return s.steps
        return math.ceil(s.images / self.stage_global_batch(index, world_size))

    def stage_images(self, index: int, world_size: int) -> int:
        """Images stage ``index`` is asked to train on: its ``images``, or steps x global batch."""
        s = self.train.stages[index]
        return s.images if s.images is not None else s.steps * self.stage_global_batch(index, world_size)

    def validation_fps(self) -> float | None:
        return self.validate.fps if self.validate.fps is not None else self.train.stages[-1].fps

    def stage_shard_sets(self, index: int) -> list[tuple[str, str | list[str]]]:
        """(config key, shards) of every shard set stage ``index`` reads: its data.shards, or each
        of its sources; the key names where to fix it."""
        eff, o = self.stage_data(index), self.train.stages[index].data
        where = f"train.stages.{index}.data" if o is not None and (o.shards or o.sources) else "data"
        if eff.sources is None:
            return [(f"{where}.shards", eff.shards)]
        return [(f"{where}.sources {s.name!r}", s.shards) for s in eff.sources]

    def stage_data(self, index: int) -> StageDataSection:
        """Stage ``index``'s effective shards or sources, filters and balance: data.* with the
        stage's ``data`` override applied (a key given there, even null, replaces data.*)."""
        d, o = self.data, self.train.stages[index].data
        out = {"shards": None if d.sources else d.shards, "sources": d.sources,
               "filters": d.filters, "balance": d.balance}
        if o is None:
            return StageDataSection.model_construct(**out)
        where, given = f"train.stages.{index}.data", o.model_fields_set
        if o.shards is not None and o.sources is not None:
            raise ValueError(f"{where}.shards and {where}.sources are both set; keep one (sources replace shards)")
        _check_sources(o.sources, where)
        if o.shards is not None:
            out.update(shards=o.shards, sources=None)
        if o.sources is not None:
            top = {s.name: s for s in d.sources or []}
            sources = []
            for j, src in enumerate(o.sources):
                if src.shards is None and src.name not in top:
                    known = f"or use one of {sorted(top)}" if top else "(data.sources is not set)"
                    raise ValueError(f"{where}.sources.{j}.name={src.name!r} is not in data.sources and has no "
                                     f"shards; add shards: PATH {known}")
                base = top.get(src.name)
                sources.append(src.model_copy(update={
                    "shards": src.shards if src.shards is not None else base.shards,
                    "filters": src.filters if "filters" in src.model_fields_set or base is None else base.filters}))
            out.update(shards=None, sources=sources)
        for key in ("filters", "balance"):
            if key in given:
                out[key] = getattr(o, key)
        return StageDataSection.model_construct(**out)


# ----------------------------------------------------------------------------- loading


def parse_overrides(pairs: list[str]) -> list[tuple[list[str], Any]]:
    """``["optim.lr=3e-4", "train.stages.0.steps=5"]`` → [(path, value)]; values parse as YAML."""
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r} is not KEY=VALUE; write e.g. --set optim.lr=3e-4")
        key, _, text = pair.partition("=")
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"--set {pair!r} has an empty key part; write e.g. --set optim.lr=3e-4")
        out.append((key.split("."), yaml.safe_load(text) if text != "" else ""))
    return out


def apply_overrides(data: dict, overrides: list[tuple[list[str], Any]]) -> dict:
    for path, value in overrides:
        node: Any = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                idx = _list_index(node, part, path[: i + 1])
                node = node[idx]
                continue
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            node = nxt
        last = path[-1]
        if isinstance(node, list):
            node[_list_index(node, last, path)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[:-1])} is a value, not a section")
    return data


def _list_index(node: list, part: str, path: list[str]) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError(
            f"--set {'.'.join(path)}: {part!r} is not an index of a list of {len(node)} items; use 0..{len(node) - 1}"
        )
    return int(part)


def format_validation_error(err: ValidationError) -> str:
    """The first error as one line: field, bad value, and what to do."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    kind, msg = e["type"], e["msg"]
    if kind == "extra_forbidden":
        return f"{loc} is not a known key; remove it or check its spelling (see configs/demo.yaml)"
    if kind == "missing":
        return f"{loc} is required; add it to the recipe"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    value = e.get("input")
    return f"{loc}={value!r}: {msg}"


def world_size_from_env() -> int:
    """The world size the launcher will create (torchrun and the deepspeed launcher set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def read_recipe(path: str | Path, overrides: list[str] | None = None) -> dict:
    """A YAML recipe as data with ``--set`` overrides applied. Raises ConfigError (one line)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {str(path)!r} does not exist; pass a YAML recipe such as configs/demo.yaml")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (run, model, data, ...)")
    apply_overrides(data, parse_overrides(overrides or []))
    return data


def parse_config(data: dict) -> RunConfig:
    """The recipe's types, ranges and per-section rules; the rules across sections and against
    the components are ``scaletrain.checks.validate_config``'s. Raises ConfigError (one line)."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
