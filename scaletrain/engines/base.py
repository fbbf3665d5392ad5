"""The one engine protocol the trainer talks to.

The loop is always::

    engine.configure_stage(micro_batch, grad_accum)        # at each curriculum stage
    for i in range(grad_accum):
        with engine.micro_step(is_last=i == grad_accum - 1):
            loss = objective(engine.module(*inputs))
            engine.backward(loss)                           # raw micro-batch loss
    norm = engine.grad_norm()                               # optional: pre-clip global norm
    stats = engine.step(lr)                                 # clip, optimizer step, zero grads
    # or, when the health guard rejects the step (same decision on every rank):
    stats = engine.skip_step(lr)                            # drop grads; weights, moments untouched

and never asks which engine it has. Each engine scales the micro loss by 1/grad_accum (or
lets DeepSpeed do it), skips gradient synchronisation on non-final micro-steps, and returns
the pre-clip global gradient norm.
"""

from __future__ import annotations

import contextlib
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from scaletrain.config import OptimSection

if TYPE_CHECKING:
    from scaletrain.engines.fp8 import Float8Plan


@dataclass
class StepStats:
    grad_norm: float
    lr: float
    skipped: bool = False  # the optimizer did not step (health guard, or an fp16 overflow)
    loss_scale: float | None = None  # fp16: the dynamic loss scale after this step


@dataclass
class LocalShard:
    """This rank's part of one trainable parameter, as a DTensor layout (for the sharded EMA).

    ``local`` is a view into the engine's own parameter storage (writing it changes what the
    module computes with). ``mesh``/``placements``/``global_shape`` say which part of the
    global tensor it is, so a DTensor built on them is reshardable by DCP.
    """

    name: str  # the Denoiser's parameter name (its state_dict key)
    local: torch.Tensor
    mesh: object  # torch.distributed.device_mesh.DeviceMesh
    placements: tuple
    global_shape: torch.Size  # the parameter's shape, or (numel,) where the layout is flat (ZeRO-3)
    shape: torch.Size  # the parameter's own shape
    # Replicated engines (DDP, ZeRO-1/2): the whole parameter, present on every rank; writing
    # ``local`` alone would leave the other ranks' parts of this copy stale.
    full: torch.Tensor | None = None
    # An fp32 master copy of ``local`` (ZeRO-3 bf16) to average instead of the bf16 weights.
    master: torch.Tensor | None = None


def world_mesh(engine: "Engine", device_type: str):
    """A 1-D DeviceMesh over all ranks, for DTensors of replicated or ZeRO-partitioned
    parameters. Collective the first time; kept on the engine so ``close`` drops it (a mesh
    outliving the process group aborts the exit, see distributed.shutdown_distributed)."""
    if getattr(engine, "_shard_mesh", None) is None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        engine._shard_mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    return engine._shard_mesh


def chunk_bounds(numel: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of rank's part of ``numel`` elements under DTensor Shard(0) (torch.chunk:
    ceil-sized parts, trailing ranks short or empty); DeepSpeed ZeRO-3 partitions the same way."""
    size = -(-numel // world)
    start = min(rank * size, numel)
    return start, min(start + size, numel)


def replicated_param_shards(named_params, mesh) -> list[LocalShard]:
    """Shards of parameters every rank holds whole: each rank takes its Shard(0) chunk along
    dim 0 (the same layout FSDP2 uses), so an EMA of it costs 1/world memory and no
    communication, and DCP checkpoints of it are interchangeable with FSDP2's."""
    from torch.distributed.tensor import Shard

    rank, world = mesh.get_local_rank(), mesh.size()
    out = []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        data = p.detach()
        if data.dim() == 0:  # a scalar cannot be chunked: view it as one element
            data = data.view(1)
        start, end = chunk_bounds(data.shape[0], rank, world)
        out.append(LocalShard(name, data[start:end], mesh, (Shard(0),), data.shape, p.shape, full=data))
    return out


class Engine(ABC):
    """Owns the wrapped trainable module and its optimizer."""

    name: str = "base"
    # async-save threads given checkpoint.async_nice in this run (counted where it happened)
    background_threads_lowered: int = 0
    module: nn.Module  # call this for the forward pass
    input_dtype: torch.dtype = torch.float32  # dtype the wrapped module expects for float inputs
    # fp16 scales the loss dynamically: a non-finite gradient norm with a finite loss is then an
    # expected overflow that the engine's own step skips (and lowers the scale), not a bad step.
    dynamic_loss_scale: bool = False
    # engine.precision=fp8: what was converted to float8 (engines/fp8.py); None otherwise
    float8: Float8Plan | None = None
    _staging: Future | None = None
    _staging_wait: float = 0.0

    def __init__(self) -> None:
        self.grad_accum = 1
        self.micro_batch = 1
        self._is_last_micro = True
        self._staging: Future | None = None
        self._staging_wait = 0.0

    # An async save copies the state to CPU memory in a background thread while the next
    # forward and backward run (they read parameters and optimizer state, never write them).
    # Whatever writes them -- the optimizer step, a load, close -- calls wait_staged() first.
    def hold_until_staged(self, future: Future | None) -> None:
        self._staging = future

    def wait_staged(self) -> None:
        if self._staging is None:
            return
        t0 = time.perf_counter()
        wait_futures([self._staging])  # a staging error surfaces through the save's own future
        self._staging_wait += time.perf_counter() - t0
        self._staging = None

    def pop_staging_wait(self) -> float:
        """Seconds training waited for async-save staging since the last call."""
        seconds, self._staging_wait = self._staging_wait, 0.0
        return seconds

    def configure_stage(self, micro_batch: int, grad_accum: int) -> None:
        self.micro_batch, self.grad_accum = micro_batch, grad_accum

    @contextlib.contextmanager
    def micro_step(self, is_last: bool) -> Iterator[None]:
        """Wrap one micro-batch's forward and backward."""
        self._is_last_micro = is_last
        with self._sync_context(is_last), self._autocast():
            yield

    def _sync_context(self, is_last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def _autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    # Multiplies the loss before backward: engine.context_parallel K (build_engine sets it), since
    # a context group's K ranks each hold the gradient of their tokens' part of one sample and the
    # engines average over all ranks (models/context_parallel.py).
    grad_scale: float = 1.0

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def grad_norm(self) -> float:
        """Collective: the pre-clip global gradient norm, the same value on every rank.
        Call after the last micro-step's backward; ``step`` reuses it instead of recomputing."""

    @abstractmethod
    def step(self, lr: float) -> StepStats: ...

    @abstractmethod
    def skip_step(self, lr: float) -> StepStats:
        """Collective: discard this step's gradients without touching weights or optimizer
        state (every rank must call it together), leaving the engine ready for the next step."""

    @abstractmethod
    def local_param_numel(self) -> int:
        """Parameter elements stored on this rank (sharded engines hold about 1/world)."""

    def full_param_numel(self) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.unwrapped_parameters())

    def trainable_param_numel(self) -> int:
        """Elements of the parameters the optimizer updates (all but frozen ones, e.g. a LoRA base)."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.unwrapped_parameters() if p.requires_grad)

    @abstractmethod
    def unwrapped_parameters(self) -> list[nn.Parameter]: ...

    def local_param_shards(self, release_gathered: bool = False) -> list[LocalShard]:
        """This rank's part of each trainable parameter, as views into the engine's storage
        (no communication). Fresh views each call: engines may re-point storage after a step.

        ``release_gathered`` first drops any gathered whole copy of sharded parameters (FSDP2
        unsharded params, ZeRO-3 params kept for reuse), so that writes to the shards are what
        the next forward computes with."""
        raise NotImplementedError(f"engine {self.name!r} does not expose local parameter shards")

    @abstractmethod
    def save_state(self, path: Path) -> None:
        """Collective: write model + optimizer state under ``path`` (each rank its own part)."""

    def async_save_state(self, path: Path, process_group):
        """Like save_state but returns at once with a Future of the write (None = not supported);
        the state is copied in the background (``hold_until_staged``) before anything changes it."""
        return None

    @abstractmethod
    def load_state(self, path: Path) -> None:
        """Collective: read what ``save_state`` wrote (at this or, where supported, another world size)."""

    def eval_mode(self) -> contextlib.AbstractContextManager:
        """Context for inference forwards (sampling/validation): eval() + no_grad, restored after."""
        return _EvalMode(self.module)

    def prepare_frozen(self, module: nn.Module, units: list[nn.Module]) -> nn.Module:
        """Lay out a frozen module (no gradients, no optimizer state; e.g. a DPO reference model)
        the way this engine holds its trainable one; call the result under ``torch.no_grad()``.
        ``units`` is the family's parallel plan for ``module`` (``models.parallel_units``).
        Here: a whole copy on every rank in the input dtype (DDP, ZeRO-1/2, which replicate
        weights anyway). Sharding engines override this so the copy is sharded too."""
        return module.requires_grad_(False).eval().to(self.input_dtype)

    def close(self) -> None:
        """Drop references to wrapped modules and optimizer state before the process group goes."""
        self.wait_staged()
        for attr in ("module", "optimizer", "ds", "_shard_mesh"):
            if hasattr(self, attr):
                setattr(self, attr, None)


class _EvalMode(contextlib.AbstractContextManager):
    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.was_training = self.module.training
        self.module.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()

    def __exit__(self, *exc) -> None:
        self.no_grad.__exit__(*exc)
        self.module.train(self.was_training)


def build_adamw(params, optim_cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW over the trainable ones of ``params``: frozen weights (a LoRA base) get no
    optimizer state and no weight decay."""
    trainable = [p for p in params if p.requires_grad]
    # On GPUs the fused kernel (one launch for all tensors; DTensor shards included). Elsewhere
    # (CPU, FSDP2 offload) foreach=False keeps the CPU and DTensor paths identical across
    # engines (bit-comparable curves).
    on_gpu = bool(trainable) and all(p.device.type == "cuda" for p in trainable)
    return torch.optim.AdamW(
        trainable,
        lr=optim_cfg.lr,
        betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        **({"fused": True} if on_gpu else {"foreach": False}),
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def total_grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """Pre-clip global L2 grad norm (a DTensor under FSDP2; ``norm_value`` reduces it).
    With ``clip_with_norm`` this is exactly ``clip_grad_norm_`` split in two, so the health
    guard can look at the norm before deciding whether the optimizer steps."""
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def clip_with_norm(params: list[nn.Parameter], max_norm: float, norm: torch.Tensor) -> None:
    """Clip in place to ``max_norm`` (0 = off; the grads are then multiplied by 1.0, as before)."""
    torch.nn.utils.clip_grads_with_norm_(params, max_norm if max_norm > 0 else float("inf"), norm)


def norm_value(norm: torch.Tensor) -> float:
    if hasattr(norm, "full_tensor"):  # FSDP2: the norm is a DTensor reduced over the mesh
        norm = norm.full_tensor()
    return float(norm)


def lower_thread_priority(nice: int, counter: list[int] | None = None) -> None:
    """Give the calling thread niceness ``nice`` (Linux schedules threads one by one; a thread it
    starts inherits the value). Lowering needs no privilege; a failure leaves it as it was.
    ``counter[0]`` counts the threads it lowered."""
    import os

    if nice > 0 and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
            if counter is not None:
                counter[0] += 1
        except OSError:
            pass


def lower_new_threads(before: set[int], nice: int) -> int:
    """Lower the priority of this process's threads that were not in ``before`` (native ids):
    those a library just started for background work (DCP's stager and async-save executor,
    whose thread pools take no initializer from us). Returns how many were changed."""
    import os

    changed = 0
    if nice <= 0 or not hasattr(os, "setpriority"):
        return 0
    for t in threading.enumerate():
        if t.native_id is not None and t.native_id not in before:
            try:
                if os.getpriority(os.PRIO_PROCESS, t.native_id) < nice:
                    os.setpriority(os.PRIO_PROCESS, t.native_id, nice)
                    changed += 1
            except OSError:
                pass
    return changed
