"""Config: loading, dotted overrides, and the one-line errors a user sees for bad input."""

from __future__ import annotations

import json
import sys

import pytest

from scaletrain.config import ConfigError, apply_overrides, load_config, parse_overrides
from tests.conftest import REPO, run_cmd, shard_pattern

DEMO = REPO / "configs" / "demo.yaml"


def _load(synth_shards, *sets, world_size=2):
    return load_config(DEMO, [f"data.shards={shard_pattern(synth_shards)}", *sets], world_size=world_size)


def test_demo_recipe_validates(synth_shards):
    cfg = _load(synth_shards)
    assert [s.resolution for s in cfg.train.stages] == [32, 64]
    assert cfg.engine.kind == "fsdp"
    assert cfg.stage_global_batch(0, 2) == cfg.train.stages[0].global_batch


def test_overrides_parse_yaml_values_and_list_indices(synth_shards):
    cfg = _load(synth_shards, "optim.lr=3e-4", "train.stages.1.steps=7", "engine.kind=ddp", "log.progress=false")
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.stages[1].steps == 7
    assert cfg.engine.kind == "ddp" and cfg.log.progress is False


def test_apply_overrides_creates_sections():
    data = apply_overrides({}, parse_overrides(["a.b.c=1", "a.d=[1, 2]"]))
    assert data == {"a": {"b": {"c": 1}, "d": [1, 2]}}


BAD_INPUTS = [
    # (overrides, world size, expected fragment of the one-line message)
    (["train.stages.0.resolutio=32"], 2, "train.stages.0.resolutio is not a known key"),
    (["optim.lr=abc"], 2, "optim.lr='abc'"),
    (["train.stages.0.steps=-3"], 2, "train.stages.0.steps=-3"),
    ([], 1, "train.stages.0.global_batch=16 but micro_batch 8 x grad_accum 1 x world size 1 = 8; set train.stages.0.grad_accum=2"),
    (["train.stages.1.resolution=63"], 2, "train.stages.1.resolution=63 is not divisible by 2"),
    (["model.preset=unet-huge"], 2, "model.preset='unet-huge' is unknown"),
    (["data.shards=/nonexistent/shard-{0..3}.tar"], 2, "'/nonexistent/shard-0.tar' (and 3 more) does not exist"),
    (["engine.kind=megatron"], 2, "engine.kind='megatron'"),
    (["train.stages.7.steps=1"], 2, "'7' is not an index of a list of 2 items"),
    (["optim.lr"], 2, "is not KEY=VALUE"),
]


@pytest.mark.parametrize("overrides,world,fragment", BAD_INPUTS)
def test_bad_config_gives_one_line(synth_shards, overrides, world, fragment):
    sets = [f"data.shards={shard_pattern(synth_shards)}"] + overrides
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, sets, world_size=world)
    msg = str(e.value)
    assert fragment in msg
    assert "\n" not in msg


def test_deepspeed_json_conflict_is_an_error(synth_shards, tmp_path):
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["gradient_clipping"] = 0.5
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match=r"gradient_clipping=0.5 conflicts with optim.grad_clip=1.0"):
        _load(synth_shards, "engine.kind=deepspeed", f"engine.deepspeed_config={p}")


def test_deepspeed_auto_values_filled(synth_shards):
    from scaletrain.engines.ds_config import fill_deepspeed_config, load_deepspeed_json

    cfg = _load(synth_shards, "engine.kind=deepspeed", "engine.precision=bf16")
    ds = fill_deepspeed_config(load_deepspeed_json("ds_configs/zero3.json"), cfg, micro_batch=4, grad_accum=2, world_size=2)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")


@pytest.mark.parametrize("overrides,world,fragment", [BAD_INPUTS[0], BAD_INPUTS[3], BAD_INPUTS[6]])
def test_launcher_prints_one_line_and_exits_nonzero(synth_shards, overrides, world, fragment):
    """Exactly as a user runs it: no traceback, one line on stderr, exit code 2, no process group."""
    sets = [x for o in [f"data.shards={shard_pattern(synth_shards)}", *overrides] for x in ("--set", o)]
    r = run_cmd([sys.executable, "launchers/pretrain.py", "--config", "configs/demo.yaml", *sets],
                env={"WORLD_SIZE": str(world)}, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("scaletrain: config error: ") and fragment in lines[0]
    assert "Traceback" not in r.stderr
