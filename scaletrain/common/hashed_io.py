"""Checkpoint file hashes, taken from the bytes as they are written (issue 29, item 6).

The checkpoint manager records every file's size and hash in ``meta.json`` and verifies them
on load. Hashing a file after it is written reads it back: ~0.15 s per 0.7 GB from the page
cache on this machine, +9 to +14 % of a ``dit-b-2`` save (benchmarks/results/
cpu_checkpoint_checksums.md). The writers that produce the large files -- DCP's file writer
(FSDP2/DDP engine state, the EMA) and scaletrain's DeepSpeed checkpoint writer -- hash the
bytes they hand to ``write`` instead (``HashingStream``), and record ``(size, hash)`` per file
here; the manager takes those records and reads back only the files nobody recorded (the small
ones: RNG state, trainer state).

A record is trusted only where nothing could have made the file differ from the bytes hashed:
the stream saw only sequential ``write`` calls (a ``seek``, ``truncate`` or any other call
voids it), and the file's size on disk still equals the bytes written. Otherwise the file is
read back, as before. Hand-written because neither DCP nor DeepSpeed hashes what it writes
(DCP's ``StreamTransformExtension`` would, but it records itself in the checkpoint's metadata
and every reader would then need it).

Why XXH3-64: it finds the bit flips and truncations this guards against (a changed file keeps
its hash with chance 2^-64; not a defence against tampering) at ~10 GB/s on one core here,
where zlib's CRC-32 did 1.8, SHA-256 1.1 and BLAKE2b 0.5 GB/s. Written "xxh3_64:<16 hex>", what
``xxhsum -H3 FILE`` prints. Checkpoints of the first checksummed version recorded zlib's CRC-32
(8 hex digits, no prefix); ``file_hash`` still computes it for them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path

import xxhash
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

HASH = "xxh3_64"
_CHUNK = 16 * 2**20

_lock = threading.Lock()
_written: dict[str, tuple[int, str]] = {}  # real path -> (bytes, "xxh3_64:<hex>"), this process's writes
# Whether the writers hash at all: the checkpoint manager sets it from checkpoint.checksums at
# each save (one manager per process in a run; the checksum benchmark alternates two), so a run
# without checksums writes through the plain streams.
_hash_writes = True


def set_write_hashing(on: bool) -> None:
    global _hash_writes
    _hash_writes = bool(on)


def hashing_stream(raw, path: str | os.PathLike):
    """``raw`` wrapped in a ``HashingStream`` when write hashing is on, else ``raw`` itself."""
    return HashingStream(raw, path) if _hash_writes else raw


def _key(path: str | os.PathLike) -> str:
    return os.path.realpath(path)


def file_hash(path: Path, algo: str = HASH) -> str:
    """``path``'s hash as meta.json records it, read in 16 MiB pieces into one reused buffer."""
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    if algo == HASH:
        h = xxhash.xxh3_64()
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
        return f"{HASH}:{h.hexdigest()}"
    import zlib

    crc = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def recorded_algo(digest: str) -> str:
    return HASH if digest.startswith(f"{HASH}:") else "crc32"


class HashingStream:
    """A binary file opened for writing, wrapped: every ``write`` also updates an XXH3-64 of the
    bytes written. ``settle()`` records ``(bytes, hash)`` for the file, unless the stream was
    used in any way that could make the file differ from the bytes hashed."""

    def __init__(self, raw, path: str | os.PathLike) -> None:
        self._raw, self._path = raw, path
        self._hash = xxhash.xxh3_64()
        self._size = 0
        self._exact = True

    def write(self, data) -> int:
        n = self._raw.write(data)
        view = memoryview(data).cast("B")
        written = len(view) if n is None else n
        self._hash.update(view[:written])
        self._size += written
        return n

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def tell(self) -> int:
        return self._raw.tell()

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False  # a writer that would seek back is told not to; if it seeks anyway, see seek()

    @property
    def closed(self) -> bool:
        return self._raw.closed

    @property
    def name(self):
        return getattr(self._raw, "name", str(self._path))

    def close(self) -> None:
        self._raw.close()

    def seek(self, *args):
        self._exact = False
        return self._raw.seek(*args)

    def __getattr__(self, name: str):
        # Anything else (truncate, a read): the bytes on disk may differ from the bytes hashed.
        self._exact = False
        return getattr(self._raw, name)

    def __enter__(self) -> "HashingStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def settle(self) -> None:
        """Record the file's size and hash (only if every byte went through ``write``, in order)."""
        if self._exact:
            with _lock:
                _written[_key(self._path)] = (self._size, f"{HASH}:{self._hash.hexdigest()}")


def forget_written(folder: str | os.PathLike) -> None:
    """Drop the records of files under ``folder`` (a save starting over in the same folder)."""
    root = _key(folder) + os.sep
    with _lock:
        for k in [k for k in _written if k.startswith(root)]:
            del _written[k]


def take_written(folder: str | os.PathLike) -> dict[str, list]:
    """Remove and return this process's records under ``folder`` as {path relative to ``folder``:
    [bytes, hash]}, keeping only files that still exist with the size written."""
    root = _key(folder)
    with _lock:
        mine = {k: _written.pop(k) for k in [k for k in _written if k.startswith(root + os.sep)]}
    out = {}
    for k, (size, digest) in mine.items():
        try:
            if os.stat(k).st_size != size:
                continue
        except OSError:
            continue
        out[Path(os.path.relpath(k, root)).as_posix()] = [size, digest]
    return out


def _move_record(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    with _lock:
        rec = _written.pop(_key(src), None)
        if rec is not None:
            _written[_key(dst)] = rec


class HashingFileSystem(FileSystem):
    """DCP's local file system with every file opened for writing wrapped in a ``HashingStream``
    (while write hashing is on)
    (DCP writes its shard files and ``.metadata`` through ``create_stream``; the metadata is
    written under a temporary name and renamed: the record follows the rename)."""

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator:
        with super().create_stream(path, mode) as raw:
            stream = hashing_stream(raw, path) if mode == "wb" else raw
            yield stream
            if isinstance(stream, HashingStream):
                stream.settle()

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        _move_record(path, new_path)


class HashingFileSystemWriter(FileSystemWriter):
    """DCP's ``FileSystemWriter`` (same files, same format: any DCP reader loads them) that records
    each file's hash as it writes it."""

    def __init__(self, path: str | os.PathLike, **kwargs) -> None:
        super().__init__(path, **kwargs)
        self.fs = HashingFileSystem()
