"""The objective seam (scaletrain/diffusion/base.py): DDPM through it equals the DDPM math,
flow matching follows SD3/Flux's definitions, a sampler inverts its objective, bad keys are
one-line config errors, and a new objective takes one file (this one defines and registers a
toy objective and trains and samples with it)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from scaletrain.config import ConfigError
from scaletrain.checks import load_run_config as load_config
from scaletrain.diffusion import OBJECTIVES, build_objective
from scaletrain.diffusion.base import Objective, ObjectiveParams, Sampler, TrainingBatch, register
from scaletrain.diffusion.seeding import per_sample_generators
from scaletrain.eval.samples import generate_samples
from tests.conftest import shard_pattern

KEYS = ["a", "b", "c", "d"]


def _cfg(synth_shards, *sets: str):
    base = [f"data.shards={shard_pattern(synth_shards)}", "train.stages.0.global_batch=null",
            "train.stages.1.global_batch=null"]
    return load_config("configs/demo.yaml", [*base, *sets], world_size=1)


# ----------------------------------------------------------------- DDPM through the seam


def _ddpm_by_hand(x0, keys, step, seed, p):
    """DDPM's training batch and min-SNR loss from the papers' formulas, sharing no code with
    scaletrain/diffusion: the scaled-linear schedule (betas = linspace(sqrt(b0), sqrt(b1), T)^2),
    alpha_bar = prod(1 - beta), x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, v = sqrt(ab) eps -
    sqrt(1 - ab) x0 (Salimans & Ho 2022), weights min(snr, 5) / snr for eps and / (snr + 1) for v
    (Hang et al. 2023). The per-sample draws follow the documented layout-invariant order: a
    generator seeded by sha256(seed, step, key), the timestep first, then the noise, then the
    per-channel offset."""
    import hashlib

    T, b0, b1 = 1000, 0.00085, 0.012
    betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=torch.float64) ** 2
    ab = torch.cumprod(1 - betas, 0)
    rows_t, rows_eps = [], []
    for k in keys:
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}\x1f{step}\x1f{k}".encode()).digest()[:8],
                                                         "little") & ((1 << 63) - 1))
        rows_t.append(int(torch.randint(0, T, (1,), generator=g)))
        eps = torch.randn(x0.shape[1:], generator=g)
        if p.get("noise_offset"):
            eps = eps + p["noise_offset"] * torch.randn((x0.shape[1], 1, 1), generator=g)
        rows_eps.append(eps)
    t, eps = torch.tensor(rows_t), torch.stack(rows_eps).double()
    a = ab[t].view(-1, 1, 1, 1)
    x = x0.double()
    noisy = a.sqrt() * x + (1 - a).sqrt() * eps
    v = p.get("prediction_type", "epsilon") == "v_prediction"
    target = a.sqrt() * eps - (1 - a).sqrt() * x if v else eps
    snr = ab[t] / (1 - ab[t])
    gamma = p.get("min_snr_gamma", 5.0)
    w = torch.clamp(snr, max=gamma) / (snr + 1 if v else snr) if gamma else torch.ones_like(snr)
    return noisy, t, target, w


@pytest.mark.parametrize("params", [{}, {"prediction_type": "v_prediction", "noise_offset": 0.1},
                                    {"min_snr_gamma": None}])
def test_ddpm_objective_equals_the_ddpm_formulas(params):
    objective = build_objective("ddpm", params)
    x0 = torch.randn(4, 3, 8, 8)
    tb = objective.training_batch(x0, KEYS, step=3, seed=1)
    noisy, t, target, w = _ddpm_by_hand(x0, KEYS, 3, 1, params)
    assert torch.equal(tb.timesteps.long(), t)
    torch.testing.assert_close(tb.noisy.double(), noisy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tb.target.double(), target, rtol=1e-5, atol=1e-6)
    pred = torch.randn_like(x0)
    mean, per = objective.loss(pred, tb)
    want = ((pred.double() - target) ** 2).flatten(1).mean(1) * w
    torch.testing.assert_close(per.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mean.double(), want.mean(), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------- flow matching


def test_flow_batch_is_the_rectified_flow_path_and_layout_invariant():
    objective = build_objective("flow_matching", {"shift": 3.0})
    x0 = torch.randn(4, 4, 8, 8)
    tb = objective.training_batch(x0, KEYS, step=5, seed=2)
    sigma = tb.t
    assert sigma.shape == (4,) and bool(((sigma > 0) & (sigma < 1)).all()) and len(set(sigma.tolist())) == 4
    noise = tb.target + x0  # target = eps - x0
    s = sigma.view(-1, 1, 1, 1)
    assert torch.allclose(tb.noisy, (1 - s) * x0 + s * noise, atol=1e-6)
    assert torch.allclose(tb.timesteps, sigma * 1000)
    # u by hand (logit-normal from each sample's own generator), then SD3's static shift
    u = torch.cat([torch.sigmoid(torch.normal(0.0, 1.0, (1,), generator=g)) for g in per_sample_generators(2, 5, KEYS)])
    assert torch.allclose(sigma, 3 * u / (1 + 2 * u), atol=1e-6)
    # sample "c" alone (another rank) draws what it drew inside the batch
    alone = objective.training_batch(x0[2:3], ["c"], step=5, seed=2)
    assert torch.equal(alone.noisy, tb.noisy[2:3]) and torch.equal(alone.target, tb.target[2:3])


def test_flow_shift_moves_sigma_towards_noise_and_dynamic_shift_follows_tokens():
    keys = [f"k{i}" for i in range(256)]
    small, big = torch.zeros(256, 4, 16, 16), torch.zeros(256, 4, 128, 128)
    plain = build_objective("flow_matching", {}).training_batch(small, keys, step=0, seed=0).t
    shifted = build_objective("flow_matching", {"shift": 3.0}).training_batch(small, keys, step=0, seed=0).t
    assert abs(plain.mean().item() - 0.5) < 0.05 and bool((shifted > plain).all())
    dyn = build_objective("flow_matching", {"dynamic_shift": True})
    lo, hi = dyn.training_batch(small, keys, step=0, seed=0).t, dyn.training_batch(big, keys, step=0, seed=0).t
    assert bool((hi > lo).all())
    # Flux's formula: mu linear in tokens (latent pixels / 4) from 0.5 at 256 to 1.15 at 4096
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (128 * 128 // 4 - 256)
    assert dyn.mu(big.shape) == pytest.approx(mu)
    assert torch.allclose(hi, math.exp(mu) / (math.exp(mu) + 1 / plain - 1), atol=1e-5)


def test_flow_weighting_and_uniform_sampling():
    objective = build_objective("flow_matching", {"weighting": "sigma_sqrt", "timestep_sampling": "uniform"})
    x0 = torch.randn(4, 3, 4, 4)
    tb = objective.training_batch(x0, KEYS, step=0, seed=0)
    u = torch.cat([torch.rand(1, generator=g) for g in per_sample_generators(0, 0, KEYS)])
    assert torch.allclose(tb.t, u.clamp(1e-5, 1 - 1e-5))
    pred = torch.zeros_like(x0)
    _, per = objective.loss(pred, tb)
    errors = tb.target.square().flatten(1).mean(1)
    assert torch.allclose(per, errors / tb.t.square())


@pytest.mark.parametrize("params", [{"shift": 3.0}, {"dynamic_shift": True}])
def test_flow_sampler_inverts_the_flow_with_an_exact_velocity(params):
    """An oracle model that knows x0 answers v = (x_t - x0) / sigma; the Euler sampler then
    walks the straight path from noise to x0 exactly, at the sigmas the model is told."""
    objective = build_objective("flow_matching", params)
    x0 = torch.randn(2, 4, 8, 8)
    sampler = objective.sampler(6, torch.device("cpu"), latent_shape=x0.shape[1:])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sampler.init_noise_sigma
    assert len(sampler.timesteps) == 6
    for t in sampler.timesteps:
        sigma = t / 1000.0
        x = sampler.step((x - x0) / sigma, t, x)
    assert torch.allclose(x, x0, atol=1e-4)


def test_flow_samples_through_generate_samples():
    """The whole sampling loop (noise, classifier-free guidance, the flow sampler, decode) with an
    oracle velocity toward a known image lands on that image: a wrong sigma, sign, guidance mix
    or step order misses it."""
    objective = build_objective("flow_matching", {"shift": 2.0})
    known = torch.linspace(-0.8, 0.8, 3 * 8 * 8).view(1, 3, 8, 8)

    def denoise(x: Tensor, t: Tensor, cond: dict) -> Tensor:
        sigma = (t.float() / 1000.0).view(-1, 1, 1, 1)
        return (x - known) / sigma  # the exact rectified-flow velocity toward `known`

    images = generate_samples(denoise, lambda texts: {"text_emb": torch.zeros(len(texts), 2, 4)}, lambda x: x,
                              prompts=["a", "b"], resolution=8, in_channels=3, latent_factor=1,
                              objective=objective, num_inference_steps=4, guidance_scale=2.0, seed=0)
    assert images.shape == (2, 3, 8, 8)
    torch.testing.assert_close(images, known.expand(2, -1, -1, -1), rtol=0, atol=1e-4)


# ----------------------------------------------------------------- config


@pytest.mark.parametrize("sets,fragment", [
    (["diffusion.objective=flow_matching", "diffusion.prediction_type=epsilon"],
     "diffusion.prediction_type is not a key of the flow_matching objective"),
    (["diffusion.flow_matching.prediction_type=epsilon"],  # checked even while ddpm is selected
     "diffusion.flow_matching.prediction_type is not a key of the flow_matching objective"),
    (["diffusion.shift=3.0"], "diffusion.shift is not a key of the ddpm objective"),
    (["diffusion.objective=rectified"], "diffusion.objective='rectified' is unknown; choose one of: ddpm, flow_matching"),
    (["diffusion={objective: flow_matching, shift: 2, dynamic_shift: true}"],
     "shift=2.0 and dynamic_shift=true both set the shift; keep one"),
    (["diffusion={objective: flow_matching, timestep_sampling: cosine}"], "diffusion.timestep_sampling='cosine'"),
    (["diffusion={objective: flow_matching}", "train.stages.1.diffusion={prediction_type: v_prediction}"],
     "train.stages.1.diffusion.prediction_type is not a key of the flow_matching objective"),
])
def test_bad_objective_keys_are_one_line_errors(synth_shards, sets, fragment):
    with pytest.raises(ConfigError) as e:
        _cfg(synth_shards, *sets)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_demo_switches_objective_with_one_key(synth_shards):
    """configs/demo.yaml keeps each objective's keys in its own subsection: one --set switches."""
    ddpm = _cfg(synth_shards)
    flow = _cfg(synth_shards, "diffusion.objective=flow_matching")
    assert ddpm.diffusion.params()["prediction_type"] == "v_prediction"
    assert build_objective(flow.diffusion.objective, flow.diffusion.params()).name == "flow_matching"
    # a flat --set wins over the recipe's subsection
    assert _cfg(synth_shards, "diffusion.noise_offset=0.2").diffusion.params()["noise_offset"] == 0.2


def test_flow_recipe_with_a_stage_shift(synth_shards):
    # demo.yaml sets the DDPM keys; a flow recipe replaces the diffusion section
    cfg = _cfg(synth_shards, "diffusion={objective: flow_matching, shift: 1.0}", "train.stages.1.diffusion={shift: 3.0}")
    from scaletrain.train.curriculum import stage_objective

    base = build_objective(cfg.diffusion.objective, cfg.diffusion.params())
    assert stage_objective(base, cfg, 0) is base
    assert stage_objective(base, cfg, 1).params.shift == 3.0 and base.params.shift == 1.0
    assert "shift 3" in stage_objective(base, cfg, 1).describe()


# ----------------------------------------------------------------- a new objective in one file


class _X0Params(ObjectiveParams):
    scale: float = 1.0


class _Blend(Sampler):
    def __init__(self, steps: int) -> None:
        self.timesteps = torch.linspace(1.0, 1.0 / steps, steps)

    def step(self, pred: Tensor, t: Tensor, x: Tensor) -> Tensor:
        return pred  # the model predicts the clean sample directly


@register
class ToyX0Objective(Objective):
    """Predict x0 from x0 + scale * noise: everything an objective needs, in this file."""

    name = "toy_x0"
    Params = _X0Params
    scheduler_class = "none"

    def training_batch(self, x0, keys, *, step, seed):
        gens = per_sample_generators(seed, step, keys)
        noise = torch.stack([torch.randn(tuple(x0.shape[1:]), generator=g) for g in gens])
        t = torch.ones(x0.shape[0])
        return TrainingBatch(noisy=x0 + self.params.scale * noise, timesteps=t * 999, target=x0, t=t)

    def errors(self, pred, batch):
        return (pred.float() - batch.target.float()).square().flatten(1).mean(1)

    def weights(self, batch):
        return None

    def sampler(self, num_inference_steps, device, *, latent_shape):
        return _Blend(num_inference_steps)

    def scheduler_config(self):
        return {}


def test_a_toy_objective_registered_in_one_file_trains_and_samples(synth_shards):
    assert "toy_x0" in OBJECTIVES
    cfg = _cfg(synth_shards, "diffusion={objective: toy_x0, scale: 0.5}")
    objective = build_objective(cfg.diffusion.objective, cfg.diffusion.params())
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    losses = []
    for step in range(30):
        tb = objective.training_batch(x0, KEYS, step=step, seed=0)
        loss, _ = objective.loss(net(tb.noisy), tb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]  # measured 0.51x after 30 steps: the loss trains the net
    images = generate_samples(lambda x, t, cond: net(x), lambda texts: {"text_emb": torch.zeros(len(texts), 2, 4)},
                              lambda x: x, prompts=["a"], resolution=8, in_channels=3, latent_factor=1,
                              objective=objective, num_inference_steps=3, guidance_scale=1.0, seed=0)
    assert images.shape == (1, 3, 8, 8)


def test_published_schedulers_name_their_objective():
    """Each objective says which diffusers schedulers it matches (a pipeline folder's
    scheduler_config.json); the published pipelines' schedulers, as their folders ship them."""
    from scaletrain.diffusion import objective_for_scheduler

    sd = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
          "beta_end": 0.012, "num_train_timesteps": 1000, "skip_prk_steps": True}
    sd21_768 = {**sd, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}
    sdxl = {**sd, "_class_name": "EulerDiscreteScheduler", "prediction_type": "epsilon"}
    sd3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    flux = {**sd3, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}
    wan = {"_class_name": "UniPCMultistepScheduler", "beta_schedule": "linear", "prediction_type": "flow_prediction",
           "use_flow_sigmas": True, "flow_shift": 3.0, "num_train_timesteps": 1000}
    sample = {**sd, "_class_name": "DDPMScheduler", "prediction_type": "sample"}
    found = {k: objective_for_scheduler(v) for k, v in
             dict(sd=sd, sd21_768=sd21_768, sdxl=sdxl, sd3=sd3, flux=flux, wan=wan, sample=sample).items()}
    assert {k: c.name if c else None for k, c in found.items()} == {
        "sd": "ddpm", "sd21_768": "ddpm", "sdxl": "ddpm", "sd3": "flow_matching", "flux": "flow_matching",
        "wan": "flow_matching", "sample": None}
    # DDPM names every training key a folder contradicts, at once
    params = build_objective("ddpm", {"beta_schedule": "linear"}).params
    assert [c[0] for c in found["sd21_768"].conflicts(sd21_768, params)] == ["prediction_type", "beta_schedule"]
    assert found["sd"].conflicts(sd, build_objective("ddpm", {}).params) == []
