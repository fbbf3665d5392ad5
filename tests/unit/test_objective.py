"""The diffusion objective checked against numbers derived by hand (closed form)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scaletrain.diffusion.objective import (
    ObjectiveConfig,
    add_noise,
    build_noise_scheduler,
    compute_snr,
    diffusion_loss,
    min_snr_weights,
    per_sample_generators,
    prepare_training_batch,
    sample_noise,
    sample_timesteps,
    training_target,
)

# Tiny linear schedule: betas 0.1, 0.2, 0.3, 0.4 -> alphas 0.9, 0.8, 0.7, 0.6
# -> alpha_bar = cumprod = 0.9, 0.72, 0.504, 0.3024.
ALPHA_BAR = [0.9, 0.72, 0.504, 0.3024]
# snr = ab / (1 - ab): 0.9/0.1, 0.72/0.28, 0.504/0.496, 0.3024/0.6976
SNR = [9.0, 18.0 / 7.0, 63.0 / 62.0, 0.3024 / 0.6976]


def _tiny_cfg(**overrides: object) -> ObjectiveConfig:
    fields = dict(num_train_timesteps=4, beta_schedule="linear", beta_start=0.1, beta_end=0.4)
    fields.update(overrides)
    return ObjectiveConfig(**fields)


def test_scheduler_alpha_bar_matches_hand_values() -> None:
    sched = build_noise_scheduler(_tiny_cfg())
    torch.testing.assert_close(sched.alphas_cumprod, torch.tensor(ALPHA_BAR), rtol=1e-6, atol=1e-6)


def test_compute_snr_hand_values() -> None:
    t = torch.tensor([0, 1, 3])
    expected = torch.tensor([SNR[0], SNR[1], SNR[3]])
    torch.testing.assert_close(compute_snr(torch.tensor(ALPHA_BAR), t), expected)
    sched = build_noise_scheduler(_tiny_cfg())
    torch.testing.assert_close(compute_snr(sched.alphas_cumprod, t), expected, rtol=1e-5, atol=1e-6)


def test_min_snr_weights_epsilon_and_v() -> None:
    snr = torch.tensor([0.5, 5.0, 20.0])
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.25]))
    torch.testing.assert_close(
        min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5.0 / 6.0, 5.0 / 21.0])
    )


def test_velocity_target_and_noisy_input_one_element() -> None:
    sched = build_noise_scheduler(_tiny_cfg(prediction_type="v_prediction"))
    x0, eps, t = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), 1.0), torch.tensor([1])
    # alpha_bar_1 = 0.72: v = sqrt(0.72) * eps - sqrt(0.28) * x0 (Salimans & Ho 2022)
    v = training_target(sched, x0, eps, t, "v_prediction")
    assert v.item() == pytest.approx(math.sqrt(0.72) * 1.0 - math.sqrt(0.28) * 2.0, rel=1e-5)
    noisy = add_noise(sched, x0, eps, t)
    assert noisy.item() == pytest.approx(math.sqrt(0.72) * 2.0 + math.sqrt(0.28) * 1.0, rel=1e-5)
    assert training_target(sched, x0, eps, t, "epsilon") is eps


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


def test_prepare_training_batch_is_order_independent() -> None:
    cfg = ObjectiveConfig(prediction_type="v_prediction", noise_offset=0.1)
    sched = build_noise_scheduler(cfg)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    keys = ["img-0", "img-1", "img-2"]
    noisy, t, target = prepare_training_batch(x0, keys, step=5, seed=1, scheduler=sched, cfg=cfg)
    perm = [2, 0, 1]
    noisy_p, t_p, target_p = prepare_training_batch(
        x0[perm], [keys[i] for i in perm], step=5, seed=1, scheduler=sched, cfg=cfg
    )
    torch.testing.assert_close(noisy_p, noisy[perm])
    torch.testing.assert_close(t_p, t[perm])
    torch.testing.assert_close(target_p, target[perm])
    bf16 = prepare_training_batch(x0.bfloat16(), keys, step=5, seed=1, scheduler=sched, cfg=cfg)
    assert bf16[0].dtype == bf16[2].dtype == torch.bfloat16


def test_loss_without_gamma_is_plain_mse() -> None:
    cfg = _tiny_cfg(min_snr_gamma=None)
    sched = build_noise_scheduler(cfg)
    pred, target = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    t = torch.tensor([0, 1, 2, 3])
    loss, per_sample = diffusion_loss(pred, target, t, sched, cfg)
    torch.testing.assert_close(loss, F.mse_loss(pred, target))
    assert per_sample.shape == (4,)
    loss0, _ = diffusion_loss(pred, target, t, sched, _tiny_cfg(min_snr_gamma=0.0))
    torch.testing.assert_close(loss0, loss)


def test_loss_with_min_snr_hand_values() -> None:
    # pred - target = 1 everywhere -> per-sample MSE 1; weights eps gamma=5 at
    # t=0 (snr 9) -> 5/9, t=3 (snr 0.3024/0.6976 < 5) -> 1.
    cfg = _tiny_cfg(min_snr_gamma=5.0)
    sched = build_noise_scheduler(cfg)
    pred, target = torch.ones(2, 1, 2, 2, dtype=torch.bfloat16), torch.zeros(2, 1, 2, 2)
    loss, per_sample = diffusion_loss(pred, target, torch.tensor([0, 3]), sched, cfg)
    torch.testing.assert_close(per_sample, torch.tensor([5.0 / 9.0, 1.0]))
    torch.testing.assert_close(loss, torch.tensor((5.0 / 9.0 + 1.0) / 2.0))
    assert loss.dtype == torch.float32


def test_prediction_type_validation() -> None:
    expected = r"diffusion\.prediction_type='sample'.*epsilon.*v_prediction"
    with pytest.raises(ValueError, match=expected):
        ObjectiveConfig(prediction_type="sample")
    with pytest.raises(ValueError, match=r"diffusion\.prediction_type"):
        min_snr_weights(torch.ones(1), 5.0, "x0")
    with pytest.raises(ValueError, match=r"diffusion\.noise_offset"):
        ObjectiveConfig(noise_offset=-0.1)
