"""What start-up cost: the ``start-up:`` line rank 0 prints right before the first step, and
``summary.json["startup"]``.

A model that fits no single device must reach its first step sharded; this is where a run
shows whether it did: each rank's peak host memory so far (peak resident set size), on a GPU
its peak device memory, and the seconds from the rank's process start.
"""

from __future__ import annotations

import resource
import time

import torch

from scaletrain.distributed import DistInfo


def _process_seconds() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


def local_startup(device: torch.device) -> list[float]:
    """[peak host GiB, peak device GiB (0 without a GPU), seconds since this process started]."""
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    dev = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return [host, dev, _process_seconds()]


def startup_report(dist_info: DistInfo) -> dict:
    """Every rank's figures (one all-gather), for rank 0's line and the summary."""
    import torch.distributed as dist

    mine = torch.tensor(local_startup(dist_info.device), dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist_info.world_size > 1:
        # gloo and NCCL alike: the tensor lives where the backend wants it
        dev = dist_info.device if dist_info.device.type == "cuda" else torch.device("cpu")
        out = [torch.zeros(3, dtype=torch.float64, device=dev) for _ in range(dist_info.world_size)]
        dist.all_gather(out, mine.to(dev))
        rows = [t.cpu().tolist() for t in out]
    else:
        rows = [mine.tolist()]
    report = {"peak_host_gib": [round(r[0], 3) for r in rows], "seconds": round(max(r[2] for r in rows), 2)}
    if dist_info.device.type == "cuda":
        report["peak_device_gib"] = [round(r[1], 3) for r in rows]
    return report


def startup_line(report: dict) -> str:
    line = (f"start-up: {report['seconds']:.1f} s; peak host memory per rank "
            + " ".join(f"{g:.2f}" for g in report["peak_host_gib"]) + " GiB")
    if "peak_device_gib" in report:
        line += "; peak device memory per rank " + " ".join(f"{g:.2f}" for g in report["peak_device_gib"]) + " GiB"
    return line
