"""Config: loading, dotted overrides, and the one-line errors a user sees for bad input."""

from __future__ import annotations

import json
import sys

import pytest

from scaletrain.config import ConfigError, apply_overrides, parse_overrides
from scaletrain.checks import load_run_config as load_config
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
    (["model.activation_checkpointing=selective", "model.activation_checkpointing_every=9"], 2,
     "model.activation_checkpointing=selective selects no unit of model.preset='unet-tiny' "
     "(activation_checkpointing_every=9 but it has 5 units)"),
    (["engine.kind=deepspeed", "engine.precision=fp16"], 2, "engine.precision=fp16 under DeepSpeed needs CUDA GPUs"),
    # a UNet-only knob on a transformer family: every block holds attention
    (["model.preset=mmdit-tiny", "model.activation_checkpointing=selective",
      "model.activation_checkpointing_selective=attention"], 2,
     "model.activation_checkpointing_selective=attention picks every unit of model.preset='mmdit-tiny' "
     "(each mmdit block holds attention): that is full checkpointing"),
    (["model.preset=flux-tiny", "model.activation_checkpointing=selective",
      "model.activation_checkpointing_selective=attention"], 2, "picks every unit of model.preset='flux-tiny'"),
    (["log.wandb=on"], 2, "log.wandb=true is ambiguous; use online, offline or disabled"),
    (["model.preset=mmdit-tiny", "sample.resolution=256"], 2,
     "sample.resolution: 256 px is larger than 128 px, the largest image model.preset='mmdit-tiny' takes"),
    (["sample.prompts=[]"], 2, "sample.prompts is empty: list at least one prompt or set sample.at_end=false"),
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


# ----------------------------------------------------------------------------- engine knobs


def test_engine_knob_defaults_are_plain_engines(synth_shards):
    """The defaults change nothing: torch's DDP defaults, FSDP2's implicit prefetch, 1-D mesh,
    and the DeepSpeed JSON's own values (every engine.deepspeed knob null)."""
    e = _load(synth_shards).engine
    assert (e.ddp.bucket_cap_mb, e.ddp.gradient_as_bucket_view, e.ddp.static_graph, e.ddp.comm_hook) == (25.0, False, False, "none")
    assert (e.fsdp.forward_prefetch, e.fsdp.backward_prefetch, e.fsdp.mesh_shape(2)) == (0, 1, None)
    assert all(v is None for v in e.deepspeed.model_dump().values())
    assert e.comm_profile_every == 0


@pytest.mark.parametrize("sets,world,shape", [
    (["engine.fsdp.shard_size=2"], 2, (1, 2)),
    (["engine.fsdp.replicate_size=2"], 2, (2, 1)),
    (["engine.fsdp.replicate_size=2", "engine.fsdp.shard_size=4"], 8, (2, 4)),
])
def test_hsdp_mesh_shape(synth_shards, sets, world, shape):
    cfg = load_config(DEMO, [f"data.shards={shard_pattern(synth_shards)}", "train.stages.0.global_batch=null",
                             "train.stages.1.global_batch=null", *sets], world_size=world)
    assert cfg.engine.fsdp.mesh_shape(world) == shape


KNOB_ERRORS = [
    (["engine.fsdp.replicate_size=2", "engine.fsdp.shard_size=2"],
     "engine.fsdp.replicate_size=2 x engine.fsdp.shard_size=2 must equal the world size 2"),
    (["engine.fsdp.shard_size=3"], "must equal the world size 2"),
    (["engine.fsdp.forward_prefetch=-1"], "engine.fsdp.forward_prefetch=-1"),
    (["engine.fsdp.backward_prefetch=0"], "engine.fsdp.backward_prefetch=0"),
    (["engine.ddp.comm_hook=int8"], "engine.ddp.comm_hook='int8'"),
    (["engine.ddp.powersgd_start_step=1"], "engine.ddp.powersgd_start_step=1"),
    (["engine.ddp.bucket_cap_mb=0"], "engine.ddp.bucket_cap_mb=0"),
    (["engine.deepspeed.allgather_bucket_size=1001"], "engine.deepspeed.allgather_bucket_size=1001 must be even"),
    (["engine.deepspeed.reduce_bucket_sise=1"], "engine.deepspeed.reduce_bucket_sise is not a known key"),
]


@pytest.mark.parametrize("sets,fragment", KNOB_ERRORS)
def test_bad_engine_knob_gives_one_line(synth_shards, sets, fragment):
    with pytest.raises(ConfigError) as e:
        _load(synth_shards, *sets)
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA refusal")
@pytest.mark.parametrize("sets,fragment", [
    (["engine.kind=ddp", "engine.ddp.comm_hook=bf16"], "engine.ddp.comm_hook='bf16' needs CUDA GPUs with NCCL"),
    (["engine.kind=deepspeed", "engine.deepspeed.zero_quantized_weights=true"],
     "engine.deepspeed.zero_quantized_weights=true needs CUDA GPUs"),
    (["engine.kind=deepspeed", "engine.deepspeed.zero_quantized_gradients=true"],
     "engine.deepspeed.zero_quantized_gradients=true needs CUDA GPUs"),
])
def test_knobs_that_cannot_work_on_cpu_are_refused(synth_shards, sets, fragment):
    # Measured here: torch refuses the bf16 hook on gloo, and DeepSpeed 0.19.8's qwZ/qgZ fail
    # with "This op had not been implemented on CPU backend" at the first step.
    with pytest.raises(ConfigError, match=fragment):
        _load(synth_shards, *sets)


def _ds_json(tmp_path, stage: int, **zero) -> str:
    p = tmp_path / f"zero{stage}.json"
    p.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": stage, **zero}}))
    return str(p)


def _fill(cfg, path):
    from scaletrain.engines.ds_config import fill_deepspeed_config, load_deepspeed_json

    return fill_deepspeed_config(load_deepspeed_json(path), cfg, micro_batch=8, grad_accum=1, world_size=2)


def test_deepspeed_knobs_fill_auto_and_absent_keys(synth_shards, tmp_path):
    path = _ds_json(tmp_path, 3, reduce_bucket_size="auto", overlap_comm="auto", stage3_prefetch_bucket_size="auto")
    cfg = _load(synth_shards, "engine.kind=deepspeed", f"engine.deepspeed_config={path}",
                "engine.deepspeed.reduce_bucket_size=1000000", "engine.deepspeed.zero_hpz_partition_size=2",
                "engine.deepspeed.stage3_param_persistence_threshold=0")
    zero = _fill(cfg, path)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 1_000_000  # "auto" filled from the recipe
    assert zero["zero_hpz_partition_size"] == 2 and zero["stage3_param_persistence_threshold"] == 0  # absent: added
    # "auto" with the recipe's knob null: a bucket size follows the hidden size (64 for
    # unet-tiny: 0.9 x 64^2, accelerate's rule); anything else is dropped (DeepSpeed's default).
    assert zero["stage3_prefetch_bucket_size"] == 3686 and "overlap_comm" not in zero


def test_deepspeed_knob_equal_to_json_is_accepted(synth_shards):
    cfg = _load(synth_shards, "engine.kind=deepspeed", "engine.deepspeed.reduce_bucket_size=50000000",
                "engine.deepspeed.overlap_comm=true")
    zero = _fill(cfg, "ds_configs/zero3.json")["zero_optimization"]
    assert zero["reduce_bucket_size"] == 50_000_000 and zero["overlap_comm"] is True


@pytest.mark.parametrize("json_name,sets,fragment", [
    ("zero3.json", ["engine.deepspeed.reduce_bucket_size=1000000"],
     "DeepSpeed JSON zero_optimization.reduce_bucket_size=50000000 conflicts with engine.deepspeed.reduce_bucket_size=1000000"),
    ("zero3.json", ["engine.deepspeed.overlap_comm=false"], "zero_optimization.overlap_comm=True conflicts"),
    ("zero2.json", ["engine.deepspeed.stage3_prefetch_bucket_size=1000"],
     "engine.deepspeed.stage3_prefetch_bucket_size=1000 applies to ZeRO stage 3, but ds_configs/zero2.json has zero_optimization.stage=2"),
    ("zero2.json", ["engine.deepspeed.zero_hpz_partition_size=2"], "applies to ZeRO stage 3"),
    ("zero3.json", ["engine.deepspeed.allgather_bucket_size=1000"], "applies to ZeRO stage 1 or 2"),
    ("zero3.json", ["engine.deepspeed.zero_hpz_partition_size=3"], "does not divide the world size 2"),
])
def test_deepspeed_knob_conflicts_are_errors(synth_shards, json_name, sets, fragment):
    with pytest.raises(ConfigError) as e:
        _load(synth_shards, "engine.kind=deepspeed", f"engine.deepspeed_config=ds_configs/{json_name}", *sets)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_yaml_off_disables_wandb(synth_shards):
    # `--set log.wandb=off` reaches the config as False (YAML 1.1): it means disabled.
    assert _load(synth_shards, "log.wandb=off").log.wandb == "disabled"


def test_a_refused_recipe_is_reported_by_rank0_while_the_other_ranks_wait(monkeypatch, capsys) -> None:
    """Regression (CI, stop 21): rank 1 exited at once on a config error, torchrun SIGTERMed
    rank 0 before it printed, and the launch failed with no ``scaletrain:`` line."""
    import time

    from scaletrain import cli

    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.pretrain_main(["--config", "configs/demo.yaml", "--set", "optim.lr=-1"]) == 2
    assert slept == [60.0] and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert cli.pretrain_main(["--config", "configs/demo.yaml", "--set", "optim.lr=-1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert slept == [60.0] and len(err) == 1 and err[0].startswith("scaletrain: config error:")


ACCELERATE_ZERO3 = REPO / "tests" / "data" / "accelerate_zero3.json"  # accelerate/transformers' ZeRO-3 template


def test_accelerate_template_runs_as_it_is(synth_shards):
    """The ZeRO-3 JSON users copy from the accelerate and transformers docs ("auto" for
    precision, optimizer, scheduler, batch, clipping and buckets) is filled from the recipe:
    the scheduler dropped with one line, buckets from the family's hidden size, no "auto"
    left for DeepSpeed to choke on."""
    from scaletrain.engines.ds_config import fill_deepspeed_config, load_deepspeed_json

    cfg = _load(synth_shards, "engine.kind=deepspeed", f"engine.deepspeed_config={ACCELERATE_ZERO3}",
                "engine.precision=bf16", "model.preset=dit-tiny")
    notes: list[str] = []
    ds = fill_deepspeed_config(load_deepspeed_json(str(ACCELERATE_ZERO3)), cfg, micro_batch=4, grad_accum=2,
                               world_size=2, notes=notes)
    assert "auto" not in json.dumps(ds) and "scheduler" not in ds
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["params"] == {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
                                         "weight_decay": cfg.optim.weight_decay}
    zero = ds["zero_optimization"]
    h = 64  # dit-tiny: 2 heads x 32
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) \
        == (h * h, int(0.9 * h * h), 10 * h)
    assert zero["stage3_gather_16bit_weights_on_model_save"] is False and zero["sub_group_size"] == 1e9
    assert len(notes) == 2 and notes[0].startswith("DeepSpeed JSON \"auto\" buckets from dit-tiny's hidden size 64")
    assert notes[1].startswith("DeepSpeed JSON scheduler WarmupDecayLR dropped: the trainer sets the LR each step")


def test_hidden_size_of_the_real_presets() -> None:
    from scaletrain.models.registry import get_family, get_preset

    sizes = {n: get_family(get_preset(n).family).hidden_size(get_preset(n).denoiser_config)
             for n in ("unet-sd2", "pixart-xl-2", "mmdit-sd3-medium", "flux-dev")}
    assert sizes == {"unet-sd2": 1280, "pixart-xl-2": 1152, "mmdit-sd3-medium": 1536, "flux-dev": 3072}


@pytest.mark.parametrize("edit,fragment", [
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 500}}},
     "DeepSpeed JSON scheduler.params.warmup_num_steps=500 conflicts with optim.warmup_steps=20"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 3e-4}}},
     "scheduler.params.warmup_max_lr=0.0003 conflicts with optim.lr=0.001"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "log"}}},
     "scheduler.params.warmup_type='log' conflicts with the trainer's warm-up, which is linear='linear'"),
    ({"scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 1e-5}}},
     "scheduler.params.cycle_min_lr=1e-05 (OneCycle) has no equivalent in the recipe"),
    ({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}},
     'DeepSpeed JSON zero_optimization.sub_group_size="auto" is not a value scaletrain fills'),
    ({"fp16": {"enabled": True}}, "DeepSpeed JSON fp16.enabled=True conflicts with engine.precision='fp32'"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4 conflicts with train.stages[].grad_accum=1"),
])
def test_template_values_that_conflict_are_one_line_errors(synth_shards, tmp_path, edit, fragment):
    ds = json.loads(ACCELERATE_ZERO3.read_text())
    ds.update(edit)
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ds))
    with pytest.raises(ConfigError) as e:
        _load(synth_shards, "engine.kind=deepspeed", f"engine.deepspeed_config={p}")
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_scheduler_that_agrees_with_the_recipe_is_dropped(synth_shards, tmp_path):
    from scaletrain.engines.ds_config import fill_deepspeed_config

    ds = json.loads(ACCELERATE_ZERO3.read_text())
    ds["scheduler"] = {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 20, "warmup_type": "linear",
                                                             "cos_min_ratio": 0.1, "total_num_steps": 1000}}
    cfg = _load(synth_shards, "engine.kind=deepspeed")
    notes: list[str] = []
    assert "scheduler" not in fill_deepspeed_config(ds, cfg, micro_batch=8, grad_accum=1, world_size=2, notes=notes)
    assert any("scheduler WarmupCosineLR dropped" in n for n in notes)
