"""The Diffusion-DPO loss (Wallace et al., 2023, "Diffusion Model Alignment Using Direct
Preference Optimization", Eq. 14) as pure tensor math.

For a pair (x_w chosen, x_l rejected) noised with the *same* noise and timestep, let
``mse(model, x)`` be the per-sample denoising error. Then

    model_diff = mse(θ, x_w) - mse(θ, x_l)
    ref_diff   = mse(ref, x_w) - mse(ref, x_l)
    z          = -β/2 · (model_diff - ref_diff)
    loss       = -log σ(z)

Lowering the policy's error on the chosen image relative to the reference (and raising it on
the rejected one) raises z. The paper's factor T·ω(λ_t) is folded into β with ω constant
(uniform timestep weighting, no Min-SNR), and the 1/2 is the authors' own training code
(SalesforceAIResearch/DiffusionDPO, ``-0.5 * beta_dpo``); diffusers' research example drops
the 1/2, so its ``beta_dpo`` equals this β/2. Per-sample errors are means over elements, so β
does not depend on the resolution; the authors use β = 5000 for SD1.5 and SDXL.

``z`` is the implicit reward margin: with r(x) = -β/2·(mse(θ, x) - mse(ref, x)) the implicit
reward of an image, z = r(x_w) - r(x_l). Implicit accuracy is the fraction of pairs with z > 0
(ties, e.g. every pair at step 0 when the policy equals the reference, count as one half).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from scaletrain.diffusion.base import Objective, TrainingBatch


@dataclass
class DPOTerms:
    loss: Tensor  # scalar, mean over pairs (what backward sees)
    margin: Tensor  # (B,) z = r(chosen) - r(rejected)
    reward_chosen: Tensor  # (B,) r(x_w)
    reward_rejected: Tensor  # (B,) r(x_l)

    def sums(self) -> list[float]:
        """[pairs, correct, margin, reward_chosen, reward_rejected] summed over this batch, for an
        all-reduce (so the logged accuracy and margin are over the global batch)."""
        m = self.margin.detach()
        correct = (m > 0).float().sum() + 0.5 * (m == 0).float().sum()
        return [float(m.numel()), float(correct), float(m.sum()), float(self.reward_chosen.sum()),
                float(self.reward_rejected.sum())]


def diffusion_dpo_loss(model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> DPOTerms:
    """Diffusion-DPO from per-sample errors (B,) of the policy and the frozen reference on the
    chosen (w) and rejected (l) images. Gradients flow through ``model_*`` only."""
    if not model_w.shape == model_l.shape == ref_w.shape == ref_l.shape:
        raise ValueError(f"per-sample errors must share one shape; got {tuple(model_w.shape)}, "
                         f"{tuple(model_l.shape)}, {tuple(ref_w.shape)}, {tuple(ref_l.shape)}")
    if beta <= 0:
        raise ValueError(f"dpo.beta={beta} must be > 0; the authors use 5000 for SD1.5/SDXL")
    ref_w, ref_l = ref_w.detach().float(), ref_l.detach().float()
    scale = -0.5 * beta
    reward_w = scale * (model_w.float() - ref_w)
    reward_l = scale * (model_l.float() - ref_l)
    margin = reward_w - reward_l  # = -β/2 · (model_diff - ref_diff)
    loss = -F.logsigmoid(margin).mean()
    return DPOTerms(loss=loss, margin=margin.detach(), reward_chosen=reward_w.detach(),
                    reward_rejected=reward_l.detach())


def prepare_pair_batch(
    x0_chosen: Tensor,
    x0_rejected: Tensor,
    keys: Sequence[str],
    *,
    step: int,
    seed: int,
    objective: Objective,
) -> TrainingBatch:
    """The objective's training batch for the 2B batch [chosen; rejected] (DDPM: epsilon/v
    targets; flow matching: velocities, as Flow-DPO). Pair i's two images get
    the same noise and timestep (the DPO comparison is between images, not noise draws), drawn
    from the generator keyed by (seed, step, pair key): the same on any rank layout."""
    if x0_chosen.shape != x0_rejected.shape or x0_chosen.shape[0] != len(keys):
        raise ValueError(f"chosen {tuple(x0_chosen.shape)} and rejected {tuple(x0_rejected.shape)} must match "
                         f"and hold one image per key ({len(keys)} keys)")
    keys = list(keys)
    # Each key appears twice; per_sample_generators seeds both rows alike, so they draw alike.
    return objective.training_batch(torch.cat([x0_chosen, x0_rejected]), keys + keys, step=step, seed=seed)
