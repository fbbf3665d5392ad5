"""Apply a model family's parallel plan, in torchtitan's fixed order: activation checkpointing
→ regional compile → ``fully_shard`` per unit → root (``parallelize``).

The units are the family's (``registry.parallel_units``): the blocks FSDP2 shards one by one
are also the regions that are checkpointed and compiled, so one list serves all three levers
on every engine. FSDP2 passes its ``shard`` function; DDP and DeepSpeed call this without one
before they wrap the module, so they get the same checkpointing and compile.

Both levers replace the unit's ``forward`` (a bound method on the instance), not the module
tree: state-dict keys, DCP/DeepSpeed checkpoints, EMA names, LoRA targets and export stay
exactly as without them (torch's ``checkpoint_wrapper`` and ``torch.compile(module)`` insert a
wrapper module and rename every key beneath it). The engine's hooks (FSDP2 all-gather,
DeepSpeed ZeRO-3 fetch, DDP) stay around the unit's ``__call__``, outside the compiled region.
"""

from __future__ import annotations

import types
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from scaletrain.config import ModelSection
from scaletrain.models.registry import parallel_units


def checkpointed_units(units: list[nn.Module], mode: str, every: int, select: str = "every") -> list[nn.Module]:
    """The units ``model.activation_checkpointing`` recomputes: none, all of them (full), or
    (selective) every ``every``-th one (1 in ``every`` units keeps no activations, a memory/
    compute trade between none and full) or, with ``select="attention"``, the units holding
    an attention layer."""
    if mode == "full":
        return list(units)
    if mode == "selective" and select == "attention":
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention

        kinds = (Attention, AttentionModuleMixin)  # the classic and the newer (e.g. Flux) attention
        return [u for u in units if any(isinstance(m, kinds) for m in u.modules())]
    if mode == "selective":
        return [u for i, u in enumerate(units) if i % every == every - 1]
    return []


class LeverCounts:
    """What the levers did in this run, counted on the units themselves (so a test or the run
    summary can show activation checkpointing and compile were applied, not only configured):
    ``calls`` forwards through the replaced ``forward``, ``inner`` runs of the unit's own
    forward (each recomputation in backward is one more ``inner`` than ``calls``)."""

    def __init__(self, recompute: bool, compile: bool) -> None:
        self.recompute, self.compile = recompute, compile
        self.calls = 0
        self.inner = 0


def _replace_forward(unit: nn.Module, *, recompute: bool, compile: bool, backend: str = "inductor") -> None:
    base = type(unit).forward  # the class's forward; FSDP2's per-instance subclass inherits it
    installed = unit.__dict__.get("forward")
    if installed is not None:
        # Another layer already replaced this instance's forward (diffusers' hook registry:
        # context parallelism splits the first block's input there): checkpoint/compile that.
        def base(self, *args, **kwargs):
            return installed(*args, **kwargs)

    counts = LeverCounts(recompute, compile)
    unit._scaletrain_levers = counts
    own = base

    def counted(self, *args, **kwargs):
        counts.inner += 1
        return own(self, *args, **kwargs)

    # Under compile the unit's own forward goes in uncounted: a Python side effect inside the
    # checkpointed region makes dynamo give up on the whole frame (no graph at all, silently;
    # tests/unit/test_parallelize.py caught it), so recomputations are counted in eager only.
    inner = own if compile else counted

    if recompute:
        def forward(self, *args, **kwargs):
            # Non-reentrant: works with keyword arguments, FSDP2/ZeRO-3 parameter hooks and
            # DDP; preserves the RNG state so dropout recomputes identically.
            return checkpoint(inner, self, *args, use_reentrant=False, **kwargs)
    else:
        forward = base
    if compile:
        # Regional compile of the unit's forward: repeated blocks of one class share a code
        # object, so dynamo reuses the graph across them (diffusers' compile_repeated_blocks
        # compiles per block the same way).
        forward = torch.compile(forward, backend=backend)
    compiled_or_plain = forward

    def entry(self, *args, **kwargs):
        counts.calls += 1
        return compiled_or_plain(self, *args, **kwargs)

    unit.forward = types.MethodType(entry, unit)


def lever_report(root: nn.Module) -> dict:
    """The levers applied under ``root`` in this process: units checkpointed and compiled, unit
    forwards recomputed in backward, and graphs dynamo compiled (its counters since the last
    ``torch._dynamo.reset()``)."""
    counts = [m._scaletrain_levers for m in root.modules() if hasattr(m, "_scaletrain_levers")]
    rec = [c for c in counts if c.recompute]
    report = {"checkpointed_units": len(rec),
              "recomputed_forwards": sum(c.inner - c.calls for c in rec if not c.compile),
              "compiled_units": sum(c.compile for c in counts)}
    if report["compiled_units"]:
        from torch._dynamo.utils import counters

        report["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
        report["compiled_unit_calls"] = sum(c.calls for c in counts if c.compile)
    return report


def parallelize(denoiser: nn.Module, model_cfg: ModelSection, shard: Callable[[nn.Module], None] | None = None) -> list[nn.Module]:
    """Apply activation checkpointing and compile to the family's units, then ``shard`` each
    unit and the root (FSDP2). Returns the units in forward order (FSDP2 prefetch uses them)."""
    return parallelize_units(denoiser, parallel_units(denoiser), model_cfg, shard)


def parallelize_units(root: nn.Module, units: list[nn.Module], model_cfg: ModelSection,
                      shard: Callable[[nn.Module], None] | None = None) -> list[nn.Module]:
    """``parallelize`` with the units given (engines' tests shard plain modules this way)."""
    recompute = {id(u) for u in checkpointed_units(units, model_cfg.activation_checkpointing,
                                                   model_cfg.activation_checkpointing_every,
                                                   model_cfg.activation_checkpointing_selective)}
    for unit in units:
        if id(unit) in recompute or model_cfg.compile:
            _replace_forward(unit, recompute=id(unit) in recompute, compile=model_cfg.compile,
                             backend=model_cfg.compile_backend)
    if shard is not None:
        for unit in units:
            shard(unit)
        shard(root)
    return units


def frozen_units(module: nn.Module) -> list[nn.Module]:
    """The blocks of a frozen encoder that FSDP2 shards one by one: the elements of every
    outermost ``nn.ModuleList`` holding parameters (T5 blocks, CLIP layers, a VAE's down and up
    blocks and its mid blocks' resnets and attentions). transformers and diffusers keep their
    repeated blocks in ModuleLists, so one rule serves every encoder class without a per-class
    plan; what no list holds (embeddings, norms, quant convs) stays with the root."""
    units: list[nn.Module] = []

    def walk(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, nn.ModuleList):
                units.extend(u for u in child if next(u.parameters(), None) is not None)
            else:
                walk(child)

    walk(module)
    return units


# The VAE is called through these methods, not forward: FSDP2 must gather its root's own
# parameters (quant convs, norms) around them too (torch's register_fsdp_forward_method).
FROZEN_METHODS = ("encode", "decode")


def shard_frozen(module: nn.Module, mesh) -> nn.Module:
    """``model.frozen_encoders=shard``: FSDP2 over ``mesh`` for a frozen encoder (no gradients,
    no optimizer state, so nothing but its parameters to shard): each unit (``frozen_units``)
    then the root, every one gathered for its forward and freed right after. Used on every
    engine, DeepSpeed's too (a second, optimizer-less DeepSpeed engine could not be called
    through the VAE's encode/decode). Every rank must call it in lockstep, as the trainer's
    steps, validation and sample grids already do for the sharded denoiser."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    module.requires_grad_(False).eval()
    for unit in frozen_units(module):
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    fully_shard(module, mesh=mesh, reshard_after_forward=True)
    for name in FROZEN_METHODS:
        if callable(getattr(module, name, None)):
            register_fsdp_forward_method(module, name)
    return module
