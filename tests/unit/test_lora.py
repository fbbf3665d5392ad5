"""LoRA application (models/lora.py) and the init/lora config checks, on one process."""

from __future__ import annotations

import pytest
import torch

from scaletrain.config import ConfigError, LoraSection

from scaletrain.checks import validate_config
from scaletrain.models import Denoiser, build_denoiser_net, get_preset
from scaletrain.models.lora import adapters_disabled, apply_lora, inject_lora


def _denoiser(preset: str) -> Denoiser:
    torch.manual_seed(0)
    p = get_preset(preset)
    return Denoiser(build_denoiser_net(p), p.family, use_text_mask=p.conditioner.use_mask)


def _run(d: Denoiser, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, emb = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 8, 32, generator=g)
    with torch.no_grad():
        return d(x, torch.tensor([10, 500]), {"text_emb": emb, "text_mask": torch.ones(2, 8, dtype=torch.long)})


@pytest.mark.parametrize("preset,layers", [("unet-tiny", 4 * 2 * 4), ("dit-tiny", 4 * (8 + 2))])
def test_apply_lora_freezes_base_and_starts_as_the_base(preset, layers):
    d = _denoiser(preset)
    before = _run(d)
    stats = apply_lora(d, LoraSection(enabled=True, rank=4))
    # UNet: to_q/k/v/out of attn1+attn2 in 4 transformer blocks; DiT: those + 2 ff per block.
    assert stats.layers == layers
    trainable = {n for n, p in d.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert stats.trainable == sum(p.numel() for n, p in d.named_parameters() if n in trainable)
    assert torch.equal(_run(d), before)  # lora_B starts at zero


def test_adapters_disabled_computes_the_base_and_restores_flags():
    d = _denoiser("unet-tiny")
    base = _run(d)
    apply_lora(d, LoraSection(enabled=True, rank=4))
    with torch.no_grad():
        for n, p in d.named_parameters():
            if ".lora_B." in n:
                p.normal_()
    adapted = _run(d)
    assert not torch.allclose(adapted, base)
    flags = {n: p.requires_grad for n, p in d.named_parameters()}
    with adapters_disabled(d):
        assert torch.equal(_run(d), base)
    assert torch.equal(_run(d), adapted)
    assert flags == {n: p.requires_grad for n, p in d.named_parameters()}


def test_inject_lora_names_the_fix_when_nothing_matches():
    with pytest.raises(ValueError, match=r"lora.target_modules=\['nope'\] matches no"):
        inject_lora(build_denoiser_net("unet-tiny"), "unet", LoraSection(target_modules=["nope"]))


def _cfg(tmp_path, **sections) -> dict:
    return {"run": {"dir": str(tmp_path / "run")}, "train": {"stages": [{"name": "a", "resolution": 32, "steps": 1,
                                                                           "micro_batch": 1}]}, **sections}


@pytest.mark.parametrize("sections,match", [
    ({"lora": {"enabled": True, "target_modules": ["to_x"]}}, "lora.target_modules=.*matches no"),
    ({"init": {"from_checkpoint": "a", "from_diffusers": "b"}}, "both set; keep one"),
])
def test_config_errors_without_paths(tmp_path, sections, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(_cfg(tmp_path, **sections), world_size=1, check_paths=False)


def test_init_source_checks_existence_class_and_config(tmp_path):
    from scaletrain.checkpoint.init import check_init_source

    build_denoiser_net("dit-tiny").save_pretrained(tmp_path / "dit")
    cfg = validate_config(_cfg(tmp_path), world_size=1, check_paths=False)
    cfg.init.from_diffusers = str(tmp_path / "dit")
    with pytest.raises(ValueError, match="holds a PixArtTransformer2DModel, model.preset='unet-tiny' is a "
                                         "UNet2DConditionModel"):
        check_init_source(cfg)
    small = get_preset("unet-tiny").denoiser_config | {"block_out_channels": (16, 32)}
    build_denoiser_net("unet-tiny").__class__(**small).save_pretrained(tmp_path / "unet")
    cfg.init.from_diffusers = str(tmp_path / "unet")
    with pytest.raises(ValueError, match=r"built with block_out_channels=\[16, 32\], model.preset='unet-tiny' has"):
        check_init_source(cfg)
    cfg.init.from_diffusers, cfg.init.from_checkpoint = None, str(tmp_path / "missing")
    with pytest.raises(ValueError, match="init.from_checkpoint=.*does not exist"):
        check_init_source(cfg)
