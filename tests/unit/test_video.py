"""Video (issue 18, parts 1-3 and 6's sample clips): shards of clips decoded with PyAV, sampled to a
stage's frames and fps; images as 1-frame clips in the same stream; bad videos skipped and
counted; the synthetic clips' captions say how the shape moves; the Wan family (tiny and real
size) with FLOPs against PyTorch's counter, LoRA in diffusers' Wan layout, and the one-line
config errors of frames stages. One process; the 2-rank run is tests/e2e/test_video.py."""

from __future__ import annotations

import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from scaletrain.config import ConfigError

from scaletrain.checks import load_config
from scaletrain.data.pipeline import LoaderSpec, build_loader
from scaletrain.data.synth import MOTIONS, write_synthetic_shards, write_synthetic_video_shards
from scaletrain.data.video import ClipSpec, VideoFpsTooLow, VideoTooShort, clip_indices, decode_video, probe_video
from scaletrain.models import build_model, count_params, get_preset, parallel_units
from scaletrain.models.registry import Denoiser, build_denoiser_net, stage_frames
from tests.conftest import REPO

VIDEO = REPO / "configs" / "video.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("video-shards")
    write_synthetic_video_shards(root / "clips", num_samples=16, samples_per_shard=8, resolution=32, frames=12, fps=8)
    write_synthetic_shards(root / "images", num_samples=16, samples_per_shard=8, resolution=32)
    return {"clips": root / "clips", "images": root / "images"}


def _members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_clip_indices_follow_the_stage_rate_and_fit_the_video():
    rng = random.Random(0)
    # 24 fps sampled at 8: every 3rd frame; 5 frames span 13 source frames
    for _ in range(50):
        idx = clip_indices(20, 24.0, ClipSpec(5, 8.0), rng)
        assert [b - a for a, b in zip(idx, idx[1:])] == [3] * 4 and 0 <= idx[0] and idx[-1] <= 19
    assert clip_indices(5, 8.0, ClipSpec(5), rng) == [0, 1, 2, 3, 4]  # own rate, exactly fits
    with pytest.raises(VideoTooShort, match="5 frames < the 6"):
        clip_indices(5, 8.0, ClipSpec(6), rng)
    with pytest.raises(VideoFpsTooLow, match="8 fps < 24"):
        clip_indices(100, 8.0, ClipSpec(2, 24.0), rng)


def test_synthetic_clips_move_the_way_their_captions_say(shards):
    """The shape's centre of mass in the first and the last decoded frame moves along the
    caption's direction: the caption is derivable from the frames, and only from several."""
    members = _members(shards["clips"] / "shard-000000.tar")
    keys = sorted({n.split(".")[0] for n in members})
    for key in keys:
        meta = json.loads(members[f"{key}.json"])
        caption = members[f"{key}.txt"].decode()
        assert caption.endswith(f"moving {meta['motion']}") and meta["fps"] == 8 and meta["frames"] == 12
        assert probe_video(members[f"{key}.mp4"])[:2] == (12, 8.0)
        clip = decode_video(members[f"{key}.mp4"], ClipSpec(12), 32, random.Random(0))
        assert clip.shape == (3, 12, 32, 32) and clip.min() >= -1 and clip.max() <= 1

        def centre(frame: torch.Tensor) -> np.ndarray:
            ink = (frame.mean(0) < 0.6).float()  # the shape is darker than the near-white background
            ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
            return np.array([(xs * ink).sum() / ink.sum(), (ys * ink).sum() / ink.sum()])

        moved = centre(clip[:, -1]) - centre(clip[:, 0])
        dx, dy = MOTIONS[meta["motion"]]
        assert moved @ np.array([dx, dy]) > 8, (caption, moved)  # ~16 px along the motion


def test_loader_samples_clips_and_counts_bad_videos(shards, tmp_path):
    """A stage of 5 frames at 4 fps: (B, 3, 5, 32, 32) batches. Planted bad samples: a
    truncated mp4 (corrupt: skipped), a 3-frame video (too short) and a 2 fps video (below the
    stage's rate), each counted under its own kind; none raises or hangs."""
    from scaletrain.data.synth import make_synthetic_video_sample, write_tar_shard

    good = [make_synthetic_video_sample(100 + i, 0, 32, 12, 8) for i in range(6)]
    short = make_synthetic_video_sample(200, 0, 32, 3, 8)
    slow = make_synthetic_video_sample(201, 0, 32, 12, 2)
    broken = dict(make_synthetic_video_sample(202, 0, 32, 12, 8))
    broken["mp4"] = broken["mp4"][:200]
    for s, k in ((short, "200x"), (slow, "201x"), (broken, "202x")):
        s["__key__"] = k
    write_tar_shard(tmp_path / "bad.tar", [good[0], short, good[1], slow, good[2], broken, *good[3:]])
    spec = LoaderSpec(shards=[str(tmp_path / "bad.tar")], resolution=32, micro_batch=3, num_workers=0,
                      frames=5, fps=4.0)
    it = iter(build_loader(spec))
    a, b = next(it), next(it)
    assert a["pixels"].shape == (3, 3, 5, 32, 32) and b["pixels"].shape == (3, 3, 5, 32, 32)
    assert a["skipped"] + b["skipped"] == 1  # each batch counts what was passed over since the last one
    assert a["issues"] == {"video_too_short": 1, "video_low_fps": 1} and not b["issues"]
    assert sorted(a["keys"] + b["keys"]) == sorted(g["__key__"] for g in good)
    # asked for more than any video holds: one line naming the fix, not an endless spin
    with pytest.raises(RuntimeError, match="every video it read is too short or below the frame rate for 13 frames"):
        next(iter(build_loader(LoaderSpec(shards=[str(tmp_path / "bad.tar")], resolution=32, micro_batch=2,
                                          num_workers=0, frames=13))))


def test_images_and_clips_train_in_one_stream_as_separate_batches(shards):
    """Joint image-video training: a clip source and an image source, weighted; images come as
    1-frame clips, and every batch holds one shape."""
    from scaletrain.data.mixing import Source

    sources = (Source("clips", tuple(str(p) for p in sorted(shards["clips"].glob("*.tar"))), 0.5),
               Source("images", tuple(str(p) for p in sorted(shards["images"].glob("*.tar"))), 0.5))
    spec = LoaderSpec(shards=[], sources=sources, resolution=32, micro_batch=2, num_workers=0, frames=5)
    it = iter(build_loader(spec))
    shapes = set()
    for _ in range(8):
        batch = next(it)
        shapes.add(tuple(batch["pixels"].shape))
        assert len(set(batch["sources"])) == 1
        assert batch["pixels"].shape[2] == (5 if batch["sources"][0] == "clips" else 1)
    assert shapes == {(2, 3, 5, 32, 32), (2, 3, 1, 32, 32)}


def test_webm_clips_decode_too(tmp_path):
    from scaletrain.data.synth import make_synthetic_video_sample

    s = make_synthetic_video_sample(0, 0, 32, 8, 8, "webm")
    clip = decode_video(s["webm"], ClipSpec(4, 4.0), 16, random.Random(0))
    assert clip.shape == (3, 4, 16, 16)


def test_wan_presets_build_forward_and_shard():
    torch.manual_seed(0)
    model = build_model("wan-tiny")
    assert 1e5 < count_params(model.denoiser) < 2e6
    assert len(parallel_units(model.denoiser)) == 3
    cond = model.encode_text(["a red circle moving left", ""], "cpu")
    x = torch.randn(2, 3, 5, 32, 32, requires_grad=True)
    out = model.denoiser(x, torch.tensor([10.0, 500.0]), cond)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.denoiser.parameters())
    # an image is a 1-frame clip: the same numbers as (B, C, 1, H, W)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model.denoiser(img, torch.tensor([10.0, 500.0]), cond)
        b = model.denoiser(img.unsqueeze(2), torch.tensor([10.0, 500.0]), cond)
    assert torch.equal(a, b.squeeze(2))
    # real size on the meta device: published sizes, Wan's VAE (8x space, 4x time)
    for name, billions, units in (("wan-2.1-1.3b", 1.419, 30), ("wan-2.1-14b", 14.288, 40)):
        with torch.device("meta"):
            big = build_model(name)
        assert count_params(big.denoiser) / 1e9 == pytest.approx(billions, rel=1e-3)
        assert type(big.vae).__name__ == "AutoencoderKLWan" and len(parallel_units(big.denoiser)) == units
        p = get_preset(name)
        assert (p.vae_factor, p.vae_frame_factor, p.downsample_factor, p.latent_frames(17)) == (8, 4, 16, 5)


@pytest.mark.parametrize("name,resolution,frames", [("wan-tiny", 32, 5), ("wan-tiny", 32, 0),
                                                    ("wan-2.1-1.3b", 256, 17)])
def test_wan_flops_match_the_flop_counter(name, resolution, frames):
    from scaletrain.models.flops import denoiser_input_size, forward_flops_per_image
    from scaletrain.models.family import get_family

    p = get_preset(name)
    with torch.device("meta"):
        den = Denoiser(build_denoiser_net(p), p.family, use_text_mask=False)
    side, width = denoiser_input_size(p, resolution), get_family(p.family).text_width(p.denoiser_config)
    clip = (p.latent_frames(frames),) if frames else ()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        den(torch.zeros(1, p.in_channels, *clip, side, side, device="meta"), torch.zeros(1, device="meta"),
            p.conditioner.example(1, device="meta"))
    assert forward_flops_per_image(name, resolution, frames) == pytest.approx(fc.get_total_flops(), rel=5e-3)


def test_wan_lora_exports_in_diffusers_wan_layout(tmp_path):
    """LoRA on wan-tiny's attention and FFN projections, written by WanLoraLoaderMixin's own
    writer; diffusers' `load_lora_adapter` on a fresh transformer reproduces the adapted output."""
    from peft import get_peft_model_state_dict

    from scaletrain.config import LoraSection
    from scaletrain.models.family import get_family
    from scaletrain.models.lora import ADAPTER, apply_lora, build_lora_config

    torch.manual_seed(0)
    p = get_preset("wan-tiny")
    den = Denoiser(build_denoiser_net(p), p.family, use_text_mask=False)
    base = {k: v.clone() for k, v in den.net.state_dict().items()}
    stats = apply_lora(den, LoraSection(enabled=True, rank=4))
    assert stats.layers == 3 * (8 + 2)  # self- and cross-attention q/k/v/out + 2 FFN per block
    with torch.no_grad():
        for n, t in den.named_parameters():
            if "lora_B" in n:
                t.normal_(std=0.1)
    x, emb = torch.randn(1, 3, 3, 16, 16), torch.randn(1, 8, 32)
    cond = {"text_emb": emb}
    with torch.no_grad():
        adapted = den(x, torch.tensor([300.0]), cond)
    layers = {k.replace(f".{ADAPTER}", ""): v for k, v in get_peft_model_state_dict(den.net, adapter_name=ADAPTER).items()}
    layout = get_family("wan").export_lora(tmp_path, den.net, layers, build_lora_config(LoraSection(enabled=True, rank=4), "wan"))
    assert layout == "diffusers" and (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    fresh = build_denoiser_net(p)
    fresh.load_state_dict(base)
    fresh.load_lora_adapter(str(tmp_path), prefix="transformer", use_safetensors=True)
    with torch.no_grad():
        again = fresh(x, timestep=torch.tensor([300.0]), encoder_hidden_states=emb, return_dict=False)[0]
    assert torch.allclose(again, adapted, atol=1e-5)


def test_animated_sample_grid(tmp_path):
    from scaletrain.eval.samples import save_video_grid

    clips = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    path = save_video_grid(clips, tmp_path / "s.gif", fps=4, captions=["a", "b"])
    with Image.open(path) as gif:
        assert gif.n_frames == 4 and gif.is_animated and gif.info["duration"] == 250


@pytest.mark.parametrize("overrides,fragment", [
    (["model.preset=unet-tiny", "train.stages.1.frames=5"],
     "train.stages.1.frames=5: model.preset='unet-tiny' (unet) is an image family; remove frames or choose a video"),
    (["train.stages.2.frames=null"], "train.stages.2.fps"),  # placeholder replaced below
    (["model.preset=wan-2.1-1.3b", "train.stages.1.frames=6", "train.stages.1.resolution=256",
      "train.stages.0.resolution=256", "train.stages.2.resolution=256", "train.stages.2.frames=9"],
     "train.stages.1.frames=6: 'wan-2.1-1.3b''s video VAE takes 1 + 4k frames; use 5 or 9"),
    (["validate.frames=6", "model.preset=wan-2.1-1.3b", "train.stages.0.resolution=256",
      "train.stages.1.resolution=256", "train.stages.2.resolution=256", "validate.resolution=256"],
     "validate.frames=6: 'wan-2.1-1.3b''s video VAE takes 1 + 4k frames; use 5 or 9"),
])
def test_frames_config_errors_are_one_line(shards, overrides, fragment):
    if overrides == ["train.stages.2.frames=null"]:
        overrides, fragment = ["train.stages.0.fps=8"], "train.stages.0.fps=8 is set without frames; set train.stages.0.frames too"
    base = [f"data.shards={shards['images']}/shard-{{000000..000001}}.tar",
            f"train.stages.1.data.sources.0.shards={shards['clips']}/shard-{{000000..000001}}.tar",
            f"train.stages.1.data.sources.1.shards={shards['images']}/shard-{{000000..000001}}.tar",
            f"train.stages.2.data.shards={shards['clips']}/shard-{{000000..000001}}.tar",
            f"validate.shards={shards['clips']}/shard-{{000000..000001}}.tar"]
    with pytest.raises(ConfigError) as e:
        load_config(VIDEO, base + overrides, world_size=2)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_video_recipe_validates_and_counts_clip_flops(shards):
    base = [f"data.shards={shards['images']}/shard-{{000000..000001}}.tar",
            f"train.stages.1.data.sources.0.shards={shards['clips']}/shard-{{000000..000001}}.tar",
            f"train.stages.1.data.sources.1.shards={shards['images']}/shard-{{000000..000001}}.tar",
            f"train.stages.2.data.shards={shards['clips']}/shard-{{000000..000001}}.tar",
            f"validate.shards={shards['clips']}/shard-{{000000..000001}}.tar"]
    cfg = load_config(VIDEO, base, world_size=2)
    assert [stage_frames(cfg, i) for i in range(3)] == [1, 5, 9]
    from scaletrain.models.flops import train_flops_per_image

    one, five = train_flops_per_image("wan-tiny", 32, 1), train_flops_per_image("wan-tiny", 32, 5)
    assert one == train_flops_per_image("wan-tiny", 32)  # a 1-frame clip costs an image
    from scaletrain.models.flops import layer_flops

    a, b = layer_flops("wan-tiny", 32, 1), layer_flops("wan-tiny", 32, 5)
    assert b["linear"] / a["linear"] == pytest.approx(5, rel=0.05)  # per token (text and time projections: per clip)
    assert 5 < b["attention"] / a["attention"] < 25  # self-attention x25, cross-attention x5
    assert 5 < five / one < 25


CP_BATCHES = ["train.stages.0.global_batch=8", "train.stages.1.global_batch=4", "train.stages.2.global_batch=2"]


@pytest.mark.parametrize("overrides,world,fragment", [
    (["engine.context_parallel=3"], 2, "engine.context_parallel=3 does not divide the world size 2"),
    (["engine.context_parallel=8"], 8, "engine.context_parallel=8 does not divide the 4 attention heads of "
                                       "model.preset='wan-tiny'"),
    (["engine.context_parallel=2", "train.stages.0.resolution=34"], 2,
     "engine.context_parallel=2 does not divide the 289 tokens per sample of train.stages.0 (34x34 px, 1 frame)"),
    (["engine.context_parallel=2", "train.stages.0.global_batch=16"], 2,
     "x 1 data-parallel replicas (world size 2 / engine.context_parallel 2) = 8; set train.stages.0.grad_accum=2"),
])
def test_context_parallel_config_errors_are_one_line(shards, overrides, world, fragment):
    base = [f"data.shards={shards['images']}/shard-{{000000..000001}}.tar",
            f"train.stages.1.data.sources.0.shards={shards['clips']}/shard-{{000000..000001}}.tar",
            f"train.stages.1.data.sources.1.shards={shards['images']}/shard-{{000000..000001}}.tar",
            f"train.stages.2.data.shards={shards['clips']}/shard-{{000000..000001}}.tar",
            f"validate.shards={shards['clips']}/shard-{{000000..000001}}.tar"]
    batches = [b for b in CP_BATCHES if b.split("=")[0] not in {o.split("=")[0] for o in overrides}]
    with pytest.raises(ConfigError) as e:
        load_config(VIDEO, base + batches + overrides, world_size=world)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_context_parallel_on_a_network_without_a_plan_is_one_line(shards):
    sets = [f"data.shards={shards['images']}/shard-{{000000..000001}}.tar", "engine.context_parallel=2",
            "train.stages.0.global_batch=8", "train.stages.1.global_batch=4"]
    with pytest.raises(ConfigError, match="diffusers has no context-parallel plan for UNet2DConditionModel "
                                          r"\(model.preset='unet-tiny'\)"):
        load_config(REPO / "configs" / "demo.yaml", sets, world_size=2)


def test_stage_fps_above_the_videos_is_one_line_before_launch(shards):
    """The launch checks read the first video of each of the stage's shard sets (8 fps here)."""
    from scaletrain.checks import load_run_config

    base = [f"data.shards={shards['images']}/shard-{{000000..000001}}.tar",
            f"train.stages.1.data.sources.0.shards={shards['clips']}/shard-{{000000..000001}}.tar",
            f"train.stages.1.data.sources.1.shards={shards['images']}/shard-{{000000..000001}}.tar",
            f"train.stages.2.data.shards={shards['clips']}/shard-{{000000..000001}}.tar",
            f"validate.shards={shards['clips']}/shard-{{000000..000001}}.tar"]
    load_run_config(VIDEO, base + ["train.stages.1.fps=8"], world_size=2)  # equal: fine
    with pytest.raises(ConfigError) as e:
        load_run_config(VIDEO, base + ["train.stages.1.fps=12"], world_size=2)
    msg = str(e.value)
    assert msg.startswith("train.stages.1.fps=12 is above the 8 fps of the videos in train.stages.1.data.sources "
                          "'clips' (sample '000000000' of ") and "lower the stage's fps to at most 8" in msg
    assert "\n" not in msg


def test_wan_vae_latent_path_per_channel_scaling_and_images():
    """The real-size presets' path at toy size: a 2-level AutoencoderKLWan (2x space, 2x time)
    registered as a preset; clips encode to (B, C, 1 + (F-1)/2, H/2, W/2), scaled per channel by
    latents_mean / latents_std as diffusers' Wan pipeline does, the denoiser keeps the shape, decode
    gives the clip's shape back; an image goes through the video VAE as one frame."""
    from scaletrain.models.components import TINY_TEXT, TINY_TEXT_DIM
    from scaletrain.models.families.wan import wan_tiny_config
    from scaletrain.models.family import PRESETS, add_preset

    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 2.0, 0.5, 1.0]
    vae = dict(_class_name="AutoencoderKLWan", base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
               temperal_downsample=[True], latents_mean=mean, latents_std=std)
    add_preset("wan-test-latent", "wan", vae, dict(wan_tiny_config(TINY_TEXT_DIM), in_channels=4, out_channels=4),
               TINY_TEXT, "test only")
    try:
        p = get_preset("wan-test-latent")
        assert (p.vae_factor, p.vae_frame_factor, p.latent_frames(5), p.downsample_factor, p.tokens(16, 16, 5)) == \
            (2, 2, 3, 4, 48)
        torch.manual_seed(0)
        model = build_model("wan-test-latent")
        x = torch.rand(2, 3, 5, 16, 16) * 2 - 1
        gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
        z = model.encode_images(x, gens())
        assert z.shape == (2, 4, 3, 8, 8)
        m, logvar = model.encode_posterior(x)
        noise = torch.stack([torch.randn(tuple(m.shape[1:]), generator=g) for g in gens()])
        expect = (m + torch.exp(0.5 * logvar) * noise - torch.tensor(mean).view(1, -1, 1, 1, 1)) \
            / torch.tensor(std).view(1, -1, 1, 1, 1)
        torch.testing.assert_close(z, expect, rtol=1e-5, atol=1e-5)
        cond = model.encode_text(["a red circle moving left", ""], "cpu")
        assert model.denoiser(z, torch.tensor([1.0, 500.0]), cond).shape == z.shape
        assert model.decode(z).shape == x.shape
        img = model.encode_images(torch.rand(2, 3, 16, 16) * 2 - 1, gens())
        assert img.shape == (2, 4, 8, 8) and model.decode(img).shape == (2, 3, 16, 16)
    finally:
        PRESETS.pop("wan-test-latent")
