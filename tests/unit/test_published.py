"""The published presets equal the published pipelines, key by key.

``tests/data/published/<preset>.json`` holds each pipeline's component configs as its
``config.json`` files publish them (sources inside each file) and the exact parameter counts
public sources state. Every network is built on the meta device (no memory at any size)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[1] / "data" / "published"
PUBLISHED = sorted(p.stem for p in DATA.glob("*.json"))


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def _differences(built: dict, published: dict) -> list[str]:
    return [f"{k}: ours {_norm(built.get(k, '<absent>'))!r}, published {_norm(v)!r}" for k, v in published.items()
            if not k.startswith("_") and k not in ("architectures", "model_type") and _norm(built.get(k, "<absent>")) != _norm(v)]


def test_every_published_preset_has_its_reference() -> None:
    assert PUBLISHED == sorted(["sdxl-base-1.0", "sd3-medium", "sd3.5-large", "flux.1-dev", "flux.1-schnell",
                                "wan-2.1-1.3b", "wan-2.1-14b"])


@pytest.mark.parametrize("name", PUBLISHED)
def test_preset_equals_the_published_pipeline(name: str) -> None:
    from scaletrain.models import get_preset
    from scaletrain.models.family import get_family
    from scaletrain.models.text import ENCODER_CLASSES
    from scaletrain.models.vaes import vae_kind_of

    ref = json.loads((DATA / f"{name}.json").read_text())
    comps = ref["components"]
    preset = get_preset(name)
    family = get_family(preset.family)
    assert family.pipeline_for(preset) == ref["pipeline"]
    counts: dict[str, int] = {}
    with torch.device("meta"):
        net = family.build(dict(preset.denoiser_config))
        denoiser = family.pipeline_denoiser
        assert type(net).__name__ == comps[denoiser]["_class_name"]
        assert _differences(dict(net.config), comps[denoiser]) == [], denoiser
        counts[denoiser] = sum(p.numel() for p in net.parameters())
        kind = vae_kind_of(preset.vae_config)
        vae = kind.cls(**{k: v for k, v in preset.vae_config.items() if k != "_class_name"})
        assert kind.class_name == comps["vae"]["_class_name"]
        assert _differences(dict(vae.config), comps["vae"]) == [], "vae"
        counts["vae"] = sum(p.numel() for p in vae.parameters())
        slots = {s.component: s for s in preset.conditioner.slots}
        assert sorted(slots) == sorted(c for c in comps if c.startswith("text_encoder"))
        for component, slot in slots.items():
            cls, cfg_cls, _ = ENCODER_CLASSES[slot.model_class]
            published = comps[component]
            assert [slot.model_class] == published["architectures"], component
            config = cfg_cls(**slot.config)
            assert config.model_type == published["model_type"], component
            assert _differences(config.to_dict(), published) == [], component
            counts[component] = sum(p.numel() for p in cls._from_config(config).parameters())
    for component, n in ref.get("param_counts", {}).items():
        assert counts[component] == n, (component, counts[component], n)
    assert counts == ref["meta_param_counts"]  # every component, as the reference's own meta build counted


def test_published_schedules_are_the_objectives_they_train_with() -> None:
    """The objective a pipeline folder's scheduler implies (item 3: taken from the folder unless
    the recipe sets one): DDPM for SDXL's Euler, flow matching for SD3/FLUX's FlowMatch Euler and
    Wan's UniPC with flow sigmas."""
    from scaletrain.diffusion import objective_for_scheduler

    want = {"sdxl-base-1.0": "ddpm", "wan-2.1-1.3b": "flow_matching", "wan-2.1-14b": "flow_matching"}
    for name in PUBLISHED:
        sched = json.loads((DATA / f"{name}.json").read_text())["components"]["scheduler"]
        found = objective_for_scheduler(sched)
        assert found is not None and found.name == want.get(name, "flow_matching"), (name, sched)
