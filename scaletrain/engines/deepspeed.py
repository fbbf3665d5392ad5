"""DeepSpeed engine: ZeRO stage 1/2/3 from ``ds_configs/*.json`` with trainer-owned values filled in.

Only the trainable denoiser goes into the DeepSpeed engine; frozen encoders stay outside as
plain modules (one engine per trainable model avoids the "several models under one
DeepSpeed engine" trap, accelerate#2974).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Shard

from scaletrain.config import RunConfig
from scaletrain.distributed import DistInfo
from scaletrain.engines.base import (Engine, LocalShard, StepStats, build_adamw, chunk_bounds,
                                      replicated_param_shards, world_mesh)
from scaletrain.engines.ds_config import fill_deepspeed_config, load_deepspeed_json
from scaletrain.engines.spec import (GRAD_NORM, Collective, EngineSpec, Layout, compute_bytes, register_engine,
                                     register_layout)


def _filled_config(cfg: RunConfig, dist_info: DistInfo, micro_batch: int, grad_accum: int,
                   notes: list[str] | None = None) -> dict:
    return fill_deepspeed_config(load_deepspeed_json(cfg.engine.deepspeed_config), cfg, micro_batch=micro_batch,
                                 grad_accum=grad_accum, world_size=dist_info.world_size,
                                 notes=notes if notes is not None else [])


def materialize_for_deepspeed(denoiser: nn.Module, cfg: RunConfig, dist_info: DistInfo, micro_batch: int,
                              grad_accum: int) -> None:
    """Start-up of a denoiser built on meta (``models/meta_init.py``) for DeepSpeed.

    ZeRO-3: the network is constructed again under ``deepspeed.zero.Init``, which partitions
    each module's parameters as soon as that module is built, so no rank ever holds the whole
    model; then each module's parameters are gathered (one module at a time), given their
    ``meta_init`` values on rank 0 and partitioned again (``GatheredParameters(modifier_rank=0)``).
    The same weights as every other engine at any world size. ZeRO-1/2 keep whole parameters
    on every rank by design: initialised whole."""
    import deepspeed

    from scaletrain.models.meta_init import expected_tensors, full_values, module_seed, seeded

    pending = denoiser.pending_init
    ensure_deepspeed_comm(dist_info)
    ds_cfg = _filled_config(cfg, dist_info, micro_batch, grad_accum)
    if pending.source is not None:  # every rank checks the keys before any collective
        pending.source.check_names(expected_tensors(denoiser.net), pending.source_what)
    if int(ds_cfg.get("zero_optimization", {}).get("stage", 0)) < 3 or pending.build is None:
        denoiser.materialize(dist_info.device)
        return
    # The constructor's own draws are overwritten below; seeded apart so the caller's RNG is untouched.
    with seeded(module_seed(pending.seed, "<zero.Init>")), deepspeed.zero.Init(config_dict_or_path=ds_cfg):
        net = pending.build()
    rank0 = dist_info.rank == 0
    with torch.no_grad():
        for qual, module in net.named_modules():
            own = list(module.parameters(recurse=False))
            if not own:
                continue
            with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
                if rank0:  # start weights (this module's tensors only) or the seeded init
                    values = ({n: pending.source.read(f"{qual}.{n}" if qual else n)
                               for n, _ in module.named_parameters(recurse=False)}
                              if pending.source is not None else full_values(module, qual, pending))
                    for name, p in module.named_parameters(recurse=False):
                        p.data.copy_(values[name])
        persistent = set(net.state_dict().keys()) - {n for n, _ in net.named_parameters()}
        for name, buf in net.named_buffers():
            from_source = pending.source is not None and name in persistent
            buf.copy_(pending.source.read(name) if from_source else pending.buffers[name])
    denoiser.net = net
    denoiser.pending_init = None


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, denoiser: nn.Module, cfg: RunConfig, dist_info: DistInfo, micro_batch: int, grad_accum: int) -> None:
        super().__init__()
        import deepspeed

        ensure_deepspeed_comm(dist_info)
        self.cfg = cfg
        self.world_size = dist_info.world_size
        self.device = dist_info.device
        notes: list[str] = []
        ds_cfg = _filled_config(cfg, dist_info, micro_batch, grad_accum, notes)
        if dist_info.is_main:
            for line in notes:  # e.g. a template's "auto" scheduler, dropped for the trainer's schedule
                print(f"deepspeed: {line}", flush=True)
        self.zero_stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
        self.ds_config = ds_cfg  # prepare_frozen builds a frozen model's engine from it
        self._frozen: list = []  # those engines, destroyed in close()
        # A JSON "optimizer" block (needed for CPU offload's DeepSpeedCPUAdam) wins; otherwise
        # the same torch AdamW the other engines use, so curves stay comparable.
        client_opt = None if "optimizer" in ds_cfg else build_adamw(denoiser.parameters(), cfg.optim)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=denoiser,
            model_parameters=[p for p in denoiser.parameters() if p.requires_grad],
            optimizer=client_opt,
            config=ds_cfg,
        )
        self.module = self.ds
        self._install_writer()
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.engine.precision, torch.float32)
        self.dynamic_loss_scale = cfg.engine.precision == "fp16"  # DeepSpeed's own loss scaler
        self.configure_stage(micro_batch, grad_accum)

    def configure_stage(self, micro_batch: int, grad_accum: int) -> None:
        super().configure_stage(micro_batch, grad_accum)
        # Curriculum stages change the micro-batch and accumulation; DeepSpeed keeps them in
        # its config and scales the loss by 1/gradient_accumulation_steps in backward().
        self.ds.set_train_micro_batch_size(micro_batch)
        self.ds.set_train_batch_size(micro_batch * grad_accum * self.world_size)

    def _sync_context(self, is_last: bool) -> contextlib.AbstractContextManager:
        # We call ds.step() once per optimizer step, so tell DeepSpeed where the boundary is.
        # ZeRO-1 then skips gradient reduction on the other micro-steps; ZeRO-2/3 still
        # reduce-scatter on every micro-step (each rank keeps only its gradient partition;
        # DeepSpeed's no_sync() refuses those stages). tests/distributed/test_comm_knobs.py.
        self.ds.set_gradient_accumulation_boundary(is_last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss * self.grad_scale if self.grad_scale != 1.0 else loss)

    _pending_norm: float | None = None  # grad_norm() of this step, reused by skip_step()

    def grad_norm(self) -> float:
        """The pre-clip global norm of the ZeRO gradient partitions, before ``ds.step()``.

        DeepSpeed computes this norm only inside ``ds.step()``, after which it is too late to
        skip; so it is taken here (``ds.step()`` computes it again: one more pass over the
        local partition and a scalar all-reduce per step).
        """
        opt = self.ds.optimizer
        self._pending_norm = None
        if self.zero_stage >= 3:
            from deepspeed.utils import safe_get_local_grad

            # Public ZeRO-3 API: this rank's fp32 gradient partition of each parameter.
            sq = torch.zeros((), dtype=torch.float32, device=self.device)
            for p in self.ds.module.parameters():
                if p.requires_grad and p.ds_tensor.numel():
                    sq += safe_get_local_grad(p).float().pow(2).sum()
            dist.all_reduce(sq, group=opt.dp_process_group)
            # fp16 partitions hold scaled gradients (the loss scale is 1 in fp32/bf16)
            self._pending_norm = float(sq.sqrt()) / float(getattr(opt, "loss_scale", 1.0))
        elif self.zero_stage in (1, 2):
            # The ZeRO-1/2 optimizer's own routine (the one ds.step() clips with); collective.
            # It reports a non-finite norm as +inf.
            self._pending_norm = float(opt.scaled_global_norm()) / float(opt.loss_scale)
        if self._pending_norm is not None:
            return self._pending_norm
        raise RuntimeError("the health guard needs ZeRO stage 1, 2 or 3 under DeepSpeed; "
                           "set zero_optimization.stage in engine.deepspeed_config or health.enabled=false")

    def step(self, lr: float) -> StepStats:
        self.wait_staged()
        self._pending_norm = None
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        opt = self.ds.optimizer
        fp16 = self.dynamic_loss_scale
        return StepStats(grad_norm=float("nan") if norm is None else float(norm), lr=lr,
                         skipped=fp16 and bool(getattr(opt, "overflow", False)),
                         loss_scale=float(getattr(opt, "loss_scale", 0.0)) if fp16 else None)

    def skip_step(self, lr: float) -> StepStats:
        """Skip through DeepSpeed's own overflow path: mark this rank's gradients invalid (NaN),
        then ``ds.step()``. ZeRO sees a non-finite global norm, drops the gradients and its
        buffers without an optimizer step, counts ``skipped_steps`` and keeps its micro-step
        and boundary counters consistent -- the path fp16 overflows take, and with fp32 or
        bf16 (``check_grad_overflow``, default true) the one a NaN gradient takes anyway."""
        self.wait_staged()
        norm = self._pending_norm if self._pending_norm is not None else self.grad_norm()
        self._pending_norm = None
        opt = self.ds.optimizer
        if self.zero_stage < 3 and getattr(opt, "dtype", None) == torch.bfloat16 and not opt.check_grad_overflow:
            # ZeRO-1/2 bf16 would apply the NaN step: refuse before touching the gradients.
            raise RuntimeError("the health guard skips steps through DeepSpeed's overflow check; set "
                               "bf16.check_grad_overflow=true in engine.deepspeed_config or health.enabled=false")
        from deepspeed.utils import safe_set_full_grad, safe_set_local_grad

        params = [p for p in self.ds.module.parameters() if p.requires_grad]
        if self.zero_stage >= 3:  # one NaN in this rank's partition spoils the global norm
            p = next(p for p in params if p.ds_tensor.numel())
            safe_set_local_grad(p, torch.full((p.ds_tensor.numel(),), float("nan"), device=self.device))
        else:  # ZeRO-1/2: each rank writes the fragments it owns of every parameter's gradient
            for p in params:
                safe_set_full_grad(p, torch.full(p.shape, float("nan"), device=self.device))
        self.ds.step()
        if not getattr(self.ds.optimizer, "overflow", False):
            raise RuntimeError("DeepSpeed applied a step the health guard asked to skip; keep "
                               "bf16.check_grad_overflow true in engine.deepspeed_config")
        return StepStats(grad_norm=norm, lr=lr, skipped=True)

    def local_param_numel(self) -> int:
        return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in self.ds.module.parameters())

    def full_param_numel(self) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.ds.module.parameters())

    def local_param_shards(self, release_gathered: bool = False) -> list[LocalShard]:
        params = [(n, p) for n, p in self.ds.module.named_parameters() if p.requires_grad]
        mesh = world_mesh(self, "cuda" if torch.cuda.is_available() else "cpu")
        if self.zero_stage < 3:  # ZeRO-1/2 keep whole parameters on every rank
            return replicated_param_shards(params, mesh)
        if release_gathered:
            # ZeRO-3 keeps gathered params for reuse (max_reuse_distance) and persistent ones
            # whole; a forward would use those copies. Release all: the next forward gathers
            # from the partitions. Costs a gc.collect, so not on every EMA update.
            self.ds.empty_partition_cache()
        rank, world = mesh.get_local_rank(), mesh.size()
        out = []
        for name, p in params:
            # p.ds_tensor is this rank's flat partition of ceil(numel/world) elements, zero-padded
            # on the last ranks: exactly DTensor Shard(0) of the flattened parameter once the
            # padding is cut off. MiCS/hpZ partition over sub-groups, which this does not cover.
            part = p.ds_tensor.detach().view(-1)
            if part.numel() != -(-p.ds_numel // world):
                raise RuntimeError(f"{name}: ZeRO-3 partition of {part.numel()} elements is not "
                                   f"ceil({p.ds_numel}/{world}); partitioned sub-groups are not supported")
            start, end = chunk_bounds(p.ds_numel, rank, world)
            master = None
            if part.dtype != torch.float32:  # bf16 weights: average the optimizer's fp32 master
                from deepspeed.utils import safe_get_local_fp32_param

                master = safe_get_local_fp32_param(p).view(-1)[: end - start]
            out.append(LocalShard(name, part[: end - start], mesh, (Shard(0),), torch.Size([p.ds_numel]),
                                  p.ds_shape, master=master))
        return out

    def _install_writer(self) -> None:
        """DeepSpeed plans the files, scaletrain's writer writes them (see engines.ds_writer):
        errors recorded per rank instead of raised between DeepSpeed's barriers, fsync per
        file, and for an async save the copy and write off the training thread."""
        from scaletrain.engines.ds_writer import RecordingCheckpointEngine

        self._writer = RecordingCheckpointEngine(nice=self.cfg.checkpoint.async_nice)
        self.ds.checkpoint_engine = self._writer
        copy_script = self.ds._copy_recovery_script  # rank 0 copies zero_to_fp32.py beside the files

        def copy_recovery_script(save_path):
            try:
                copy_script(save_path)
            except OSError as e:
                self._writer.errors.append(f"{type(e).__name__}: {e}")

        self.ds._copy_recovery_script = copy_recovery_script

    @property
    def background_threads_lowered(self) -> int:
        """Async-save threads that took checkpoint.async_nice (the writer's one thread)."""
        return self._writer.threads_lowered[0] if getattr(self, "_writer", None) is not None else 0

    def save_state(self, path: Path) -> None:
        # DeepSpeed's own format: each rank writes its ZeRO partition of parameters and
        # optimizer state. The trainer keeps its own counters, so no client_state here.
        self.wait_staged()
        self._writer.background = False
        self.ds.save_checkpoint(str(path), tag="zero", save_latest=False)
        self._writer.finish().result()  # this rank's first write error, after DeepSpeed's barriers

    def async_save_state(self, path: Path, process_group):
        """``save_checkpoint`` returns once DeepSpeed has handed every file's state to the
        writer's thread; the copy to CPU and the writes run there (no collectives: the
        process group is not needed)."""
        self.wait_staged()
        self._writer.background = True
        self.ds.save_checkpoint(str(path), tag="zero", save_latest=False)
        self.hold_until_staged(self._writer.staged())
        return self._writer.finish()

    def load_state(self, path: Path) -> None:
        """Same data-parallel size: DeepSpeed's ZeRO loader. Another size: ZeRO partitions do not
        reshard, so the checkpoint is converted once to DeepSpeed's universal format (rank 0,
        kept beside it as ``zero_universal``) and loaded with ``load_universal``. Every
        ``torch.load`` inside runs weights-only (see common.safe_load)."""
        import torch.distributed as dist

        from scaletrain.common.safe_load import (CheckpointLoadError, agreed_check_torch_files,
                                                     convert_to_universal, weights_only_torch_load,
                                                     zero_dp_world_size)

        self.wait_staged()
        saved = zero_dp_world_size(path / "zero")
        tag, universal = "zero", saved not in (0, self.world_size)
        if universal:
            tag = "zero_universal"
            error = ""
            if dist.get_rank() == 0 and not (path / tag).is_dir():
                try:
                    convert_to_universal(path / "zero", path / tag)
                except Exception as e:  # every rank must learn of it, not wait forever
                    error = str(e)
            errors = [error]
            dist.broadcast_object_list(errors, src=0)
            if errors[0]:
                raise CheckpointLoadError(errors[0])
        # Every file DeepSpeed will read, scanned weights-only and agreed across ranks first:
        # a rank refusing a file inside load_checkpoint would leave the others in a collective.
        agreed_check_torch_files(list((path / tag).rglob("*.pt")))
        self.ds._config.load_universal_checkpoint = universal
        try:
            with weights_only_torch_load():
                load_path, _ = self.ds.load_checkpoint(
                    str(path), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
                )
        finally:
            self.ds._config.load_universal_checkpoint = False
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {path}/{tag}")

    def unwrapped_parameters(self) -> list[nn.Parameter]:
        return list(self.ds.module.parameters())

    def prepare_frozen(self, module: nn.Module, units: list[nn.Module]) -> nn.Module:
        """ZeRO-3: a second DeepSpeed engine without an optimizer, which partitions the frozen
        module's parameters over the same ranks (1/world each, gathered per forward); TRL
        prepares its DPO reference model this way. A separate engine, not a second model in the
        training engine, so DeepSpeed's optimizer and checkpoints never see it (accelerate#2974).
        ZeRO-1/2 replicate weights anyway: a plain frozen copy (the base class)."""
        if self.zero_stage < 3:
            return super().prepare_frozen(module, units)
        import copy

        import deepspeed

        module.requires_grad_(False).eval()
        cfg = copy.deepcopy(self.ds_config)
        for key in ("optimizer", "scheduler"):
            cfg.pop(key, None)
        cfg["zero_optimization"].pop("offload_optimizer", None)  # nothing to offload
        frozen, *_ = deepspeed.initialize(model=module, config=cfg)
        frozen.eval()
        self._frozen.append(frozen)
        return frozen

    def close(self) -> None:
        self.wait_staged()
        if getattr(self, "_writer", None) is not None:
            self._writer.close()  # finishes queued writes
        for frozen in self._frozen:
            frozen.destroy()
        self._frozen = []
        if getattr(self, "ds", None) is not None:
            self.ds.destroy()
        super().close()


# ----------------------------------------------------------------------------- sizing entries

DS_BUCKET_ELEMS = 50_000_000  # reduce_bucket_size in ds_configs/*.json
DS_SUB_GROUP_ELEMS = 1e9  # DeepSpeed's zero_optimization.sub_group_size default


@register_layout
class Zero1Layout(Layout):
    """4 P weights + 4 P grads + 12 P / N (fp32 master + Adam); buckets reduce-scattered and the
    updated partitions all-gathered at the step boundary."""

    label, kind, ds_config = "zero1", "deepspeed", "ds_configs/zero1.json"
    whole_params = True
    memory_split = False  # flat partitions and reduce buckets outside torch's tracker
    overlapped_grads = False  # ZeRO-1 reduces at the step boundary; ZeRO-2 under backward (overlap_comm)

    def state_bytes(self, facts, world, precision="fp32", host_is_device=True):
        return 8 * facts.params + 12 * facts.params / world

    def startup_bytes(self, facts, world, precision="fp32"):
        return 4 * facts.params + 4 * facts.params / world

    def step_comms(self, facts, precision, gpus_per_node, world):
        P, n = facts.params, math.ceil(facts.params / DS_BUCKET_ELEMS)
        return [Collective("reduce_scatter", 4 * P, n, "global", "grad" if self.overlapped_grads else "tail"),
                Collective("all_gather", compute_bytes(precision) * P, n, "global", "tail"), GRAD_NORM]


@register_layout
class Zero2Layout(Zero1Layout):
    """4 P weights + 16 P / N (grads, master, Adam) + one reduce bucket (4 min(P, 5e7))."""

    label, ds_config = "zero2", "ds_configs/zero2.json"
    overlapped_grads = True

    def state_bytes(self, facts, world, precision="fp32", host_is_device=True):
        return 4 * facts.params + 16 * facts.params / world + 4 * min(facts.params, DS_BUCKET_ELEMS)


@register_layout
class Zero3Layout(Layout):
    """20 P / N + the largest module gathered (W); per module that owns parameters, a gather in
    forward and in backward and a reduce-scatter. At start-up (zero.Init) what DeepSpeed 0.19's
    stage-3 optimizer allocates in its constructor (``runtime/zero/stage3.py``): the parameter
    partition (W), its fp32 master copy (4), the flat gradient-partition buffer (4) and
    ``initialize_optimizer_states``' gradient buffer for the largest sub-group (4, up to
    ``sub_group_size`` = 1e9 elements), plus the largest module gathered while it is filled."""

    label, kind, ds_config = "zero3", "deepspeed", "ds_configs/zero3.json"
    memory_split = False

    def state_bytes(self, facts, world, precision="fp32", host_is_device=True):
        return (20 * facts.params / world - self.offloaded(facts, world, host_is_device)
                + facts.largest_module * compute_bytes(precision) * (world > 1))

    def offloaded(self, facts, world, host_is_device):
        return 0

    def startup_bytes(self, facts, world, precision="fp32"):
        P, N, w = facts.params, world, compute_bytes(precision)
        return (w + 8) * P / N + 4 * min(P / N, DS_SUB_GROUP_ELEMS) + facts.largest_module * w * (N > 1)

    def step_comms(self, facts, precision, gpus_per_node, world):
        P, w, m = facts.params, compute_bytes(precision), facts.param_modules
        return [Collective("all_gather", 2 * w * P, 2 * m, "global", "gather"),
                Collective("reduce_scatter", 4 * P, m, "global", "grad"), GRAD_NORM]


@register_layout
class Zero3OffloadLayout(Zero3Layout):
    """ZeRO-3 with the fp32 master and Adam in host memory (12 P / N off the device; counted only
    where host and device are one memory, i.e. on CPU)."""

    label, ds_config = "zero3-offload", "ds_configs/zero3_offload.json"
    compute_like = "zero3"

    def offloaded(self, facts, world, host_is_device):
        return 0 if host_is_device else 12 * facts.params / world


@register_layout
class Zero3OffloadParamLayout(Zero3OffloadLayout):
    """A bench variant: ZeRO-3 with the parameters offloaded as well."""

    label, ds_config = "zero3-offload-param", "ds_configs/zero3_offload_param.json"
    sized = False


@register_layout
class Zero3HPZLayout(Zero3Layout):
    """ZeRO++ hierarchical partitioning (zero_hpz_partition_size = GPUs per node): a secondary
    copy of the parameters sharded inside each node (W P / GPUs per node); forward gathers the
    primary shards, backward the node's secondary copy."""

    label, ds_config = "zero3-hpz", None
    compute_like = memory_like = "zero3"
    benched = False

    def extra_bytes(self, facts, world, gpus_per_node, precision):
        return facts.params * compute_bytes(precision) / min(world, gpus_per_node)

    def step_comms(self, facts, precision, gpus_per_node, world):
        P, w, m = facts.params, compute_bytes(precision), facts.param_modules
        return [Collective("all_gather", w * P, m, "global", "gather"),
                Collective("all_gather", w * P, m, "intra", "gather"),
                Collective("reduce_scatter", 4 * P, m, "global", "grad"), GRAD_NORM]


# ----------------------------------------------------------------------------- recipe entry


def zero_stage(cfg: RunConfig, world: int, notes: list[str] | None = None) -> int:
    """The ZeRO stage the DeepSpeed JSON gives, filled for every curriculum stage (each raising on
    a conflict with the recipe)."""
    raw = load_deepspeed_json(cfg.engine.deepspeed_config)
    stage = 0
    for st in cfg.train.stages:
        filled = fill_deepspeed_config(raw, cfg, micro_batch=st.micro_batch, grad_accum=st.grad_accum,
                                       world_size=world, notes=notes)
        stage = int(filled.get("zero_optimization", {}).get("stage", 0))
    return stage


@register_engine
class DeepSpeedSpec(EngineSpec):
    kind = "deepspeed"
    reads_dcp_start_weights = False  # its start-up reads on rank 0 (materialize_for_deepspeed)

    def check_recipe(self, cfg, world):
        e = cfg.engine
        if e.precision == "fp16" and not torch.cuda.is_available():
            raise ValueError("engine.precision=fp16 under DeepSpeed needs CUDA GPUs (DeepSpeed's CPU accelerator runs "
                             "fp32 and bf16 only); use engine.precision=bf16, or engine.kind=fsdp/ddp for fp16")
        for key in ("zero_quantized_weights", "zero_quantized_gradients"):
            if getattr(e.deepspeed, key) and not torch.cuda.is_available():
                raise ValueError(f"engine.deepspeed.{key}=true needs CUDA GPUs (DeepSpeed's quantizer has no "
                                 f"CPU kernels); set it to false on this machine")
        hpz = e.deepspeed.zero_hpz_partition_size
        if hpz is not None and world % hpz:
            raise ValueError(f"engine.deepspeed.zero_hpz_partition_size={hpz} does not divide the world size "
                             f"{world}; use the number of ranks per node")

    def check_launch(self, cfg, world):
        zero_stage(cfg, world)

    def sizing_label(self, cfg, world):
        return f"zero{zero_stage(cfg, world) or 3}"

    def config_notes(self, cfg, world):
        import json

        lines: list[str] = []
        for i, st in enumerate(cfg.train.stages):
            notes: list[str] = []
            ds = fill_deepspeed_config(load_deepspeed_json(cfg.engine.deepspeed_config), cfg, micro_batch=st.micro_batch,
                                       grad_accum=st.grad_accum, world_size=world, notes=notes)
            lines += [f"deepspeed: {n}" for n in notes if i == 0]
            lines.append(f"deepspeed JSON, stage {i} at world size {world}: {json.dumps(ds, sort_keys=True)}")
        return lines


def ensure_deepspeed_comm(dist_info: DistInfo) -> None:
    """DeepSpeed's comm layer over the process group ``distributed.init_distributed`` made
    (idempotent): before zero.Init or deepspeed.initialize."""
    import deepspeed
    import deepspeed.comm as ds_comm

    if not ds_comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist_info.backend)
