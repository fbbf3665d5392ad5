import math

import pytest

from scaletrain.train.metrics import LossEMA
from scaletrain.train.schedule import lr_at


def test_warmup_is_linear_then_cosine_to_floor():
    kw = dict(total_steps=10, base_lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.5)
    assert lr_at(1, **kw) == pytest.approx(1.0)
    assert lr_at(2, **kw) == pytest.approx(1.0)  # cosine starts at the peak
    # halfway through the decay: floor + (1-floor)/2
    assert lr_at(6, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(10, **kw) == pytest.approx(0.1)
    assert lr_at(50, **kw) == pytest.approx(0.1)


def test_constant_schedule():
    assert lr_at(7, total_steps=10, base_lr=3e-4, schedule="constant") == 3e-4


def test_loss_ema_bias_corrected_and_ignores_nan():
    ema = LossEMA(0.9)
    assert ema.update(2.0) == pytest.approx(2.0)  # bias correction: first value is exact
    ema.update(float("nan"))
    assert ema.get() == pytest.approx(2.0)
    assert ema.update(1.0) == pytest.approx((0.9 * 0.1 * 2 + 0.1 * 1) / (1 - 0.81))
