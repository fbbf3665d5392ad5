"""Extract training throughput from MLPerf Training result logs (the published tables that
benchmarks/published_scaling.py predicts).

MLPerf publishes one folder per system and benchmark, each with result_*.txt files of
`:::MLLOG {json}` lines: the global batch, the platform and, while training runs, either
block_start/block_stop intervals with a samples_count (stable_diffusion, v4.0) or a
train_step_time per block (flux1, v5.1). This reads those lines (json.loads of each line's
payload; nothing else in the files is interpreted) from a local copy of the repository, a work
tree or a bare mirror read with `git show`, and writes one JSON row per configuration: the
source (repository, commit, folder, files), GPUs, nodes, global batch, accumulation, the
micro-batch per GPU and the median training throughput over the runs (each run: the median of
its blocks after the first, which holds the warm-up). Eval time is outside the blocks.

benchmarks/published/mlperf.json was written by (MIRROR: where the mirrors are):

  python benchmarks/published/extract_mlperf.py --repo mlcommons/training_results_v4.0 \
      --path $MIRROR/mlcommons+training_results_v4.0/repo \
      --folder NVIDIA/results/eos_n8_ngc24.04_nemo/stable_diffusion \
      --folder NVIDIA/results/eos_n64_ngc24.04_nemo/stable_diffusion \
      --folder NVIDIA/results/eos_n128_ngc24.04_nemo/stable_diffusion --out benchmarks/published/mlperf.json
  python benchmarks/published/extract_mlperf.py --repo mlcommons/training_results_v5.1 \
      --path $MIRROR/mlcommons+training_results_v5.1/repo \
      --folder University-of-Florida/results/hpg.dgxb200x8.n2/flux1 (and .n4, .n8, .n9, .n16) \
      --folder Oracle/results/2xBM.GPU.B200.8/flux1 --folder Oracle/results/9xBM.GPU.B200.8/flux1 \
      --out benchmarks/published/mlperf.json

Written by hand because no MLPerf package parses throughput out of result logs (the
mlperf_logging package checks compliance, it reports no img/s).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
from pathlib import Path

_LINE = re.compile(r"^(?:\s*\d+: )?:::MLLOG (\{.*\})\s*$")  # srun prefixes "RANK: "


class Source:
    """A repository checkout (a folder with a work tree) or a bare git mirror."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.bare = not (self.path / ".git").exists() and (self.path / "HEAD").exists()

    def commit(self) -> str:
        git = ["git", f"--git-dir={self.path}"] if self.bare else ["git", "-C", str(self.path)]
        return subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()

    def files(self, folder: str) -> list[str]:
        if not self.bare:
            return sorted(str(p.relative_to(self.path)) for p in (self.path / folder).glob("result_*.txt"))
        out = subprocess.run(["git", f"--git-dir={self.path}", "ls-tree", "--name-only", "HEAD", folder + "/"],
                             check=True, capture_output=True, text=True).stdout.split()
        return sorted(f for f in out if re.search(r"/result_\d+\.txt$", f))

    def read(self, name: str) -> str:
        if not self.bare:
            return (self.path / name).read_text(errors="replace")
        return subprocess.run(["git", f"--git-dir={self.path}", "show", f"HEAD:{name}"], check=True,
                              capture_output=True, text=True, errors="replace").stdout


def events(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        m = _LINE.match(line.rstrip())
        if m:
            try:
                out.append(json.loads(m.group(1)))
            except json.JSONDecodeError:
                continue
    return out


def run_throughput(evs: list[dict]) -> tuple[float, dict]:
    """(images per second of this run, the keys it came from)."""
    first = {e["key"]: e["value"] for e in reversed(evs) if e.get("event_type") == "POINT_IN_TIME"}
    gbs = int(first["global_batch_size"])
    steps = [e["value"]["train_step_time"] for e in evs
             if e["key"] == "tracked_stats" and isinstance(e.get("value"), dict) and "train_step_time" in e["value"]]
    if steps:
        per_block = [gbs / s for s in steps[1:] or steps]
        how = "global_batch_size / train_step_time"
    else:
        starts = {e["metadata"]["samples_count"]: e["time_ms"] for e in evs if e["key"] == "block_start"}
        per_block = []
        for e in evs:
            if e["key"] == "block_stop":
                end = e["metadata"]["samples_count"]
                begin = max((s for s in starts if s < end), default=None)
                if begin is not None and e["time_ms"] > starts[begin]:
                    per_block.append((end - begin) / ((e["time_ms"] - starts[begin]) / 1e3))
        per_block = per_block[1:] or per_block
        how = "samples_count between block_start and block_stop / their time_ms"
    return statistics.median(per_block), {"global_batch_size": gbs, "platform": first.get("submission_platform"),
                                          "accumulation": int(first.get("gradient_accumulation_steps", 1)),
                                          "blocks": len(per_block), "how": how}


def extract(src: Source, repo: str, folder: str, gpus_per_node: int) -> dict:
    files = src.files(folder)
    if not files:
        raise SystemExit(f"no result_*.txt under {folder} in {src.path}")
    runs, meta = [], None
    for f in files:
        ips, m = run_throughput(events(src.read(f)))
        runs.append(round(ips, 2))
        meta = meta or m
    nodes = int(re.match(r"(\d+)x", meta["platform"]).group(1)) if re.match(r"\d+x", meta["platform"] or "") else None
    gpus = nodes * gpus_per_node
    micro, rem = divmod(meta["global_batch_size"], gpus * meta["accumulation"])
    if rem:
        raise SystemExit(f"{folder}: global batch {meta['global_batch_size']} is not a multiple of {gpus} GPUs")
    return {"repo": repo, "commit": src.commit(), "folder": folder, "files": len(files), "platform": meta["platform"],
            "nodes": nodes, "gpus_per_node": gpus_per_node, "gpus": gpus, "global_batch": meta["global_batch_size"],
            "accumulation": meta["accumulation"], "micro_batch": micro, "images_per_second": statistics.median(runs),
            "runs": runs, "how": meta["how"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", required=True, help="owner/name, recorded as the source")
    ap.add_argument("--path", required=True, help="a local checkout or bare mirror of --repo")
    ap.add_argument("--folder", action="append", required=True, help="a results folder holding result_*.txt")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--out", required=True, help="JSON file; rows of other folders already in it are kept")
    a = ap.parse_args()
    out = Path(a.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    src = Source(a.path)
    for folder in a.folder:
        row = extract(src, a.repo, folder, a.gpus_per_node)
        rows = [r for r in rows if (r["repo"], r["folder"]) != (a.repo, folder)] + [row]
        print(f"{folder}: {row['gpus']} GPUs, global batch {row['global_batch']}, micro {row['micro_batch']}, "
              f"{row['images_per_second']:,.1f} img/s (median of {row['files']} runs)")
    out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
