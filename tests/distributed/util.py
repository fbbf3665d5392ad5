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


class Payload:
    """What an attacker plants in a checkpoint: unpickling it runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def rechecksum(path: Path) -> Path:
    """Record ``path``'s new size and hash in its checkpoint's meta.json, as an attacker who
    can write the folder would: the checksums find corruption, not tampering, so the tamper
    tests must meet the restricted readers, not the checksum check."""
    from scaletrain.checkpoint.manager import file_checksums

    path = Path(path)
    for folder in path.parents:
        meta_file = folder / "meta.json"
        if meta_file.is_file():
            meta = json.loads(meta_file.read_text())
            name = path.relative_to(folder).as_posix()
            if name in meta.get("files", {}):
                meta["files"][name] = file_checksums(folder)[name]
                meta_file.write_text(json.dumps(meta))
            break
    return path


def flip_bit(path: Path) -> Path:
    """Flip one bit in the middle of a file (tensor data in a checkpoint: it still parses)."""
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0x10
    Path(path).write_bytes(bytes(data))
    return path


def tamper_dcp_metadata(folder: Path, marker: Path) -> Path:
    """Rewrite ``folder/.metadata`` (a DCP checkpoint) with a payload in an attribute DCP never
    reads: torch's own reader would run it and then load normally. Returns the file."""
    import pickle

    path = Path(folder) / ".metadata"
    with open(path, "rb") as f:
        metadata = pickle.load(f)  # the test's own, untampered file
    metadata.__dict__["note"] = Payload(marker)
    path.write_bytes(pickle.dumps(metadata))
    return rechecksum(path)


def tamper_torch_file(path: Path, marker: Path) -> Path:
    """Rewrite a ``torch.save`` file (a DeepSpeed partition) with the payload beside its content."""
    import torch

    state = torch.load(path, weights_only=False, map_location="cpu")  # the test's own file
    torch.save({**state, "note": Payload(marker)} if isinstance(state, dict) else Payload(marker), path)
    return rechecksum(path)


def one_error_line(stderr: str, needle: str) -> str:
    """The single ``scaletrain:`` line of a failed launch, which must contain ``needle``; no
    traceback through scaletrain's code (torchrun's own failure report may follow)."""
    import re

    lines = [ln for ln in stderr.splitlines() if ln.startswith("scaletrain: ")]
    assert len(lines) == 1 and needle in lines[0], stderr[-4000:]
    assert not re.search(r'File "[^"]*(scaletrain|launchers)/[^"]*\.py", line', stderr), stderr[-4000:]
    return lines[0]


def no_checkpoint_loads(stderr: str, needle: str) -> None:
    """A resume whose only checkpoint fails: one line skipping it, one saying none loads (exit
    2); both name the failure; no traceback through scaletrain's code."""
    import re

    lines = [ln for ln in stderr.splitlines() if ln.startswith("scaletrain: ")]
    assert len(lines) == 2, stderr[-4000:]
    assert lines[0].startswith("scaletrain: skipping checkpoint") and needle in lines[0], lines
    assert " loads (1 tried): " in lines[1] and needle in lines[1], lines
    assert not re.search(r'File "[^"]*(scaletrain|launchers)/[^"]*\.py", line', stderr), stderr[-4000:]
