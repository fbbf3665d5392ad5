"""`scaletrain curate aesthetic-score` under torchrun (2 ranks, gloo): input shards split across ranks,
every sample written exactly once, with the score the head gives its image in one process."""

from __future__ import annotations

import io
import json
import sys
import tarfile

import pytest
import torch
from PIL import Image

from tests.conftest import run_cmd
from tests.distributed.util import free_port

pytestmark = pytest.mark.dist


def _samples(paths) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                assert ext not in out.setdefault(key, {}), f"{m.name} written twice"
                out[key][ext] = tar.extractfile(m).read()
    return out


def test_two_rank_aesthetic_score_writes_each_sample_once(synth_shards, tmp_path):
    from scaletrain.curate.aesthetic import AestheticHead, load_head, save_head

    torch.manual_seed(0)
    head = AestheticHead(64)  # untrained is enough: the test is about the distributed pass
    save_head(head, tmp_path / "head", "tiny", {})
    shards = str(synth_shards / "shard-{000000..000004}.tar")  # 5 shards: rank 0 takes 3, rank 1 takes 2
    out = tmp_path / "scored"
    r = run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                 "127.0.0.1", "--master_port", str(free_port()), "-m", "scaletrain.cli", "curate", "aesthetic-score",
                 "--head", str(tmp_path / "head"), "--shards", shards, "--out", str(out), "--min-aesthetic", "-100"],
                env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["input"] == {"shards": 5, "samples": 160} and report["kept"] == 160
    written = _samples(out / name for name in json.loads((out / "manifest.json").read_text())["shards"])
    inputs = _samples(sorted(synth_shards.glob("shard-00000[0-4].tar")))
    assert sorted(written) == sorted(inputs)  # every sample exactly once (duplicates fail in _samples)
    assert list(written) == list(inputs)  # shards renamed back into input order

    head, embedder = load_head(tmp_path / "head")
    keys = sorted(inputs)[::16]
    with torch.no_grad():
        expected = head(embedder.embed([Image.open(io.BytesIO(inputs[k]["jpg"])).convert("RGB") for k in keys]))
    got = [json.loads(written[k]["json"])["aesthetic"] for k in keys]
    assert got == pytest.approx(expected.tolist(), abs=2e-4)  # stored rounded to 4 decimals
    assert report["stages"]["aesthetic"]["scored"] == 160
