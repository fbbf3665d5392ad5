"""A denoiser built without its weights, then initialised where they live: whole, or shard by shard.

A 12B denoiser built in fp32 on every rank needs 48 GB per rank before FSDP2 shards anything.
So the network is built on the ``meta`` device (``build_on_meta``): shapes only. The engine
applies its parallel plan to that shell, ``materialize`` allocates what each rank keeps
(``to_empty``: FSDP2 allocates only the local shards) and initialises it.

The initialisation is the same at any world size, and the same whole or sharded: every module
that owns parameters draws them from a generator seeded by (run seed, the module's qualified
name), through the module's own ``reset_parameters`` (the distribution its constructor uses),
as a whole tensor on the host, of which each rank copies the slice it owns. A parameter whose
module has no ``reset_parameters`` (a raw ``nn.Parameter``, e.g. PixArt's scale-shift table)
keeps the value its constructor gave it from a generator seeded by the run seed alone:
``build_on_meta`` records those (they are small) before moving them to ``meta``. Buffers (positional tables, RoPE frequencies) are built on the host as
usual and put back after ``to_empty``.

Why by hand: torch's meta device drops every value, and accelerate's ``init_empty_weights``
drops raw parameters' values too; neither reinitialises a sharded module, and torchtitan's
``init_weights`` is written per model. This one works for every family, which
``tests/unit/test_meta_init.py`` checks against the constructors' own init.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn


@dataclass
class PendingInit:
    """What ``materialize`` needs of a network built on ``meta``: the seed, the raw parameters'
    constructor values and the buffers, by qualified name under the network."""

    seed: int
    raw: dict[str, Tensor] = field(default_factory=dict)
    buffers: dict[str, Tensor] = field(default_factory=dict)
    # The constructor call itself, for an engine that must construct the network its own way
    # (DeepSpeed ZeRO-3 builds it under deepspeed.zero.Init, partitioned module by module).
    build: Callable[[], nn.Module] | None = None
    # Start weights to read instead of initialising (checkpoint/sources.py: a SafetensorsFolder,
    # read(name, slices), or a DCPCheckpoint, load_into(net) collectively; both check_names(
    # expected, what)); ``source_what`` names them in errors.
    source: Any = None
    source_what: str = ""


@contextlib.contextmanager
def _parameters_to_meta(raw: dict[int, tuple[nn.Module, dict[str, Tensor]]]) -> Iterator[None]:
    """While building: each parameter goes to ``meta`` as it is registered (a Linear's
    ``torch.empty`` is never touched, so it costs no memory); a raw parameter's constructor value
    is kept first. Buffers stay on the host."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is None or param.device.type == "meta":
            return
        if not hasattr(module, "reset_parameters"):
            raw.setdefault(id(module), (module, {}))[1][name] = param.detach().clone()
        module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_on_meta(build: Callable[[], nn.Module], seed: int) -> tuple[nn.Module, PendingInit]:
    """``build()`` with every parameter on ``meta``; returns the network and what
    ``materialize`` needs. ``seed``: the run's; torch's global RNG is neither read nor advanced."""
    raw: dict[int, tuple[nn.Module, dict[str, Tensor]]] = {}
    with seeded(module_seed(seed, "<constructor>")), _parameters_to_meta(raw):
        net = build()  # raw parameters' values depend on the seed only, not on the caller's RNG
    pending = PendingInit(seed, build=build)
    for qual, module in net.named_modules():
        if id(module) in raw and raw[id(module)][0] is module:
            for name, value in raw[id(module)][1].items():
                if name in module._parameters:  # not replaced after registration
                    pending.raw[_join(qual, name)] = value
    pending.buffers = {name: b for name, b in net.named_buffers()}
    return net, pending


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's host generator seeded with ``seed`` inside, restored after (torch.manual_seed
    would also format a stack trace per call, which adds up over thousands of modules)."""
    gen = torch.default_generator
    saved = gen.get_state()
    gen.manual_seed(seed)
    try:
        yield
    finally:
        gen.set_state(saved)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def module_seed(seed: int, name: str) -> int:
    """The generator seed of module ``name``'s parameters: independent of the world size,
    of the order modules are visited in and of every other module."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def full_values(module: nn.Module, name: str, pending: PendingInit) -> dict[str, Tensor]:
    """Whole fp32 host tensors for the parameters ``module`` (qualified name ``name``) owns."""
    own = dict(module.named_parameters(recurse=False))
    if not hasattr(module, "reset_parameters"):
        missing = [n for n in own if _join(name, n) not in pending.raw]
        if missing:
            raise RuntimeError(f"cannot initialise {_join(name, missing[0])} built on the meta device: its module "
                               f"{type(module).__name__} has no reset_parameters and no constructor value was recorded")
        return {n: pending.raw[_join(name, n)].float() for n in own}
    # A shell of the module holding whole host tensors; its own reset_parameters fills them.
    shell = copy.copy(module)
    shell._parameters = {n: None if p is None else nn.Parameter(torch.empty(tuple(p.shape), dtype=torch.float32),
                                                                 p.requires_grad)
                         for n, p in module._parameters.items()}  # None entries too (a Linear without bias)
    shell._modules = {}  # a reset that walks children must not reach the real ones
    with seeded(module_seed(pending.seed, name)), torch.no_grad():
        shell.reset_parameters()
    return {n: shell._parameters[n].detach() for n in own}


@torch.no_grad()
def _copy_into(param: Tensor, full: Tensor) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        # src_data_rank=None: every rank slices its part of its own (identical) whole tensor; no collective.
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)  # to the parameter's device


@torch.no_grad()
def materialize(net: nn.Module, pending: PendingInit, device: torch.device) -> None:
    """Allocate ``net``'s parameters on ``device`` (only the local shards of sharded ones: call
    this after the engine has applied its plan) and fill them: from ``pending.source`` when the
    run starts from weights (each rank reads only the slices it keeps), else initialise them.
    Buffers get their built values back (or the source's, for persistent ones it holds)."""
    if pending.source is not None:
        pending.source.check_names(expected_tensors(net), pending.source_what)
    persistent = set(net.state_dict().keys()) - {n for n, _ in net.named_parameters()}
    net.to_empty(device=device)
    if hasattr(pending.source, "load_into"):  # a checkpoint read collectively into the shards (DCP)
        pending.source.load_into(net)  # parameters and persistent buffers
        for name, buf in net.named_buffers():
            if name not in persistent:
                buf.copy_(pending.buffers[name])
        return
    if pending.source is not None:
        for name, p in net.named_parameters():
            target = p.to_local() if _is_dtensor(p) else p
            target.copy_(pending.source.read(name, local_index(p)))
    else:
        for qual, module in net.named_modules():
            if next(module.parameters(recurse=False), None) is None:
                continue
            values = full_values(module, qual, pending)
            for name, p in module.named_parameters(recurse=False):
                _copy_into(p, values[name])
    for name, buf in net.named_buffers():
        from_source = pending.source is not None and name in persistent
        buf.copy_(pending.source.read(name) if from_source else pending.buffers[name])


def expected_tensors(net: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> global shape of what a weights file for ``net`` must hold: its parameters and
    persistent buffers (works on meta, sharded and ZeRO-3-partitioned modules)."""
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in net.named_parameters()}
    params = set(shapes)
    buffers = dict(net.named_buffers())
    for n in net.state_dict().keys():
        if n not in params and n in buffers:
            shapes[n] = tuple(buffers[n].shape)
    return shapes


def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_index(param: Tensor) -> tuple[slice, ...] | None:
    """The part of the global tensor a DTensor parameter's local shard holds, as one slice per
    dimension; None for a whole parameter."""
    if not _is_dtensor(param):
        return None
    # torch's own rule for where a shard sits (Shard(0) chunks; HSDP's replicate x shard mesh)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def is_on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())
