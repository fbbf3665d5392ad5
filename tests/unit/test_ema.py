"""EMA decay schedule, the shard layout it relies on, and the `ema` config section."""

from __future__ import annotations

import pytest
import torch

from scaletrain.config import ConfigError

from scaletrain.checks import validate_config
from scaletrain.engines.base import chunk_bounds
from scaletrain.train.ema import ema_decay


def test_ratio_warmup_matches_hand_values() -> None:
    # diffusers EMAModel's default: min(decay, (1+n)/(10+n)).
    assert ema_decay(0, 0.9999) == pytest.approx(0.1)
    assert ema_decay(10, 0.9999) == pytest.approx(11 / 20)
    assert ema_decay(90, 0.9999) == pytest.approx(91 / 100)
    assert ema_decay(10**6, 0.9999) == 0.9999  # capped at the configured decay
    assert ema_decay(80, 0.9) == 0.9  # (81/90 = 0.9) reached


def test_power_warmup_matches_hand_values() -> None:
    # diffusers use_ema_warmup with inv_gamma=1: 1 - (1+n)^-power.
    assert ema_decay(0, 0.999, "power") == 0.0  # the first update copies the weights
    assert ema_decay(7, 0.999, "power", power=2 / 3) == pytest.approx(1 - 8 ** (-2 / 3))  # 0.75
    assert ema_decay(999, 0.999, "power", power=0.75) == pytest.approx(1 - 1000**-0.75)
    assert ema_decay(10**9, 0.999, "power") == 0.999


def test_no_warmup_is_constant_and_unknown_warmup_is_an_error() -> None:
    assert ema_decay(0, 0.95, "none") == ema_decay(1000, 0.95, "none") == 0.95
    with pytest.raises(ValueError, match="ema.warmup"):
        ema_decay(0, 0.9, "linear")


def test_decay_never_decreases() -> None:
    for warmup in ("ratio", "power", "none"):
        values = [ema_decay(n, 0.999, warmup) for n in range(2000)]
        assert all(a <= b for a, b in zip(values, values[1:])), warmup


@pytest.mark.parametrize("numel,world", [(21, 2), (3, 2), (1, 2), (5, 4), (2, 4), (16, 4), (0, 2)])
def test_chunk_bounds_match_dtensor_and_deepspeed_layouts(numel: int, world: int) -> None:
    # DTensor Shard(0) is torch.chunk; DeepSpeed ZeRO-3 gives each rank ceil(numel/world)
    # elements of the flat parameter, padding the last. Both must give the same slices.
    chunks = torch.arange(numel).chunk(world) if numel else ()
    part = -(-numel // world) if numel else 0
    for rank in range(world):
        start, end = chunk_bounds(numel, rank, world)
        want = chunks[rank].tolist() if rank < len(chunks) else []
        assert list(range(start, end)) == want, (rank, start, end)
        ds = [i for i in range(rank * part, (rank + 1) * part) if i < numel]  # padding cut off
        assert list(range(start, end)) == ds, rank


def _cfg(**ema) -> dict:
    return {"train": {"stages": [{"name": "a", "resolution": 32, "steps": 1, "micro_batch": 1}]}, "ema": ema}


def test_ema_config_defaults_and_bad_values() -> None:
    cfg = validate_config(_cfg(), check_paths=False)
    assert not cfg.ema.enabled and cfg.ema.decay == 0.9999 and cfg.ema.warmup == "ratio"
    for bad in ({"decay": 1.0}, {"decay": 0.0}, {"warmup": "linear"}, {"update_every": 0}, {"decya": 0.9}):
        with pytest.raises((ConfigError, ValueError), match="ema"):
            validate_config(_cfg(**bad), check_paths=False)
