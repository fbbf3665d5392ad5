"""``scaletrain size`` against published multi-node tables: calibrate from the smallest
configuration only, as a user who measured one would, and predict the rest (issue 27, item 3).

The tables are MLPerf Training results (benchmarks/published/mlperf.json, written by
benchmarks/published/extract_mlperf.py from the public result logs; each row names its
repository, commit and folder). For each source the smallest configuration becomes one
``--measured GPUS:IMG_S@RES:ENGINE`` point on that configuration's stage (its global batch and
micro-batch per GPU), and every other configuration is predicted at its own global batch and
micro-batch, exactly as

    scaletrain size --preset P --gpu G --gpus-per-node 8 --engines E --precision bf16 \
        --stage RES::MICRO0:GLOBAL0 --stage RES::MICRO:GLOBAL --nodes N --measured GPUS0:IMG_S0@RES:E

prints it (the second stage's row at N nodes). Nothing is fitted on the rows that are
predicted. The bar: every predicted row within +-20 % of the published figure.

    python benchmarks/published_scaling.py --out benchmarks/results/published_scaling.md

writes the Markdown table and a JSON beside it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scaletrain.bench.sizing import SizeInputs, size_report  # noqa: E402

BAR = 0.20

# What each published configuration trained, as scaletrain's presets and engines name it.
# Sources: the implementation folders beside the results (config_*.sh, conf/*.yaml).
#
# The engine: both implementations shard the optimizer within a node and replicate it across
# nodes (Apex DistributedFusedAdam with distribute_within_nodes: True for SD; Megatron's
# distributed optimizer with num_distributed_optimizer_instances = nodes / SEGMENT for FLUX,
# SEGMENT 1 where the config sets none), reduce-scattering gradients under the backward pass.
# Of the scaling model's engines, hsdp has that communication pattern (reduce-scatter and
# all-gather inside a node, an all-reduce of a node's shard across nodes). It differs in two
# ways, both making it slower than these runs: it all-gathers the parameters per micro-batch
# (FSDP) where these keep them whole, and it reduces fp32 gradients where these reduce 16-bit
# ones. The first mapping this script ran with was zero1 (ZeRO-1 from the optimizer's name);
# OTHER_ENGINES keeps those runs in the report.
OTHER_ENGINES = ("zero1", "zero2", "ddp", "fsdp")
SOURCES = [
    {"name": "MLPerf Training v4.0, NVIDIA, Stable Diffusion v2 on DGX H100 (Eos)",
     "repo": "mlcommons/training_results_v4.0", "match": "NVIDIA/results/eos_n", "preset": "unet-sd2",
     "resolution": 512, "gpu": "H100", "engine": "hsdp", "precomputed": True,
     "what": "SD v2 UNet (865M) at 512 px on precomputed latents (train_moments), the OpenCLIP text encoder "
             "run online; NeMo, fp16, CUDA graphs, Apex DistributedFusedAdam (optimizer state sharded within "
             "each node, 16-bit gradients reduce-scattered under backward, parameters all-gathered after the "
             "step); global batch 1024 at 8 nodes, 2048 at 64 and 128 "
             "(NVIDIA/benchmarks/stable_diffusion/implementations/nemo: config_DGXH100_*.sh, conf/)"},
    {"name": "MLPerf Training v5.1, University of Florida, FLUX.1 on DGX B200 (HiPerGator)",
     "repo": "mlcommons/training_results_v5.1", "match": "University-of-Florida/results/", "preset": "flux-dev",
     "resolution": 256, "gpu": "B200", "engine": "hsdp", "precomputed": True,
     "what": "FLUX.1-schnell (11.9B; scaletrain's flux-dev preset has the same transformer) at 256 px on "
             "precomputed latents and T5/CLIP embeddings; NeMo/Megatron, MXFP8 GEMMs, the distributed "
             "optimizer (one instance per node), gradient reduction and parameter gathering overlapped; "
             "micro-batch 32 per GPU at every size. The submitter's folder holds NVIDIA's configuration files "
             "(University-of-Florida/benchmarks/flux1/implementations/b200_nemo); the MFU below is against the "
             "bf16 peak and scaletrain's FLOP count (512 text tokens, 31.0 TFLOP per image), where the runs "
             "used FP8 GEMMs and 256 text tokens (MODEL_TFLOP_PER_SAMPLE=20.3 in config_common.sh)"},
    {"name": "MLPerf Training v5.1, Oracle, FLUX.1 on BM.GPU.B200.8",
     "repo": "mlcommons/training_results_v5.1", "match": "Oracle/results/", "preset": "flux-dev",
     "resolution": 256, "gpu": "B200", "engine": "hsdp", "precomputed": True,
     "what": "the same benchmark on another submitter's B200 cluster (Oracle Cloud), 2 and 9 nodes"},
]


def predict(src: dict, cal: dict, row: dict, engine: str | None = None) -> tuple[float, str, list[str]]:
    """(img/s scaletrain size predicts for ``row`` calibrated on ``cal``, the command, what the
    report says about the calibration); ``engine`` overrides the source's mapping."""
    src = {**src, "engine": engine or src["engine"]}
    stages = [(src["resolution"], 0, cal["micro_batch"], cal["global_batch"]),
              (src["resolution"], 0, row["micro_batch"], row["global_batch"])]
    inp = SizeInputs(preset=src["preset"], stages=stages, gpu=src["gpu"], gpus_per_node=row["gpus_per_node"],
                     price_per_gpu_hour=None, engines=[src["engine"]], nodes=[row["nodes"]], precision="bf16",
                     precomputed=src["precomputed"],
                     measured=[(cal["gpus"], cal["images_per_second"], src["resolution"], src["engine"])])
    rows: list[dict] = []
    report = size_report(inp, rows)
    got = [r for r in rows if r["stage"] == 1 and r["nodes"] == row["nodes"]]
    if not got and engine is None:
        raise SystemExit(f"scaletrain size printed no row for {row['folder']}:\n{report}")
    cmd = (f"scaletrain size --preset {src['preset']} --gpu {src['gpu']} --gpus-per-node {row['gpus_per_node']} "
           f"--engines {src['engine']} --precision bf16" + (" --precomputed" if src["precomputed"] else "")
           + f" --stage {src['resolution']}::{cal['micro_batch']}:{cal['global_batch']}"
           f" --stage {src['resolution']}::{row['micro_batch']}:{row['global_batch']} --nodes {row['nodes']}"
           f" --measured {cal['gpus']}:{cal['images_per_second']:g}@{src['resolution']}:{src['engine']}")
    keep = ("WARNING", "- compute:", "- intra-node link:", "- inter-node link:", "- overlap:")
    said = [ln.strip().removeprefix("- ") for ln in report.splitlines() if ln.strip().startswith(keep)]
    return (got[0]["images_per_second"] if got else None), cmd, said


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", default=str(REPO / "benchmarks/published/mlperf.json"))
    ap.add_argument("--out", required=True, help="Markdown file; the JSON goes beside it")
    a = ap.parse_args()
    table = json.loads(Path(a.table).read_text())
    out = Path(a.out)
    results, lines = [], []
    for src in SOURCES:
        pub = sorted((r for r in table if r["repo"] == src["repo"] and r["folder"].startswith(src["match"])),
                     key=lambda r: r["gpus"])
        if len(pub) < 2:
            raise SystemExit(f"{src['name']}: fewer than two configurations in {a.table}")
        cal = pub[0]
        lines += [f"## {src['name']}", "", src["what"] + ".", "",
                  f"Source: `{src['repo']}` at commit `{cal['commit'][:12]}`, folders "
                  + ", ".join(f"`{r['folder']}`" for r in pub) + f"; {pub[0]['how']}, median of each run's blocks "
                  "(the first, with the warm-up, left out), then the median over the runs.", "",
                  f"Calibrated on the {cal['gpus']}-GPU row only ({src['preset']}, {src['gpu']}, engine "
                  f"{src['engine']}).", "",
                  "| GPUs | nodes | global batch | micro/GPU | published img/s | per GPU | predicted img/s | error | runs |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        notes = []
        for row in pub:
            pred, cmd, extra = predict(src, cal, row)
            err = pred / row["images_per_second"] - 1
            role = "calibration" if row is cal else "predicted"
            results.append({"source": src["name"], "folder": row["folder"], "role": role, "gpus": row["gpus"],
                            "nodes": row["nodes"], "global_batch": row["global_batch"],
                            "micro_batch": row["micro_batch"], "published": row["images_per_second"],
                            "predicted": round(pred, 1), "error": round(err, 4), "command": cmd,
                            "within_bar": abs(err) <= (0.02 if row is cal else BAR)})
            lines.append(f"| {row['gpus']} | {row['nodes']} | {row['global_batch']} | {row['micro_batch']} | "
                         f"{row['images_per_second']:,.0f} | {row['images_per_second'] / row['gpus']:.1f} | "
                         f"{pred:,.0f} | {err:+.1%}{' (calibration)' if row is cal else ''} | {row['files']} |")
            if row is cal:
                notes = extra
        lines += ["", f"Under the other engine mappings (each calibrated the same way on the {cal['gpus']}-GPU row):", "",
                  "| engine | " + " | ".join(f"{r['gpus']} GPUs" for r in pub[1:]) + " |",
                  "|---|" + "---:|" * (len(pub) - 1)]
        for other in OTHER_ENGINES:
            errs = []
            for row in pub[1:]:
                got = predict(src, cal, row, other)[0]
                errs.append(None if got is None else got / row["images_per_second"] - 1)
                results.append({"source": src["name"], "folder": row["folder"], "role": f"other mapping: {other}",
                                "gpus": row["gpus"], "published": row["images_per_second"],
                                "predicted": None if got is None else round(got, 1),
                                "error": None if got is None else round(errs[-1], 4)})
            lines.append(f"| {other}{' (first run)' if other == 'zero1' else ''} | "
                         + " | ".join("does not fit" if e is None else f"{e:+.1%}" for e in errs) + " |")
        lines += ["", "What the calibration fitted (scaletrain size's own lines):", ""]
        lines += [f"- {n}" for n in dict.fromkeys(notes)] + ["", "Command for the last row:", "", f"```bash\n{cmd}\n```", ""]
    predicted = [r for r in results if r["role"] == "predicted"]
    worst = max(predicted, key=lambda r: abs(r["error"]))
    ok = all(r["within_bar"] for r in results if "within_bar" in r)
    head = ["# scaletrain size against published multi-node tables", "",
            "Written by `python benchmarks/published_scaling.py --out " + str(a.out) + "` from "
            f"`{Path(a.table).relative_to(REPO) if Path(a.table).is_relative_to(REPO) else a.table}`. Each source is "
            "calibrated on its smallest configuration only and predicts the others (global batch and micro-batch "
            f"per GPU as published). Bar: every predicted row within +-{BAR:.0%}; the calibration row reproduced "
            "within 2 %.", "",
            f"**{'All' if ok else 'Not all'} rows within the bar**: {len(predicted)} predicted rows, the worst "
            f"{worst['error']:+.1%} ({worst['source']}, {worst['gpus']} GPUs).", ""]
    lines += ["## Published tables considered and not used", "",
              "- NeMo DFM, `docs/performance-summary.md` (NVIDIA-NeMo/DFM), Wan 2.1 14B on DGX H100 with FSDP: "
              "175.88 model TFLOP/s per GPU at 8 GPUs, 228.85 at 64 (global batch = GPUs, micro-batch 1). A GPU "
              "runs 30 % faster at 64 GPUs than at 8; the scaling model never makes a GPU faster by adding "
              "others, so calibrated on the 8-GPU row it predicts at most 176 per GPU at 64, 23 % under. "
              "The page gives no reason for the slower 8-GPU row (both rows: FSDP, DP = GPUs, no TP/CP).",
              "- MLPerf Training v5.1, NVIDIA, FLUX.1 on GB200/GB300 NVL72 (16, 72, 512, 1152 GPUs): the 512- "
              "and 1152-GPU configurations use tensor parallelism 4 (`config_GB*_*xtp4.sh`), which the scaling "
              "model does not have, and 72-GPU NVLink domains in place of 8-GPU nodes.", "",
              "Held back by the issue's author: at least one more published table, for the same check.", ""]
    out.write_text("\n".join(head + lines))
    out.with_suffix(".json").write_text(json.dumps({"bar": BAR, "all_within_bar": ok, "rows": results}, indent=1) + "\n")
    print("\n".join(head + lines))


if __name__ == "__main__":
    main()
