"""models/meta_init.py: a denoiser built on the meta device and initialised afterwards keeps each
family's constructor init (the distribution of every random tensor, every constant tensor and
buffer exactly), leaves torch's global RNG alone, and reads start weights by name with one-line
errors for keys that do not match (checkpoint/sources.py)."""

from __future__ import annotations

import pytest
import torch

from scaletrain.checkpoint.sources import SafetensorsFolder
from scaletrain.models import build_model
from scaletrain.models.registry import get_family, get_preset

TINY = ["unet-tiny", "dit-tiny", "mmdit-tiny", "flux-tiny", "wan-tiny"]


@pytest.mark.parametrize("name", TINY)
def test_meta_init_keeps_the_constructors_init(name: str) -> None:
    preset = get_preset(name)
    torch.manual_seed(0)
    ref = get_family(preset.family).build(dict(preset.denoiser_config))  # the constructor's own init
    state = torch.get_rng_state()
    den = build_model(name, seed=0, encoders=False).denoiser
    assert torch.equal(torch.get_rng_state(), state)  # the build drew nothing from the global RNG
    ours = dict(den.net.named_parameters())
    assert ours.keys() == dict(ref.named_parameters()).keys()
    for n, r in ref.named_parameters():
        q = ours[n].detach()
        if r.numel() < 2 or r.std() == 0:  # constants (norm weights, zero biases) exactly
            assert torch.equal(q, r.detach()), n
        elif r.numel() > 256:  # random tensors: the same distribution, other draws
            assert 0.8 < (q.std() / r.std()).item() < 1.25, n
            assert not torch.equal(q, r.detach()), n
    refb = dict(ref.named_buffers())
    assert all(torch.equal(b, refb[n]) for n, b in den.net.named_buffers())


def test_meta_init_depends_on_the_seed_only() -> None:
    a = build_model("dit-tiny", seed=3, encoders=False).denoiser.state_dict()
    torch.manual_seed(123)  # the caller's RNG does not matter
    b = build_model("dit-tiny", seed=3, encoders=False).denoiser.state_dict()
    c = build_model("dit-tiny", seed=4, encoders=False).denoiser.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_start_weights_by_name_and_one_line_for_keys_that_do_not_fit(tmp_path) -> None:
    src = build_model("unet-tiny", seed=5, encoders=False).denoiser.net
    src.save_pretrained(tmp_path / "unet")
    den = build_model("unet-tiny", seed=0, encoders=False, defer_init=True).denoiser
    den.pending_init.source, den.pending_init.source_what = SafetensorsFolder(tmp_path / "unet"), "init.from_diffusers"
    den.materialize(torch.device("cpu"))
    ref = src.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in den.net.state_dict().items())
    # another family's weights: every missing and unexpected key counted, named, on one line
    build_model("dit-tiny", seed=0, encoders=False).denoiser.net.save_pretrained(tmp_path / "dit")
    den = build_model("unet-tiny", seed=0, encoders=False, defer_init=True).denoiser
    den.pending_init.source, den.pending_init.source_what = SafetensorsFolder(tmp_path / "dit"), "init.from_diffusers=X"
    with pytest.raises(ValueError) as e:
        den.materialize(torch.device("cpu"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("init.from_diffusers=X: its weights do not match")
    assert "missing " in msg and "unexpected " in msg and "conv_in.weight" in msg
    # same keys, another shape (a wider variant of the same network)
    cfg = dict(get_preset("unet-tiny").denoiser_config, cross_attention_dim=48)
    get_family("unet").build(cfg).save_pretrained(tmp_path / "wide")
    den = build_model("unet-tiny", seed=0, encoders=False, defer_init=True).denoiser
    den.pending_init.source, den.pending_init.source_what = SafetensorsFolder(tmp_path / "wide"), "W"
    with pytest.raises(ValueError, match=r"other shape \d+: .*attn2.to_k.weight \(\d+, 48\) vs the model's"):
        den.materialize(torch.device("cpu"))
    with pytest.raises(ValueError, match="has neither diffusion_pytorch_model.safetensors nor"):
        SafetensorsFolder(tmp_path)


def test_a_preset_that_cannot_fit_this_host_is_one_line_before_launch() -> None:
    """FLUX.1-dev size (11.9B) on DDP with 8 ranks on this host: every rank would hold the whole
    fp32 model (48 GB each); the sizing model's start-up floor refuses it before any allocation,
    naming the sizes and what to change. The same recipe sharded over 8 FSDP2 ranks passes the
    floor only where the host has the memory."""
    import psutil

    from scaletrain.bench.sizing import model_facts, startup_floor_bytes
    from scaletrain.checks import check_startup_memory
    from scaletrain.config import ConfigError
    from scaletrain.checks import load_config
    from tests.conftest import REPO

    sizes = ["model.preset=flux-dev", "train.stages.0.resolution=64", "train.stages.0.global_batch=64",
             "train.stages.1.resolution=128", "train.stages.1.global_batch=32"]
    cfg = load_config(REPO / "configs" / "demo.yaml", [*sizes, "engine.kind=ddp"], world_size=8, check_paths=False)
    with pytest.raises(ConfigError) as e:
        check_startup_memory(cfg, 8)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.preset='flux-dev' on ddp x8 needs at least ")
    assert "8 rank(s) on this host" in msg and "engine.kind=fsdp" in msg
    facts = model_facts("flux-dev")
    fsdp = startup_floor_bytes("fsdp", facts, 8)
    assert startup_floor_bytes("ddp", facts, 8) - fsdp == pytest.approx(4 * facts.params * 7 / 8)
    # model.frozen_encoders=shard: the GPU holds 1/8 of the (here fp32) T5-XXL + CLIP + VAE
    assert fsdp - startup_floor_bytes("fsdp", facts, 8, frozen_encoders="shard") == pytest.approx(4 * facts.frozen * 7 / 8)
    if 8 * fsdp > psutil.virtual_memory().available:
        with pytest.raises(ConfigError, match="on fsdp x8 needs at least"):
            check_startup_memory(load_config(REPO / "configs" / "demo.yaml", sizes, world_size=8, check_paths=False), 8)


def test_dcp_checkpoint_as_start_weights_and_one_line_for_keys_that_do_not_fit(tmp_path) -> None:
    """init.from_checkpoint's DCP source (checkpoint/sources.py DCPCheckpoint): the model
    entries, then the EMA's over the parameters, land in a meta-built denoiser exactly; a
    checkpoint of another preset is one line naming the keys. (Two ranks: test_posttrain.)"""
    import torch.distributed.checkpoint as dcp

    from scaletrain.checkpoint.sources import DCPCheckpoint

    saved = build_model("dit-tiny", seed=3, encoders=False).denoiser
    state = {k: v.clone() for k, v in saved.state_dict().items()}
    dcp.save({"model": state, "optim": {"step": torch.tensor(7)}}, checkpoint_id=str(tmp_path / "engine"))
    ema = {n: torch.full_like(p, 0.5) for n, p in saved.named_parameters()}
    dcp.save({"params": ema, "num_updates": torch.tensor(3)}, checkpoint_id=str(tmp_path / "ema"))
    for use_ema in (False, True):
        den = build_model("dit-tiny", seed=0, encoders=False, defer_init=True).denoiser
        source = DCPCheckpoint(tmp_path, use_ema)
        den.pending_init.source, den.pending_init.source_what = source, "init.from_checkpoint='x'"
        den.materialize(torch.device("cpu"))
        want = {**state, **ema} if use_ema else state
        assert den.state_dict().keys() == state.keys()
        assert all(torch.equal(v, want[k]) for k, v in den.state_dict().items())
        assert 0 < source.bytes_read <= source.total_bytes
    other = build_model("unet-tiny", seed=0, encoders=False, defer_init=True).denoiser
    other.pending_init.source, other.pending_init.source_what = DCPCheckpoint(tmp_path, False), "init.from_checkpoint='x'"
    with pytest.raises(ValueError) as e:
        other.materialize(torch.device("cpu"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("init.from_checkpoint='x': its weights do not match the model's keys (missing ")
    assert "unexpected" in msg and "pick the preset it was trained with" in msg
