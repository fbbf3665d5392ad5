"""The DDPM objective (scaletrain/diffusion/objectives/ddpm.py) checked against numbers derived
by hand (closed form)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scaletrain.diffusion import TrainingBatch, build_objective
from scaletrain.diffusion.objectives.ddpm import compute_snr, min_snr_weights, sample_noise, sample_timesteps
from scaletrain.diffusion.seeding import per_sample_generators

# Tiny linear schedule: betas 0.1, 0.2, 0.3, 0.4 -> alphas 0.9, 0.8, 0.7, 0.6
# -> alpha_bar = cumprod = 0.9, 0.72, 0.504, 0.3024.
ALPHA_BAR = [0.9, 0.72, 0.504, 0.3024]
# snr = ab / (1 - ab): 0.9/0.1, 0.72/0.28, 0.504/0.496, 0.3024/0.6976
SNR = [9.0, 18.0 / 7.0, 63.0 / 62.0, 0.3024 / 0.6976]


def _tiny(**overrides: object):
    fields = dict(num_train_timesteps=4, beta_schedule="linear", beta_start=0.1, beta_end=0.4)
    fields.update(overrides)
    return build_objective("ddpm", fields)


def _loss(objective, pred, target, t):
    return objective.loss(pred, TrainingBatch(noisy=target, timesteps=t, target=target, t=t))


def test_scheduler_alpha_bar_matches_hand_values() -> None:
    sched = _tiny().noise_scheduler
    torch.testing.assert_close(sched.alphas_cumprod, torch.tensor(ALPHA_BAR), rtol=1e-6, atol=1e-6)


def test_compute_snr_hand_values() -> None:
    t = torch.tensor([0, 1, 3])
    expected = torch.tensor([SNR[0], SNR[1], SNR[3]])
    torch.testing.assert_close(compute_snr(torch.tensor(ALPHA_BAR), t), expected)
    sched = _tiny().noise_scheduler
    torch.testing.assert_close(compute_snr(sched.alphas_cumprod, t), expected, rtol=1e-5, atol=1e-6)


def test_min_snr_weights_epsilon_and_v() -> None:
    snr = torch.tensor([0.5, 5.0, 20.0])
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.25]))
    torch.testing.assert_close(
        min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5.0 / 6.0, 5.0 / 21.0])
    )


def test_velocity_target_and_noisy_input_by_hand() -> None:
    x0 = torch.tensor([2.0, -1.0, 0.5, 3.0]).view(4, 1, 1, 1)
    keys = ["a", "b", "c", "d"]
    eps_batch = _tiny().training_batch(x0, keys, step=3, seed=0)
    v_batch = _tiny(prediction_type="v_prediction").training_batch(x0, keys, step=3, seed=0)
    eps, t = eps_batch.target, eps_batch.t  # an epsilon objective's target is the noise it drew
    assert torch.equal(v_batch.t, t) and torch.equal(v_batch.noisy, eps_batch.noisy)  # same draws
    ab = torch.tensor(ALPHA_BAR)[t].view(-1, 1, 1, 1)
    # v = sqrt(ab) * eps - sqrt(1 - ab) * x0 (Salimans & Ho 2022); x_t = sqrt(ab) x0 + sqrt(1 - ab) eps
    torch.testing.assert_close(v_batch.target, ab.sqrt() * eps - (1 - ab).sqrt() * x0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eps_batch.noisy, ab.sqrt() * x0 + (1 - ab).sqrt() * eps, rtol=1e-5, atol=1e-6)
    # the draws: the timestep first, then the noise, from each sample's own generator
    gens = per_sample_generators(0, 3, keys)
    assert t.tolist() == sample_timesteps(4, gens).tolist()
    torch.testing.assert_close(eps, sample_noise(x0.shape, noise_offset=0.0, generators=gens), rtol=0, atol=0)


def test_noise_offset_is_per_channel_constant() -> None:
    shape, offset = (2, 3, 4, 4), 0.1
    keys = ["a", "b"]
    plain = sample_noise(shape, noise_offset=0.0, generators=per_sample_generators(0, 0, keys))
    shifted = sample_noise(shape, noise_offset=offset, generators=per_sample_generators(0, 0, keys))
    # The offset N(0,1) per channel is drawn from each sample's generator right after its noise.
    expected_shift = []
    for gen in per_sample_generators(0, 0, keys):
        torch.randn(shape[1:], generator=gen)
        expected_shift.append(offset * torch.randn(shape[1], 1, 1, generator=gen))
    shift = shifted - plain
    torch.testing.assert_close(shift, torch.stack(expected_shift).expand(shape))
    # Constant within each channel, different across channels.
    assert torch.allclose(shift, shift[..., :1, :1].expand(shape))
    assert not torch.allclose(shift[0, 0], shift[0, 1])


def test_per_sample_generators_are_independent_of_batch_composition() -> None:
    shape = (3, 4, 8, 8)

    def noise(step: int, keys: list[str]) -> torch.Tensor:
        gens = per_sample_generators(7, step, keys)
        return sample_noise((len(keys), *shape[1:]), noise_offset=0.05, generators=gens)

    abc, ca = noise(11, ["a", "b", "c"]), noise(11, ["c", "a"])
    torch.testing.assert_close(ca[0], abc[2], rtol=0, atol=0)
    torch.testing.assert_close(ca[1], abc[0], rtol=0, atol=0)
    assert not torch.allclose(abc[0], abc[1])  # different keys differ
    assert not torch.allclose(abc, noise(12, ["a", "b", "c"]))  # different steps differ
    t1 = sample_timesteps(1000, per_sample_generators(7, 11, ["a", "b", "c"]))
    t2 = sample_timesteps(1000, per_sample_generators(7, 11, ["c", "b", "a"]))
    assert t1.tolist() == t2.flip(0).tolist()
    assert t1.dtype == torch.int64 and bool(((t1 >= 0) & (t1 < 1000)).all())


def test_training_batch_is_order_independent() -> None:
    objective = build_objective("ddpm", {"prediction_type": "v_prediction", "noise_offset": 0.1})
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    keys = ["img-0", "img-1", "img-2"]
    batch = objective.training_batch(x0, keys, step=5, seed=1)
    perm = [2, 0, 1]
    permuted = objective.training_batch(x0[perm], [keys[i] for i in perm], step=5, seed=1)
    torch.testing.assert_close(permuted.noisy, batch.noisy[perm])
    torch.testing.assert_close(permuted.timesteps, batch.timesteps[perm])
    torch.testing.assert_close(permuted.target, batch.target[perm])
    bf16 = objective.training_batch(x0.bfloat16(), keys, step=5, seed=1)
    assert bf16.noisy.dtype == bf16.target.dtype == torch.bfloat16


def test_loss_without_gamma_is_plain_mse() -> None:
    pred, target = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    t = torch.tensor([0, 1, 2, 3])
    loss, per_sample = _loss(_tiny(min_snr_gamma=None), pred, target, t)
    torch.testing.assert_close(loss, F.mse_loss(pred, target))
    assert per_sample.shape == (4,)
    loss0, _ = _loss(_tiny(min_snr_gamma=0.0), pred, target, t)
    torch.testing.assert_close(loss0, loss)


def test_loss_with_min_snr_hand_values() -> None:
    # pred - target = 1 everywhere -> per-sample MSE 1; weights eps gamma=5 at
    # t=0 (snr 9) -> 5/9, t=3 (snr 0.3024/0.6976 < 5) -> 1.
    pred, target = torch.ones(2, 1, 2, 2, dtype=torch.bfloat16), torch.zeros(2, 1, 2, 2)
    loss, per_sample = _loss(_tiny(min_snr_gamma=5.0), pred, target, torch.tensor([0, 3]))
    torch.testing.assert_close(per_sample, torch.tensor([5.0 / 9.0, 1.0]))
    torch.testing.assert_close(loss, torch.tensor((5.0 / 9.0 + 1.0) / 2.0))
    assert loss.dtype == torch.float32


def test_prediction_type_validation() -> None:
    expected = r"diffusion\.prediction_type='sample'.*epsilon.*v_prediction"
    with pytest.raises(ValueError, match=expected):
        build_objective("ddpm", {"prediction_type": "sample"})
    with pytest.raises(ValueError, match=r"prediction_type='x0' is not supported"):
        min_snr_weights(torch.ones(1), 5.0, "x0")
    with pytest.raises(ValueError, match=r"diffusion\.noise_offset"):
        build_objective("ddpm", {"noise_offset": -0.1})
