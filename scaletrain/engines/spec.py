"""What each engine says of itself to the rest of scaletrain without building anything.

- ``EngineSpec`` (one per ``engine.kind``): its recipe checks (knobs that cannot work at this
  world size or on this machine), its launch checks (the DeepSpeed JSON filled per stage), the
  sizing label a recipe runs as, and the notes ``scaletrain config check`` prints.
- ``Layout`` (one per label ``scaletrain size`` and ``scaletrain bench`` name: an engine and its
  variants, ``ddp``, ``fsdp``/``hsdp``/``fsdp-offload``, ``zero1``..``zero3-hpz``): how it lays out
  a denoiser's state on N ranks, what it holds at start-up and what it communicates per step.

Both live in their engine's own module (``engines/ddp.py``, ``engines/fsdp.py``,
``engines/deepspeed.py``) and register themselves; ``checks``, ``bench/`` and the CLI ask
``engine_spec(kind)`` / ``layout(label)`` and never branch on an engine's name. This module
imports nothing but the standard library.

Bytes are per rank, for a denoiser of P trainable parameters (``facts``: ``models.facts.ModelFacts``),
W = 4 (fp32) or 2 (bf16/fp16; fp8 too, an upper bound) bytes per parameter of the compute copy.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from scaletrain.config import RunConfig


class EngineSpec:
    kind: ClassVar[str]
    # start weights from a DCP checkpoint are read collectively into the engine's own shards
    # (checkpoint/sources.py); otherwise they are consolidated whole first
    reads_dcp_start_weights: ClassVar[bool] = True
    # trains engine.precision=fp8 (torchao's float8 Linear layers, engines/fp8.py)
    trains_fp8: ClassVar[bool] = False

    def check_recipe(self, cfg: RunConfig, world: int) -> None:
        """Raise ValueError (one line) for a knob that cannot work at ``world`` ranks or here."""

    def check_launch(self, cfg: RunConfig, world: int) -> None:
        """Raise ValueError (one line) for what the engine reads from disk and cannot use."""

    def sizing_label(self, cfg: RunConfig, world: int) -> str:
        """The layout label this recipe runs as (``scaletrain size``'s engine)."""
        return self.kind

    def config_notes(self, cfg: RunConfig, world: int) -> list[str]:
        """Lines ``scaletrain config check`` prints after the YAML (what the engine filled in)."""
        return []


ENGINE_SPECS: dict[str, EngineSpec] = {}


def register_engine(cls: type[EngineSpec]) -> type[EngineSpec]:
    ENGINE_SPECS[cls.kind] = cls()
    return cls


def engine_spec(kind: str) -> EngineSpec:
    load_layouts()
    return ENGINE_SPECS[kind]  # engine.kind is a Literal in the schema: always known


@dataclass(frozen=True)
class Collective:
    """One kind of collective in a step: ``calls`` calls moving ``nbytes`` in all."""

    op: str  # all_reduce | all_gather | reduce_scatter
    nbytes: float
    calls: int
    scope: str  # global | intra (inside a node) | inter (across nodes)
    kind: str  # gather (per micro-batch, prefetched) | grad (per step, under backward) | tail (exposed)


GRAD_NORM = Collective("all_reduce", 8, 1, "global", "tail")  # the clip's global norm, every engine


def compute_bytes(precision: str) -> int:
    # fp8: the gathered Linear weights take 1 byte (fp8 all-gather), the rest 2; 2 is the bound
    return 2 if precision in ("bf16", "fp16", "fp8") else 4


class Layout:
    label: ClassVar[str]
    kind: ClassVar[str]  # the engine.kind that runs it
    # whose measured compute (bench cells, --measured points) this layout shares: a variant that
    # changes only where state lives or how it moves computes like its base
    compute_like: ClassVar[str | None] = None
    # whose bench cells describe its memory beyond the model states (its fitted engine constant)
    memory_like: ClassVar[str | None] = None
    # The recipe a bench cell of this label runs: its DeepSpeed JSON and engine-section settings.
    ds_config: ClassVar[str | None] = None
    settings: ClassVar[dict[str, Any]] = {}
    whole_params: ClassVar[bool] = False  # every rank holds the whole parameters (by design)
    sized: ClassVar[bool] = True  # `scaletrain size` models it (bench-only variants do not)
    benched: ClassVar[bool] = True  # `scaletrain bench` runs it (sizing-only variants do not)
    # torch's memory tracker sees the engine's buffers (DeepSpeed allocates its flat partitions
    # and buckets where the tracker does not look)
    memory_split: ClassVar[bool] = True

    @property
    def compute(self) -> str:
        return self.compute_like or self.label

    @property
    def memory(self) -> str:
        return self.memory_like or self.label

    def state_world(self, world: int, gpus_per_node: int) -> int:
        """Ranks the model state is sharded over (HSDP: a node's)."""
        return world

    def state_bytes(self, facts: Any, world: int, precision: str = "fp32", host_is_device: bool = True) -> float:
        """Model-state bytes per rank: weights, grads, optimizer, engine buffers."""
        raise NotImplementedError

    def extra_bytes(self, facts: Any, world: int, gpus_per_node: int, precision: str) -> float:
        """State a variant adds on the device beyond its compute base's (ZeRO++'s secondary copy)."""
        return 0.0

    def startup_bytes(self, facts: Any, world: int, precision: str = "fp32") -> float:
        """The denoiser as the engine holds it when a rank reaches its first step (no Adam moments
        yet: torch's AdamW makes them at the first step)."""
        raise NotImplementedError

    def step_comms(self, facts: Any, precision: str, gpus_per_node: int, world: int) -> list[Collective]:
        """The collectives of one optimizer step."""
        raise NotImplementedError


LAYOUTS: dict[str, Layout] = {}
# Where the engines live (importing one registers its spec and layouts).
_ENGINE_MODULES = ("scaletrain.engines.ddp", "scaletrain.engines.fsdp", "scaletrain.engines.deepspeed")


def register_layout(cls: type[Layout]) -> type[Layout]:
    LAYOUTS[cls.label] = cls()
    return cls


def load_layouts() -> dict[str, Layout]:
    """Every engine's layouts (importing the engine modules registers them and their specs)."""
    for name in _ENGINE_MODULES:
        importlib.import_module(name)
    return LAYOUTS


def layout(label: str) -> Layout:
    """The layout ``label`` names; one line listing the known ones otherwise."""
    known = load_layouts()
    if label not in known:
        raise ValueError(f"engine {label!r} is unknown; choose from {', '.join(sized_labels())}")
    return known[label]


def sized_labels() -> tuple[str, ...]:
    return tuple(k for k, v in load_layouts().items() if v.sized)


def startup_floor_bytes(engine: str, facts: Any, world: int, precision: str = "fp32",
                        precomputed: bool = False, frozen_encoders: str = "replicate") -> float:
    """The least a rank holds when it reaches its first step (no activations, no Adam moments
    yet: torch's AdamW makes them at the first step): the frozen encoders in the run precision
    (none on precomputed latents), plus the denoiser as the engine keeps it at start-up (its
    layout's ``startup_bytes``, ``engines/spec.py``): FSDP2 its fp32 shard (meta-device init);
    DDP and ZeRO-1/2 the whole fp32 model (ZeRO-1/2 also the fp32 master partition); ZeRO-3
    (zero.Init) what DeepSpeed's stage-3 optimizer allocates in its constructor.
    ``frozen_encoders="shard"`` (model.frozen_encoders) holds 1/world of the encoders on the
    device; the host builds them whole first, so a host check passes "replicate".
    A floor, not a forecast: allocator slack and imports come on top (``benchmarks/
    startup_memory.py`` adds a measured baseline and compares)."""
    frozen = 0.0 if precomputed else compute_bytes(precision) * facts.frozen
    frozen /= world if frozen_encoders == "shard" else 1
    return frozen + layout(engine).startup_bytes(facts, world, precision)
