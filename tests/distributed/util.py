from __future__ import annotations

import json
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir: Path, *, steps_only: bool = True) -> list[dict]:
    """metrics.jsonl records; by default only the per-step ones (not checkpoint timings)."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in records if "loss" in r] if steps_only else records
