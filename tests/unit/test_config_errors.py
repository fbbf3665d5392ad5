"""Every one-line recipe error the components' checks raise, listed with its exact wording (issue 30,
"Bad input": a refactor may keep a message or improve it, never lose it). Each case is one bad
key on the demo recipe; the last test fails when a check's message has no case here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from scaletrain.checks import load_config
from scaletrain.config import ConfigError
from tests.conftest import REPO, shard_pattern

pytestmark = pytest.mark.unit

# (--set overrides on configs/demo.yaml, world size, check paths, the error); {tmp} is a folder
# holding an empty folder "empty" and a file "afile".
CASES = [
    (['train.stages.0.images=1000'], 1, False,
     'train.stages.0 sets both of steps and images; give exactly one (e.g. train.stages.0.steps=1000 or train.stages.0.images=1000000)'),
    (['train.stages.0.global_batch=17'], 1, False,
     'train.stages.0.global_batch=17 but micro_batch 8 x grad_accum 1 x world size 1 = 8; make global_batch a multiple of micro_batch x world (8)'),
    (['health.window=10', 'health.max_bad_in_window=11'], 1, False,
     'health.max_bad_in_window=11 exceeds health.window=10, so a rollback could never trigger; use at most 10'),
    (['health.loss_spike_factor=0.5'], 1, False,
     'health.loss_spike_factor=0.5 would flag ordinary steps (a factor of the EMA); use a value above 1, e.g. 3, or 0 to disable'),
    (['health.inject_nan_steps=[3]', 'health.inject_nan_rank=2'], 1, False,
     'health.inject_nan_rank=2 but the world size is 1; use a rank below 1'),
    (['health.inject_nan_steps=[0]'], 2, False,
     'health.inject_nan_steps=[0] must hold steps >= 1'),
    (['run.dir={tmp}/afile'], 1, True,
     "run.dir='{tmp}/afile': {tmp}/afile exists and is not a folder; choose another run.dir"),
    (['model.preset=from_diffusers'], 1, False,
     'model.preset=from_diffusers builds the model from a diffusers pipeline folder; set init.from_diffusers=FOLDER (the folder with model_index.json)'),
    (['model.preset=from_diffusers', 'init.from_diffusers={tmp}/empty'], 1, False,
     "model.preset=from_diffusers needs init.from_diffusers to be a diffusers pipeline folder (with model_index.json); '{tmp}/empty' is not one"),
    (['data.image_formats=[GIF, EPS]'], 1, False,
     "data.image_formats=['GIF', 'EPS']: EPS is not a format scaletrain decodes (JPEG, PNG and WebP always; add any of GIF, BMP, TIFF, PPM, TGA; never EPS or PS, which PIL decodes by running Ghostscript)"),
    (['train.stages.0.resolution=33'], 1, False,
     "train.stages.0.resolution=33 is not divisible by 2, the down-sampling factor of model.preset='unet-tiny'; use 32 or 34"),
    (['train.stages.0.frames=5'], 1, False,
     "train.stages.0.frames=5: model.preset='unet-tiny' (unet) is an image family; remove frames or choose a video preset (e.g. wan-tiny)"),
    (['model.preset=wan-tiny', 'train.stages.0.fps=8'], 1, False,
     'train.stages.0.fps=8 is set without frames; set train.stages.0.frames too'),
    (['model.preset=wan-2.1-1.3b', 'train.stages.0.resolution=64', 'train.stages.1.resolution=64', 'validate.resolution=64', 'train.stages.0.frames=4'], 1, False,
     "train.stages.0.frames=4: 'wan-2.1-1.3b''s video VAE takes 1 + 4k frames; use 1 or 5"),
    (['sample.resolution=33'], 1, False,
     'sample.resolution=33 is not divisible by 2; pick a multiple of 2'),
    (['model.preset=mmdit-tiny', 'train.stages.1.resolution=4096'], 1, False,
     "train.stages.1.resolution: 4096 px is larger than 128 px, the largest image model.preset='mmdit-tiny' takes (its position-embedding grid); use at most 128 px"),
    (['engine.context_parallel=3'], 2, False,
     'engine.context_parallel=3 does not divide the world size 2; use a divisor of 2 (ranks r..r+K-1 form one context group)'),
    (['model.preset=dit-tiny', 'model.activation_checkpointing=selective', 'model.activation_checkpointing_selective=attention'], 1, False,
     "model.activation_checkpointing_selective=attention picks every unit of model.preset='dit-tiny' (each dit block holds attention): that is full checkpointing; set model.activation_checkpointing=full, or activation_checkpointing_selective=every"),
    (['model.activation_checkpointing=selective', 'model.activation_checkpointing_every=100'], 1, False,
     "model.activation_checkpointing=selective selects no unit of model.preset='unet-tiny' (activation_checkpointing_every=100 but it has 5 units); use full, a smaller activation_checkpointing_every, or none"),
    (['lora.enabled=true', 'lora.target_modules=[nope]'], 1, False,
     "lora.target_modules=['nope'] matches no Linear/Conv2d layer of model.preset='unet-tiny'; use suffixes such as to_q, to_k, to_v, to_out.0"),
    (['diffusion.ddpm=5'], 1, False,
     "diffusion.ddpm must be a mapping of ddpm's keys, got 5"),
    (['validate.frames=5'], 1, False,
     "validate.frames=5: model.preset='unet-tiny' (unet) is an image family; remove validate.frames"),
    (['model.preset=wan-2.1-1.3b', 'train.stages.0.resolution=64', 'train.stages.1.resolution=64', 'validate.resolution=64', 'validate.frames=4'], 1, False,
     "validate.frames=4: 'wan-2.1-1.3b''s video VAE takes 1 + 4k frames; use 1 or 5"),
    (['validate.resolution=33'], 1, False,
     'validate.resolution=33 is not divisible by 2; pick a multiple of 2'),
    (['validate.num_images=2'], 4, False,
     'validate.num_images=2 is fewer than the 4 ranks; set validate.num_images>=4'),
    (['validate.feature_extractor=inception'], 1, False,
     'validate.feature_extractor=inception needs validate.inception_weights=PATH (a local weights file; nothing is downloaded), or use validate.feature_extractor=offline'),
    (['validate.feature_extractor=inception', 'validate.inception_weights={tmp}/none.pt'], 1, True,
     "validate.inception_weights='{tmp}/none.pt' does not exist; point it at a local InceptionV3 weights file"),
    (['validate.safety_model={tmp}/empty'], 1, True,
     "validate.safety_model='{tmp}/empty' is not a local model folder with config.json; point it at a save_pretrained image classifier (nothing is downloaded) or remove it"),
    (['validate.shards={tmp}/none.tar'], 1, True,
     "validate.shards: '{tmp}/none.tar' does not exist; write shards with `scaletrain data synth --out DIR --seed 1` or fix the path"),
    (['data.shards={tmp}/empty'], 1, True,
     "data.shards: shards='{tmp}/empty' matched no .tar files; point it at .tar files"),
    (['data.shards={tmp}/none.tar'], 1, True,
     "data.shards: '{tmp}/none.tar' does not exist; write shards with `scaletrain data synth --out DIR` or fix the path"),
    (['init.from_checkpoint=/tmp/a', 'init.from_diffusers=/tmp/b'], 1, False,
     'init.from_checkpoint and init.from_diffusers are both set; keep one of them'),
    (['engine.fsdp.shard_size=3'], 4, False,
     'engine.fsdp.replicate_size=None x engine.fsdp.shard_size=3 must equal the world size 4; set one of them and leave the other null'),
    (['model.preset=wan-tiny', 'engine.fsdp.shard_size=2', 'engine.fsdp.replicate_size=2', 'engine.context_parallel=2'], 4, False,
     'engine.context_parallel > 1 with engine.fsdp.shard_size/replicate_size (HSDP) is not supported; drop the HSDP sizes (FSDP2 then shards over all ranks)'),
    (['engine.kind=ddp', 'engine.ddp.comm_hook=bf16'], 1, False,
     "engine.ddp.comm_hook='bf16' needs CUDA GPUs with NCCL (torch refuses it on gloo); use fp16 or powersgd on this machine"),
    (['engine.kind=deepspeed', 'engine.precision=fp16'], 1, False,
     "engine.precision=fp16 under DeepSpeed needs CUDA GPUs (DeepSpeed's CPU accelerator runs fp32 and bf16 only); use engine.precision=bf16, or engine.kind=fsdp/ddp for fp16"),
    (['engine.kind=deepspeed', 'engine.precision=fp8'], 1, False,
     "engine.precision=fp8 is not wired into engine.kind=deepspeed (torchao's float8 Linear layers train under engine.kind=fsdp only); use engine.kind=fsdp, or engine.precision=bf16 with deepspeed"),
    (['engine.kind=ddp', 'engine.precision=fp8'], 1, False,
     "engine.precision=fp8 is not wired into engine.kind=ddp (torchao's float8 Linear layers train under engine.kind=fsdp only); use engine.kind=fsdp, or engine.precision=bf16 with ddp"),
    (['engine.precision=fp8', 'engine.fp8.recipe=blockwise'], 1, False,
     "engine.fp8.recipe='blockwise': Input should be 'tensorwise' or 'rowwise'"),
    (['engine.precision=fp8', 'engine.fp8.recipe=rowwise', 'engine.fp8.all_gather=true'], 1, False,
     'engine.fp8.all_gather=true needs engine.fp8.recipe=tensorwise (torchao gathers fp8 weights with one scale per tensor only, not rowwise); set engine.fp8.all_gather=false or engine.fp8.recipe=tensorwise'),
    (['engine.kind=deepspeed', 'engine.deepspeed.zero_quantized_weights=true'], 1, False,
     "engine.deepspeed.zero_quantized_weights=true needs CUDA GPUs (DeepSpeed's quantizer has no CPU kernels); set it to false on this machine"),
    (['engine.kind=deepspeed', 'engine.deepspeed.zero_hpz_partition_size=3'], 4, False,
     'engine.deepspeed.zero_hpz_partition_size=3 does not divide the world size 4; use the number of ranks per node'),
]
# Raised where no case here can reach it: the suite runs as root, who may write anywhere; every
# built-in preset has parallel units (a family without any is refused for the memory levers);
# this machine has no CUDA GPU and has torchao (test_fp8_needs_fp8_tensor_cores_and_torchao fakes both).
UNREACHABLE = {" is not writable by this user; choose another ",
               " to act on; set model.activation_checkpointing=none and model.compile=false",
               "engine.precision=fp8 needs fp8 tensor cores: ",
               "engine.precision=fp8 needs torchao, which is not installed; pip install 'torchao>=0.18,<0.19' "
               "(or use engine.precision=bf16)"}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cfgerr")
    (d / "empty").mkdir()
    (d / "afile").write_text("")
    return d


@pytest.mark.parametrize("sets,world,paths,message", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_each_recipe_error_is_one_line_with_its_wording(synth_shards, tmp, sets, world, paths, message):
    base = [f"data.shards={shard_pattern(synth_shards)}", "train.stages.0.global_batch=null",
            "train.stages.1.global_batch=null"]
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "demo.yaml", base + [s.format(tmp=tmp) for s in sets], world_size=world,
                    check_paths=paths)
    assert str(e.value) == message.format(tmp=tmp)
    assert "\n" not in str(e.value)


def test_fp8_needs_fp8_tensor_cores_and_torchao(synth_shards, monkeypatch):
    """fp8 on a CUDA GPU below compute capability 8.9 (a V100, faked), and without torchao: one line
    each, before anything starts; 8.9 (an L4) passes."""
    import importlib.util

    import torch

    def fp8(world: int = 1):
        load_config(REPO / "configs" / "demo.yaml", [f"data.shards={shard_pattern(synth_shards)}",
                                                       "train.stages.0.global_batch=null",
                                                       "train.stages.1.global_batch=null", "engine.precision=fp8"],
                    world_size=world, check_paths=False)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    with pytest.raises(ConfigError) as e:
        fp8()
    assert str(e.value) == ("engine.precision=fp8 needs fp8 tensor cores: Tesla V100-SXM2-32GB has compute capability "
                            "7.0, below 8.9 (L4, L40S, H100, H200, B200 and later have them); use "
                            "engine.precision=bf16 on this GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    fp8()
    monkeypatch.undo()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a))
    with pytest.raises(ConfigError) as e:
        fp8()
    assert str(e.value) == ("engine.precision=fp8 needs torchao, which is not installed; pip install "
                            "'torchao>=0.18,<0.19' (or use engine.precision=bf16)")


def _raised_texts() -> list[tuple[str, str]]:
    """(where, the longest literal piece of the message) of every ValueError the components'
    recipe checks raise: each component's checks.py, and each engine's EngineSpec.check_recipe."""
    pkg = REPO / "scaletrain"
    nodes: list[tuple[str, ast.AST]] = [(str(p.relative_to(REPO)), ast.parse(p.read_text()))
                                        for p in sorted(pkg.glob("*/checks.py"))]
    for p in sorted((pkg / "engines").glob("*.py")):
        for cls in ast.walk(ast.parse(p.read_text())):
            if isinstance(cls, ast.ClassDef) and any(getattr(b, "id", "") == "EngineSpec" for b in cls.bases):
                nodes += [(f"{p.relative_to(REPO)}:{cls.name}.{f.name}", f) for f in cls.body
                          if isinstance(f, ast.FunctionDef) and f.name == "check_recipe"]
    out = []
    for where, tree in nodes:
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args \
                    and getattr(node.exc.func, "id", "") == "ValueError":
                arg = node.exc.args[0]
                parts = [arg] if isinstance(arg, ast.Constant) else getattr(arg, "values", [])
                pieces = [v.value for v in parts if isinstance(v, ast.Constant) and isinstance(v.value, str)]
                if isinstance(arg, ast.BinOp):  # "..." "..." split over lines is one Constant; f"" + f"" is not used
                    pieces = []
                out.append((f"{where}:{node.lineno}", max(pieces, key=len) if pieces else ""))
    return out


def test_every_check_message_has_a_case():
    texts = _raised_texts()
    assert len(texts) >= 30  # the checks modules were found
    messages = [c[3] for c in CASES]
    missing = [f"{where}: {text!r}" for where, text in texts
               if text and text not in UNREACHABLE and not any(text in m for m in messages)]
    assert not missing, "no case in CASES for:\n" + "\n".join(missing)
