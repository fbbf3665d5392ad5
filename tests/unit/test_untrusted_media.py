"""Untrusted media reach no interpreter (issue 29, item 7): image members are decoded only by
PIL's allow-listed decoders (JPEG, PNG, WebP; others only when data.image_formats names them),
whatever the member's name says; videos only in allow-listed containers and codecs; nothing in a
shard is ever handed to an external program. A fuzz run sends 1,000 random and mutated members
(images, videos, captions, JSON) through the loader's decoder: each is decoded or counted as bad,
none crashes or hangs (each within a time limit), and a shard of them streams to its end."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import time

import pytest
import torch
from PIL import Image

from scaletrain.data.pipeline import Dropped, LoaderSpec, _decode_sample, build_loader
from scaletrain.data.samples import decode_image, image_formats, open_image
from scaletrain.data.video import VideoNotAllowed, decode_video, encode_video, probe_video

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n"
PER_MEMBER_SECONDS = 2.0


def _image(fmt: str, size=(24, 16), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture()
def no_external_programs(monkeypatch):
    """Starting any process is a failure: PIL's EPS plugin would start Ghostscript."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"an external program was started: {args[:1]}")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(os, "system", refuse)
    monkeypatch.setattr(os, "posix_spawn", refuse)
    monkeypatch.setattr(os, "posix_spawnp", refuse)


def test_only_allow_listed_decoders_open_an_image_whatever_its_name(no_external_programs) -> None:
    for fmt in ("JPEG", "PNG", "WEBP"):
        assert decode_image(_image(fmt), 16).shape == (3, 16, 16)
    for data in (_image("GIF"), _image("BMP"), _image("TIFF"), EPS):  # e.g. a member named x.jpg
        with pytest.raises(Exception) as e:  # PIL's UnidentifiedImageError: counted as corrupt
            decode_image(data, 16)
        assert "cannot identify image file" in str(e.value)
    # data.image_formats adds one of the in-process decoders, never EPS/PS
    assert decode_image(_image("GIF"), 16, formats=image_formats(["gif"])).shape == (3, 16, 16)
    with pytest.raises(ValueError) as e:
        image_formats(["EPS"])
    assert "\n" not in str(e.value) and "never EPS or PS, which PIL decodes by running Ghostscript" in str(e.value)
    with pytest.raises(Exception):
        open_image(EPS, image_formats(["GIF", "TIFF"]))


def test_videos_only_in_allow_listed_containers_and_codecs(no_external_programs) -> None:
    from scaletrain.data.video import ClipSpec

    frames = [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(4)]
    mp4 = encode_video(frames, 8)
    assert probe_video(mp4)[0] == 4
    assert decode_video(mp4, ClipSpec(2, None), 16, random.Random(0)).shape == (3, 2, 16, 16)
    gif = io.BytesIO()  # FFmpeg demuxes GIF as a video; it is not on the list
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=125)
    with pytest.raises(VideoNotAllowed, match="container 'gif'"):
        probe_video(gif.getvalue())


def _mutate(rng: random.Random, data: bytes) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:  # random bytes
        return rng.randbytes(rng.randrange(0, 512))
    if kind == 1:  # truncated
        return data[: rng.randrange(0, max(1, len(data)))]
    if kind == 2:  # bit flips
        b = bytearray(data)
        for _ in range(rng.randrange(1, 20)):
            if b:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 3:  # another format's bytes under this name (EPS included)
        return rng.choice([EPS, _image("GIF"), _image("BMP"), b"<svg xmlns='http://www.w3.org/2000/svg'/>"])
    return data  # intact


def _fuzz_members(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    bases = {"jpg": _image("JPEG"), "png": _image("PNG"), "webp": _image("WEBP"),
             "mp4": encode_video([Image.new("RGB", (16, 16), (0, i * 50, 0)) for i in range(4)], 8)}
    out = []
    for i in range(n):
        ext = rng.choice(list(bases))
        raw = {"__key__": f"k{i:05d}", ext: _mutate(rng, bases[ext])}
        r = rng.random()
        if r < 0.3:
            raw["txt"] = rng.randbytes(rng.randrange(0, 64))  # any bytes, UTF-8 or not
        elif r < 0.6:
            raw["txt"] = "a red circle".encode()
        if rng.random() < 0.5:
            raw["json"] = rng.choice([json.dumps({"aesthetic": rng.random() * 10}).encode(), rng.randbytes(16),
                                      b"[1, 2]", b"{\"caption\": 3}", b"{" * 50])
        out.append(raw)
    return out


def test_fuzzed_members_are_decoded_or_counted_never_crash_or_hang(no_external_programs, tmp_path) -> None:
    members = _fuzz_members(1000)
    image_spec = LoaderSpec(shards=("x",), resolution=16, micro_batch=2)
    video_spec = LoaderSpec(shards=("x",), resolution=16, micro_batch=2, frames=2)
    outcomes = {"decoded": 0, "bad": 0, "dropped": 0}
    slowest = 0.0
    for raw in members:
        spec = video_spec if "mp4" in raw else image_spec
        t0 = time.perf_counter()
        out = _decode_sample(dict(raw), spec, epoch=0)
        slowest = max(slowest, time.perf_counter() - t0)
        if out is None:
            outcomes["bad"] += 1
        elif isinstance(out, Dropped):
            outcomes["dropped"] += 1
        else:
            assert torch.isfinite(out["pixels"]).all() and out["pixels"].shape[-2:] == (16, 16)
            outcomes["decoded"] += 1
    assert slowest < PER_MEMBER_SECONDS, slowest
    assert sum(outcomes.values()) == 1000 and outcomes["decoded"] > 100 and outcomes["bad"] > 100, outcomes

    # The image members as one shard: the stream goes on past every bad one to the end, and what
    # it skipped is counted.
    from scaletrain.common.tars import TarWriter

    shard = tmp_path / "fuzz-000000.tar"
    writer = TarWriter(shard)
    images = [m for m in members if "mp4" not in m]
    for raw in images:
        writer.write(raw)
    writer.close()
    spec = LoaderSpec(shards=(str(shard),), resolution=16, micro_batch=4, num_workers=0, shuffle_buffer=0,
                      split="sample")
    results = [_decode_sample(dict(raw), spec, 0) for raw in images]
    good = sum(isinstance(r, dict) for r in results)
    batches, skipped, seen = iter(build_loader(spec)), 0, 0
    while seen < good - good % 4:  # the first epoch's whole batches
        b = next(batches)
        seen += len(b["keys"])
        skipped += b["skipped"]
    # the corrupt members before the last sample batched, each counted once
    last = [i for i, r in enumerate(results) if isinstance(r, dict)][seen - 1]
    assert skipped == sum(r is None for r in results[:last]) > 100


def test_media_are_opened_in_one_place_each() -> None:
    """`Image.open` only in data/samples.py (open_image) and `av.open` for reading only in
    data/video.py (open_video): a new reader of shard media goes through the allow-lists."""
    from pathlib import Path

    import scaletrain

    root = Path(scaletrain.__file__).parent
    found = []
    for path in root.rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            rel = path.relative_to(root).as_posix()
            if "Image.open(" in line and rel != "data/samples.py":
                found.append(f"{rel}:{i}")
            if "av.open(" in line and not (rel == "data/video.py" and ("mode=\"w\"" in line or "io.BytesIO(data)" in line)):
                found.append(f"{rel}:{i}")
    assert found == [], found
