"""Diffusion-DPO post-training: the pre-training loop with a preference objective.

``DPOTrainer`` overrides four of the Trainer's hooks: ``build_batches`` (preference-pair
shards, ``data.pairs``), ``forward_backward_step`` (the DPO loss, ``diffusion.dpo``),
``objective_local_sums`` and ``objective_metrics`` (implicit accuracy and reward margin over
the global batch; the sums ride the trainer's one all-reduce a step). Engines,
checkpoints, health guard, EMA and launchers are the pre-training ones.

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
from scaletrain.data.pipeline import LoaderSpec, expand_shards
from scaletrain.diffusion.dpo import diffusion_dpo_loss, prepare_pair_batch
from scaletrain.distributed import DistInfo
from scaletrain.models import parallel_units
from scaletrain.models.lora import adapters_disabled
from scaletrain.models.registry import Denoiser, build_denoiser_net, get_preset
from scaletrain.train.health import poison
from scaletrain.train.trainer import Trainer

# Per pair: two trained images (forward + backward, ~3 forward FLOPs each) and two reference
# forwards (1 each) = 8 forward units, i.e. 8/3 of a pre-training image.
_FLOPS_PER_PAIR_IN_IMAGES = 8 / 3


def build_start_denoiser(cfg: RunConfig) -> tuple[Denoiser, str]:
    """The denoiser the policy started from, rebuilt: same preset and seed (Trainer seeds torch,
    then builds the denoiser first), then the ``init`` weights. Also on resume, where the policy
    comes from the run's own checkpoint: the reference stays the start weights, so the init
    source must still exist. The global RNG is left as it was."""
    preset = get_preset(cfg.model.preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        denoiser = Denoiser(build_denoiser_net(preset), preset.family, use_text_mask=preset.text_encoder.use_mask)
    if cfg.init.source is None:
        return denoiser, f"random init (run.seed={cfg.run.seed})"
    if not Path(cfg.init.source).exists():
        key = "init.from_checkpoint" if cfg.init.from_checkpoint else "init.from_diffusers"
        raise ValueError(f"{key}={cfg.init.source!r} does not exist; DPO rebuilds its frozen reference from "
                         "the start weights on every launch, so keep them until the run has finished")
    return denoiser, load_init_weights(denoiser, cfg.init, cfg.model.preset).removeprefix("init: ")


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


class DPOTrainer(Trainer):
    def __init__(self, cfg: RunConfig, dist_info: DistInfo) -> None:
        if cfg.dpo is None:  # the dumped config.yaml then shows the beta that ran
            cfg = cfg.model_copy(update={"dpo": DPOSection()})
        check_dpo_data(cfg)
        super().__init__(cfg, dist_info)
        self.dpo = cfg.dpo
        # The paper's timestep weighting ω(λ_t) is constant (as in both reference codes): plain
        # per-sample MSE of the prediction target, no Min-SNR weights inside the preference loss.
        self.reference, self.reference_kind = self.build_reference()
        self.reference_local_numel = stored_numel(self.reference) if isinstance(self.reference, nn.Module) else 0
        self._sums = [0.0] * 5  # DPOTerms.sums() accumulated over this step's micro-batches
        self.logger.event(f"dpo: beta={self.dpo.beta:g}, reference = {self.reference_kind}, "
                          f"{self.reference_local_numel / 1e6:.2f}M params stored on rank 0")

    def build_reference(self) -> tuple[Callable[..., Tensor], str]:
        if self.cfg.lora.enabled:  # the base weights are frozen start weights already
            module = self.engine.module

            def base_forward(*args: Tensor) -> Tensor:
                with adapters_disabled(module):
                    return module(*args)

            return base_forward, "the policy with its LoRA adapters disabled"
        ref, source = build_start_denoiser(self.cfg)
        frozen = self.engine.prepare_frozen(ref.to(self.device), parallel_units(ref))
        return frozen, f"frozen start weights ({source}), laid out by the {self.engine.name} engine"

    # ------------------------------------------------------------------ hooks

    def build_batches(self, resolution: int, micro_batch: int, skip: int = 0) -> Iterator[dict]:
        d, eff = self.cfg.data, self.cfg.stage_data(self.stage_index)
        spec = LoaderSpec(
            shards=expand_shards(eff.shards), filters=eff.filters, resolution=resolution, micro_batch=micro_batch,
            caption_dropout=d.caption_dropout, num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer,
            seed=self.cfg.run.seed, split=d.split, rank=self.dist.rank, world_size=self.dist.world_size,
            skip_batches=skip,
        )
        return iter(build_pair_loader(spec))

    def _errors(self, pred: Tensor, tb) -> Tensor:
        # The DPO reward compares plain per-sample errors (no SNR or flow weighting), on the
        # objective's own target: noise / v for DDPM, the velocity for flow matching.
        return self.objective.errors(pred.float(), tb)

    def forward_backward_step(self, batch: dict, *, is_last: bool) -> float:
        """One micro-batch of pairs: chosen and rejected go through one forward as a 2B batch,
        noised with the same noise and timestep per pair (the generator is keyed by the pair's
        key and the step, so it is the same on any rank layout)."""
        keys = list(batch["keys"])
        n = len(keys)
        pixels = torch.cat([batch["pixels_chosen"], batch["pixels_rejected"]]).to(self.device)
        x0 = self.model.encode_images(pixels)  # one VAE pass for both sides
        emb, mask = self.model.encode_text(batch["captions"], self.device)
        emb, mask = emb.repeat(2, 1, 1), mask.repeat(2, 1)
        tb = prepare_pair_batch(x0[:n], x0[n:], keys, step=self.step, seed=self.cfg.run.seed,
                                objective=self.objective)
        dtype = self.engine.input_dtype
        inputs = (tb.noisy.to(dtype), tb.timesteps, emb.to(dtype), mask)
        with self.engine.micro_step(is_last=is_last):
            with torch.no_grad():  # reference first: ZeRO-3 and FSDP2 then see forward, backward in order
                ref_err = self._errors(self.reference(*inputs), tb)
            err = self._errors(self.engine.module(*inputs), tb)
            terms = diffusion_dpo_loss(err[:n], err[n:], ref_err[:n], ref_err[n:], self.dpo.beta)
            loss = terms.loss
            if self.health.inject_nan(self.attempt + 1, self.dist.rank):  # test hook, one rank only
                loss = poison(loss)
            self.engine.backward(loss)
        self._sums = [a + b for a, b in zip(self._sums, terms.sums())]
        return float(loss.detach())

    def objective_local_sums(self) -> list[float]:
        sums, self._sums = self._sums, [0.0] * 5
        return sums

    def objective_metrics(self, sums: list[float]) -> dict:
        pairs, correct, margin, chosen, rejected = sums
        return {"dpo_accuracy": correct / pairs, "dpo_reward_margin": margin / pairs,
                "dpo_reward_chosen": chosen / pairs, "dpo_reward_rejected": rejected / pairs}

    def throughput_metrics(self, resolution: int, images_per_second: float) -> dict:
        # images_per_second counts pairs here; FLOPs follow the forwards and backwards run per pair.
        return super().throughput_metrics(resolution, images_per_second * _FLOPS_PER_PAIR_IN_IMAGES)

    def summary(self) -> dict:
        return {**super().summary(), "dpo_beta": self.dpo.beta, "reference": self.reference_kind,
                "reference_params_local_rank0": self.reference_local_numel}

    def close(self) -> None:
        self.reference = None  # a sharded copy holds DTensors on the mesh (DeepSpeed's: engine.close)
        super().close()
