"""Activation checkpointing and regional compile (models/parallelize.py), in one process:
the loss and every gradient are unchanged (checkpointing: bit for bit in fp32; compile: within
1e-4), state-dict keys are untouched, and selective checkpointing picks every k-th unit.
The same levers on FSDP2, DeepSpeed and DDP, 2 ranks: tests/distributed/test_engine_equivalence.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from scaletrain.models import build_model, parallel_units
from scaletrain.models.parallelize import checkpointed_units, parallelize


def _levers(ac: str = "none", every: int = 2, compile: bool = False, select: str = "every") -> SimpleNamespace:
    return SimpleNamespace(activation_checkpointing=ac, activation_checkpointing_every=every, compile=compile, compile_backend="inductor",
                           activation_checkpointing_selective=select)


def _loss_and_grads(name: str, levers: SimpleNamespace, res: int = 32) -> tuple[torch.Tensor, dict, list[str]]:
    torch.manual_seed(0)
    model = build_model(name)
    den = model.denoiser
    parallelize(den, levers)
    cond = model.encode_text(["a red circle", ""], "cpu")
    x = torch.randn(2, model.preset.in_channels, res, res, generator=torch.Generator().manual_seed(1))
    out = den(x, torch.tensor([10, 700]), cond)
    loss = out.float().pow(2).mean()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in den.named_parameters()}, list(den.state_dict())


@pytest.mark.parametrize("name", ["unet-tiny", "dit-tiny", "mmdit-tiny", "flux-tiny"])
@pytest.mark.parametrize("mode,select", [("full", "every"), ("selective", "every"), ("selective", "attention")])
def test_activation_checkpointing_changes_nothing_numerically(name: str, mode: str, select: str) -> None:
    ref_loss, ref_grads, ref_keys = _loss_and_grads(name, _levers())
    loss, grads, keys = _loss_and_grads(name, _levers(mode, select=select))
    assert keys == ref_keys  # checkpoints, EMA, LoRA and export see the same names
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-8, msg=k)


def test_checkpointing_really_recomputes() -> None:
    """Forward calls of a unit: once without checkpointing, twice with it (forward + recompute);
    selective with every=2 recomputes units 1, 3, 5, ... only."""
    torch.manual_seed(0)
    model = build_model("unet-tiny")
    units = parallel_units(model.denoiser)
    assert checkpointed_units(units, "none", 2) == []
    assert checkpointed_units(units, "full", 2) == units
    assert checkpointed_units(units, "selective", 2) == units[1::2]
    assert checkpointed_units(units, "selective", 3) == units[2::3]
    # attention: the UNet's cross-attention blocks (mid block included), not its plain ResNet blocks
    attention = checkpointed_units(units, "selective", 2, "attention")
    assert [type(u).__name__ for u in attention] == [type(u).__name__ for u in units if "CrossAttn" in type(u).__name__]
    assert 0 < len(attention) < len(units)
    parallelize(model.denoiser, _levers("selective", 2))
    calls = [0] * len(units)
    for i, u in enumerate(units):
        # a leaf inside the unit: a recompute re-runs it, not the unit's own __call__
        leaf = next(m for m in u.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
        leaf.register_forward_pre_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
    cond = model.encode_text(["a red circle", ""], "cpu")
    model.denoiser(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]), cond).mean().backward()
    assert calls == [1 + (i % 2) for i in range(len(units))], calls


def test_compile_is_regional_and_within_1e4() -> None:
    from torch._dynamo.utils import counters

    ref_loss, ref_grads, ref_keys = _loss_and_grads("unet-tiny", _levers())
    torch._dynamo.reset()
    counters.clear()
    loss, grads, keys = _loss_and_grads("unet-tiny", _levers("full", compile=True))
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])  # the units really compiled
    assert keys == ref_keys
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=0)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)
