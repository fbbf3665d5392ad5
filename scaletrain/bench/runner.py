"""The benchmark matrix: preset x resolution x engine x micro-batch x world size, one torchrun per cell.

Each cell runs in its own process group (``scaletrain.bench.cell``), so peak memory (CUDA
max allocated, or process RSS on CPU) belongs to that cell alone, and a cell that runs out
of memory, crashes or hangs is recorded as such while the matrix goes on. Steps after the
warm-up are the repetitions: the JSON keeps every one, the tables report median and spread.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from scaletrain.bench.cell import ENGINE_VARIANTS, PHASES

SCHEMA = "scaletrain.bench/1"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class MatrixSpec:
    presets: list[str]
    resolutions: list[int]
    engines: list[str]
    micro_batches: list[int] = field(default_factory=lambda: [4])
    world_sizes: list[int] = field(default_factory=lambda: [1, 2])
    search: bool = False  # also find the largest micro-batch that fits, per (preset, res, engine, world)
    search_max: int = 64
    precision: str = "fp32"
    # memory/speed levers (model section, models/parallelize.py), the same for every cell
    activation_checkpointing: str = "none"
    compile: bool = False
    compile_backend: str = "inductor"  # aot_eager: the same regions without code generation (dry runs)
    warmup: int = 2
    reps: int = 5
    num_workers: int = 1
    max_memory_gib: float | None = None  # CPU stand-in for the device's memory (see cell.MemoryLimitExceeded)
    peak_tflops: float | None = None
    timeout_s: float = 600.0
    comm_sweep: bool = True  # time collectives at the largest world size, for the sizing model
    # with several world sizes: also time each 1-rank cell as max(world_sizes) copies at once (launch_loaded)
    loaded: bool = True
    # measure each (preset, resolution, engine) group this many times, its 1-rank, loaded and
    # N-rank runs back to back in every round; repetitions are pooled over the rounds
    rounds: int = 1
    shards: str | None = None  # default: synthetic shards written into the output folder
    # Video presets: frames per clip as a matrix axis ([]: images). Cells carry "frames"; the
    # default data is synthetic clips (data synth --video) long enough for the largest.
    frames: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        bad = [e for e in self.engines if e not in ENGINE_VARIANTS]
        if bad:
            raise ValueError(f"--engines {bad[0]!r} is unknown; choose from {', '.join(ENGINE_VARIANTS)}")
        if self.rounds < 1:
            raise ValueError(f"--rounds {self.rounds} must be at least 1")
        if self.frames:
            from scaletrain.models import get_preset

            still = [p for p in self.presets if not get_preset(p).video]
            if still:
                raise ValueError(f"--frames needs video presets; {still[0]!r} takes images (drop it or --frames)")
            if any(f < 1 for f in self.frames):
                raise ValueError(f"--frames {self.frames}: frame counts are >= 1 (1: images as 1-frame clips)")

    def config_hash(self) -> str:
        d = asdict(self)
        if not d["frames"]:  # image matrices hash as before the axis existed
            del d["frames"]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def cell_label(c: dict) -> str:
    """Resolution, with the clip's frames for a video cell ("64x9f")."""
    return f"{c['resolution']}x{c['frames']}f" if c.get("frames") else f"{c['resolution']}"


def _stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "p25": q[0], "p75": q[2], "min": xs[0], "max": xs[-1], "n": len(xs)}


def write_cell_spec(spec: dict, work: Path) -> str:
    """Write a cell's spec where ``scaletrain.bench.cell --cell PATH`` reads it; each rank then
    writes ``PATH.rank{r}.json`` (``cell_records``)."""
    work.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(suffix=".json", dir=work)
    os.close(fd)
    Path(path).write_text(json.dumps({**spec, "out": path, "repo": str(REPO)}))
    return path


def cell_records(path: str, world_size: int) -> list[dict]:
    """The rank records a cell launched with ``write_cell_spec``'s PATH left behind."""
    files = [Path(path).with_suffix(f".rank{r}.json") for r in range(world_size)]
    return [json.loads(f.read_text()) for f in files if f.is_file()]


def _start(spec: dict, world_size: int, work: Path, env_extra: dict | None = None) -> tuple[subprocess.Popen, str]:
    path = write_cell_spec(spec, work)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size),
           "-m", "scaletrain.bench.cell", "--cell", path]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           **(env_extra or {})}
    # Own session, so a hung cell is stopped with its ranks (and only them).
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    return proc, path


def _collect(proc: subprocess.Popen, path: str, world_size: int, timeout_s: float) -> list[dict]:
    try:
        log, _ = proc.communicate(timeout=timeout_s)
        status = "error"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        status = "timeout"
    records = cell_records(path, world_size)
    if not records or (proc.returncode != 0 and not any(r["status"] == "oom" for r in records)):
        return [{"rank": 0, "status": status, "returncode": proc.returncode, "log_tail": (log or "")[-2000:]}]
    return records


def launch(spec: dict, world_size: int, work: Path, timeout_s: float) -> list[dict]:
    """Run one cell under torchrun; returns the rank records (status error/timeout when none)."""
    proc, path = _start(spec, world_size, work)
    return _collect(proc, path, world_size, timeout_s)


def launch_loaded(spec: dict, copies: int, work: Path, timeout_s: float) -> list[dict]:
    """Run ``copies`` independent 1-rank copies of a cell at the same time, one per device
    (CUDA_VISIBLE_DEVICES on GPUs): 1-rank speed while every device of the host is busy.

    An N-rank run loads the host N times over (CPU cores shared with the other ranks, memory
    bandwidth, caches, PCIe, the data loaders), which an idle 1-rank run does not see; on
    this project's 2-core machine two uncoupled copies each ran 64 px steps 1-40 % slower than
    one alone. Predicting N ranks from this instead of the idle 1-rank time leaves the sizing
    model's communication term as the only difference. Returns one record per copy."""
    import torch

    gpus = torch.cuda.device_count()
    started = [_start({**spec, "run_dir": f"{spec.get('run_dir', work / 'run')}-copy{i}"}, 1, work,
                      {"CUDA_VISIBLE_DEVICES": str(i % gpus)} if gpus else None)
               for i in range(copies)]
    return [_collect(proc, path, 1, timeout_s)[0] for proc, path in started]


def _slowest_steps(records: list[dict]) -> list[float]:
    """Per repetition, the slowest record's step: an N-rank step waits for its slowest rank."""
    return [max(r["steps"][i]["step"] for r in records) for i in range(min(len(r["steps"]) for r in records))]


def _phase_means(records: list[dict]) -> dict[str, float]:
    """Per phase, the mean over records of each record's median."""
    return {p: statistics.fmean(statistics.median(s[p] for s in r["steps"]) for r in records) for p in PHASES}


def summarize_cell(records: list[dict], cell: dict) -> dict:
    """Merge rank records: step time per repetition is the slowest rank's; phases are rank means."""
    out = dict(cell)
    statuses = {r["status"] for r in records}
    out["status"] = "oom" if "oom" in statuses else ("ok" if statuses == {"ok"} else records[0]["status"])
    out["baseline_gib"] = max((r["baseline"]["peak_gib"] for r in records if "baseline" in r), default=None)
    out["peak_memory_gib"] = max((r["memory"]["peak_gib"] for r in records if "memory" in r), default=None)
    if out["status"] != "ok":
        out["error"] = next((r.get("error") or r.get("log_tail") for r in records if r["status"] != "ok"), None)
        return out
    step = _slowest_steps(records)
    global_batch = cell["micro_batch"] * cell["world_size"]
    out["step_seconds"] = _stats(step)
    out["step_seconds_all"] = step
    st = out["step_seconds"]  # img/s from step quantiles (slowest step = lowest img/s), so median img/s = batch / median step
    out["images_per_second"] = {"median": global_batch / st["median"], "p25": global_batch / st["p75"],
                                "p75": global_batch / st["p25"], "min": global_batch / st["max"],
                                "max": global_batch / st["min"], "n": st["n"]}
    out["phases_seconds"] = _phase_means(records)
    r0 = records[0]
    out.update(params_total=r0["params_total"], params_local=r0["params_local"], params_frozen=r0["params_frozen"],
               precomputed=r0.get("precomputed", False), fp8=r0.get("fp8"),
               after_build_gib=max(r["after_build"]["peak_gib"] for r in records),
               peak_tflops=r0["peak_tflops"], peak_source=r0["peak_source"], threads=r0["threads"])
    if "reserved_gib" in r0["memory"]:
        out["peak_reserved_gib"] = max(r["memory"]["reserved_gib"] for r in records)
    splits = [r["memory_split_mib"] for r in records if r.get("memory_split_mib")]
    if splits:  # per category, the highest rank (ranks differ by their shard sizes)
        out["memory_split_mib"] = {k: max(s[k] for s in splits) for k in splits[0]}
    from scaletrain.models.flops import train_flops_per_image

    per_device = train_flops_per_image(cell["preset"], cell["resolution"], cell.get("frames", 0)) * cell["micro_batch"]
    out["tflops_per_device"] = per_device / out["step_seconds"]["median"] / 1e12
    out["mfu"] = out["tflops_per_device"] / out["peak_tflops"]
    return out


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """The rank (or copy) records of several runs of one cell as one run: repetitions pooled in
    round order, memory the highest any round reached; a round that did not finish is the result."""
    bad = next((recs for recs in rounds if any(r["status"] != "ok" for r in recs)), None)
    if bad is not None:
        return bad
    merged = []
    for per_rank in zip(*rounds):
        m = dict(per_rank[0])
        m["steps"] = [s for r in per_rank for s in r["steps"]]
        for key in ("memory", "after_build", "baseline"):
            m[key] = max((r[key] for r in per_rank), key=lambda snap: snap["peak_gib"])
        merged.append(m)
    return merged


def round_medians(step: list[float], rounds: int) -> list[float]:
    """Median of each round's repetitions (pooled in round order by ``merge_rounds``)."""
    n = len(step) // rounds
    return [statistics.median(step[i * n:(i + 1) * n]) for i in range(rounds)]


def add_loaded(cell: dict, records: list[dict]) -> None:
    """Attach the loaded 1-rank measurement (``launch_loaded``) to a 1-rank cell: per
    repetition the slowest copy's step, as an N-rank step waits for its slowest rank."""
    bad = [r for r in records if r["status"] != "ok"]
    if bad:
        cell["loaded"] = {"copies": len(records), "status": bad[0]["status"],
                          "error": bad[0].get("error") or bad[0].get("log_tail")}
        return
    step = _slowest_steps(records)
    cell["loaded"] = {"copies": len(records), "status": "ok", "step_seconds": _stats(step), "step_seconds_all": step,
                      "phases_seconds": _phase_means(records)}


def solo_basis(cell: dict) -> tuple[float, dict]:
    """(median step s, phase medians) of a 1-rank cell to predict N ranks from: the loaded
    measurement when the matrix took one, else the idle 1-rank run."""
    loaded = cell.get("loaded") or {}
    if loaded.get("status") == "ok":
        return loaded["step_seconds"]["median"], loaded.get("phases_seconds", {})
    return cell["step_seconds"]["median"], cell.get("phases_seconds", {})


def add_exposed_comm(cells: list[dict]) -> None:
    """Exposed communication of an N-rank cell: its median step time minus the 1-rank cell's
    at the same per-rank micro-batch (a 1-rank group moves no bytes), the loaded 1-rank time
    when measured (``solo_basis``). Also per phase, which shows where it surfaced (FSDP
    all-gathers in forward, reduce-scatter in backward, ...)."""
    solo = {(c["preset"], c["resolution"], c.get("frames", 0), c["engine"], c["micro_batch"]): c
            for c in cells if c["world_size"] == 1 and c["status"] == "ok"}
    for c in cells:
        base = solo.get((c["preset"], c["resolution"], c.get("frames", 0), c["engine"], c["micro_batch"]))
        if c["status"] != "ok" or base is None:
            c["exposed_comm_seconds"] = None
            continue
        step, phases = solo_basis(base)
        c["exposed_comm_seconds"] = c["step_seconds"]["median"] - step if c["world_size"] > 1 else 0.0
        c["exposed_comm_by_phase"] = {p: (c["phases_seconds"][p] - phases[p] if c["world_size"] > 1 else 0.0)
                                      for p in PHASES}


def search_micro_batch(fits: Callable[[int], bool], start: int, limit: int) -> int | None:
    """Largest micro-batch in [start, limit] for which ``fits`` holds: doubling, then bisection.
    None when even ``start`` does not fit."""
    if not fits(start):
        return None
    lo, hi = start, None
    while hi is None:
        nxt = min(lo * 2, limit)
        if nxt == lo:
            return lo
        if fits(nxt):
            lo = nxt
        else:
            hi = nxt
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def environment() -> dict:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("deepspeed", "diffusers", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 -- a missing optional package is a fact to record, not a failure
            versions[mod] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout)
    except OSError:
        commit, dirty = None, None
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    return {"hardware": {"cpu": cpu, "cpu_count": os.cpu_count(), "gpus": gpus, "memory_gib": mem,
                         "host": platform.node()},
            "versions": versions, "git_commit": commit, "git_dirty": dirty}


def run_matrix(spec: MatrixSpec, out_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Run every cell; write results.json, results.md and the plots into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "cells"
    shards = spec.shards
    if shards is None:
        from scaletrain.data.synth import write_synthetic_shards

        shards = str(out_dir / "shards")
        if not Path(shards).is_dir():  # enough shards for 2 ranks x 1 worker with shard split
            write_synthetic_shards(shards, num_samples=256, samples_per_shard=32,
                                   resolution=max(spec.resolutions), seed=0)
    clip_shards = spec.shards
    if spec.frames and clip_shards is None:
        from scaletrain.data.synth import write_synthetic_video_shards

        clip_shards = str(out_dir / "shards-video")
        if not Path(clip_shards).is_dir():  # clips as long as the largest --frames, at their own rate
            write_synthetic_video_shards(clip_shards, num_samples=64, samples_per_shard=8,
                                         resolution=max(spec.resolutions), frames=max(max(spec.frames), 2), fps=8)
    load_before = os.getloadavg()
    t_start = time.time()
    cells: list[dict] = []
    base = {"precision": spec.precision, "activation_checkpointing": spec.activation_checkpointing,
            "compile": spec.compile, "compile_backend": spec.compile_backend, "num_workers": spec.num_workers,
            "shards": shards,
            "max_memory_gib": spec.max_memory_gib, "peak_tflops": spec.peak_tflops}

    def run(cell: dict, warmup: int, reps: int) -> dict:
        return {**base, **cell, "warmup": warmup, "reps": reps, "run_dir": str(work / "run")}

    def measure(preset: str, res: int, engine: str, mb: int, world: int, warmup: int, reps: int) -> dict:
        cell = {"preset": preset, "resolution": res, "engine": engine, "micro_batch": mb, "world_size": world, **fr}
        return summarize_cell(launch(run(cell, warmup, reps), world, work, spec.timeout_s),
                              {**cell, "warmup": warmup, "reps": reps})

    for preset, res, frames in [(p, r, f) for p in spec.presets for r in spec.resolutions for f in spec.frames or [0]]:
            fr = {"frames": frames, "shards": clip_shards} if frames else {}
            at = cell_label({"resolution": res, **fr}) + "px"
            for engine in spec.engines:
                group: list[tuple[dict, bool]] = []  # (cell, its micro-batch found by the search)
                for world in spec.world_sizes:
                    mbs = list(spec.micro_batches)
                    if spec.search:
                        probes: dict[int, dict] = {}

                        def fits(mb: int) -> bool:
                            probes[mb] = measure(preset, res, engine, mb, world, warmup=1, reps=1)
                            return probes[mb]["status"] == "ok"

                        best = search_micro_batch(fits, 1, spec.search_max)
                        log(f"  search {preset} {at} {engine} x{world}: largest micro-batch that fits = {best} "
                            f"(probed {sorted(probes)})")
                        cells.extend({**c, "search_probe": True} for c in probes.values())
                        if best is not None and best not in mbs:
                            mbs.append(best)
                    group += [({"preset": preset, "resolution": res, "engine": engine, "micro_batch": mb,
                                "world_size": world, **fr}, spec.search and mb == mbs[-1] and mb not in spec.micro_batches)
                              for mb in mbs]
                # Rounds: this VM's speed drifts by tens of per cent between minutes, so a 1-rank
                # basis and the N-rank cell it predicts are measured close together, several times.
                copies = max(spec.world_sizes) if spec.loaded else 0
                runs: list[list[list[dict]]] = [[] for _ in group]  # per group cell, per round: records
                loads: list[list[list[dict]]] = [[] for _ in group]
                for k in range(spec.rounds):
                    for i, (cell, _) in enumerate(group):
                        world = cell["world_size"]
                        recs = launch(run(cell, spec.warmup, spec.reps), world, work, spec.timeout_s)
                        runs[i].append(recs)
                        if world == 1 and copies > 1 and all(r["status"] == "ok" for r in recs):
                            loads[i].append(launch_loaded(run(cell, spec.warmup, spec.reps), copies, work, spec.timeout_s))
                        if spec.rounds > 1:
                            log(f"  round {k + 1}/{spec.rounds} {preset} {at} {engine} x{world} "
                                f"mb{cell['micro_batch']}: " + ", ".join(sorted({r['status'] for r in recs})))
                for i, (cell, largest) in enumerate(group):
                    world, mb = cell["world_size"], cell["micro_batch"]
                    c = summarize_cell(merge_rounds(runs[i]), {**cell, "warmup": spec.warmup, "reps": spec.reps})
                    if loads[i] and c["status"] == "ok":  # the same cell as N 1-rank copies at once
                        add_loaded(c, merge_rounds(loads[i]))
                    c["rounds"] = len(runs[i])
                    if c["status"] == "ok":
                        c["round_step_medians"] = round_medians(c["step_seconds_all"], c["rounds"])
                        if c.get("loaded", {}).get("status") == "ok":
                            c["loaded"]["round_step_medians"] = round_medians(c["loaded"]["step_seconds_all"], c["rounds"])
                    c["largest_fitting"] = largest
                    cells.append(c)
                    log(f"  {preset} {at} {engine} x{world} mb{mb}: {c['status']}"
                        + (f", {c['images_per_second']['median']:.1f} img/s, peak {c['peak_memory_gib']:.2f} GiB"
                           if c["status"] == "ok" else ""))
    timed = [c for c in cells if not c.get("search_probe")]
    add_exposed_comm(timed)
    comm = None
    if spec.comm_sweep and max(spec.world_sizes) > 1:
        recs = launch({"comm_sweep": True, "engine": "ddp", "max_bytes": 2**24}, max(spec.world_sizes), work,
                      spec.timeout_s)
        comm = recs[0].get("collectives") if recs[0]["status"] == "ok" else {"error": recs[0].get("log_tail")}
    results = {"schema": SCHEMA, **environment(), "config_hash": spec.config_hash(), "spec": asdict(spec),
               "conditions": {"loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                              "wall_seconds": time.time() - t_start,
                              "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1")},
               "command": " ".join(sys.argv), "cells": cells, "comm": comm}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (out_dir / "results.md").write_text(markdown_table(results))
    try:
        from scaletrain.bench.plots import plot_results

        plot_results(results, out_dir)
    except ImportError as e:  # matplotlib is optional for headless nodes; the JSON is the result
        log(f"plots skipped: {e}")
    return results


def markdown_table(results: dict) -> str:
    env = results["hardware"]
    lines = [f"# Benchmark matrix ({results['config_hash']})", "",
             f"Hardware: {env['cpu']} x{env['cpu_count']}" + (f", GPUs: {', '.join(env['gpus'])}" if env["gpus"] else "")
             + f"; torch {results['versions']['torch']}, deepspeed {results['versions']['deepspeed']}; "
             f"load average before/after {results['conditions']['loadavg_before'][0]:.1f}/"
             f"{results['conditions']['loadavg_after'][0]:.1f}", "",
             f"Levers: precision {results['spec']['precision']}, activation checkpointing "
             f"{results['spec'].get('activation_checkpointing', 'none')}, compile "
             f"{'on' if results['spec'].get('compile') else 'off'}; latents "
             f"{'precomputed (scaletrain data encode: no VAE or text encoder in the step)' if any(c.get('precomputed') for c in results['cells']) else 'online (the VAE and text encoder run in the encode phase)'}.",
             "",
             "Step time: median over the repetitions (p25-p75 spread); img/s = global batch / median step. "
             "Phases are rank means of per-phase medians. Exposed comm = step(N ranks) - step(1 rank), the 1-rank "
             "step taken with N copies running at once when the matrix measured that (table below).", "",
             "| preset | res | engine | ranks | micro | status | img/s | step s (p25-p75) | data | encode | fwd | bwd | "
             "opt | exposed comm | TFLOP/s/dev | MFU | peak GiB | baseline GiB |",
             "|" + "---|" * 18]
    for c in results["cells"]:
        if c.get("search_probe"):
            continue
        head = f"| {c['preset']} | {cell_label(c)} | {c['engine']} | {c['world_size']} | {c['micro_batch']}" \
               + ("*" if c.get("largest_fitting") else "")
        if c["status"] != "ok":
            lines.append(head + f" | {c['status']} |" + " |" * 12)
            continue
        s, ph = c["step_seconds"], c["phases_seconds"]
        ec = c.get("exposed_comm_seconds")
        lines.append(head + f" | ok | {c['images_per_second']['median']:.2f} | {s['median']:.3f} ({s['p25']:.3f}-{s['p75']:.3f})"
                     + "".join(f" | {ph[p]:.3f}" for p in PHASES)
                     + f" | {'-' if ec is None else f'{ec:.3f}'} | {c['tflops_per_device']:.4f} | {c['mfu']:.1%}"
                     f" | {c['peak_memory_gib']:.3f} | {c['baseline_gib']:.3f} |")
    split = [c for c in results["cells"] if c.get("memory_split_mib") and not c.get("search_probe")]
    if split:
        lines += ["", "Tensor memory per rank at the step's peak, by category (MiB; torch's memory tracker, one extra "
                  "step after the timed ones; activations include a checkpointed unit's recomputed ones). DeepSpeed "
                  "cells have none: its ZeRO partitions and buckets live outside the tracker's categories.", "",
                  "| preset | res | engine | ranks | micro | params | grads | optimizer | activations | comm buffers "
                  "| total |", "|" + "---|" * 11]
        for c in split:
            m = c["memory_split_mib"]
            lines.append(f"| {c['preset']} | {cell_label(c)} | {c['engine']} | {c['world_size']} | "
                         f"{c['micro_batch']} | " + " | ".join(f"{m[k]:.1f}" for k in
                         ("params", "grads", "optimizer", "activations", "comm_buffers", "total")) + " |")
    loaded = [c for c in results["cells"] if (c.get("loaded") or {}).get("status") == "ok"]
    if loaded:
        lines += ["", "1-rank cells again with N independent copies running at once (one per device): the basis "
                  "the sizing model predicts N ranks from.", "",
                  "| preset | res | engine | micro | copies | step s alone | step s, N at once (p25-p75) | slowdown |",
                  "|" + "---|" * 8]
        for c in loaded:
            s, solo = c["loaded"]["step_seconds"], c["step_seconds"]["median"]
            lines.append(f"| {c['preset']} | {cell_label(c)} | {c['engine']} | {c['micro_batch']} | "
                         f"{c['loaded']['copies']} | {solo:.3f} | {s['median']:.3f} ({s['p25']:.3f}-{s['p75']:.3f}) | "
                         f"{s['median'] / solo - 1:+.1%} |")
    rounds = [c for c in results["cells"] if c.get("rounds", 1) > 1 and c["status"] == "ok"]
    if rounds:
        lines += ["", f"Every cell ran in {rounds[0]['rounds']} rounds of {rounds[0]['reps']} repetitions, a (preset, "
                  "resolution, engine) group's 1-rank, loaded and N-rank runs back to back in each round; the tables "
                  "above pool the repetitions of all rounds. Median step (s) of each round:", "",
                  "| preset | res | engine | ranks | micro | rounds | N copies at once |", "|" + "---|" * 7]
        for c in rounds:
            ld = (c.get("loaded") or {}).get("round_step_medians")
            lines.append(f"| {c['preset']} | {cell_label(c)} | {c['engine']} | {c['world_size']} | {c['micro_batch']} | "
                         + " / ".join(f"{x:.3f}" for x in c["round_step_medians"]) + " | "
                         + (" / ".join(f"{x:.3f}" for x in ld) if ld else "-") + " |")
    lines += ["", "`*` largest micro-batch that fit (search). Memory: CUDA max allocated on GPUs, peak process RSS "
              "on CPU (baseline = RSS before the model is built: interpreter, torch, DeepSpeed, process group).", ""]
    return "\n".join(lines)
