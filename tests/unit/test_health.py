"""The health guard's decision logic (scaletrain/train/health.py) and its config rules."""

from __future__ import annotations

import json
import math

import pytest

from scaletrain.config import ConfigError, HealthSection

from scaletrain.checks import validate_config
from scaletrain.train.health import HealthGuard


def _guard(**kw) -> HealthGuard:
    base = {"min_steps": 3, "ema_decay": 0.5, "loss_spike_factor": 3.0, "grad_spike_factor": 5.0,
            "window": 5, "max_bad_in_window": 3, "max_rollbacks": 2, "lr_factor": 0.5}
    return HealthGuard(HealthSection(**{**base, **kw}))


def _warm(g: HealthGuard, n: int = 3, loss: float = 1.0, norm: float = 2.0) -> None:
    for i in range(n):
        assert not g.check(i + 1, loss, norm).bad


def test_non_finite_loss_or_norm_is_bad_even_before_min_steps():
    g = _guard()
    v = g.check(1, float("nan"), 1.0)
    assert v.bad and "loss=nan is not finite" in v.reason
    v = g.check(2, 1.0, float("inf"))
    assert v.bad and "grad_norm=inf is not finite" in v.reason
    assert g.bad_steps == 2 and g.loss_ema.count == 0 and g.grad_ema.count == 0


def test_spikes_over_the_ema_are_bad_only_after_min_steps():
    g = _guard()
    assert not g.check(1, 100.0, 2.0).bad  # no spike check while the EMA is young
    g = _guard()
    _warm(g)  # EMA of loss 1.0, grad norm 2.0
    assert not g.check(4, 2.9, 9.9).bad  # under 3x / 5x
    # a good step enters the bias-corrected EMA: (0.5*2.9 + 0.25 + 0.125 + 0.0625) / (1 - 0.5^4)
    assert math.isclose(g.loss_ema.get(), (0.5 * 2.9 + 0.25 + 0.125 + 0.0625) / (1 - 0.5**4))
    g = _guard()
    _warm(g)
    v = g.check(4, 3.5, 2.0)
    assert v.bad and v.reason.startswith("loss=3.5 > 3 x its EMA 1")
    v = g.check(5, 1.0, 10.5)
    assert v.bad and v.reason.startswith("grad_norm=10.5 > 5 x its EMA 2")


def test_a_factor_of_zero_disables_that_spike_check():
    g = _guard(loss_spike_factor=0.0)
    _warm(g)
    assert not g.check(4, 1e6, 2.0).bad
    assert g.check(5, float("nan"), 2.0).bad  # non-finite still is


def test_bad_steps_never_enter_the_emas():
    g = _guard()
    _warm(g)
    before = (g.loss_ema.value, g.loss_ema.count, g.grad_ema.value, g.grad_ema.count)
    assert g.check(4, 50.0, 2.0).bad  # a spike: finite, yet excluded
    assert g.check(5, float("nan"), float("nan")).bad
    assert (g.loss_ema.value, g.loss_ema.count, g.grad_ema.value, g.grad_ema.count) == before


def test_rollback_needs_max_bad_within_the_window():
    g = _guard()  # 3 bad within 5 steps
    assert [g.check(a, float("nan"), 1.0).rollback for a in (1, 3)] == [False, False]
    assert not g.check(7, float("nan"), 1.0).rollback  # 1 left the window: {3, 7}
    assert not g.check(8, float("nan"), 1.0).rollback  # 3 left (3 <= 8 - 5): {7, 8}
    assert g.check(9, float("nan"), 1.0).rollback  # {7, 8, 9}
    assert g.bad_steps == 5


def test_rollbacks_scale_the_lr_move_the_data_and_run_out():
    g = _guard()
    for a in (1, 2, 3):
        v = g.check(a, float("nan"), 1.0)
    assert v.rollback and g.can_roll_back
    g.begin_rollback(stage=0, skip_batches=6)
    assert not g.check(4, float("nan"), 1.0).rollback  # the window starts afresh
    g.begin_rollback(stage=0, skip_batches=2)
    assert g.lr_scale == 0.25 and g.rollbacks == 2 and g.data_skip == {0: 8}
    assert not g.can_roll_back  # max_rollbacks=2 used up


def test_state_round_trips_through_json():
    g = _guard()
    _warm(g)
    g.check(4, float("nan"), 1.0)
    g.begin_rollback(stage=1, skip_batches=4)
    h = _guard()
    h.load_state_dict(json.loads(json.dumps(g.state_dict())))
    assert h.state_dict() == g.state_dict() and h.data_skip == {1: 4}
    assert h.loss_ema.get() == g.loss_ema.get() and h.lr_scale == 0.5


def test_nan_injection_hits_one_rank_at_the_chosen_steps():
    g = _guard(inject_nan_steps=[5, 7], inject_nan_rank=1)
    hits = [(a, r) for a in range(1, 10) for r in (0, 1) if g.inject_nan(a, r)]
    assert hits == [(5, 1), (7, 1)]


STAGES = {"stages": [{"name": "s", "resolution": 32, "steps": 4, "micro_batch": 2}]}


@pytest.mark.parametrize("health, message", [
    ({"max_bad_in_window": 6, "window": 5}, "health.max_bad_in_window=6 exceeds health.window=5"),
    ({"loss_spike_factor": 0.9}, "health.loss_spike_factor=0.9 would flag ordinary steps"),
    ({"inject_nan_steps": [3], "inject_nan_rank": 2}, "health.inject_nan_rank=2 but the world size is 2"),
    ({"inject_nan_steps": [0]}, "health.inject_nan_steps=[0] must hold steps >= 1"),
    ({"lr_factor": 0}, "health.lr_factor=0"),
    ({"windw": 3}, "health.windw is not a known key"),
])
def test_bad_health_config_is_one_line(health, message):
    with pytest.raises(ConfigError) as e:
        validate_config({"train": STAGES, "health": health}, world_size=2, check_paths=False)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_health_is_on_by_default():
    cfg = validate_config({"train": STAGES}, world_size=2, check_paths=False)
    assert cfg.health.enabled and cfg.health.inject_nan_steps == []
