"""Post-training launchers as a user types them: SFT from a pre-training checkpoint (torchrun,
FSDP2), LoRA under torchrun (FSDP2, UNet) and under the deepspeed launcher (ZeRO-3, PixArt DiT
from an exported diffusers model), and the exported adapters loaded by diffusers / peft alone."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import BIN, run_cmd, shard_pattern
from tests.distributed.util import free_port, read_metrics

pytestmark = pytest.mark.e2e

ENV = {"OMP_NUM_THREADS": "1"}


def _sets(synth_shards, run_dir, steps: int, *extra: str) -> list[str]:
    pairs = [f"data.shards={shard_pattern(synth_shards)}", "data.split=sample", "data.shuffle_buffer=0",
             f"run.dir={run_dir}", "log.wandb=disabled", "log.progress=false", "sample.at_end=false",
             "validate.every_steps=0", "validate.at_end=false",
             f"train.stages=[{{name: s, resolution: 32, steps: {steps}, micro_batch: 4}}]", *extra]
    return [x for p in pairs for x in ("--set", p)]


def _torchrun(launcher: str, config: str, *args: str) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
            launcher, "--config", config, *args]


def _ok(r):
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    return r


def _state(src, *, use_ema: bool = True) -> dict[str, torch.Tensor]:
    from scaletrain.checkpoint.export import denoiser_state_dict, resolve_checkpoint

    return denoiser_state_dict(resolve_checkpoint(src), use_ema=use_ema)[0]


def _net_keys(state: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("net."): v for k, v in state.items()}


@pytest.fixture(scope="module")
def pretrained(synth_shards, tmp_path_factory):
    """A short FSDP2 pre-training run with an EMA: the start point of SFT and LoRA."""
    d = tmp_path_factory.mktemp("pre")
    _ok(run_cmd(_torchrun("launchers/pretrain.py", "configs/demo.yaml",
                          *_sets(synth_shards, d, 3, "ema.enabled=true")), env=ENV))
    return d


def test_sft_starts_from_checkpoint_and_relaunch_resumes_its_own(synth_shards, pretrained, tmp_path):
    """Launch 1 skips its first step (the health guard's NaN hook: no optimizer update) and
    checkpoints it, so the step-1 checkpoint holds exactly the start weights; it stops after
    step 2. The relaunch, with the init source moved away, must resume step 2, not re-init."""
    run_dir = tmp_path / "sft"
    cmd = _torchrun("launchers/sft.py", "configs/sft.yaml", *_sets(
        synth_shards, run_dir, 4, f"init.from_checkpoint={pretrained}", "checkpoint.every_steps=1",
        "checkpoint.keep_last=5", "health.inject_nan_steps=[1]", "run.stop_at_step=2"))
    r = _ok(run_cmd(cmd, env=ENV))
    # FSDP2 from a DCP checkpoint: one collective load into the shards (checkpoint/sources.py
    # DCPCheckpoint), never the whole model on a rank: rank 0 read about half the stored bytes
    # of the 2-rank checkpoint (model entries, then the EMA's over them).
    line = re.search(r"init: EMA weights of .*; DCP, each rank read what it keeps\); rank 0 read ([\d.]+) of "
                     r"([\d.]+) MiB", r.stdout + r.stderr)
    assert line, (r.stdout + r.stderr)[-3000:]
    assert 0 < float(line[1]) < 0.6 * float(line[2]), line[0]
    start = _net_keys(_state(run_dir / "checkpoints" / "step-00000001", use_ema=False))
    expected = _net_keys(_state(pretrained, use_ema=True))  # sft.yaml keeps init.use_ema: true
    assert start.keys() == expected.keys()
    assert all(torch.equal(start[k], expected[k]) for k in expected)
    raw = _net_keys(_state(pretrained, use_ema=False))
    assert any(not torch.equal(raw[k], expected[k]) for k in raw)  # so the EMA, not the raw weights
    # Step 2 trained from the start weights: they moved.
    after = _net_keys(_state(run_dir / "checkpoints" / "step-00000002", use_ema=False))
    assert any(not torch.equal(after[k], expected[k]) for k in expected)

    moved = pretrained.with_name(pretrained.name + "-moved")
    pretrained.rename(moved)
    try:
        r = _ok(run_cmd(cmd, env=ENV))
    finally:
        moved.rename(pretrained)
    out = r.stdout + r.stderr
    assert "resumed at step 2" in out and "init: skipped" in out
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]


DIFFUSERS_UNET_CHECK = """
import sys, torch
from safetensors.torch import save_file
from diffusers import UNet2DConditionModel
base, lora, out = sys.argv[1:4]
net = UNet2DConditionModel.from_pretrained(base).eval()
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 3, 32, 32, generator=g); emb = torch.randn(2, 8, 32, generator=g); t = torch.tensor([10, 500])
with torch.no_grad():
    before = net(x, t, encoder_hidden_states=emb).sample
    net.load_lora_adapter(lora, prefix="unet", use_safetensors=True)
    after = net(x, t, encoder_hidden_states=emb).sample
assert not any(m.startswith("scaletrain") for m in sys.modules)
save_file({"before": before, "after": after, "x": x, "emb": emb}, out)
"""


def test_lora_fsdp_torchrun_exports_for_diffusers(synth_shards, pretrained, tmp_path):
    from scaletrain.config import LoraSection
    from scaletrain.models import build_denoiser_net
    from scaletrain.models.lora import inject_lora

    run_dir, out = tmp_path / "lora", tmp_path / "export"
    _ok(run_cmd(_torchrun("launchers/lora.py", "configs/lora.yaml", *_sets(
        synth_shards, run_dir, 3, f"init.from_checkpoint={pretrained}", "ema.enabled=true")), env=ENV))
    summary = json.loads((run_dir / "summary.json").read_text())
    raw = _state(run_dir, use_ema=False)
    lora_numel = sum(v.numel() for k, v in raw.items() if ".lora_" in k)
    assert summary["params_trainable"] == lora_numel < summary["params_total"] / 10
    # Only the adapters trained: every base weight is the start weights', bit for bit.
    from scaletrain.checkpoint.export import base_state_dict

    base, start = base_state_dict(raw), _net_keys(_state(pretrained))
    assert base.keys() == start.keys() and all(torch.equal(base[k], start[k]) for k in start)
    assert all(v.abs().sum() > 0 for k, v in raw.items() if ".lora_B." in k)  # B starts at zero

    r = _ok(run_cmd([sys.executable, "-m", "scaletrain.cli", "ckpt", "export-lora", str(run_dir), str(out),
                     "--with-base"]))
    assert "diffusers layout, EMA weights" in r.stdout
    (tmp_path / "check.py").write_text(DIFFUSERS_UNET_CHECK)
    _ok(run_cmd([sys.executable, str(tmp_path / "check.py"), str(out / "base"), str(out),
                 str(tmp_path / "out.safetensors")], cwd=tmp_path))
    got = load_file(str(tmp_path / "out.safetensors"))
    assert (got["after"] - got["before"]).abs().max() > 1e-4  # the adapter changes the output
    # ... to exactly what the trained (EMA) scaletrain model computes
    cfg = yaml_lora(run_dir)
    net = build_denoiser_net("unet-tiny").eval()
    inject_lora(net, "unet", LoraSection(**cfg))
    net.load_state_dict(_net_keys(_state(run_dir)), strict=True)
    with torch.no_grad():
        expected = net(got["x"], torch.tensor([10, 500]), encoder_hidden_states=got["emb"]).sample
    torch.testing.assert_close(got["after"], expected, rtol=1e-5, atol=1e-5)  # thread-count rounding


def yaml_lora(run_dir) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["lora"]


PEFT_PIXART_CHECK = """
import sys, torch
from safetensors.torch import save_file
from diffusers import PixArtTransformer2DModel
from peft import PeftModel
base, lora, out = sys.argv[1:4]
net = PixArtTransformer2DModel.from_pretrained(base).eval()
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 3, 32, 32, generator=g); emb = torch.randn(2, 8, 32, generator=g); t = torch.tensor([10, 500])
kw = dict(encoder_hidden_states=emb, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None})
with torch.no_grad():
    before = net(x, **kw).sample
    after = PeftModel.from_pretrained(net, lora).eval()(x, **kw).sample
assert not any(m.startswith("scaletrain") for m in sys.modules)
save_file({"before": before, "after": after, "x": x, "emb": emb}, out)
"""


def test_lora_deepspeed_launcher_dit_from_diffusers(synth_shards, tmp_path):
    """ZeRO-3 under `deepspeed --hostfile`, PixArt DiT starting from a diffusers folder: the base
    partitioned with the adapters (half of every parameter on rank 0), the base bit-identical after
    training, the adapter loaded by diffusers/peft alone computing scaletrain's outputs."""
    from scaletrain.config import LoraSection
    from scaletrain.models import build_denoiser_net
    from scaletrain.models.lora import inject_lora

    base_dir, run_dir, out = tmp_path / "dit-base", tmp_path / "lora", tmp_path / "export"
    torch.manual_seed(7)
    build_denoiser_net("dit-tiny").save_pretrained(base_dir)  # stands in for `scaletrain ckpt export`
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\n")
    cmd = [str(BIN / "deepspeed"), "--hostfile", str(hosts), "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), "--no_ssh_check", "launchers/lora.py", "--config", "configs/lora.yaml",
           *_sets(synth_shards, run_dir, 3, "model.preset=dit-tiny", "init.from_checkpoint=null",
                  f"init.from_diffusers={base_dir}", "engine.kind=deepspeed",
                  "engine.deepspeed_config=ds_configs/zero3.json")]
    r = _ok(run_cmd(cmd, env=ENV))
    assert "trainable:" in r.stdout + r.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engine"] == "deepspeed" and summary["params_local_rank0"] * 2 == summary["params_total"]
    from scaletrain.checkpoint.export import base_state_dict

    raw = _state(run_dir, use_ema=False)
    start = load_file(str(base_dir / "diffusion_pytorch_model.safetensors"))
    base = base_state_dict(raw)
    assert base.keys() == start.keys() and all(torch.equal(base[k], start[k]) for k in start)

    _ok(run_cmd([sys.executable, "-m", "scaletrain.cli", "ckpt", "export-lora", str(run_dir), str(out)]))
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    (tmp_path / "check.py").write_text(PEFT_PIXART_CHECK)
    _ok(run_cmd([sys.executable, str(tmp_path / "check.py"), str(base_dir), str(out),
                 str(tmp_path / "out.safetensors")], cwd=tmp_path))
    got = load_file(str(tmp_path / "out.safetensors"))
    assert (got["after"] - got["before"]).abs().max() > 1e-4
    net = build_denoiser_net("dit-tiny").eval()
    inject_lora(net, "dit", LoraSection(**yaml_lora(run_dir)))
    net.load_state_dict(_net_keys(raw), strict=True)
    with torch.no_grad():
        expected = net(got["x"], encoder_hidden_states=got["emb"], timestep=torch.tensor([10, 500]),
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    torch.testing.assert_close(got["after"], expected, rtol=1e-5, atol=1e-5)  # thread-count rounding
