"""Two real gloo ranks x 2 loader workers on 3 uneven shards: no hang, exact epoch coverage.

Each rank runs this file as a script (like torchrun would run a trainer), so
the test exercises real process groups and real DataLoader worker processes.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path

SIZES = [5, 1, 7]  # 13 samples, 3 shards < 2 ranks x 2 workers -> split="sample"
WORLD, WORKERS, BATCHES = 2, 2, 40


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_shards(out: Path) -> list[str]:
    from scaletrain.data import make_synthetic_sample, write_tar_shard

    paths, index = [], 0
    for i, size in enumerate(SIZES):
        path = out / f"shard-{i:06d}.tar"
        write_tar_shard(path, [make_synthetic_sample(index + j, 0, 16) for j in range(size)])
        paths.append(str(path))
        index += size
    return paths


def _rank_main(rank: int, port: int, shard_dir: str, out: str) -> None:
    import itertools

    import torch.distributed as dist

    from scaletrain.data import LoaderSpec, build_loader

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    spec = LoaderSpec(shards=shard_dir, resolution=16, micro_batch=1, num_workers=WORKERS,
                      rank=rank, world_size=WORLD)
    batches = list(itertools.islice(iter(build_loader(spec)), BATCHES))
    # DataLoader round-robins workers, so worker w's stream is batches[w::WORKERS];
    # slot w*WORLD+rank owns global indices j % 4 == slot, i.e. this many per epoch:
    first_epoch: list[str] = []
    for worker in range(WORKERS):
        per_epoch = len(range(worker * WORLD + rank, sum(SIZES), WORLD * WORKERS))
        first_epoch += [b["keys"][0] for b in batches[worker::WORKERS][:per_epoch]]
    gathered: list[list[str] | None] = [None] * WORLD
    dist.all_gather_object(gathered, first_epoch)
    Path(out).write_text(json.dumps({"batches": len(batches), "gathered": gathered}))
    dist.destroy_process_group()


def test_two_ranks_two_workers_uneven_shards(tmp_path: Path) -> None:
    _write_shards(tmp_path)
    port = _free_port()
    root = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--rank", str(r), "--port", str(port),
             "--shards", str(tmp_path), "--out", str(tmp_path / f"rank{r}.json")],
            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(WORLD)
    ]
    try:
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * WORLD, "\n".join(logs)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert all(res["batches"] == BATCHES for res in results)
    keys = [k for rank_keys in results[0]["gathered"] for k in rank_keys]
    assert sorted(keys) == [f"{i:09d}" for i in range(sum(SIZES))], "each sample once per epoch"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    _rank_main(args.rank, args.port, args.shards, args.out)
