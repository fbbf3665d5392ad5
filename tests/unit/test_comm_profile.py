"""The exposed-communication arithmetic (train/comm_profile.py) against hand-computed timelines."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from scaletrain.train.comm_profile import CommProfiler, merge, split_trace, uncovered


def test_merge_unions_overlapping_and_touching_intervals():
    assert merge([(5, 7), (0, 2), (1, 3), (3, 4), (9, 9)]) == [(0, 4), (5, 7)]


@pytest.mark.parametrize("comm,cover,want", [
    ([(0, 10)], [], 10),  # nothing computes: all exposed
    ([(0, 10)], [(0, 10)], 0),  # fully hidden
    ([(0, 10)], [(2, 4), (6, 7)], 7),  # holes at 0-2, 4-6, 7-10
    ([(0, 4), (2, 6)], [(3, 5)], 4),  # overlapping collectives counted once: 0-3 and 5-6
    ([(0, 2), (8, 10)], [(1, 9)], 2),  # cover spanning the gap between collectives
])
def test_uncovered(comm, cover, want):
    assert uncovered(comm, cover) == pytest.approx(want)


def _ev(name, start, end, thread=1, device=DeviceType.CPU):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), thread=thread,
                           device_type=device)


def test_split_trace_cpu_counts_aten_ops_on_the_training_thread_only():
    events = [
        _ev("scaletrain.step", 0, 100),  # the marker range is not compute
        _ev("FSDP::pre_forward", 0, 40),  # wraps a wait: not compute
        _ev("aten::mm", 10, 30),
        _ev("aten::mm", 50, 60, thread=7),  # another thread: not the training thread's compute
        _ev("c10d::allreduce_", 30, 31),
        _ev("gloo:all_reduce", 20, 60, thread=3),  # in flight 20-60; aten::mm hides 20-30
    ]
    in_flight, exposed = split_trace(events, on_gpu=False, main_thread=1)
    assert in_flight == pytest.approx(40e-6) and exposed == pytest.approx(30e-6)


def test_split_trace_gpu_uses_kernels():
    events = [
        _ev("ncclDevKernel_AllReduce_Sum_f32", 0, 100, device=DeviceType.CUDA),
        _ev("ampere_sgemm_128x64", 0, 70, device=DeviceType.CUDA),
        _ev("aten::mm", 0, 100),  # host-side: ignored on GPU
    ]
    assert split_trace(events, on_gpu=True, main_thread=1) == pytest.approx((100e-6, 30e-6))


def test_profiler_off_by_default_and_on_sampled_steps_only():
    off = CommProfiler(0, torch.device("cpu"))
    off.start(1)
    off.stop()
    assert off.record(1.0, 0.1) == {}
    on = CommProfiler(2, torch.device("cpu"))
    on.start(1)  # not a multiple of 2: not profiled
    assert on._prof is None
    on.stop()
    assert on.record(1.0, 0.1) == {}


def test_profiled_step_without_collectives_is_all_compute():
    prof = CommProfiler(1, torch.device("cpu"))
    prof.start(1)
    torch.randn(64, 64) @ torch.randn(64, 64)
    prof.stop()  # one process, no process group: the all-reduce of the split is local
    rec = prof.record(0.5, 0.1)
    assert rec == {"compute_seconds": pytest.approx(0.4), "comm_exposed_seconds": 0.0, "comm_in_flight_seconds": 0.0}
