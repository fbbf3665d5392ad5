"""Summarise a `benchmarks/gpu_check.sh` output folder as one Markdown table against the goals
of issue 14, written to OUT/gpu_<device>.md (commit it as benchmarks/results/gpu_<device>.md).

    python3 benchmarks/gpu_report.py OUT

Every figure is read from the bench results.json files the check wrote (img/s is the median
step's; MFU uses the bench's analytic FLOPs and the device's table peak), and each row names
the levers it ran with. Goals (one H100-class GPU): unet-sd2 256 px >= 340 img/s, 512 px >= 90
img/s; DiT (pixart-xl-2) >= 45 % MFU at 256 px.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

GOALS = {("unet-sd2", 256): ("img/s", 340.0), ("unet-sd2", 512): ("img/s", 90.0), ("pixart-xl-2", 256): ("MFU", 0.45)}


def rows(out: Path) -> list[dict]:
    found = []
    for f in sorted(out.glob("bench-*/results.json")):
        results = json.loads(f.read_text())
        spec = results["spec"]
        for c in results["cells"]:
            if c.get("search_probe"):
                continue
            found.append({"run": f.parent.name.removeprefix("bench-"), "cell": c, "precision": spec["precision"],
                          "ac": spec.get("activation_checkpointing", "none"), "compile": spec.get("compile", False),
                          "latents": "precomputed" if c.get("precomputed") else "online"})
    return found


def table(found: list[dict]) -> list[str]:
    lines = ["| run | preset | res | engine | micro | precision | latents | act. ckpt | compile | status | img/s | TFLOP/s "
             "| MFU | peak GiB | activations MiB | encode s/step | goal |", "|" + "---|" * 17]
    for r in found:
        c = r["cell"]
        goal = GOALS.get((c["preset"], c["resolution"]))
        head = (f"| {r['run']} | {c['preset']} | {c['resolution']} | {c['engine']} | {c['micro_batch']} | "
                f"{r['precision']} | {r['latents']} | {r['ac']} | {'on' if r['compile'] else 'off'} | {c['status']} |")
        if c["status"] != "ok":
            lines.append(head + " |" * 7)
            continue
        ips, mfu = c["images_per_second"]["median"], c["mfu"]
        verdict = ""
        if goal is not None:
            name, bar = goal
            value = ips if name == "img/s" else mfu
            shown = f"{bar:.0%}" if name == "MFU" else f"{bar:.0f}"
            verdict = f"{'met' if value >= bar else 'missed'}: {name} >= {shown}"
        act = (c.get("memory_split_mib") or {}).get("activations")
        lines.append(head + f" {ips:.1f} | {c['tflops_per_device']:.1f} | {mfu:.1%} | {c['peak_memory_gib']:.1f} | "
                     f"{'-' if act is None else f'{act:.0f}'} | {c['phases_seconds']['encode']:.3f} | {verdict} |")
    return lines


def fp8_table(found: list[dict]) -> list[str]:
    """Each fp8 row beside the row of the same cell in the check's base precision (bf16 on a GPU):
    the speed-up and the peak memory of both."""
    def key(r: dict) -> tuple:
        c = r["cell"]
        return c["preset"], c["resolution"], c["engine"], c["micro_batch"], r["latents"], r["ac"], r["compile"]

    base = {key(r): r for r in found if r["precision"] != "fp8" and r["cell"]["status"] == "ok"}
    lines = []
    for r in found:
        b = base.get(key(r))
        if r["precision"] != "fp8" or b is None or r["cell"]["status"] != "ok":
            continue
        c, d = r["cell"], b["cell"]
        f8 = c.get("fp8") or {}
        layers = f"{f8.get('linears', '?')}{' (emulated)' if f8.get('emulated') else ''}"
        fast, slow = c["images_per_second"]["median"], d["images_per_second"]["median"]
        lines.append(f"| {c['preset']} | {c['resolution']} | {layers} | {b['precision']} | {slow:.1f} | {fast:.1f} | "
                     f"{fast / slow:.2f}x | {d['mfu']:.1%} | {c['mfu']:.1%} | {d['peak_memory_gib']:.1f} | "
                     f"{c['peak_memory_gib']:.1f} |")
    if not lines:
        return []
    return ["", "fp8 against the same cell in the base precision (MFU of both against the bf16 peak; "
            "a CPU dry run emulates fp8, so its figures mean nothing):", "",
            "| preset | res | fp8 Linear layers | base | base img/s | fp8 img/s | speed-up | base MFU | fp8 MFU "
            "| base peak GiB | fp8 peak GiB |", "|" + "---|" * 11] + lines


def cell_table(out: Path) -> list[str]:
    """gpu_check.sh's record of every cell: its exit status, seconds and time limit."""
    f = out / "cells.tsv"
    rows = [ln.split("\t") for ln in f.read_text().splitlines()[1:] if ln.strip()] if f.is_file() else []
    names = {"0": "ok", "124": "timed out", "137": "killed", "skipped": "skipped (global limit)"}
    return ["| cell | status | seconds | limit s |", "|---|---|---|---|"] + [
        f"| {r[0]} | {names.get(r[1], f'exit {r[1]}')} | {r[2]} | {r[3]} |" for r in rows if len(r) == 4]


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    gpu = (out / "gpu.txt").read_text() if (out / "gpu.txt").is_file() else "unknown device"
    device = re.sub(r"[^A-Za-z0-9]+", "_", gpu.splitlines()[0].split(":", 1)[-1].split("(")[0].strip()).strip("_")
    found = rows(out)
    lines = [f"# GPU check: {gpu.splitlines()[0] if gpu else device}", "",
             "Command: `bash benchmarks/gpu_check.sh OUT` (then `python3 benchmarks/gpu_report.py OUT`).", "",
             "```", gpu.strip(), "```", "",
             "One rank, bf16 (fp8 rows: engine.precision=fp8, torchao's float8 Linear layers, tensorwise "
             "scaling with the fp8 all-gather, MFU against the bf16 peak). Latents: precomputed (`scaletrain "
             "data encode` ran first; the encode column is the posterior sample and noise) or online (the VAE and text encoder run every step in bf16, inside the "
             "encode column). Activations: tensor memory of that category at the step's peak (torch's memory "
             "tracker).", ""] + table(found) + fp8_table(found)
    lines += ["", "Cells in the order they ran (OUT/cells.tsv; rc 124: stopped at its time limit, its processes "
              "killed):", ""] + cell_table(out)
    prof = sorted(out.glob("profile_*.txt"))
    for f in prof:
        lines += ["", f"Profile ({f.name}):", "", "```", *f.read_text().splitlines()[:40], "```"]
    report = out / f"gpu_{device or 'device'}.md"
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12 + len(found) + 2]))
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
