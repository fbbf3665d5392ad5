"""DeepSpeed engine: ZeRO stage 1/2/3 from ``ds_configs/*.json`` with trainer-owned values filled in.

Only the trainable denoiser goes into the DeepSpeed engine; frozen encoders stay outside as
plain modules (one engine per trainable model avoids the "several models under one
DeepSpeed engine" trap, accelerate#2974).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from scaletrain.engines.base import Engine, StepStats, build_adamw
from scaletrain.engines.ds_config import fill_deepspeed_config, load_deepspeed_json


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, denoiser: nn.Module, cfg, dist_info, micro_batch: int, grad_accum: int) -> None:
        super().__init__()
        import deepspeed

        self.cfg = cfg
        self.world_size = dist_info.world_size
        ds_cfg = fill_deepspeed_config(
            load_deepspeed_json(cfg.engine.deepspeed_config),
            cfg,
            micro_batch=micro_batch,
            grad_accum=grad_accum,
            world_size=dist_info.world_size,
        )
        self.zero_stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
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
        self.input_dtype = torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32
        self.configure_stage(micro_batch, grad_accum)

    def configure_stage(self, micro_batch: int, grad_accum: int) -> None:
        super().configure_stage(micro_batch, grad_accum)
        # Curriculum stages change the micro-batch and accumulation; DeepSpeed keeps them in
        # its config and scales the loss by 1/gradient_accumulation_steps in backward().
        self.ds.set_train_micro_batch_size(micro_batch)
        self.ds.set_train_batch_size(micro_batch * grad_accum * self.world_size)

    def _sync_context(self, is_last: bool) -> contextlib.AbstractContextManager:
        # We call ds.step() once per optimizer step, so tell DeepSpeed where the boundary is
        # (it then skips gradient reduction on the other micro-steps).
        self.ds.set_gradient_accumulation_boundary(is_last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self, lr: float) -> StepStats:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return StepStats(grad_norm=float("nan") if norm is None else float(norm), lr=lr)

    def local_param_numel(self) -> int:
        return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in self.ds.module.parameters())

    def full_param_numel(self) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.ds.module.parameters())

    def save_state(self, path: Path) -> None:
        # DeepSpeed's own format: each rank writes its ZeRO partition of parameters and
        # optimizer state. The trainer keeps its own counters, so no client_state here.
        self.ds.save_checkpoint(str(path), tag="zero", save_latest=False)

    def load_state(self, path: Path) -> None:
        """Same data-parallel size: DeepSpeed's ZeRO loader. Another size: ZeRO partitions do not
        reshard, so the checkpoint is converted once to DeepSpeed's universal format (rank 0,
        kept beside it as ``zero_universal``) and loaded with ``load_universal``. Every
        ``torch.load`` inside runs weights-only (see checkpoint.safe_load)."""
        import torch.distributed as dist

        from scaletrain.checkpoint.safe_load import (convert_to_universal, weights_only_torch_load,
                                                     zero_dp_world_size)

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
                raise RuntimeError(errors[0])
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

    def close(self) -> None:
        if getattr(self, "ds", None) is not None:
            self.ds.destroy()
        super().close()
