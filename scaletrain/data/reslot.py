"""Resume a stage's data stream at another world size (or worker count) without replaying it.

A checkpoint stores, per rank, each loader slot's position (``pipeline._batches``: per leaf
stream its epoch and raw reader state; the bucket samples still waiting). At the same layout each
slot continues from its own position. At another one, the slots change: slot = worker *
world_size + rank, so a slot's old position means nothing to the new slot of the same number.
``reslot`` turns every old slot's position into the new slots' positions so that the stage goes
on from the checkpointed global position: no sample is read twice, none is skipped, and nothing
before the position is decoded (the replay it replaces decoded and dropped everything seen).

Per leaf stream (a source, or a class of one under ``data.balance``):

- ``split="sample"``: every slot reads the same shuffled stream and keeps its share of it
  (``pipeline.owner_of``). The reader's state (shard cursor, shuffle buffer, RNG) depends only on
  how far the stream was read, so the slowest old slot's state is the shared stream at its
  frontier F. The new slots start from that state; the samples at or past F that faster old
  slots already took are excluded, and the rest are dealt round-robin over the new slots.
- ``split="shard"``: each old slot read its own shards. What it had not read of its epoch -- the
  samples its shuffle buffer held, the rest of its current shard, its remaining shards, and the
  whole of any epoch another old slot had already started -- becomes a list of units dealt
  round-robin to the new slots, which read them (``pipeline._Remainder``) before their first
  epoch under the new layout.

Samples waiting in a bucket are dealt the same way. A layout change that also changes the split
mode of a leaf ("auto" picks "shard" only with at least one shard per slot) is refused with
``ReslotError``; the caller then replays, saying why.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from scaletrain.data.pipeline import LoaderSpec, Stream, _LeafStream, _RawEpoch, owner_of, resolve_split


class ReslotError(ValueError):
    """The old positions cannot be carried to this layout (the caller replays instead)."""


def _old_leaf_states(positions: list[dict], old_world: int, old_workers: int, leaf: int, stream: Stream,
                     ) -> list[dict]:
    """Every old slot's state of leaf ``leaf``, by old slot index (a slot that never produced a
    batch: its fresh state)."""
    states = []
    for slot in range(old_world * old_workers):
        worker, rank = divmod(slot, old_world)
        pos = positions[rank].get(str(worker))
        if pos is not None:
            states.append(pos["state"]["leaves"][leaf])
        else:
            spec = replace(stream.spec, rank=rank, world_size=old_world, num_workers=old_workers)
            states.append(_LeafStream(spec, stream.shards, stream.mode, worker).state())
    return states


def _sample_leaf(states: list[dict], new_slots: int) -> list[dict]:
    old_slots = len(states)
    frontier = [s["offset"] + s["raw"]["count"] for s in states]
    slowest = min(range(old_slots), key=lambda i: frontier[i])
    base = frontier[slowest]
    old_remap = states[slowest].get("remap")
    taken = {g for g in (old_remap or {}).get("exclude", ()) if g >= base}
    for slot, state in enumerate(states):
        taken.update(g for g in range(base, frontier[slot]) if owner_of(g, old_slots, state.get("remap")) == slot)
    start = copy.deepcopy(states[slowest])
    start.pop("remainder", None)
    start["remap"] = {"base": base, "exclude": sorted(taken)}
    return [copy.deepcopy(start) for _ in range(new_slots)]


def _shard_units(state: dict, stream: Stream, old_world: int, old_workers: int, slot: int, last_epoch: int) -> list:
    """What old slot ``slot`` had not read of the epochs up to ``last_epoch``, as remainder units."""
    worker, rank = divmod(slot, old_world)
    spec = replace(stream.spec, rank=rank, world_size=old_world, num_workers=old_workers)
    units = [list(u) for u in state.get("remainder") or ()]
    epoch, raw = state["epoch"], state["raw"]
    for e in range(epoch, last_epoch + 1):
        order = _RawEpoch(spec, stream.shards, "shard", e, worker, 0).order
        if e == epoch and raw is not None:
            units += [["sample", url, pos, e] for url, pos in raw["pool"]]
            index, last = raw["cursor"]
            if index < len(order) and last != "end":
                units.append(["tail", order[index], last, e])
            units += [["tail", url, None, e] for url in order[index + 1:]]
        else:
            units += [["tail", url, None, e] for url in order]
    return units


def _shard_leaf(states: list[dict], stream: Stream, old_world: int, old_workers: int, new_slots: int) -> list[dict]:
    last_epoch = max(s["epoch"] for s in states)
    units = [u for slot, s in enumerate(states) for u in _shard_units(s, stream, old_world, old_workers, slot,
                                                                          last_epoch)]
    return [{"epoch": last_epoch + 1, "offset": 0, "good": 0, "filtered": {}, "raw": None,
             "remainder": units[i::new_slots]} for i in range(new_slots)]


def reslot(positions: list[dict], old_world: int, old_workers: int, spec: LoaderSpec, streams: list[Stream],
           ) -> dict[str, dict]:
    """This rank's ``LoaderSpec.resume`` at the layout of ``spec``, from every old rank's slot
    positions (``positions[r]``: {str(worker): {"done", "state"}}, as old rank r stored them).

    Every new rank computes all new slots from the same inputs and keeps its own, so the ranks
    agree without talking. ``done`` is set so the loader skips nothing (``spec.skip_batches``
    is where the stage is)."""
    if len(positions) != old_world:
        raise ReslotError(f"the checkpoint holds the stream positions of {len(positions)} of its {old_world} ranks")
    old_slots, new_slots = old_world * old_workers, spec.num_slots
    per_leaf = []
    for i, stream in enumerate(streams):
        old_mode = resolve_split(replace(stream.spec, world_size=old_world, num_workers=old_workers, rank=0),
                                 len(stream.shards))
        if old_mode != stream.mode:
            raise ReslotError(f"{stream.spec.stream_name} splits by {old_mode} at {old_slots} loader slots and by "
                              f"{stream.mode} at {new_slots}")
        states = _old_leaf_states(positions, old_world, old_workers, i, stream)
        per_leaf.append(_sample_leaf(states, new_slots) if stream.mode == "sample" else
                        _shard_leaf(states, stream, old_world, old_workers, new_slots))
    olds = [positions[rank].get(str(worker)) for worker, rank in
            (divmod(slot, old_world) for slot in range(old_slots))]
    pending = [p for pos in olds if pos is not None for p in pos["state"]["pending"]]
    n = -(-sum(pos["state"]["n"] for pos in olds if pos is not None) // new_slots)
    workers = spec.workers_per_rank
    out = {}
    for worker in range(workers):
        slot = worker * spec.world_size + spec.rank
        out[str(worker)] = {"done": len(range(worker, spec.skip_batches, workers)), "state": {
            "n": n, "leaves": [leaf[slot] for leaf in per_leaf], "pending": pending[slot::new_slots]}}
    return out
