"""Restricted readers (scaletrain/common/safe_load.py), in one process: DCP metadata and
DCP's non-tensor entries, the small JSON/safetensors files, and a diffusers folder given as
init.from_diffusers. Each crafted file runs its payload under an unrestricted reader (so the
test would catch a reader that let it through) and is refused here with one line naming it.
The launch-level paths (resume, rollback, export, init, both engines) are in
tests/distributed/test_checkpoint.py."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from scaletrain.common.safe_load import (CheckpointLoadError, UnsafeCheckpointError, load_dcp_full,
                                             read_dcp_metadata, read_json, read_safetensors)
from scaletrain.engines.torch_engine import load_dcp_state, save_dcp_state
from tests.distributed.util import Payload, tamper_dcp_metadata


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    return m, opt


def _one_line(e: pytest.ExceptionInfo, path: Path, what: str) -> None:
    assert str(e.value).startswith(f"{path}: {what}") and "\n" not in str(e.value), str(e.value)


def test_dcp_round_trip_through_the_restricted_readers(tmp_path):
    m, opt = _model_and_optimizer(0)
    save_dcp_state(m, opt, tmp_path / "ck")
    m2, opt2 = _model_and_optimizer(1)
    load_dcp_state(m2, opt2, tmp_path / "ck")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert opt2.state_dict()["param_groups"][0]["lr"] == 1e-3
    full = load_dcp_full(tmp_path / "ck")
    assert torch.equal(full["model"]["0.weight"], m.state_dict()["0.weight"])


def test_tampered_dcp_metadata_is_refused(tmp_path):
    m, opt = _model_and_optimizer(0)
    save_dcp_state(m, opt, tmp_path / "ck")
    marker = tmp_path / "ran"
    f = tamper_dcp_metadata(tmp_path / "ck", marker)
    for load in (lambda: load_dcp_state(m, opt, tmp_path / "ck"), lambda: load_dcp_full(tmp_path / "ck")):
        with pytest.raises(UnsafeCheckpointError) as e:
            load()
        _one_line(e, f, "refusing to unpickle posix.system")
    assert not marker.exists()
    pickle.loads(f.read_bytes())  # torch's own reader (plain pickle.load) runs it
    assert marker.exists()


def test_damaged_dcp_metadata_fails_naming_it(tmp_path):
    m, opt = _model_and_optimizer(0)
    save_dcp_state(m, opt, tmp_path / "ck")
    f = tmp_path / "ck" / ".metadata"
    good = f.read_bytes()
    f.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointLoadError) as e:
        read_dcp_metadata(f)
    _one_line(e, f, "unreadable DCP metadata")
    f.write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(CheckpointLoadError) as e:
        read_dcp_metadata(f)
    _one_line(e, f, "holds a dict, not DCP metadata")


def test_tampered_dcp_entry_is_refused(tmp_path):
    """A non-tensor entry (an optimizer hyper-parameter) holding the payload: DCP's planner
    would torch.load it with weights_only=False."""
    m, opt = _model_and_optimizer(0)
    marker = tmp_path / "ran"
    model_sd, optim_sd = get_state_dict(m, opt)
    optim_sd["param_groups"][0]["lr"] = Payload(marker)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    for load in (lambda: load_dcp_state(m, opt, tmp_path / "ck"), lambda: load_dcp_full(tmp_path / "ck")):
        with pytest.raises(UnsafeCheckpointError) as e:
            load()
        _one_line(e, tmp_path / "ck" / "__0_0.distcp", "refusing to unpickle posix.system")
        assert "'optim.param_groups.0.lr'" in str(e.value)
    assert not marker.exists()


def test_small_files_fail_naming_them(tmp_path):
    f = tmp_path / "trainer_state.json"
    f.write_text('{"step": 3')
    with pytest.raises(CheckpointLoadError) as e:
        read_json(f)
    _one_line(e, f, "unreadable")
    f = tmp_path / "rng-rank0.safetensors"
    f.write_bytes(pickle.dumps(Payload(tmp_path / "ran")))
    with pytest.raises(CheckpointLoadError) as e:
        read_safetensors(f)
    _one_line(e, f, "not a readable safetensors file")
    assert not (tmp_path / "ran").exists()


def test_init_from_diffusers_pickled_weights_are_weights_only(tmp_path):
    """A diffusers folder whose weights are a pickled .bin carrying the payload."""
    from types import SimpleNamespace

    from scaletrain.checkpoint.init import load_init_weights
    from scaletrain.models import build_model

    denoiser = build_model("unet-tiny").denoiser
    folder = tmp_path / "model"
    denoiser.net.save_pretrained(folder, safe_serialization=False)
    weights = folder / "diffusion_pytorch_model.bin"
    marker = tmp_path / "ran"
    torch.save({**torch.load(weights, weights_only=True), "note": Payload(marker)}, weights)
    init = SimpleNamespace(from_checkpoint=None, from_diffusers=str(folder), use_ema=True)
    with pytest.raises(CheckpointLoadError) as e:
        load_init_weights(denoiser, init, "unet-tiny")
    _one_line(e, weights, "refusing to unpickle posix.system")
    assert not marker.exists()


def test_truncated_dcp_shard_fails_naming_the_folder(tmp_path):
    """A damaged data file is a one-line CheckpointLoadError (what resume's fallback to the
    previous checkpoint catches), not DCP's multi-rank traceback."""
    m, opt = _model_and_optimizer(0)
    save_dcp_state(m, opt, tmp_path / "ck")
    f = next((tmp_path / "ck").glob("*.distcp"))
    f.write_bytes(f.read_bytes()[:100])
    for load in (lambda: load_dcp_state(m, opt, tmp_path / "ck"), lambda: load_dcp_full(tmp_path / "ck")):
        with pytest.raises(CheckpointLoadError) as e:
            load()
        _one_line(e, tmp_path / "ck", "unreadable DCP checkpoint")
