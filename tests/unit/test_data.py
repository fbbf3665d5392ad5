"""Synthetic shards and the webdataset pipeline: decoding, corruption, splitting."""

from __future__ import annotations

import io
import torch
import itertools
import json
import tarfile

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scaletrain.data import (
    LoaderSpec,
    build_loader,
    caption_is_dropped,
    decode_image,
    expand_shards,
    iter_epoch_samples,
    make_synthetic_sample,
    missing_local_shards,
    resolve_split,
    write_synthetic_shards,
    write_tar_shard,
)

RES = 64


def _write_uneven(out: Path, sizes: list[int], fmt: str = "jpg") -> list[str]:
    """Shards with ``sizes`` samples each; keys are global indices in shard order."""
    out.mkdir(parents=True, exist_ok=True)
    paths, index = [], 0
    for i, size in enumerate(sizes):
        path = out / f"shard-{i:06d}.tar"
        write_tar_shard(path, [make_synthetic_sample(index + j, 0, RES, fmt) for j in range(size)])
        paths.append(str(path))
        index += size
    return paths


def _all_keys(sizes: list[int]) -> list[str]:
    return [f"{i:09d}" for i in range(sum(sizes))]


def _take(loader, n: int) -> list[dict]:
    return list(itertools.islice(iter(loader), n))


@pytest.fixture(scope="module")
def shards64(tmp_path_factory) -> list[str]:
    return write_synthetic_shards(
        tmp_path_factory.mktemp("synth"), num_samples=32, samples_per_shard=8, resolution=RES, seed=3
    )


# ------------------------------------------------------------------- synth


def test_synth_is_deterministic_and_seeded(tmp_path: Path) -> None:
    kw = dict(num_samples=20, samples_per_shard=6, resolution=RES)
    a = write_synthetic_shards(tmp_path / "a", seed=7, **kw)
    b = write_synthetic_shards(tmp_path / "b", seed=7, **kw)
    c = write_synthetic_shards(tmp_path / "c", seed=8, **kw)
    assert [Path(p).name for p in a] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert all(Path(x).read_bytes() == Path(y).read_bytes() for x, y in zip(a, b))
    assert Path(a[0]).read_bytes() != Path(c[0]).read_bytes()


def test_manifest_and_metadata(tmp_path: Path) -> None:
    shards = write_synthetic_shards(tmp_path, num_samples=10, samples_per_shard=4, resolution=32, seed=1, image_format="png")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["num_samples"] == 10 and manifest["resolution"] == 32 and manifest["seed"] == 1
    assert manifest["shards"] == [Path(s).name for s in shards]
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
        assert names[:3] == ["000000000.png", "000000000.txt", "000000000.json"]
        for key in ("000000000", "000000003"):
            caption = tar.extractfile(f"{key}.txt").read().decode()
            meta = json.loads(tar.extractfile(f"{key}.json").read())
            image = Image.open(io.BytesIO(tar.extractfile(f"{key}.png").read()))
            assert meta["caption"] == caption and meta["key"] == key and meta["status"] == "success"
            assert f"{meta['color']} {meta['shape']}" in caption
            assert image.size == (32, 32) == (meta["width"], meta["height"])
            assert 4 <= meta["aesthetic"] <= 7 and 0 <= meta["punsafe"] <= 0.2 and 0 <= meta["pwatermark"] <= 0.5


def test_synth_rejects_bad_args(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_format"):
        write_synthetic_shards(tmp_path, num_samples=2, samples_per_shard=2, resolution=32, image_format="gif")


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_shapes_and_range(shards64: list[str], resolution: int, num_workers: int) -> None:
    spec = LoaderSpec(shards=shards64, resolution=resolution, micro_batch=4, num_workers=num_workers)
    for batch in _take(build_loader(spec), 3):
        pixels = batch["pixels"]
        assert pixels.shape == (4, 3, resolution, resolution) and str(pixels.dtype) == "torch.float32"
        assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.max() > 0.5
        assert len(batch["captions"]) == len(batch["keys"]) == 4 and batch["skipped"] == 0


def test_non_square_image_is_center_cropped() -> None:
    # 96x48: red | green | blue in 24/48/24 columns; the center crop must be green.
    arr = np.zeros((48, 96, 3), np.uint8)
    arr[:, :24] = (255, 0, 0)
    arr[:, 24:72] = (0, 255, 0)
    arr[:, 72:] = (0, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    pixels = decode_image(buf.getvalue(), 32)
    assert pixels.shape == (3, 32, 32)
    inner = pixels[:, :, 2:-2]  # bicubic blends a pixel or two at the colour borders
    assert inner[1].min() > 0.9 and inner[0].max() < -0.9 and inner[2].max() < -0.9


def _corrupt_shard(path: Path) -> list[str]:
    """Six samples: 1 garbage jpg, 1 without image, 1 bad json; returns the good keys."""
    samples = [make_synthetic_sample(i, 0, RES) for i in range(6)]
    samples[1]["jpg"] = b"\xff\xd8 this is not a jpeg"
    del samples[3]["jpg"]
    samples[4]["json"] = "{not json"
    del samples[5]["txt"]  # missing caption: falls back to the json caption, not corrupt
    write_tar_shard(path, samples)
    return [s["__key__"] for i, s in enumerate(samples) if i not in (1, 3, 4)]


def test_corrupt_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    good = _corrupt_shard(tmp_path / "bad.tar")
    spec = LoaderSpec(shards=[str(tmp_path / "bad.tar")], resolution=32, micro_batch=1, num_workers=0)
    batches = _take(build_loader(spec), 6)  # two epochs of 3 good samples each
    assert [b["keys"][0] for b in batches] == good * 2
    assert sum(b["skipped"] for b in batches[:3]) == 3
    assert all(b["captions"][0] for b in batches)


def _bad_data_shard(path: Path) -> None:
    """8 samples: 0 good, 1 no caption anywhere, 2 a non-UTF-8 caption, 3 an empty .txt (a valid
    unconditional caption), 4 a 2000x2000 image, 5 a 2 MiB extra member, 6-7 good."""
    samples = [make_synthetic_sample(i, 0, 32) for i in range(8)]
    del samples[1]["txt"]
    samples[1]["json"] = json.dumps({k: v for k, v in json.loads(samples[1]["json"]).items() if k != "caption"})
    samples[2]["txt"] = b"caf\xe9 au lait"  # latin-1, not UTF-8
    samples[3]["txt"] = ""
    buf = io.BytesIO()
    Image.new("RGB", (2000, 2000), (200, 10, 10)).save(buf, format="PNG")
    del samples[4]["jpg"]
    samples[4]["png"] = buf.getvalue()
    samples[5]["extra.bin"] = b"\0" * (2 * 2**20)
    write_tar_shard(path, samples)


def test_truncated_shard_counts_the_samples_its_manifest_says_it_lost(tmp_path: Path, capsys) -> None:
    """A synthetic set (manifest.json: 10 per shard) with shard 1 cut inside its 4th image: 3
    samples read, 7 lost; the epoch's skipped count is 7, not 1."""
    shards = write_synthetic_shards(tmp_path, num_samples=20, samples_per_shard=10, resolution=32, seed=0)
    with tarfile.open(shards[1]) as tar:
        cut = tar.getmember("000000013.jpg")
    data = Path(shards[1]).read_bytes()
    Path(shards[1]).write_bytes(data[: cut.offset_data + cut.size // 2])
    spec = LoaderSpec(shards=shards, resolution=32, micro_batch=1, num_workers=0)
    batches = _take(build_loader(spec), 14)  # epoch 0: 13 good samples; the 14th batch is epoch 1's first
    assert [b["keys"][0] for b in batches[:13]] == [f"{i:09d}" for i in range(13)]
    assert sum(b["skipped"] for b in batches) == 7
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("scaletrain: data: shard")]
    assert len(err) == 1 and "damaged after 3 samples" in err[0] and "7 of its 10 samples lost" in err[0]


@pytest.mark.parametrize("mode", ["empty", "skip"])
def test_bad_data_is_counted_by_kind_and_the_run_goes_on(tmp_path: Path, mode: str) -> None:
    _bad_data_shard(tmp_path / "bad.tar")
    spec = LoaderSpec(shards=[str(tmp_path / "bad.tar")], resolution=32, micro_batch=1, num_workers=0,
                      bad_captions=mode, max_image_pixels=1_000_000, max_member_bytes=2**20)
    kept = ["000000000", "000000001", "000000002", "000000003", "000000006", "000000007"]
    if mode == "skip":
        kept = [k for k in kept if k not in ("000000001", "000000002")]
    batches = _take(build_loader(spec), len(kept))
    assert [b["keys"][0] for b in batches] == kept
    captions = {b["keys"][0]: b["captions"][0] for b in batches}
    assert captions["000000003"] == "" and captions["000000000"]
    issues: dict[str, int] = {}
    for b in batches:
        for kind, n in b["issues"].items():
            issues[kind] = issues.get(kind, 0) + n
    assert issues == {"bad_caption": 2, "image_too_large": 1, "member_too_large": 1}
    if mode == "empty":
        assert captions["000000001"] == captions["000000002"] == ""


def test_image_too_large_is_refused_from_its_header(monkeypatch) -> None:
    from scaletrain.data.samples import ImageTooLarge

    buf = io.BytesIO()
    Image.new("RGB", (3000, 1000)).save(buf, format="PNG")
    monkeypatch.setattr(Image.Image, "convert", lambda *a, **k: pytest.fail("decoded a refused image"))
    with pytest.raises(ImageTooLarge, match="3000x1000 pixels"):
        decode_image(buf.getvalue(), 32, max_pixels=2_999_999)


def test_pipe_shards_need_an_explicit_yes(tmp_path: Path, synth_shards) -> None:
    from scaletrain.config import ConfigError
    from scaletrain.checks import load_run_config as load_config
    from tests.conftest import shard_pattern

    spec = LoaderSpec(shards=["pipe:cat /dev/null"], resolution=32, micro_batch=1, num_workers=0)
    with pytest.raises(ValueError, match=r"'pipe:cat /dev/null' runs a shell command .* data.allow_pipe_shards: true"):
        build_loader(spec)
    sets = ["train.stages.0.global_batch=null", "train.stages.1.global_batch=null"]
    with pytest.raises(ConfigError, match=r"data.shards: 'pipe:curl -s http://x/a.tar' runs a shell command"):
        load_config("configs/demo.yaml", ["data.shards=pipe:curl -s http://x/a.tar", *sets])
    with pytest.raises(ConfigError, match=r"validate.shards: 'pipe:cat v.tar' runs a shell command"):
        load_config("configs/demo.yaml", [f"data.shards={shard_pattern(synth_shards)}", "validate.shards=pipe:cat v.tar",
                                          *sets])


def test_truncated_shard_does_not_crash(tmp_path: Path, capsys) -> None:
    paths = _write_uneven(tmp_path, [4, 4])
    with tarfile.open(paths[1]) as tar:
        cut = tar.getmember("000000006.jpg")
    data = Path(paths[1]).read_bytes()
    Path(paths[1]).write_bytes(data[: cut.offset_data + cut.size // 2])  # mid-image
    spec = LoaderSpec(shards=paths, resolution=32, micro_batch=2, num_workers=0)
    batches = _take(build_loader(spec), 7)  # 2+ epochs of the 6 intact samples
    keys = [k for b in batches for k in b["keys"]]
    assert keys == [f"{i:09d}" for i in range(6)] * 2 + keys[:2]
    # One marker per epoch; epoch 1's lands in the batch after its last sample.
    assert [b["skipped"] for b in batches] == [0, 0, 0, 1, 0, 0, 1]
    # the damaged shard is named once, with how many samples came before the damage
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("scaletrain: data: shard")]
    assert len(err) == 1 and paths[1] in err[0] and "damaged after 2 samples" in err[0]


# ---------------------------------------------------------------- shards


def test_expand_shards(tmp_path: Path) -> None:
    paths = _write_uneven(tmp_path, [1, 1, 1])
    assert expand_shards(str(tmp_path / "shard-{000000..000002}.tar")) == paths
    assert expand_shards(str(tmp_path)) == paths
    assert expand_shards(str(tmp_path / "shard-*.tar")) == paths
    assert expand_shards(paths) == paths  # idempotent
    urls = ["https://host/s-{0..1}.tar", "pipe:curl -s x.tar", "s3://bucket/a.tar"]
    assert expand_shards(urls) == ["https://host/s-0.tar", "https://host/s-1.tar", *urls[1:]]
    with pytest.raises(ValueError, match="data.shards"):
        expand_shards(str(tmp_path / "nothing-*.tar"))


def test_missing_local_shards(tmp_path: Path) -> None:
    paths = _write_uneven(tmp_path, [1])
    urls = [*paths, str(tmp_path / "gone.tar"), "https://host/x.tar", "pipe:cat y.tar"]
    assert missing_local_shards(urls) == [str(tmp_path / "gone.tar")]


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="caption_dropout"):
        LoaderSpec(shards=["x.tar"], resolution=32, micro_batch=2, caption_dropout=1.5)
    with pytest.raises(ValueError, match="rank"):
        LoaderSpec(shards=["x.tar"], resolution=32, micro_batch=2, rank=2, world_size=2)
    spec = LoaderSpec(shards=["x.tar"], resolution=32, micro_batch=2, split="shard", world_size=2, num_workers=2)
    with pytest.raises(ValueError, match="split='shard'"):
        resolve_split(spec, 3)
    assert resolve_split(LoaderSpec(shards=["x"], resolution=8, micro_batch=1, world_size=2, num_workers=2), 3) == "sample"


# ---------------------------------------------------------- caption dropout


def test_caption_dropout_rate_and_determinism(shards64: list[str]) -> None:
    keys = [f"{i:09d}" for i in range(4000)]
    rate = np.mean([caption_is_dropped(0, k, 0, 0.2) for k in keys])
    assert abs(rate - 0.2) < 0.03
    assert [caption_is_dropped(0, k, 1, 0.2) for k in keys] != [caption_is_dropped(0, k, 0, 0.2) for k in keys]
    assert not any(caption_is_dropped(0, k, 0, 0.0) for k in keys)

    def captions(world: int, rank: int) -> dict[str, str]:
        spec = LoaderSpec(shards=shards64, resolution=8, micro_batch=1, caption_dropout=0.5,
                          num_workers=0, split="sample", world_size=world, rank=rank)
        return {s["key"]: s["caption"] for s in iter_epoch_samples(spec)}

    one = captions(1, 0)
    assert one == captions(1, 0) == {**captions(2, 0), **captions(2, 1)}  # layout-independent
    assert 4 <= sum(c == "" for c in one.values()) <= 28


# ---------------------------------------------------------------- splitting


@pytest.mark.parametrize(
    ("sizes", "mode"),
    [([4] * 8, "shard"), ([4] * 3, "sample"), ([5, 1, 7], "sample"), ([5, 1, 7, 2, 3], "shard")],
)
@pytest.mark.parametrize("shuffle", [0, 5])
def test_epoch_coverage_2_ranks_x_2_workers(tmp_path: Path, sizes: list[int], mode: str, shuffle: int) -> None:
    paths = _write_uneven(tmp_path, sizes)
    for epoch in (0, 1):
        seen: list[str] = []
        for rank in range(2):
            spec = LoaderSpec(shards=paths, resolution=8, micro_batch=1, num_workers=2,
                              shuffle_buffer=shuffle, rank=rank, world_size=2)
            assert resolve_split(spec, len(paths)) == mode
            for worker in range(2):
                seen += [s["key"] for s in iter_epoch_samples(spec, epoch, worker, offset=epoch * sum(sizes))]
        assert sorted(seen) == _all_keys(sizes), f"epoch {epoch}: each sample exactly once"


def test_loader_is_infinite_on_every_rank(tmp_path: Path) -> None:
    # 3 uneven shards < 4 slots: webdataset's own splitters would raise or starve here.
    sizes = [5, 1, 7]
    paths = _write_uneven(tmp_path, sizes)
    for rank in range(2):
        spec = LoaderSpec(shards=paths, resolution=8, micro_batch=3, num_workers=2, rank=rank, world_size=2)
        batches = _take(build_loader(spec), 14)  # 42 samples per rank, > 3x the dataset
        assert all(len(b["keys"]) == 3 and b["pixels"].shape[0] == 3 for b in batches)
        # Worker w (batches w::2) holds slot 2w+rank: samples j with j % 4 == slot.
        for worker in range(2):
            slot = worker * 2 + rank
            keys = [int(k) for b in batches[worker::2] for k in b["keys"]]
            assert keys == [j % 13 for j in range(slot, 4 * 21, 4)]


def test_shard_split_with_one_sample_slot_loops(tmp_path: Path) -> None:
    # Shard i -> slot i % 4 = worker * world + rank: slot 1 (worker 0, rank 1) holds one sample.
    paths = _write_uneven(tmp_path, [5, 1, 7, 2])
    spec = LoaderSpec(shards=paths, resolution=8, micro_batch=4, num_workers=2, rank=1, world_size=2)
    batches = _take(build_loader(spec), 6)
    assert all(b["keys"] == ["000000005"] * 4 for b in batches[0::2])
    assert [k for b in batches[1::2] for k in b["keys"]] == ["000000013", "000000014"] * 6


def test_empty_slot_raises_instead_of_hanging(tmp_path: Path) -> None:
    paths = _write_uneven(tmp_path, [2])
    spec = LoaderSpec(shards=paths, resolution=8, micro_batch=1, num_workers=0, rank=3, world_size=4)
    with pytest.raises(RuntimeError, match="no decodable samples"):
        _take(build_loader(spec), 1)


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("shuffle", [0, 4])
def test_sample_split_is_layout_invariant(tmp_path: Path, num_workers: int, shuffle: int) -> None:
    sizes = [5, 1, 7]  # 13 samples: epochs do not align with the global batch of 4
    paths = _write_uneven(tmp_path, sizes)

    def keys(world: int, rank: int, micro: int) -> list[list[str]]:
        spec = LoaderSpec(shards=paths, resolution=8, micro_batch=micro, num_workers=num_workers,
                          shuffle_buffer=shuffle, split="sample", rank=rank, world_size=world)
        return [b["keys"] for b in _take(build_loader(spec), 10)]

    single, r0, r1 = keys(1, 0, 4), keys(2, 0, 2), keys(2, 1, 2)
    for step in range(10):
        assert sorted(single[step]) == sorted(r0[step] + r1[step]), f"step {step}"
    if shuffle == 0:  # rank r's n-th sample is global sample n*world + r
        flat = [k for b in single for k in b]
        assert [k for b in r1 for k in b] == flat[1::2][:20]
        assert flat[:14] == [f"{j % 13:09d}" for j in range(14)]


# ------------------------------------------------------- resume position


def _positions(batches: list[dict], upto: int) -> dict:
    """Each slot's state after its last batch below ``upto``: what a checkpoint stores."""
    out = {}
    for b in batches[:upto]:
        pos = b["position"]
        out[str(pos["slot"])] = {"done": pos["done"], "state": pos["state"]}
    return json.loads(json.dumps(out))  # through JSON, as the trainer state carries it


@pytest.mark.parametrize("shuffle,split,workers,buckets", [
    (0, "sample", 0, False), (16, "shard", 0, False), (16, "sample", 0, True), (8, "shard", 2, False)])
def test_resume_position_continues_the_stream_exactly_without_replaying_it(
        tmp_path: Path, monkeypatch, shuffle: int, split: str, workers: int, buckets: bool) -> None:
    """Issue 16 part 4: from the positions a checkpoint stores, a loader continues with exactly
    the batches the uninterrupted one gives (same keys, same pixels; shuffle buffer, shard and
    sample split, workers, buckets, epoch boundaries), and decodes nothing it skipped: resuming
    after 4 or after 45 batches decodes the same number of images before its first batch."""
    from dataclasses import replace

    import scaletrain.data.pipeline as pipeline

    shards = write_synthetic_shards(tmp_path, num_samples=60, samples_per_shard=10, resolution=32, seed=0,
                                    aspect_ratios=[1.0, 1.5] if buckets else None)
    spec = LoaderSpec(shards=shards, resolution=32, micro_batch=3, num_workers=workers, shuffle_buffer=shuffle,
                      split=split, world_size=2, rank=1, caption_dropout=0.3,
                      buckets=((32, 32), (48, 32)) if buckets else ())
    straight = _take(build_loader(spec), 60)  # 30 samples per rank per epoch: 6 epochs
    decodes = [0]
    real = pipeline.decode_image

    def counting(*args, **kwargs):
        decodes[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "decode_image", counting)
    before_first = {}
    for k in (4, 45):
        decodes[0] = 0
        resumed = iter(build_loader(replace(spec, skip_batches=k, resume=_positions(straight, k))))
        first = next(resumed)
        before_first[k] = decodes[0]
        got = [first] + _take(resumed, 4)
        assert [b["keys"] for b in got] == [b["keys"] for b in straight[k:k + 5]]
        assert [b["captions"] for b in got] == [b["captions"] for b in straight[k:k + 5]]
        for a, b in zip(got, straight[k:k + 5]):
            assert torch.equal(a["pixels"], b["pixels"])
    if workers == 0:
        if buckets:  # a bucket still filling at the checkpoint is re-read: bounded by the buckets, not by k
            assert max(before_first.values()) <= 2 * spec.micro_batch
        else:
            assert before_first[4] == before_first[45] == spec.micro_batch  # just the first batch's images


def test_resume_position_then_skip_moves_on_past_a_stretch(tmp_path: Path) -> None:
    """A rollback resumes from a checkpoint's positions and skips the micro-batches it rolled
    back over: skip_batches beyond the positions continues at the right batch."""
    from dataclasses import replace

    shards = write_synthetic_shards(tmp_path, num_samples=40, samples_per_shard=10, resolution=32, seed=0)
    spec = LoaderSpec(shards=shards, resolution=32, micro_batch=2, num_workers=0, shuffle_buffer=8)
    straight = _take(build_loader(spec), 30)
    resumed = _take(build_loader(replace(spec, skip_batches=13, resume=_positions(straight, 10))), 3)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in straight[13:16]]


def test_resume_position_keeps_the_mixing_picks(tmp_path: Path) -> None:
    """Two weighted sources: the per-position source picks continue where they were."""
    from dataclasses import replace

    from scaletrain.data.mixing import Source

    shards = write_synthetic_shards(tmp_path, num_samples=40, samples_per_shard=10, resolution=32, seed=0)
    spec = LoaderSpec(shards=[], sources=(Source("a", tuple(shards[:2]), 0.7, None), Source("b", tuple(shards[2:]), 0.3, None)),
                      resolution=32, micro_batch=2, num_workers=0, shuffle_buffer=4)
    straight = _take(build_loader(spec), 40)
    resumed = _take(build_loader(replace(spec, skip_batches=23, resume=_positions(straight, 23))), 8)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in straight[23:31]]
    assert [b["sources"] for b in resumed] == [b["sources"] for b in straight[23:31]]
