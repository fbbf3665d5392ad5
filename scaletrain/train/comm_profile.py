"""Where a step's time goes: compute, exposed communication, data wait.

One step in every ``engine.comm_profile_every`` runs under ``torch.profiler``; every other
step runs without it (0 = never: no overhead at all). From the sampled step's trace:

- **communication in flight** = the union of the collectives' intervals: NCCL kernels on the
  GPU timeline; on CPU, gloo work items (``gloo:*`` events, from enqueue to completion on
  gloo's worker threads).
- **exposed communication** = the part of that union during which no compute kernel runs:
  on GPUs, any other kernel on the device; on CPU, any ATen operator on the training thread
  (wrapping ranges such as ``FSDP::pre_forward`` or autograd nodes are not counted, as they
  can contain waits). So the training thread blocked on a collective, or busy in Python while
  one is in flight, is exposed; a collective running under backward's kernels is hidden.
- **compute** = step time - data wait - exposed communication (so it includes Python and
  framework overhead: everything the step spends neither waiting for data nor for the network).

Overlap is what the engine knobs trade in (bucket sizes, prefetch, overlap_comm), so it is
measured on the timeline rather than by timing each collective: a collective's own duration
says nothing about whether the step waited for it.
"""

from __future__ import annotations

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from scaletrain.distributed import all_reduce_mean

# Host-side names of collectives (c10d launch ops and the gloo work items); never "compute".
_COMM_MARKERS = ("gloo:", "nccl", "c10d::", "record_param_comms")


def is_comm(name: str) -> bool:
    n = name.lower()
    return any(m in n for m in _COMM_MARKERS)


def merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, disjoint union of [start, end) intervals."""
    out: list[tuple[float, float]] = []
    for s, e in sorted(i for i in intervals if i[1] > i[0]):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def uncovered(comm: list[tuple[float, float]], cover: list[tuple[float, float]]) -> float:
    """Length of union(comm) minus union(cover)."""
    total, cover = 0.0, merge(cover)
    for s, e in merge(comm):
        for cs, ce in cover:
            if ce <= s or cs >= e:
                continue
            if cs > s:
                total += cs - s
            s = max(s, ce)
            if s >= e:
                break
        total += max(0.0, e - s)
    return total


def split_trace(events, *, on_gpu: bool, main_thread: int | None) -> tuple[float, float]:
    """(communication in flight, exposed communication) in seconds, from profiler events."""
    comm, compute = [], []
    for ev in events:
        span = (ev.time_range.start, ev.time_range.end)  # microseconds
        gpu_kernel = ev.device_type == DeviceType.CUDA
        if on_gpu:
            if gpu_kernel:
                (comm if is_comm(ev.name) else compute).append(span)
        elif ev.name.startswith("gloo:"):
            comm.append(span)
        elif ev.thread == main_thread and ev.name.startswith("aten::"):
            compute.append(span)  # CPU "kernels": ATen ops, not the ranges that wrap waits
    in_flight = sum(e - s for s, e in merge(comm))
    return in_flight / 1e6, uncovered(comm, compute) / 1e6


class CommProfiler:
    """Profile one step in every ``every``; ``record`` turns it into metrics fields."""

    _MARK = "scaletrain.step"

    def __init__(self, every: int, device: torch.device) -> None:
        self.every, self.device = every, device
        self._prof: profile | None = None
        self._mark = None
        self._last: tuple[float, float] | None = None

    def start(self, step: int) -> None:
        """Call at the start of global step ``step`` (1-based) on every rank."""
        self._last = None
        if self.every <= 0 or step % self.every:
            return
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._prof = profile(activities=acts)
        self._prof.__enter__()
        # A marker on the training thread: its thread id tells the trace which thread computes.
        self._mark = torch.autograd.profiler.record_function(self._MARK)
        self._mark.__enter__()

    def stop(self) -> None:
        """Call after the step (every rank: the split is averaged over ranks, a collective)."""
        if self._prof is None:
            return
        self._mark.__exit__(None, None, None)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._prof.__exit__(None, None, None)
        events = self._prof.events()
        main = next((e.thread for e in events if e.name == self._MARK), None)
        in_flight, exposed = split_trace(events, on_gpu=self.device.type == "cuda", main_thread=main)
        self._prof = self._mark = None
        self._last = tuple(all_reduce_mean([in_flight, exposed], self.device))

    def record(self, step_seconds: float, data_wait_seconds: float) -> dict[str, float]:
        """Metrics fields for the step just stopped; empty when it was not sampled."""
        if self._last is None:
            return {}
        in_flight, exposed = self._last
        exposed = min(exposed, max(0.0, step_seconds - data_wait_seconds))
        return {
            "compute_seconds": step_seconds - data_wait_seconds - exposed,
            "comm_exposed_seconds": exposed,
            "comm_in_flight_seconds": in_flight,
        }
