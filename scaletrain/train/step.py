"""One training step's diffusion math, shared by the trainer and the benchmark cell.

``model_inputs`` turns a loader batch into (x0 in the denoiser's space, text embedding, mask):
the precomputed posterior and text outputs when the batch has them, else the frozen encoders;
a latent preset draws its posterior sample from per-key generators on both paths, so the two
paths give the same x0. ``forward_backward`` is one micro-batch: the objective's training
batch, the engine's forward inside ``micro_step``, the objective's loss, ``engine.backward``.
The trainer adds its health-guard hooks through ``on_loss``, the bench cell its phase timers
through ``mark``; neither re-implements the step. (``examples/reference_loop.py`` is the
hand-written baseline the trainer is tested against, so it shares none of this on purpose.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from scaletrain.diffusion.base import Objective
from scaletrain.diffusion.objective import posterior_generators


def model_inputs(model, batch: dict, device: torch.device, *, seed: int, step: int,
                 scaling: tuple[float, float] | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(x0, text emb, text mask), float32 on ``device``. ``model`` is a ``models.DiffusionModel``;
    ``scaling`` is the precomputed shards' (scaling_factor, shift_factor)."""
    gens = posterior_generators(seed, step, batch["keys"]) if model.preset.latent else None
    if "latents" in batch:
        mean, logvar = batch["latents"].to(device, non_blocking=True).chunk(2, dim=1)
        x0 = model.latents_from_posterior(mean, logvar, gens, scaling=scaling)
        emb = batch["text_emb"].to(device, non_blocking=True).float()
        return x0, emb, batch["text_mask"].to(device, non_blocking=True)
    x0 = model.encode_images(batch["pixels"].to(device, non_blocking=True), gens)
    emb, mask = model.encode_text(batch["captions"], device)
    return x0, emb, mask


def forward_backward(engine, objective: Objective, x0: Tensor, emb: Tensor, mask: Tensor | None,
                     keys: Sequence[str], *, step: int, seed: int, is_last: bool,
                     on_loss: Callable[[Tensor], Tensor] | None = None,
                     mark: Callable[[str], None] | None = None) -> Tensor:
    """One micro-batch through ``engine`` (an ``engines.Engine``); returns the loss, detached
    (0-dim, no host sync). ``on_loss`` may replace the loss before backward (test hooks);
    ``mark(phase)`` is called after "encode", "forward" and "backward"."""
    tb = objective.training_batch(x0, keys, step=step, seed=seed)
    if mark:
        mark("encode")
    dtype = engine.input_dtype
    with engine.micro_step(is_last=is_last):
        pred = engine.module(tb.noisy.to(dtype), tb.timesteps, emb.to(dtype), mask)
        loss, _ = objective.loss(pred.float(), tb)
        if on_loss is not None:
            loss = on_loss(loss)
        if mark:
            mark("forward")
        engine.backward(loss)
        if mark:
            mark("backward")
    return loss.detach()
