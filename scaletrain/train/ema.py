"""Sharded EMA: an exponential moving average of the weights that lives beside the parameter
shards and costs no communication per step.

Each rank averages only its own part of each parameter, as the engine stores it
(``Engine.local_param_shards``): FSDP2's local DTensor shards, DeepSpeed ZeRO-3's flat
partitions, or, for engines that replicate parameters (DDP, ZeRO-1/2), a dim-0 chunk of each
parameter. The averages are fp32 DTensors with the parameter's layout, so

- the update is one in-place ``lerp`` per tensor, no collective (the EMA under ZeRO-3/FSDP
  that is gathered every step, or never updated, is what users of other tools report:
  DeepSpeed#2056, diffusers#5783);
- each rank holds about 1/world of the EMA on every engine;
- DCP writes each rank's part and reshards it on load (another world size or engine);
- the full weights are gathered only when asked: ``swapped()`` for validation/sampling,
  ``full_state_dict()`` for export.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, distribute_tensor

from scaletrain.config import EMASection
from scaletrain.engines.base import Engine


def ema_decay(num_updates: int, decay: float, warmup: str = "ratio", power: float = 2 / 3) -> float:
    """Decay for the update after ``num_updates`` earlier ones.

    Early weights are far from where training goes, so a fixed high decay would keep the
    EMA near the random init for ~1/(1-decay) steps. Warm-up caps the decay while few
    updates have been made (both schedules are diffusers ``EMAModel``'s):

    - ``ratio``: min(decay, (1+n)/(10+n)), diffusers' default;
    - ``power``: min(decay, 1-(1+n)^-power), diffusers' ``use_ema_warmup`` with inv_gamma=1
      (power 2/3 reaches 0.999 at ~31k updates, 3/4 at ~10k; Karras et al.);
    - ``none``: the constant ``decay``.
    """
    if warmup == "none":
        return decay
    if warmup == "ratio":
        return min(decay, (1 + num_updates) / (10 + num_updates))
    if warmup == "power":
        return min(decay, 1 - (1 + num_updates) ** -power)
    raise ValueError(f"ema.warmup={warmup!r} is unknown; use ratio, power or none")


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


class ShardedEMA:
    """EMA of an engine's trainable parameters, one fp32 DTensor per parameter.

    ``update`` after each optimizer step; ``state_dict``/``save``/``load`` for checkpoints.
    """

    def __init__(self, engine: Engine, decay: float, *, warmup: str = "ratio", power: float = 2 / 3,
                 update_every: int = 1) -> None:
        ema_decay(0, decay, warmup, power)  # reject an unknown warm-up now, not at step 1
        self.engine, self.decay, self.warmup, self.power = engine, decay, warmup, power
        self.update_every = update_every
        self.num_updates = 0
        self.averages: dict[str, DTensor] = {}
        self.shapes: dict[str, torch.Size] = {}  # the parameters' own shapes, for full_state_dict
        for s in engine.local_param_shards():
            src = s.master if s.master is not None else s.local
            local = src.detach().to(torch.float32, copy=True)  # fp32 even when training in bf16
            # shape/stride given: uneven shards need no collective to find the global size.
            self.averages[s.name] = DTensor.from_local(
                local, s.mesh, s.placements, run_check=False,
                shape=s.global_shape, stride=_contiguous_stride(s.global_shape))
            self.shapes[s.name] = s.shape

    # ------------------------------------------------------------------ training

    def current_decay(self) -> float:
        return ema_decay(self.num_updates, self.decay, self.warmup, self.power)

    @torch.no_grad()
    def update(self) -> None:
        """ema <- d*ema + (1-d)*param on this rank's shards; no communication."""
        d = self.current_decay()
        shards = self.engine.local_param_shards()
        emas = [self.averages[s.name].to_local() for s in shards]
        srcs = [(s.master if s.master is not None else s.local).to(torch.float32) for s in shards]
        # One fused multi-tensor lerp, as torch.optim.swa_utils' EMA does; lerp(x, w) = x + w(y - x).
        torch._foreach_lerp_(emas, srcs, 1.0 - d)
        self.num_updates += 1

    def maybe_update(self, step: int) -> bool:
        """Update after global optimizer step ``step`` (1-based) when it is an update step."""
        if step % self.update_every:
            return False
        self.update()
        return True

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the current weights (a checkpoint written without an EMA)."""
        for s in self.engine.local_param_shards():
            src = s.master if s.master is not None else s.local
            self.averages[s.name].to_local().copy_(src)
        self.num_updates = 0

    # ------------------------------------------------------------------ using the weights

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Collective context: ``engine.module`` computes with the EMA weights inside it.

        Each rank writes its EMA shard into its parameter shard (and, where the parameter is
        also held whole, the gathered EMA into the whole copy), then restores the training
        weights on exit. The optimizer's state is not touched.
        """
        backups: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for s in self.engine.local_param_shards(release_gathered=True):
                    ema = self.averages[s.name]
                    backups.append((s.local, s.local.clone()))
                    s.local.copy_(ema.to_local())
                    if s.full is not None:
                        backups.append((s.full, s.full.clone()))
                        s.full.copy_(ema.full_tensor().view(s.full.shape))
            yield
        finally:
            with torch.no_grad():
                for dst, saved in reversed(backups):
                    dst.copy_(saved)
            self.engine.local_param_shards(release_gathered=True)  # drop gathered copies of the EMA weights

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the whole EMA, keyed and shaped like the denoiser's parameters (every
        rank gets it; for export, call on all ranks and keep rank 0's)."""
        return {name: ema.full_tensor().reshape(self.shapes[name]) for name, ema in self.averages.items()}

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"params": dict(self.averages), "num_updates": torch.tensor(self.num_updates)}

    def save(self, path: Path) -> None:
        """Collective: each rank writes its shards with DCP (each file hashed as it is written,
        for the checkpoint's checksums)."""
        from scaletrain.common.hashed_io import HashingFileSystemWriter

        dcp.save(self.state_dict(), storage_writer=HashingFileSystemWriter(str(path)))

    def load(self, path: Path | None) -> None:
        """Collective: read what ``save`` wrote, at any world size and from any engine.

        ``None`` means the checkpoint has no EMA (written before it was enabled): the average
        restarts from the weights just loaded. Where the saved layout differs from this
        engine's (FSDP2/DDP keep parameter shapes, ZeRO-3 flat partitions), the whole
        tensor is read and this rank keeps its part.
        """
        if path is None:
            self.reset()
            return
        from scaletrain.common.safe_load import SafeFileSystemReader, load_dcp

        reader = SafeFileSystemReader(str(path))
        saved = reader.read_metadata().state_dict_metadata  # a refusal: the same file on every rank
        state: dict = {"params": {}, "num_updates": torch.tensor(0)}
        mismatched = {}
        for name, ema in self.averages.items():
            key = f"params.{name}"
            if key not in saved:
                raise ValueError(f"{path}: the saved EMA has no {name!r}; was it written for another model?")
            size = torch.Size(saved[key].size)
            if size == ema.shape:
                state["params"][name] = ema  # DCP fills the local shard in place, resharding
            elif size.numel() == ema.shape.numel():
                state["params"][name] = mismatched[name] = torch.empty(size, dtype=torch.float32)
            else:
                raise ValueError(f"{path}: saved EMA {name!r} has shape {tuple(size)}, the model {tuple(ema.shape)}")
        load_dcp(state, path, reader)
        with torch.no_grad():
            for name, full in mismatched.items():
                ema = self.averages[name]
                # src_data_rank=None: each rank cuts its own part, no scatter.
                full = full.reshape(ema.shape).to(ema.device)
                part = distribute_tensor(full, ema.device_mesh, ema.placements, src_data_rank=None)
                ema.to_local().copy_(part.to_local())
        self.num_updates = int(state["num_updates"])


def build_ema(engine: Engine, ema_cfg: EMASection) -> ShardedEMA | None:
    """The run's EMA from the ``ema`` config section; None when disabled."""
    if not ema_cfg.enabled:
        return None
    return ShardedEMA(engine, ema_cfg.decay, warmup=ema_cfg.warmup, power=ema_cfg.power,
                      update_every=ema_cfg.update_every)
