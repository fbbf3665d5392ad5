"""The model-family seam: a family defined in this file alone builds, trains a step, shards,
counts FLOPs, takes LoRA and passes config validation; the Flux family's packing, rotary ids
and timestep scale are the ones diffusers' FluxPipeline uses (a diffusers-only process samples
its export to the same images); and no family name is branched on outside the family files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import Tensor, nn

from scaletrain.models.family import FAMILIES, PRESETS, ModelFamily, add_preset, register_family

REPO = Path(__file__).resolve().parents[2]


class ToyNet(ModelMixin, ConfigMixin):
    """A 2-block conv net conditioned on the mean text embedding: no diffusers family at all."""

    @register_to_config
    def __init__(self, in_channels: int = 3, width: int = 16, text_dim: int = 32) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.SiLU())
                                     for _ in range(2)])
        self.text_proj = nn.Linear(text_dim, width)
        self.conv_out = nn.Conv2d(width, in_channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, text: Tensor) -> Tensor:
        h = self.conv_in(x) + self.text_proj(text.mean(dim=1))[:, :, None, None] + (t / 1000.0)[:, None, None, None]
        for block in self.blocks:
            h = h + block(h)
        return self.conv_out(h)


class ToyFamily(ModelFamily):
    name = "toy"
    net_class = ToyNet
    lora_targets = ("text_proj",)

    def forward(self, net: nn.Module, x: Tensor, timesteps: Tensor, cond: dict[str, Tensor], *,
                pixel_size: tuple[int, int] | None = None) -> Tensor:
        return net(x, timesteps.float(), cond["text_emb"])

    def parallel_units(self, net: nn.Module) -> list[nn.Module]:
        return list(net.blocks)

    def downsample(self, config: dict[str, Any]) -> int:
        return 1

    def text_width(self, config: dict[str, Any]) -> int:
        return config["text_dim"]


@pytest.fixture(scope="module")
def toy_family():
    from scaletrain.models.components import TINY_TEXT

    register_family(ToyFamily)
    add_preset("toy-tiny", "toy", None, dict(in_channels=3, width=16, text_dim=32), TINY_TEXT,
               "a conv net defined in a test file")
    yield "toy-tiny"
    PRESETS.pop("toy-tiny")
    FAMILIES.pop("toy")


def test_a_family_defined_in_one_file_trains_shards_counts_and_adapts(toy_family, synth_shards):
    from torch.utils.flop_counter import FlopCounterMode

    from scaletrain.models.flops import forward_flops_per_image
    from scaletrain.config import LoraSection
    from scaletrain.checks import load_run_config as load_config
    from scaletrain.diffusion import build_objective
    from scaletrain.models import build_model, parallel_units
    from scaletrain.models.lora import apply_lora

    torch.manual_seed(0)
    model = build_model(toy_family)
    assert [type(u) for u in parallel_units(model.denoiser)] == [nn.Sequential, nn.Sequential]
    cond = model.encode_text(["a red circle", "a blue square"], "cpu")
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    objective = build_objective("flow_matching", {})
    tb = objective.training_batch(x0, ["a", "b"], step=0, seed=0)
    opt = torch.optim.SGD(model.denoiser.parameters(), lr=0.05)
    losses = []
    for _ in range(5):  # the same batch: the loss must fall
        loss, _ = objective.loss(model.denoiser(tb.noisy, tb.timesteps, cond), tb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # FLOPs from the one walker equal PyTorch's count for this family too
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.denoiser(torch.zeros(1, 3, 32, 32), torch.zeros(1), model.preset.conditioner.example(1))
    assert forward_flops_per_image(toy_family, 32) == pytest.approx(fc.get_total_flops(), rel=5e-3)
    stats = apply_lora(model.denoiser, LoraSection(enabled=True, rank=2))
    assert stats.layers == 1 and 0 < stats.trainable < stats.total
    cfg = load_config(REPO / "configs/demo.yaml", [f"model.preset={toy_family}",
                                                   f"data.shards={synth_shards}/shard-{{000000..000007}}.tar",
                                                   "model.activation_checkpointing=full"], world_size=2)
    assert cfg.model.preset == toy_family


FLUX_SAMPLE = """
import sys, torch
from safetensors.torch import load_file, save_file
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
folder, inputs, out = sys.argv[1:4]
net = FluxTransformer2DModel.from_pretrained(folder).eval()
scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
d = load_file(inputs)
emb, pooled, x, scale = d["emb"], d["pooled"], d["noise"], float(d["guidance"])
b, c, h, w = x.shape
latents = FluxPipeline._pack_latents(x, b, c, h, w)
img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
txt_ids = torch.zeros(emb.shape[1], 3)
cfg = scheduler.config
mu = calculate_shift(latents.shape[1], cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
n = int(d["steps"])
scheduler.set_timesteps(sigmas=[1.0 - i * (1.0 - 1.0 / n) / (n - 1) for i in range(n)], mu=mu)  # FluxPipeline's spacing
with torch.no_grad():
    for t in scheduler.timesteps:
        pred = net(hidden_states=torch.cat([latents, latents]), encoder_hidden_states=emb,
                   pooled_projections=pooled, timestep=(t / 1000).expand(2 * b),
                   img_ids=img_ids, txt_ids=txt_ids).sample
        uncond, cond = pred.chunk(2)
        latents = scheduler.step(uncond + scale * (cond - uncond), t, latents).prev_sample
x = FluxPipeline._unpack_latents(latents, h, w, 1)
assert not any(m.startswith("scaletrain") for m in sys.modules)
save_file({"images": x.clamp(-1, 1)}, out)
"""


def test_flux_conventions_match_diffusers_flux_pipeline(tmp_path):
    """scaletrain's Flux forward (packing, rotary ids, timestep / 1000, CLIP's pooled vector) and
    the flow objective's dynamic shift sample the same images as diffusers' own Flux helpers in a process that
    never imports scaletrain."""
    from safetensors.torch import save_file

    from scaletrain.diffusion import build_objective
    from scaletrain.eval.samples import generate_samples
    from scaletrain.models import build_model

    torch.manual_seed(3)
    model = build_model("flux-tiny")
    model.denoiser.eval()
    folder = tmp_path / "flux"
    model.denoiser.net.save_pretrained(folder)
    objective = build_objective("flow_matching", {"dynamic_shift": True})
    import diffusers

    getattr(diffusers, objective.scheduler_class).from_config(objective.scheduler_config()).save_pretrained(
        folder / "scheduler")
    prompts, steps, guidance = ["a red circle", "a green triangle on the right"], 6, 2.0
    ours = generate_samples(model.denoiser, lambda texts: model.encode_text(texts, "cpu"), model.decode,
                            prompts=prompts, resolution=32, in_channels=3, latent_factor=1, objective=objective,
                            num_inference_steps=steps, guidance_scale=guidance, seed=0)
    cond = model.encode_text([""] * 2 + prompts, "cpu")
    noise = torch.stack([torch.randn((3, 32, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)])
    save_file({"emb": cond["text_emb"].contiguous(), "pooled": cond["pooled"].contiguous(), "noise": noise, "guidance": torch.tensor(guidance),
               "steps": torch.tensor(steps)}, str(tmp_path / "in.safetensors"))
    (tmp_path / "sample.py").write_text(FLUX_SAMPLE)
    r = subprocess.run([sys.executable, str(tmp_path / "sample.py"), str(folder), str(tmp_path / "in.safetensors"),
                        str(tmp_path / "out.safetensors")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_file

    theirs = load_file(str(tmp_path / "out.safetensors"))["images"]
    assert (theirs - noise.clamp(-1, 1)).abs().mean() > 0.05
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def _name_branches(names: set[str], subject: str, home: str) -> list[str]:
    """Lines outside scaletrain/<home>/ where a registered name decides something: ``subject ==
    "x"``-style comparisons, or a quoted name compared with == / !=."""
    quoted = "|".join(sorted(map(re.escape, names)))
    pattern = re.compile(rf"""{subject}\s*(==|!=|in)\s*[("'\[]|["']({quoted})["']\s*(==|!=)|(==|!=)\s*["']({quoted})["']""")
    offenders = []
    for path in (REPO / "scaletrain").rglob("*.py"):
        if home in path.relative_to(REPO / "scaletrain").as_posix():
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    return offenders


def test_no_family_or_objective_name_branch_outside_its_own_file():
    """`family == "unet"`-style branches are what the seams replaced: a family's file is the only
    place its name may decide anything, and an objective's file the only place for an objective's
    (the names come from the registries, so a new family or objective is guarded too)."""
    from scaletrain.diffusion import OBJECTIVES
    from scaletrain.models.registry import load_families

    load_families()
    families = {name for name, fam in FAMILIES.items() if type(fam).__module__.startswith("scaletrain.")}
    assert {"unet", "dit", "mmdit", "flux", "wan"} <= families
    objectives = {name for name, cls in OBJECTIVES.items() if cls.__module__.startswith("scaletrain.")}
    assert objectives == {"ddpm", "flow_matching"}
    # each objective lives in the file named after it
    assert all(OBJECTIVES[n].__module__ == f"scaletrain.diffusion.objectives.{n}" for n in objectives)
    offenders = _name_branches(families, "family", "models/families/")
    offenders += _name_branches(objectives, "objective", "diffusion/objectives/")
    assert not offenders, "\n".join(offenders)


def test_no_engine_name_branch_outside_engines():
    """Each engine owns its checks, labels and sizing entry (engines/spec.py: EngineSpec, Layout,
    registered from its own module): outside engines/ no engine kind or label decides anything."""
    from scaletrain.engines.spec import ENGINE_SPECS, load_layouts

    labels = set(load_layouts())
    assert {"fsdp", "deepspeed", "ddp"} == set(ENGINE_SPECS)
    assert {"ddp", "fsdp", "hsdp", "zero1", "zero2", "zero3", "zero3-offload", "zero3-hpz"} <= labels
    offenders = _name_branches(set(ENGINE_SPECS) | labels, r"engine(?:\.kind|\.name|_kind)?", "engines/")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("preset,fragment", [
    ("unet-tiny", "--pipeline: unet-tiny runs in pixel space (no VAE), which no diffusers text-to-image pipeline does"),
    ("dit-tiny", "--pipeline: dit-tiny is a dit model: PixArtAlphaPipeline encodes prompts with a masked T5"),
    ("dit-b-2", "--pipeline: dit-b-2 is a dit model: PixArtAlphaPipeline encodes prompts with a masked T5"),
    ("mmdit-tiny", "--pipeline: mmdit-tiny runs in pixel space (no VAE)"),
    ("flux-tiny", "--pipeline: flux-tiny runs in pixel space (no VAE)"),
])
def test_pipeline_export_refusals_come_from_the_family(monkeypatch, tmp_path, preset, fragment) -> None:
    """`ckpt export --pipeline` writes what the family (or its conditioner) names
    (StableDiffusionPipeline for a latent UNet, tested end to end in
    tests/distributed/test_precomputed.py) and refuses the rest in one line, before reading any
    weights or writing anything."""
    from types import SimpleNamespace

    from scaletrain.checkpoint import export

    monkeypatch.setattr(export, "resolve_checkpoint", lambda src: SimpleNamespace(meta={"preset": preset},
                                                                                 path=tmp_path / "ckpt"))
    with pytest.raises(ValueError) as e:
        export.export_pipeline("run", tmp_path / "out")
    assert str(e.value).startswith(fragment) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
