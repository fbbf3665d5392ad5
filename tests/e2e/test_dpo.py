"""Diffusion-DPO through launchers/dpo.py as a user runs it: torchrun + FSDP2 (the proof that
implicit preference accuracy rises well above 50% on a tiny synthetic preference set), the
deepspeed launcher with a ZeRO-3 frozen reference, LoRA-DPO on FSDP2 and ZeRO-3 (reference =
adapters off; the ZeRO-3 adapter loaded by diffusers alone), and a
stop-and-resume that reproduces the straight run."""

from __future__ import annotations

import json
import math
import statistics
import sys

import pytest

from tests.conftest import BIN, run_cmd
from tests.distributed.util import free_port, read_metrics

pytestmark = pytest.mark.e2e

# A tiny preference set (see configs/dpo.yaml for the rule): 16 pairs at 16 px, one global
# batch, so a ~1M-parameter UNet from random init learns every pair in a few dozen steps.
NUM_PAIRS, RESOLUTION = 16, 16
DPO_FIELDS = ("dpo_accuracy", "dpo_reward_margin", "dpo_reward_chosen", "dpo_reward_rejected")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """`scaletrain data synth-pairs`, in this process."""
    from scaletrain.cli import main

    out = tmp_path_factory.mktemp("pairs")
    assert main(["data", "synth-pairs", "--out", str(out), "--num-pairs", str(NUM_PAIRS), "--per-shard", "4",
                 "--resolution", str(RESOLUTION), "--seed", "0"]) == 0
    return out


@pytest.fixture(scope="module")
def start_weights(tmp_path_factory):
    """Start weights that differ from run.seed's random init, as an exported diffusers folder."""
    import torch

    from scaletrain.models import build_denoiser_net

    torch.manual_seed(1234)
    out = tmp_path_factory.mktemp("start")
    build_denoiser_net("unet-tiny").save_pretrained(out)
    return out


def _sets(pairs, run_dir, steps: int, *extra: str) -> list[str]:
    sets = [f"data.shards={pairs}", f"run.dir={run_dir}", f"train.stages.0.resolution={RESOLUTION}",
            f"train.stages.0.steps={steps}", "log.progress=false", "checkpoint.at_stage_end=false", *extra]
    return [x for s in sets for x in ("--set", s)]


def _check_start(metrics: list[dict]) -> None:
    """Step 1 runs before any update: policy == reference, so every pair ties."""
    first = metrics[0]
    assert first["dpo_reward_margin"] == 0.0 and first["dpo_accuracy"] == 0.5
    assert first["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    for m in metrics:
        assert all(math.isfinite(m[k]) for k in DPO_FIELDS)


def test_dpo_torchrun_fsdp_raises_implicit_accuracy(pairs, tmp_path):
    run_dir = tmp_path / "run"
    steps = 30
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           "launchers/dpo.py", "--config", "configs/dpo.yaml", *_sets(pairs, run_dir, steps)]
    r = run_cmd(cmd, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    _check_start(metrics)
    late = statistics.mean(m["dpo_accuracy"] for m in metrics[-10:])
    print(f"implicit accuracy, mean of the last 10 steps: {late:.3f}")
    assert late >= 0.8, [round(m["dpo_accuracy"], 3) for m in metrics]
    assert statistics.mean(m["dpo_reward_margin"] for m in metrics[-10:]) > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    # The frozen reference is sharded like the policy: half of the parameters on rank 0.
    assert summary["engine"] == "fsdp" and summary["world_size"] == 2
    assert summary["reference_params_local_rank0"] == summary["params_local_rank0"] < summary["params_total"]


def test_dpo_deepspeed_launcher_zero3_reference_from_init(pairs, start_weights, tmp_path):
    """ZeRO-3 policy and reference, both from `init.from_diffusers`: step 1's zero margin shows
    the reference holds the start weights (the seed's random init would not tie). Launched as
    `deepspeed --hostfile hosts` with `localhost slots=2` (no ssh check: one host)."""
    run_dir = tmp_path / "run"
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\n")
    cmd = [str(BIN / "deepspeed"), "--hostfile", str(hosts), "--no_ssh_check", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "launchers/dpo.py", "--config", "configs/dpo.yaml",
           *_sets(pairs, run_dir, 4, "engine.kind=deepspeed", "engine.deepspeed_config=ds_configs/zero3.json",
                  f"init.from_diffusers={start_weights}")]
    r = run_cmd(cmd, timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    _check_start(metrics)
    assert any(m["dpo_reward_margin"] != 0.0 for m in metrics[1:])  # the policy moved away from it
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engine"] == "deepspeed" and str(start_weights) in summary["reference"]
    # A second, optimizer-less ZeRO-3 engine partitions the reference: ~half on rank 0.
    assert summary["reference_params_local_rank0"] < 0.6 * summary["params_total"]


@pytest.fixture(scope="module")
def lora_dpo(pairs, start_weights, tmp_path_factory) -> dict:
    """LoRA-DPO from exported weights, 4 steps, on FSDP2 and on ZeRO-3 (torchrun)."""
    runs = {}
    for engine, extra in (("fsdp", []), ("zero3", ["engine.kind=deepspeed", "engine.deepspeed_config=ds_configs/zero3.json"])):
        run_dir = tmp_path_factory.mktemp(f"lora-dpo-{engine}")
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
               "launchers/dpo.py", "--config", "configs/dpo.yaml",
               *_sets(pairs, run_dir, 4, "lora.enabled=true", "lora.rank=4", "optim.lr=1e-2",
                      f"init.from_diffusers={start_weights}", "checkpoint.at_stage_end=true", *extra)]
        r = run_cmd(cmd, timeout=600)
        assert r.returncode == 0, (engine, r.stderr[-4000:])
        runs[engine] = run_dir
    return runs


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_lora_dpo_reference_is_the_base_model(lora_dpo, start_weights, engine):
    """The reference is the base (adapters off, no second model), the base is sharded like the
    adapters (ZeRO-3 partitions it too) and only the adapters train: every base weight is the
    start weights', bit for bit."""
    import torch
    from safetensors.torch import load_file

    from scaletrain.checkpoint.export import base_state_dict

    run_dir = lora_dpo[engine]
    metrics = read_metrics(run_dir)
    _check_start(metrics)  # LoRA's B starts at zero: the adapted model is its base
    assert any(m["dpo_reward_margin"] != 0.0 for m in metrics[1:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engine"] == ("deepspeed" if engine == "zero3" else "fsdp")
    assert summary["params_trainable"] < summary["params_total"] / 10
    assert summary["params_local_rank0"] == pytest.approx(summary["params_total"] / 2, rel=0.02)
    assert "LoRA adapters disabled" in summary["reference"] and summary["reference_params_local_rank0"] == 0
    raw = _raw_state(run_dir)
    start = load_file(str(start_weights / "diffusion_pytorch_model.safetensors"))
    base = base_state_dict(raw)
    assert base.keys() == start.keys() and all(torch.equal(base[k], start[k]) for k in start)
    assert all(v.abs().sum() > 0 for k, v in raw.items() if ".lora_B." in k)


def test_lora_dpo_zero3_follows_fsdp_and_its_adapter_loads_in_diffusers(lora_dpo, start_weights, tmp_path):
    """ZeRO-3's LoRA-DPO curve is FSDP2's (rtol 1e-5, as the engine-equivalence runs); its exported
    adapter, loaded by diffusers alone onto the start weights, computes scaletrain's output."""
    import torch
    from safetensors.torch import load_file

    from scaletrain.config import LoraSection
    from scaletrain.models import build_denoiser_net
    from scaletrain.models.lora import inject_lora
    from tests.e2e.test_posttrain import DIFFUSERS_UNET_CHECK, yaml_lora

    fsdp, zero3 = (read_metrics(lora_dpo[e]) for e in ("fsdp", "zero3"))
    assert [m["loss"] for m in zero3] == pytest.approx([m["loss"] for m in fsdp], rel=1e-5)
    run_dir, out = lora_dpo["zero3"], tmp_path / "export"
    assert run_cmd([sys.executable, "-m", "scaletrain.cli", "ckpt", "export-lora", str(run_dir), str(out)]).returncode == 0
    (tmp_path / "check.py").write_text(DIFFUSERS_UNET_CHECK.replace("32, 32", f"{RESOLUTION}, {RESOLUTION}"))
    r = run_cmd([sys.executable, str(tmp_path / "check.py"), str(start_weights), str(out), str(tmp_path / "out.st")],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = load_file(str(tmp_path / "out.st"))
    assert (got["after"] - got["before"]).abs().max() > 1e-4  # the adapter changes the output
    net = build_denoiser_net("unet-tiny").eval()
    inject_lora(net, "unet", LoraSection(**yaml_lora(run_dir)))
    net.load_state_dict({k.removeprefix("net."): v for k, v in _raw_state(run_dir).items()}, strict=True)
    with torch.no_grad():
        expected = net(got["x"], torch.tensor([10, 500]), encoder_hidden_states=got["emb"]).sample
    torch.testing.assert_close(got["after"], expected, rtol=1e-5, atol=1e-5)


def _raw_state(run_dir) -> dict:
    from scaletrain.checkpoint.export import denoiser_state_dict, resolve_checkpoint

    return denoiser_state_dict(resolve_checkpoint(run_dir), use_ema=False)[0]


def test_dpo_resume_reproduces_the_straight_run(pairs, start_weights, tmp_path):
    """Stop a 2-rank FSDP2 DPO run at step 3 and resume it: steps 4-6 give the straight run's
    loss and preference metrics exactly. The resumed run takes the policy from its checkpoint
    and rebuilds the frozen reference from `init` (the start weights, not the resumed ones)."""
    def run(run_dir, *extra):
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
               "launchers/dpo.py", "--config", "configs/dpo.yaml",
               *_sets(pairs, run_dir, 6, f"init.from_diffusers={start_weights}", "data.num_workers=0", *extra)]
        r = run_cmd(cmd, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
        return r

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight)
    first = run(resumed, "run.stop_at_step=3")
    assert "stopping at step 3" in first.stdout + first.stderr
    second = run(resumed)
    assert "resumed at step 3" in second.stdout + second.stderr
    fields = ("step", "loss", *DPO_FIELDS)
    want = [tuple(m[k] for k in fields) for m in read_metrics(straight)]
    got = [tuple(m[k] for k in fields) for m in read_metrics(resumed)]
    assert [g[0] for g in got] == list(range(1, 7))
    _check_start(read_metrics(resumed))
    assert got == want
    summary = json.loads((resumed / "summary.json").read_text())
    assert str(start_weights) in summary["reference"]
