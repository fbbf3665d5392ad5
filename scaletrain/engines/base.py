"""The one engine protocol the trainer talks to.

The loop is always::

    engine.configure_stage(micro_batch, grad_accum)        # at each curriculum stage
    for i in range(grad_accum):
        with engine.micro_step(is_last=i == grad_accum - 1):
            loss = objective(engine.module(*inputs))
            engine.backward(loss)                           # raw micro-batch loss
    stats = engine.step(lr)                                 # clip, optimizer step, zero grads

and never asks which engine it has. Each engine scales the micro loss by 1/grad_accum (or
lets DeepSpeed do it), skips gradient synchronisation on non-final micro-steps, and returns
the pre-clip global gradient norm.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn


@dataclass
class StepStats:
    grad_norm: float
    lr: float


class Engine(ABC):
    """Owns the wrapped trainable module and its optimizer."""

    name: str = "base"
    module: nn.Module  # call this for the forward pass
    input_dtype: torch.dtype = torch.float32  # dtype the wrapped module expects for float inputs

    def __init__(self) -> None:
        self.grad_accum = 1
        self.micro_batch = 1
        self._is_last_micro = True

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

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self, lr: float) -> StepStats: ...

    @abstractmethod
    def local_param_numel(self) -> int:
        """Parameter elements stored on this rank (sharded engines hold about 1/world)."""

    def full_param_numel(self) -> int:
        return sum(p.numel() for p in self.unwrapped_parameters())

    @abstractmethod
    def unwrapped_parameters(self) -> list[nn.Parameter]: ...

    @abstractmethod
    def save_state(self, path: Path) -> None:
        """Collective: write model + optimizer state under ``path`` (each rank its own part)."""

    def async_save_state(self, path: Path, process_group):
        """Like save_state but returns a Future once the state is staged; None = not supported."""
        return None

    @abstractmethod
    def load_state(self, path: Path) -> None:
        """Collective: read what ``save_state`` wrote (at this or, where supported, another world size)."""

    def eval_mode(self) -> contextlib.AbstractContextManager:
        """Context for inference forwards (sampling/validation): eval() + no_grad, restored after."""
        return _EvalMode(self.module)

    def close(self) -> None:
        """Drop references to wrapped modules and optimizer state before the process group goes."""
        for attr in ("module", "optimizer", "ds"):
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


def build_adamw(params, optim_cfg) -> torch.optim.AdamW:
    # foreach=False keeps CPU and DTensor paths identical across engines (bit-comparable curves).
    return torch.optim.AdamW(
        params,
        lr=optim_cfg.lr,
        betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        foreach=False,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_and_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Pre-clip global grad norm; clips in place when max_norm > 0. Works on DTensor grads."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: the norm is a DTensor reduced over the mesh
        norm = norm.full_tensor()
    return float(norm)
