"""Diffusion-DPO post-training: the pre-training loop with a preference loss and pair batches.

DPO is two pieces handed to the unchanged ``Trainer`` (``dpo_recipe``): ``PreferenceLoss``, a
``TrainingLoss`` (train/step.py) that runs the DPO loss of ``diffusion.dpo`` on the stage's
objective (DDPM errors, or velocity errors as Flow-DPO) and keeps implicit accuracy and reward
margin as sums that ride the trainer's one all-reduce a step; and ``pair_batches``, the batch
builder over preference-pair shards (``data.pairs``). Engines, checkpoints, health guard, EMA,
stages and launchers are the pre-training ones.

The frozen reference is the start weights, never the resumed ones:
- full-parameter DPO: the denoiser is rebuilt from the same seed (and ``init`` weights) and
  handed to ``engine.prepare_frozen``, which shards it like the policy (FSDP2 units on the
  same mesh; a ZeRO-3 engine without optimizer; a replicated copy under DDP and ZeRO-1/2);
- LoRA-DPO: the policy's own forward with its adapters switched off (no second copy).
It is not checkpointed: a resumed run rebuilds it from the same source.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from scaletrain.config import DPOSection, RunConfig
from scaletrain.data.pairs import build_pair_loader
from scaletrain.checkpoint.init import load_init_weights
from scaletrain.common.tars import expand_shards
from scaletrain.data.pipeline import LoaderSpec
from scaletrain.data.samples import image_formats
from scaletrain.diffusion.dpo import diffusion_dpo_loss, prepare_pair_batch
from scaletrain.models import parallel_units
from scaletrain.models.lora import adapters_disabled
from scaletrain.models.registry import Denoiser, build_denoiser, get_preset
from scaletrain.diffusion.base import Objective
from scaletrain.train.step import BatchRequest, LossContext, TrainingLoss, cast_cond


def build_start_denoiser(cfg: RunConfig) -> tuple[Denoiser, str]:
    """The denoiser the policy started from, rebuilt: same preset and seed, then the ``init`` weights. Also on resume, where the policy
    comes from the run's own checkpoint: the reference stays the start weights, so the init
    source must still exist. The global RNG is left as it was."""
    # models/meta_init.py: the policy's init depends on (run.seed, module names) only
    denoiser = build_denoiser(get_preset(cfg.model.preset), seed=cfg.run.seed)
    if cfg.init.source is None:
        return denoiser, f"random init (run.seed={cfg.run.seed})"
    if not Path(cfg.init.source).exists():
        key = "init.from_checkpoint" if cfg.init.from_checkpoint else "init.from_diffusers"
        raise ValueError(f"{key}={cfg.init.source!r} does not exist; DPO rebuilds its frozen reference from "
                         "the start weights on every launch, so keep them until the run has finished")
    return denoiser, load_init_weights(denoiser, cfg.init, cfg.model.preset).removeprefix("init: ")


def dpo_recipe(cfg: RunConfig) -> RunConfig:
    """The recipe DPO runs: ``dpo`` filled with its defaults when absent (so the run's
    config.yaml shows the beta that ran), after ``check_dpo_data``."""
    check_dpo_data(cfg)
    return cfg if cfg.dpo is not None else cfg.model_copy(update={"dpo": DPOSection()})


def check_dpo_data(cfg: RunConfig) -> None:
    """Preference pairs come from data.shards (with data.filters); refuse what the pair loader
    does not do, rather than ignore it."""
    if cfg.data.buckets.enabled:
        raise ValueError("data.buckets.enabled=true: DPO pairs are square crops; set data.buckets.enabled=false")
    for i in range(len(cfg.train.stages)):
        eff = cfg.stage_data(i)
        if eff.sources or eff.balance is not None:
            key = "sources" if eff.sources else "balance"
            raise ValueError(f"data.{key} (stage {i}) is not supported for DPO preference pairs; "
                             "list the pair shards in data.shards")


def stored_numel(module: nn.Module) -> int:
    """Parameter elements this rank stores: its FSDP2 shard (DTensor local part), its ZeRO-3
    partition (``ds_tensor``), or the whole parameter."""
    total = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):
            total += p.ds_tensor.numel()
        else:
            total += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return total


def pair_batches(req: BatchRequest) -> Iterator[dict]:
    """The batch builder of a DPO run: the stage's preference-pair shards through the
    pipeline's own split, filters and skip (resume replays ``skip`` micro-batches)."""
    d, eff = req.cfg.data, req.cfg.stage_data(req.stage_index)
    spec = LoaderSpec(
        shards=expand_shards(eff.shards), filters=eff.filters, resolution=req.resolution,
        micro_batch=req.micro_batch, caption_dropout=d.caption_dropout, num_workers=d.num_workers,
        shuffle_buffer=d.shuffle_buffer, seed=req.cfg.run.seed, split=d.split, rank=req.rank,
        world_size=req.world_size, skip_batches=req.skip, image_formats=image_formats(d.image_formats),
    )
    return iter(build_pair_loader(spec))


def build_reference(ctx: LossContext) -> tuple[Callable[..., Tensor], str]:
    """The frozen reference: the policy with its adapters off (LoRA-DPO), else the start weights
    rebuilt and laid out by the engine like the policy (``engine.prepare_frozen``)."""
    if ctx.cfg.lora.enabled:  # the base weights are frozen start weights already
        module = ctx.engine.module

        def base_forward(*args: Tensor) -> Tensor:
            with adapters_disabled(module):
                return module(*args)

        return base_forward, "the policy with its LoRA adapters disabled"
    ref, source = build_start_denoiser(ctx.cfg)
    frozen = ctx.engine.prepare_frozen(ref.to(ctx.device), parallel_units(ref))
    return frozen, f"frozen start weights ({source}), laid out by the {ctx.engine.name} engine"


class PreferenceLoss(TrainingLoss):
    """Diffusion-DPO on a pair micro-batch, under whichever objective the stage trains.

    The paper's timestep weighting ω(λ_t) is constant (as in both reference codes): the reward
    compares plain per-sample errors of the objective's own target (noise / v for DDPM, the
    velocity for flow matching), no Min-SNR or flow weights inside the preference loss."""

    name = "diffusion-dpo"
    # Per pair: two trained images (forward + backward, ~3 forward FLOPs each) and two reference
    # forwards (1 each) = 8 forward units, i.e. 8/3 of a pre-training image.
    images_per_sample = 8 / 3

    def __init__(self, ctx: LossContext) -> None:
        if ctx.cfg.dpo is None:
            raise ValueError("PreferenceLoss needs the recipe's dpo section (dpo_recipe fills it)")
        self.beta = ctx.cfg.dpo.beta
        self.model, self.device = ctx.model, ctx.device
        self.reference, self.reference_kind = build_reference(ctx)
        self.reference_local_numel = stored_numel(self.reference) if isinstance(self.reference, nn.Module) else 0
        self._sums = [0.0] * 5  # DPOTerms.sums() accumulated over this step's micro-batches

    def describe(self) -> str:
        return (f"dpo: beta={self.beta:g}, reference = {self.reference_kind}, "
                f"{self.reference_local_numel / 1e6:.2f}M params stored on rank 0")

    def __call__(self, engine, objective: Objective, batch: dict, *, step: int, seed: int, is_last: bool,
                 on_loss: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """One micro-batch of pairs: chosen and rejected go through one forward as a 2B batch,
        noised with the same noise and timestep per pair (the generator is keyed by the pair's
        key and the step, so it is the same on any rank layout)."""
        keys = list(batch["keys"])
        n = len(keys)
        pixels = torch.cat([batch["pixels_chosen"], batch["pixels_rejected"]]).to(self.device)
        x0 = self.model.encode_images(pixels)  # one VAE pass for both sides
        cond = self.model.encode_text(batch["captions"], self.device)
        cond = {k: torch.cat([v, v]) for k, v in cond.items()}  # the same caption for both sides
        tb = prepare_pair_batch(x0[:n], x0[n:], keys, step=step, seed=seed, objective=objective)
        dtype = engine.input_dtype
        inputs = (tb.noisy.to(dtype), tb.timesteps, cast_cond(cond, dtype))
        with engine.micro_step(is_last=is_last):
            with torch.no_grad():  # reference first: ZeRO-3 and FSDP2 then see forward, backward in order
                ref_err = objective.errors(self.reference(*inputs).float(), tb)
            err = objective.errors(engine.module(*inputs).float(), tb)
            terms = diffusion_dpo_loss(err[:n], err[n:], ref_err[:n], ref_err[n:], self.beta)
            loss = terms.loss if on_loss is None else on_loss(terms.loss)
            engine.backward(loss)
        self._sums = [a + b for a, b in zip(self._sums, terms.sums())]
        return loss.detach()

    def local_sums(self) -> list[float]:
        sums, self._sums = self._sums, [0.0] * 5
        return sums

    def metrics(self, sums: list[float]) -> dict:
        pairs, correct, margin, chosen, rejected = sums
        return {"dpo_accuracy": correct / pairs, "dpo_reward_margin": margin / pairs,
                "dpo_reward_chosen": chosen / pairs, "dpo_reward_rejected": rejected / pairs}

    def summary(self) -> dict:
        return {"dpo_beta": self.beta, "reference": self.reference_kind,
                "reference_params_local_rank0": self.reference_local_numel}

    def close(self) -> None:
        self.reference = None  # a sharded copy holds DTensors on the mesh (DeepSpeed's: engine.close)
