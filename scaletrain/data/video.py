"""Video clips from webdataset shards (``key.mp4`` / ``key.webm`` + ``key.txt`` + ``key.json``).

Decoded with PyAV (``av`` on PyPI), not torchcodec: PyAV's wheels carry their own FFmpeg
(decoders and the encoders ``data synth --video`` writes with), so ``pip install av`` is the
whole install on any Linux box, and it does not pin the torch version. torchcodec is built
against one torch release and needs the system's FFmpeg 4-7 shared libraries, which a
cluster image may not have.

A clip is ``frames`` frames at ``fps`` (the stage's), taken from a start frame drawn per
(seed, key, epoch) so every epoch sees another stretch of a long video, resized and
center-cropped exactly like an image (the same target size for every frame). Layout
(3, F, H, W) in [-1, 1], the (C, F, H, W) diffusers' video transformers take per sample.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")


class VideoTooShort(ValueError):
    """The video holds fewer frames than the clip needs at the stage's frame rate."""


class VideoFpsTooLow(ValueError):
    """The video's frame rate is below the stage's: frames would have to be invented."""


@dataclass(frozen=True)
class ClipSpec:
    frames: int  # frames per clip (>= 1)
    fps: float | None = None  # None: the video's own rate (consecutive frames)


def frame_stride(src_fps: float, fps: float | None) -> float:
    """Source frames per clip frame: 24 fps sampled at 8 is every 3rd frame."""
    if fps is None:
        return 1.0
    if src_fps + 1e-6 < fps:
        raise VideoFpsTooLow(f"{src_fps:g} fps < {fps:g}")
    return src_fps / fps


def clip_indices(num_frames: int, src_fps: float, clip: ClipSpec, rng: random.Random) -> list[int]:
    """Source frame indices of one clip: ``clip.frames`` frames ``frame_stride`` apart from a
    start drawn by ``rng`` among the starts that fit."""
    stride = frame_stride(src_fps, clip.fps)
    span = (clip.frames - 1) * stride  # source frames from the first to the last picked
    last_start = num_frames - 1 - math.ceil(span - 1e-9)
    if last_start < 0:
        raise VideoTooShort(f"{num_frames} frames < the {math.ceil(span - 1e-9) + 1} a {clip.frames}-frame clip "
                            f"at {clip.fps or src_fps:g} fps needs")
    start = rng.randint(0, last_start)
    return [start + round(i * stride) for i in range(clip.frames)]


# Untrusted video bytes are demuxed and decoded in process by PyAV's own FFmpeg, and only in
# these containers (FFmpeg's demuxer names) and codecs; anything else counts as corrupt before a
# frame is decoded. No member is ever handed to an external program.
VIDEO_CONTAINERS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi"})
VIDEO_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg"})


class VideoNotAllowed(ValueError):
    """The container or codec is not on the allow-list (the sample counts as corrupt)."""


def open_video(data: bytes):
    """PyAV container of untrusted bytes, refused (``VideoNotAllowed``) unless its container and
    first video stream's codec are allow-listed: the one place scaletrain opens shard videos."""
    import av

    container = av.open(io.BytesIO(data))
    try:
        fmt = container.format.name
        if fmt not in VIDEO_CONTAINERS:
            raise VideoNotAllowed(f"container {fmt!r} is not one of {sorted(VIDEO_CONTAINERS)}")
        if not container.streams.video:
            raise VideoNotAllowed("no video stream")
        codec = container.streams.video[0].codec_context.name
        if codec not in VIDEO_CODECS:
            raise VideoNotAllowed(f"codec {codec!r} is not one of {sorted(VIDEO_CODECS)}")
    except BaseException:
        container.close()
        raise
    return container


def probe_video(data: bytes) -> tuple[int, float, int, int]:
    """(frames, fps, width, height) from the container header, nothing decoded."""
    with open_video(data) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        frames = stream.frames
        if not frames and stream.duration is not None and stream.time_base is not None:
            frames = int(round(float(stream.duration * stream.time_base) * rate))
        return int(frames), rate, stream.codec_context.width, stream.codec_context.height


def decode_video(data: bytes, clip: ClipSpec, resolution: int, rng: random.Random,
                 buckets: tuple[tuple[int, int], ...] = ()) -> torch.Tensor:
    """Bytes -> float32 (3, F, H, W) in [-1, 1]: R x R, or with ``buckets`` the (W, H) bucket
    nearest the video's aspect ratio (as ``decode_image``).
    Decodes frames in order and stops after the clip's last one; raises ``VideoTooShort`` /
    ``VideoFpsTooLow`` (the sample is dropped and counted) and anything PyAV raises on bad bytes
    (the sample is corrupt), or ``VideoNotAllowed`` for a container or codec off the allow-list."""
    from scaletrain.data.buckets import nearest_bucket
    from scaletrain.data.samples import resize_crop  # the images' rule, frame by frame

    num_frames, src_fps, width, height = probe_video(data)
    tw, th = buckets[nearest_bucket(width, height, buckets)] if buckets else (resolution, resolution)
    if src_fps <= 0:
        raise ValueError("the video stream declares no frame rate")
    if num_frames <= 0:  # header without a count: decode to find it (rare for mp4/webm)
        with open_video(data) as container:
            num_frames = sum(1 for _ in container.decode(video=0))
    want = clip_indices(num_frames, src_fps, clip, rng)
    wanted = set(want)
    picked: dict[int, np.ndarray] = {}
    with open_video(data) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                picked[i] = np.asarray(resize_crop(frame.to_image(), tw, th), dtype=np.float32)
            if i >= want[-1]:
                break
    if len(picked) < len(wanted):  # the header promised more frames than the stream holds
        raise VideoTooShort(f"the stream ended after {i + 1} frames, before frame {want[-1]}")
    arr = np.stack([picked[i] for i in want]) / 127.5 - 1.0  # (F, H, W, 3)
    return torch.from_numpy(arr.transpose(3, 0, 1, 2).copy())


def encode_video(frames: list[Image.Image], fps: int, fmt: str = "mp4") -> bytes:
    """RGB frames -> an mp4 (MPEG-4 part 2, in every FFmpeg build) or webm (VP9) file."""
    import av

    codec = {"mp4": "mpeg4", "webm": "libvpx-vp9"}[fmt]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        if codec == "mpeg4":
            stream.options = {"qscale": "2"}  # near-lossless: the tiny shapes keep their colours
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def first_video_fps(url: str, max_members: int = 256) -> tuple[str, float] | None:
    """(key, fps) of the first video in a local shard: its metadata's ``fps`` (video2dataset
    writes it), else the container header. None: no video in the first ``max_members``."""
    import json
    import tarfile

    with tarfile.open(url) as tar:
        meta: dict[str, dict] = {}
        for n, member in enumerate(tar):
            if n >= max_members:
                return None
            key, _, ext = member.name.partition(".")
            if ext == "json":
                try:
                    meta[key] = json.loads(tar.extractfile(member).read())
                except ValueError:
                    meta[key] = {}
            elif ext in VIDEO_EXTS:
                data = tar.extractfile(member).read()
                fps = (meta.get(key) or {}).get("fps")
                if not isinstance(fps, (int, float)):
                    # the json may follow the video: the header then
                    fps = probe_video(data)[1]
                return key, float(fps)
    return None


def check_video_shards(cfg) -> None:
    """Before launch: a stage whose ``fps`` is above its videos' frame rate is one line (its first
    shard's first video stands for the set, as video2dataset writes one rate per dataset); a
    video preset on precomputed latents is refused (not built yet)."""
    from scaletrain.common.tars import expand_shards
    from scaletrain.models.registry import get_preset

    if not get_preset(cfg.model.preset).video:
        return
    if cfg.data.precomputed:
        raise ValueError(f"data.precomputed: precomputed latents of video presets ({cfg.model.preset}) are not "
                         "built yet; train from the clip shards")
    for i, st in enumerate(cfg.train.stages):
        if not (st.frames and st.fps):
            continue
        for where, shards in cfg.stage_shard_sets(i):
            urls = [u for u in expand_shards(shards) if "://" not in u and not u.startswith("pipe:")]
            found = first_video_fps(urls[0]) if urls else None
            if found is not None and found[1] + 1e-6 < st.fps:
                raise ValueError(f"train.stages.{i}.fps={st.fps:g} is above the {found[1]:g} fps of the videos in "
                                 f"{where} (sample {found[0]!r} of {urls[0]}); lower the stage's fps to at most "
                                 f"{found[1]:g} or use other shards")
