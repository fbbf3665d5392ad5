"""LoRA adapters (peft) on the denoiser's attention and projection layers.

``apply_lora(denoiser, cfg.lora)`` is the one place adapters are put on a model: the LoRA
launcher, LoRA-DPO and ``ckpt export-lora`` all call it (or ``inject_lora`` on a bare
diffusers network), so every path names the same layers and the same peft adapter.
It runs before the engine wraps the denoiser: the engines then see frozen base weights
(``requires_grad=False``) and build the optimizer, gradient norm and EMA over the adapter
parameters only. FSDP2 shards frozen and trainable parameters of a unit together and
reduce-scatters only the trainable gradients; DeepSpeed gets only trainable parameters.

Adapters are peft ``LoraLayer`` modules inside ``denoiser.net`` (parameter names
``...to_q.lora_A.default.weight``, base weights move to ``...to_q.base_layer.weight``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from scaletrain.config import LoraSection
from scaletrain.models.family import ADAPTER, get_family  # ADAPTER: peft's adapter name (re-exported)

# Layer types peft's LoRA (and diffusers' LoRA loader) handle.
_LORA_TYPES = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class LoraStats:
    layers: int  # adapted layers
    trainable: int  # adapter parameters (elements)
    total: int  # all denoiser parameters, adapters included


def target_modules(family: str, targets: list[str] | None) -> list[str]:
    """The configured module-name suffixes, or the family's defaults (``ModelFamily.lora_targets``)."""
    return list(targets) if targets else list(get_family(family).lora_targets)


def matching_modules(net: nn.Module, targets: list[str]) -> list[str]:
    """Names of the layers peft would adapt: a Linear/Conv2d whose name is a target or ends
    with "." + target (peft's rule for a list of names)."""
    return [name for name, m in net.named_modules()
            if isinstance(m, _LORA_TYPES) and any(name == t or name.endswith("." + t) for t in targets)]


def build_lora_config(lora_cfg: LoraSection, family: str):
    """A peft ``LoraConfig`` from the ``lora`` config section (alpha defaults to the rank:
    scaling 1, what diffusers' LoRA training scripts use)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora_cfg.rank,
        lora_alpha=lora_cfg.alpha if lora_cfg.alpha is not None else lora_cfg.rank,
        lora_dropout=lora_cfg.dropout,
        target_modules=target_modules(family, lora_cfg.target_modules),
        init_lora_weights=True,  # A random (kaiming), B zero: the adapted model starts as the base
    )


def inject_lora(net: nn.Module, family: str, lora_cfg: LoraSection):
    """Freeze ``net`` and add the adapter to the targeted layers; returns the peft LoraConfig.
    Seed torch first: lora_A is drawn from the global RNG (identical on every rank)."""
    from peft import inject_adapter_in_model

    config = build_lora_config(lora_cfg, family)
    found = matching_modules(net, list(config.target_modules))
    if not found:
        raise ValueError(f"lora.target_modules={sorted(config.target_modules)} matches no Linear/Conv2d layer of "
                         f"this {family} network; use names such as {', '.join(target_modules(family, None))}")
    net.requires_grad_(False)
    inject_adapter_in_model(config, net, adapter_name=ADAPTER)
    return config


def apply_lora(denoiser: nn.Module, lora_cfg: LoraSection) -> LoraStats:
    """Put LoRA adapters on ``denoiser.net`` (a ``models.Denoiser``) and freeze everything
    else. Call on every rank, after loading start weights and before ``build_engine``."""
    inject_lora(denoiser.net, denoiser.family, lora_cfg)
    denoiser.requires_grad_(False)
    for name, p in denoiser.named_parameters():
        if is_lora_key(name):
            p.requires_grad_(True)
    return lora_stats(denoiser)


def lora_stats(module: nn.Module) -> LoraStats:
    from peft.tuners.lora import LoraLayer

    layers = sum(isinstance(m, LoraLayer) for m in module.modules())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return LoraStats(layers, trainable, sum(p.numel() for p in module.parameters()))


def is_lora_key(name: str) -> bool:
    """A state-dict key or parameter name of an adapter weight."""
    return f".lora_A.{ADAPTER}." in name or f".lora_B.{ADAPTER}." in name


def has_lora_keys(state: dict) -> bool:
    return any(is_lora_key(k) or ".base_layer." in k for k in state)


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Inside this block the adapted model computes as its base (adapters skipped), e.g. for a
    DPO reference forward that shares the policy's frozen weights. Works on the engine's
    module (FSDP2, DeepSpeed and DDP keep the peft layers in place). peft's switch also
    clears the adapters' requires_grad; the flags are restored on exit."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    flags = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)
