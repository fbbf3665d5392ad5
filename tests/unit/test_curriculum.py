"""Curriculum extras: stage length in images, per-stage noise offset, aspect-ratio buckets
(sizes, assignment, one-bucket batches, determinism, resume), FLOPs of non-square inputs, and
the start-up check of the validation reference count."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from scaletrain.config import ConfigError
from scaletrain.checks import load_run_config as load_config
from scaletrain.data import LoaderSpec, build_loader, decode_image, write_synthetic_shards
from scaletrain.data.buckets import BucketSpec, bucket_sizes, nearest_bucket
from scaletrain.diffusion import build_objective
from scaletrain.diffusion.objectives.ddpm import sample_noise, sample_timesteps
from scaletrain.diffusion.seeding import per_sample_generators
from scaletrain.models.registry import stage_buckets
from scaletrain.train.curriculum import planned_stage_steps, stage_objective
from tests.conftest import REPO

DEMO = REPO / "configs" / "demo.yaml"
RATIOS = [1.0, 2.0, 0.5, 1.5, 0.667]


def _cfg(*sets: str, world: int = 2):
    """The demo recipe without its stated global batches, so any world size validates."""
    free = ["train.stages.0.global_batch=null", "train.stages.1.global_batch=null"]
    return load_config(DEMO, [*free, *sets], world_size=world, check_paths=False)


# ----------------------------------------------------------------- stage length in images


def test_images_resolve_to_steps_rounded_up_per_world_size():
    sets = ["train.stages.1.steps=null", "train.stages.1.images=100"]
    # stage 1: micro 4 x accum 1 -> global batch 4 per rank count
    assert _cfg(*sets, world=2).stage_steps(1, 2) == 13  # ceil(100 / 8)
    assert _cfg(*sets, world=1).stage_steps(1, 1) == 25  # 100 / 4 exactly
    assert _cfg(*sets, world=3).stage_steps(1, 3) == 9  # ceil(100 / 12)
    cfg = _cfg(*sets, world=2)
    assert cfg.stage_steps(0, 2) == 100 and cfg.stage_images(0, 2) == 1600  # a steps stage: steps x batch
    assert cfg.stage_images(1, 2) == 100


@pytest.mark.parametrize("sets,message", [
    (["train.stages.1.images=100"], "train.stages.1 sets both of steps and images; give exactly one"),
    (["train.stages.0.steps=null"], "train.stages.0 sets neither of steps and images; give exactly one"),
    (["train.stages.1.steps=null", "train.stages.1.images=0"], "train.stages.1.images=0"),
])
def test_stage_length_errors_are_one_line(sets, message):
    with pytest.raises(ConfigError) as err:
        _cfg(*sets)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_resumed_images_stage_replans_from_images_left():
    sets = ["train.stages.1.steps=null", "train.stages.1.images=100"]
    two, one = _cfg(*sets, world=2), _cfg(*sets, world=1)
    # same global batch: the plan of a fresh start (13 steps of 8)
    assert planned_stage_steps(two, 1, 2, steps_done=5, images_done=40) == 13
    # 2 ranks (batch 8) for 5 steps, then 1 rank (batch 4): 60 images left -> 15 more steps
    assert planned_stage_steps(one, 1, 1, steps_done=5, images_done=40) == 20
    # a steps-length stage keeps its steps whatever the batch
    assert planned_stage_steps(one, 0, 1, steps_done=5, images_done=80) == 100
    # a recipe that now ends the stage before the checkpoint's position fails with one line
    with pytest.raises(ConfigError, match=r"train.stages.1.images=30 but the checkpoint is already 5 steps"):
        planned_stage_steps(_cfg(sets[0], "train.stages.1.images=30"), 1, 2, steps_done=5, images_done=40)


# ----------------------------------------------------------------- noise offset per stage


def test_stage_noise_offset_reaches_the_noise():
    cfg = _cfg("train.stages.1.noise_offset=0.4")
    base = build_objective("ddpm", {"noise_offset": cfg.diffusion.params()["noise_offset"]})  # epsilon target
    assert stage_objective(base, cfg, 0) is base  # no stage value: diffusion.noise_offset (0.05)
    obj = stage_objective(base, cfg, 1)
    assert obj.params.noise_offset == 0.4 and obj.params.prediction_type == base.params.prediction_type
    sched = obj.noise_scheduler
    x0 = torch.randn(3, 3, 8, 8)
    keys = ["a", "b", "c"]
    tb = obj.training_batch(x0, keys, step=7, seed=1)
    noisy, t, target = tb.noisy, tb.t, tb.target
    # the same draws by hand: timesteps first, then noise with the stage's offset
    gens = per_sample_generators(1, 7, keys)
    t_ref = sample_timesteps(obj.params.num_train_timesteps, gens)
    noise = sample_noise(x0.shape, noise_offset=0.4, generators=gens)
    assert torch.equal(t, t_ref) and torch.equal(target, noise)
    assert torch.allclose(noisy, sched.add_noise(x0, noise, t))
    noise_base = sample_noise(x0.shape, noise_offset=0.05, generators=per_sample_generators(1, 7, keys))
    assert not torch.allclose(target, noise_base)  # it is not the diffusion-level offset


# ----------------------------------------------------------------- bucket sets


@pytest.mark.parametrize("resolution,factor", [(32, 2), (48, 2), (256, 8), (512, 16), (512, 64), (1024, 64)])
@pytest.mark.parametrize("max_aspect", [1.5, 2.0, 3.0])
def test_bucket_sets_divide_keep_area_and_cover_aspects(resolution, factor, max_aspect):
    spec = BucketSpec(enabled=True, max_aspect=max_aspect)
    sizes = spec.sizes(resolution, factor)
    assert (resolution, resolution) in sizes  # 7 buckets: odd, so the square is one of them
    assert sizes == sorted(sizes, key=lambda wh: wh[0] / wh[1]) and len(set(sizes)) == len(sizes)
    for w, h in sizes:
        assert w % factor == 0 and h % factor == 0
        # never more pixels than the square (a micro-batch that fits at R x R fits), and within
        # one factor-wide strip of it
        assert resolution**2 - factor * (w + h) <= w * h <= resolution**2
        assert (h, w) in sizes  # symmetric: every wide bucket has its tall transpose
    aspects = [w / h for w, h in sizes]
    # the extremes reach max_aspect as nearly as the factor allows (one step of factor on the short side)
    slack = 1 + 2 * factor / min(min(sizes, key=lambda wh: wh[0] / wh[1]))
    assert max(aspects) >= max_aspect / slack and min(aspects) <= slack / max_aspect
    assert max(aspects) <= max_aspect * slack


def test_bucket_ratios_explicit_and_errors():
    assert bucket_sizes(64, 2, [1.0]) == [(64, 64)]
    assert BucketSpec(aspect_ratios=[2.0, 0.5, 1.0]).sizes(64, 2) == [(44, 90), (64, 64), (90, 44)]
    assert len(BucketSpec(num_buckets=3).ratios()) == 3 and BucketSpec(num_buckets=1).ratios() == [1.0]
    for sets, message in [
        (["data.buckets.aspect_ratios=[1.0, 3.0]"],
         "data.buckets.aspect_ratios has 3.0 outside [1/max_aspect, max_aspect]"),
        (["data.buckets.aspect_ratios=[1.0]", "data.buckets.num_buckets=3"], "sets both num_buckets and aspect_ratios"),
        (["data.buckets.max_aspect=0.5"], "data.buckets.max_aspect=0.5"),
        (["data.buckets.size=3"], "data.buckets.size is not a known key"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            _cfg(*sets)
    cfg = _cfg("data.buckets.enabled=true")
    assert stage_buckets(cfg, 0) == BucketSpec().sizes(32, 2) and (64, 64) in stage_buckets(cfg, 1)
    assert stage_buckets(_cfg(), 0) == []


def test_nearest_bucket_in_log_aspect():
    buckets = [(22, 44), (32, 32), (44, 22)]
    assert nearest_bucket(100, 100, buckets) == 1
    assert nearest_bucket(300, 100, buckets) == 2 and nearest_bucket(100, 300, buckets) == 0
    # 1.41 is nearer 2 than 1 in log space (log 1.41 > log 2 / 2), 1.4 is nearer 1
    assert nearest_bucket(142, 100, buckets) == 2 and nearest_bucket(140, 100, buckets) == 1


# ----------------------------------------------------------------- loader with buckets


@pytest.fixture(scope="module")
def wide_shards(tmp_path_factory) -> list[str]:
    return write_synthetic_shards(tmp_path_factory.mktemp("ar"), num_samples=40, samples_per_shard=5, resolution=32,
                                  seed=2, aspect_ratios=RATIOS)


def _meta(shards: list[str]) -> dict[str, dict]:
    out = {}
    for path in shards:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    out[meta["key"]] = meta
    return out


def test_synth_aspect_ratios_write_sizes_and_metadata(wide_shards):
    meta = _meta(wide_shards)
    with tarfile.open(wide_shards[0]) as tar:
        for m in tar.getmembers():
            if m.name.endswith(".jpg"):
                key = m.name.split(".")[0]
                w, h = Image.open(io.BytesIO(tar.extractfile(m).read())).size
                assert (w, h) == (meta[key]["width"], meta[key]["height"])
                assert (w, h) == (meta[key]["original_width"], meta[key]["original_height"])
                assert min(w, h) == 32 and w / h == pytest.approx(RATIOS[int(key) % len(RATIOS)], rel=0.02)
    assert json.loads((Path(wide_shards[0]).parent / "manifest.json").read_text())["aspect_ratios"] == RATIOS


def _bucket_spec(shards, **kw) -> LoaderSpec:
    return LoaderSpec(shards=shards, resolution=32, micro_batch=2, num_workers=0, split="sample",
                      buckets=tuple(BucketSpec(max_aspect=2.0).sizes(32, 2)), **kw)


def test_bucketed_batches_hold_one_bucket_nearest_each_image(wide_shards):
    spec = _bucket_spec(wide_shards)
    meta = _meta(wide_shards)
    batches = list(itertools.islice(iter(build_loader(spec)), 19))  # 38 of the 40 samples
    shapes = {tuple(b["pixels"].shape[-2:]) for b in batches}
    assert len(shapes) >= 4  # 22x44, 32x32, 44x22, and 1.5 / 0.667 land in their own buckets
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == len(set(keys))  # no sample twice within the epoch
    for b in batches:
        h, w = b["pixels"].shape[-2:]
        assert b["pixels"].shape[0] == 2 and (w, h) in spec.buckets
        for key in b["keys"]:
            m = meta[key]
            assert spec.buckets[nearest_bucket(m["width"], m["height"], spec.buckets)] == (w, h)


def test_bucket_decode_covers_and_center_crops():
    img = Image.new("RGB", (60, 30), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 10, 30))  # a black strip at the far left: cropped away in a square
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    wide = decode_image(buf.getvalue(), 32, ((22, 44), (32, 32), (44, 22)))
    assert wide.shape == (3, 22, 44) and wide[:, :, 0].mean() < -0.9  # 2:1 bucket keeps the strip
    square = decode_image(buf.getvalue(), 32)
    assert square.shape == (3, 32, 32) and square[:, :, 0].mean() > 0.9
    assert torch.equal(decode_image(buf.getvalue(), 32, ((32, 32),)), square)


def test_bucketed_loader_is_deterministic_and_resumes_with_skip(wide_shards):
    full = list(itertools.islice(iter(build_loader(_bucket_spec(wide_shards))), 30))  # wraps into epoch 2
    again = list(itertools.islice(iter(build_loader(_bucket_spec(wide_shards))), 30))
    assert [b["keys"] for b in full] == [b["keys"] for b in again]
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(full, again))
    for skip in (3, 17):
        resumed = list(itertools.islice(iter(build_loader(_bucket_spec(wide_shards, skip_batches=skip))), 30 - skip))
        assert [b["keys"] for b in resumed] == [b["keys"] for b in full[skip:]]
        assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(resumed, full[skip:]))


def test_bucketed_ranks_split_the_samples(wide_shards):
    seen = []
    for rank in (0, 1):
        spec = _bucket_spec(wide_shards, rank=rank, world_size=2)
        batches = list(itertools.islice(iter(build_loader(spec)), 9))
        assert all(len({tuple(p.shape) for p in b["pixels"]}) == 1 for b in batches)
        seen.append({k for b in batches for k in b["keys"]})
    assert not seen[0] & seen[1]


# ----------------------------------------------------------------- FLOPs of non-square inputs


@pytest.mark.parametrize("name", ["unet-tiny", "dit-tiny", "mmdit-tiny", "flux-tiny"])
def test_flops_of_a_bucket_match_flop_counter(name):
    from torch.utils.flop_counter import FlopCounterMode

    from scaletrain.models.family import get_family

    from scaletrain.models.flops import forward_flops_per_image
    from scaletrain.models import get_preset
    from scaletrain.models.registry import Denoiser, build_denoiser_net

    preset = get_preset(name)
    with torch.device("meta"):
        den = Denoiser(build_denoiser_net(preset), preset.family, use_text_mask=False)
    width = get_family(preset.family).text_width(preset.denoiser_config)
    h, w = 24, 40
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        den(torch.zeros(1, preset.in_channels, h, w, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"),
            preset.conditioner.example(1, device="meta"))
    assert forward_flops_per_image(name, (h, w)) == pytest.approx(fc.get_total_flops(), rel=5e-3)
    # transposed bucket, same FLOPs; square of the same side differs by the area ratio for convs
    assert forward_flops_per_image(name, (w, h)) == forward_flops_per_image(name, (h, w))
    assert forward_flops_per_image(name, (32, 32)) == forward_flops_per_image(name, 32)


# ----------------------------------------------------------------- validation reference count


def test_validation_reference_count_is_checked_at_start(tmp_path):
    from scaletrain.eval.validate import count_reference_images
    from scaletrain.eval.watchers import check_validation_reference

    shards = write_synthetic_shards(tmp_path / "val", num_samples=6, samples_per_shard=3, resolution=16, seed=1)
    with open(shards[1], "r+b") as f:  # damage the second shard: only its complete samples count
        f.truncate(1500)
    found = count_reference_images(shards, 64)
    assert 3 <= found < 6
    assert count_reference_images(shards, 2) == 2  # stops at num_images

    def check(*sets):
        cfg = _cfg(f"data.shards={tmp_path / 'val'}", *sets)
        check_validation_reference(cfg)

    check(f"validate.num_images={found}")  # enough: no error
    check("validate.num_images=64", "validate.every_steps=0", "validate.at_end=false")  # validation off
    with pytest.raises(ConfigError) as err:
        check("validate.num_images=64")
    assert str(err.value) == (f"validate.num_images=64 but the training shards (validate.shards is unset) hold only "
                              f"{found} decodable images; lower validate.num_images or point validate.shards at a "
                              "larger set")
    with pytest.raises(ConfigError, match=r"^validate.num_images=64 but validate.shards hold only"):
        check("validate.num_images=64", f"validate.shards={tmp_path / 'val'}")
