"""2 ranks on CPU (gloo): each family's parallel plan halves per-rank storage and keeps the math."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_shard_worker.py")
PRESETS = ["unet-tiny", "dit-tiny"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def worker_output(tmp_path_factory) -> str:
    # Launched as a user would (torchrun), one launch for both presets: start-up is the cost.
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "SHARD_TEST_DIR": str(tmp_path_factory.mktemp("weights"))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), *PRESETS]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"workers exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.parametrize("name", PRESETS)
def test_sharded_matches_unsharded_on_both_ranks(name: str, worker_output: str) -> None:
    # Ranks share one stdout, so lines can interleave: search, don't split on newlines.
    ranks = re.findall(rf"OK {re.escape(name)} rank=(\d+) ", worker_output)
    assert sorted(ranks) == ["0", "1"], worker_output


@pytest.mark.parametrize("name", PRESETS)
def test_meta_init_gives_the_whole_builds_weights_at_two_ranks(name: str, worker_output: str) -> None:
    """FSDP2 start-up: a denoiser built on meta, sharded, then each rank initialising only its
    shards has the full state dict of the one-process build, bit for bit (dit-tiny includes raw
    parameters kept from the constructor and a positional buffer)."""
    ranks = re.findall(rf"META {re.escape(name)} rank=(\d+) ", worker_output)
    assert sorted(ranks) == ["0", "1"], worker_output


@pytest.mark.parametrize("name", PRESETS)
def test_start_weights_are_read_by_slices_from_a_sharded_safetensors_folder(name: str, worker_output: str) -> None:
    """init.from_diffusers under FSDP2: a save_pretrained folder split over several files (its
    index.json) is read with safe_open slices; each rank reads about half the bytes (counted)
    and the sharded model's full state dict equals the file's tensors, bit for bit."""
    ranks = re.findall(rf"LOAD {re.escape(name)} rank=(\d+) ", worker_output)
    assert sorted(ranks) == ["0", "1"], worker_output


def test_sharded_frozen_encoders_give_the_replicated_embeddings(worker_output: str) -> None:
    """model.frozen_encoders=shard (models.parallelize.shard_frozen): a CLIP text encoder and a
    VAE (fp32) and a T5 (bf16) FSDP2-sharded over 2 ranks hold about half their parameters per
    rank (counted) and give the whole copies' embeddings, posteriors and decodes bit for bit."""
    ranks = re.findall(r"FROZEN rank=(\d+) .*?equal=True", worker_output)
    assert sorted(ranks) == ["0", "1"], worker_output
