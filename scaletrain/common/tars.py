"""Shard tars: the shard list, the streaming reader and the deterministic writer.

``expand_shards`` flattens what a recipe or a command line names (paths, brace patterns, globs,
folders, URLs) into shard URLs; ``read_shard`` streams a shard's samples grouped by key (the
training loader, ``data encode``, ``curate`` and the class scan all read through it), surviving
a damaged tar; ``TarWriter`` writes samples with fixed member metadata (mtime 0, mode 644, as
``data.synth.write_tar_shard``), so the same input gives byte-identical shards.
"""

from __future__ import annotations

import glob
import io
import json
import re
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from braceexpand import braceexpand
from webdataset import gopen

_URL_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://", "gcs://")
# Same key/extension rule as webdataset: key = path up to the first dot of the basename.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def is_url(path: str) -> bool:
    """A remote shard (http(s), pipe:, s3, gs): read by webdataset's streamer, not checked locally."""
    return path.startswith(_URL_PREFIXES)


def expand_shards(shards: str | Path | list[str]) -> list[str]:
    """Flatten paths, brace patterns, globs, directories (all ``*.tar``) and URLs."""
    items = [shards] if isinstance(shards, (str, Path)) else list(shards)
    out: list[str] = []
    for item in items:
        for path in braceexpand(str(item)):
            if is_url(path):
                out.append(path)  # remote: existence is the streamer's business
            elif Path(path).is_dir():
                out.extend(sorted(str(p) for p in Path(path).glob("*.tar")))
            elif any(ch in path for ch in "*?["):
                out.extend(sorted(glob.glob(path)))
            else:
                out.append(path)
    if not out:
        raise ValueError(
            f"data.shards={shards!r} matched no .tar files; pass a path, a brace pattern like "
            "'data/shard-{000000..000007}.tar', or a directory holding *.tar"
        )
    return out


_REPORTED_SHARDS: set[str] = set()  # damaged shards already named on this process's stderr


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZ", b"\xfd7zXZ")  # gzip, bzip2, xz: offsets are not file offsets


def _open_at(url: str, start: int | None):
    """(stream, base, skip_below): the shard opened at byte ``start`` when it is a seekable,
    uncompressed file (then ``base`` = start); otherwise from its beginning, and samples that
    begin below ``skip_below`` are to be passed over (their members are read, never decoded)."""
    stream = gopen(url)
    if not start:
        return stream, 0, 0
    if getattr(stream, "seekable", lambda: False)():
        head = stream.read(6)
        if not any(head.startswith(m) for m in _COMPRESSED_MAGIC):
            stream.seek(start)
            return stream, start, 0
        stream.seek(0)
    return stream, 0, start


def _expected_samples(url: str) -> int | None:
    """How many samples a local shard should hold, from what wrote it: img2dataset's
    ``NAME_stats.json`` ("successes"), or a ``manifest.json`` beside it (``scaletrain data synth``
    and ``curate``: "shards" + "samples_per_shard", an int or a list). None when neither says."""
    if is_url(url):
        return None
    path = Path(url.removeprefix("file:"))
    try:
        stats = path.with_name(path.name.removesuffix(".tar") + "_stats.json")
        if stats.is_file():
            value = json.loads(stats.read_text()).get("successes")
            return int(value) if isinstance(value, int) else None
        manifest = path.parent / "manifest.json"
        if manifest.is_file():
            m = json.loads(manifest.read_text())
            names, per = m.get("shards") or [], m.get("samples_per_shard")
            if path.name not in names:
                return None
            i = names.index(path.name)
            if isinstance(per, list):
                return int(per[i])
            if isinstance(per, int) and isinstance(m.get("num_samples"), int):
                return min(per, m["num_samples"] - i * per)
    except (OSError, ValueError, TypeError, IndexError):
        return None
    return None


def read_shard(url: str, max_member_bytes: int | None = None, start: int | None = None) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__pos__", ext: bytes}`` grouped by key, streamed; ``__pos__`` is
    the byte offset of the sample's first tar header, and ``start`` (such an offset) begins there
    (a seek in a local uncompressed shard: nothing before it is read).

    A truncated/corrupt tar yields the complete samples before the damage plus
    one ``{"__corrupt__"}`` marker instead of raising: one bad shard must not
    kill a week-long run; the shard is named once on stderr. (A tar cut exactly at a
    header boundary looks like a normal end of archive to tarfile and cannot be detected.)
    A member larger than ``max_member_bytes`` is not read (its sample gets
    ``"__issue__": "member_too_large"``): a hostile shard cannot make a worker allocate it.
    """
    stream, base, skip_below = _open_at(url, start)
    current: dict | None = None
    count = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                match = _KEY_EXT.match(member.name)
                if not member.isfile() or match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if current is not None and current["__key__"] != key:
                    count += 1
                    if current["__pos__"] >= skip_below:
                        yield current
                    current = None
                current = current or {"__key__": key, "__pos__": base + member.offset}
                if max_member_bytes is not None and member.size > max_member_bytes:
                    current["__issue__"] = "member_too_large"  # stream mode skips its data unread
                    continue
                if current["__pos__"] < skip_below:
                    continue  # passing over to ``start``: the data is skipped by the stream, not kept
                # Stream-mode tarfile returns short data on truncation instead of raising.
                current[ext] = tar.extractfile(member).read()
                if len(current[ext]) != member.size:
                    raise tarfile.ReadError(f"{member.name} truncated")
    except (tarfile.TarError, EOFError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        expected = _expected_samples(url)
        lost = max(1, expected - count) if expected is not None else 1
        if url not in _REPORTED_SHARDS:
            _REPORTED_SHARDS.add(url)
            known = f"{lost} of its {expected} samples lost" if expected is not None else "its size is unknown"
            print(f"scaletrain: data: shard {url} is damaged after {count} samples ({type(err).__name__}: {err}); "
                  f"the rest of it is skipped and counted in skipped_samples ({known})", file=sys.stderr, flush=True)
        # drops the partial sample; counts what the shard's manifest says was lost (else 1)
        current = {"__key__": f"{url}#corrupt", "__corrupt__": True, "__lost__": lost}
    finally:
        stream.close()
    if current is not None and (current.get("__corrupt__") or current["__pos__"] >= skip_below):
        yield current


class TarWriter:
    """Streaming tar writer with ``data.synth.write_tar_shard``'s member conventions (that one
    takes a whole list; a 10k-sample shard should not sit in memory)."""

    def __init__(self, path: Path) -> None:
        self.path, self.count = path, 0
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)

    def write(self, raw: dict[str, Any]) -> None:
        key = str(raw["__key__"])
        for ext, payload in raw.items():
            if ext.startswith("__"):
                continue
            data = payload.encode("utf-8") if isinstance(payload, str) else payload
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self._tar.close()


def batched(items: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """Lists of ``size`` consecutive items (the last one shorter)."""
    batch: list[dict[str, Any]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
