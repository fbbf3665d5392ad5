"""The sizing model: memory per GPU, step time at N GPUs, and the time and cost of a curriculum.

Memory per rank = runtime baseline + model states + frozen encoders + activations, where

- model states are analytic, in bytes per denoiser parameter P (W = 4 fp32 / 2 bf16 compute copy):
  ``ddp``: 4 weights + 4 grads + 4 DDP bucket copy + 8 Adam = 20 P;
  ``fsdp``: 16 P / N (fp32 weights, grads, Adam, sharded) + the largest unit gathered (W) with its
  unsharded grads (4);
  ``zero1``: 4 P weights + 4 P grads + 12 P / N (fp32 master + Adam);
  ``zero2``: 4 P weights + 16 P / N (grads, master, Adam) + one reduce bucket (4 min(P, 5e7));
  ``zero3``: 20 P / N + the largest module gathered; ``zero3-offload`` keeps master + Adam in host
  memory (counted only where host and device are the same memory, i.e. on CPU);
- frozen encoders (text encoder, VAE) are whole on every rank, in the training precision (4 or 2
  bytes per parameter), and absent when the cell trains on precomputed latents;
- activations are ``a x micro_batch x S^2`` (S = side of the denoiser input: memory-efficient
  attention keeps activations linear in tokens), with ``a`` taken from the measured memory split
  (torch's tracker) where cells carry one, else fitted per preset from the cells' residual memory,
  plus a fitted constant per engine (its buffers beyond the analytic states, allocator slack);
- the baseline is the measured memory before the model is built (CUDA context / interpreter,
  torch, DeepSpeed, process group), or an assumed value where nothing was measured.

Step time at N ranks = the 1-rank step time measured at the same per-rank micro-batch (taken
with one copy per device running at once when the benchmark measured that, so host load --
shared cores, memory bandwidth, loaders -- is in it; ``runner.launch_loaded``) + the exposed
communication: for each collective of the engine's step, latency + bytes x factor(N) /
busbw (the nccl-tests convention; factor 2(N-1)/N all-reduce, (N-1)/N all-gather and
reduce-scatter), times (1 - overlap). Latency and busbw come from a collective sweep
(``scaletrain bench`` runs one, as does ``scaletrain preflight``) or are given.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from scaletrain.bench.facts import CommModel
from scaletrain.engines.spec import startup_floor_bytes  # noqa: F401  (the size command's start-up rows)
from scaletrain.models.facts import ModelFacts, model_facts
from scaletrain.bench.runner import solo_basis
from scaletrain.engines.spec import compute_bytes, layout, load_layouts

# GPU memory (GiB, as torch reports the card) for the size command's --gpu.
GPU_MEMORY_GIB = {"H100": 79.1, "H100 PCIe": 79.1, "H200": 139.8, "A100": 79.1, "A100-40GB": 39.4, "L40S": 44.4,
                  "L4": 22.0, "A10": 22.0, "B200": 178.4}
# The engines `scaletrain size` models with their own bench cells; ``VARIANTS`` add a layout
# to one of them (HSDP to FSDP2, ZeRO++ hpZ to ZeRO-3) and take its cells' compute. Each is an
# engine's sizing entry (``engines/spec.py``: memory, start-up floor, collectives per step).
ENGINES = tuple(name for name, lay in load_layouts().items() if lay.sized and lay.benched)
VARIANTS = tuple(name for name, lay in load_layouts().items() if lay.sized and not lay.benched)


def state_bytes(engine: str, facts: ModelFacts, world: int, precision: str = "fp32", host_is_device: bool = True) -> float:
    """Model-state bytes per rank (weights, grads, optimizer, engine buffers): the engine's layout."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is unknown; choose from {', '.join(ENGINES)}")
    return layout(engine).state_bytes(facts, world, precision, host_is_device)


def denoiser_side(preset: str, resolution: int) -> int:
    from scaletrain.models.flops import denoiser_input_size
    from scaletrain.models import get_preset

    return denoiser_input_size(get_preset(preset), resolution)


def act_elems(preset: str, resolution: int, frames: int = 0) -> int:
    """Input elements per sample that activations scale with: S^2, times the denoiser's frames
    for a clip (a video VAE's latent frames)."""
    from scaletrain.models import get_preset

    p = get_preset(preset)
    return denoiser_side(preset, resolution) ** 2 * (p.latent_frames(frames) if frames else 1)


@dataclass
class ActivationFit:
    """Activation bytes = per_elem[preset] x micro_batch x S^2, plus a constant per engine
    (what the engine allocates beyond the analytic states: DeepSpeed's flat buffers, allocator
    slack). Fitted jointly by least squares on measured cells."""

    per_elem: dict[str, float] = field(default_factory=dict)  # preset -> bytes per (image x S^2)
    engine_bytes: dict[str, float] = field(default_factory=dict)  # engine -> constant bytes
    points: dict[str, int] = field(default_factory=dict)
    from_split: set[str] = field(default_factory=set)  # presets whose ``a`` is the measured split

    def bytes(self, preset: str, micro_batch: int, resolution: int, engine: str | None = None,
              frames: int = 0, context: int = 1) -> float | None:
        """``context``: a context-parallel degree splits each sample's activations over K ranks."""
        if preset not in self.per_elem:
            return None
        return self.per_elem[preset] * micro_batch * act_elems(preset, resolution, frames) / context + \
            self.engine_bytes.get(engine, 0.0)


def frozen_bytes(cell: dict, facts: ModelFacts) -> float:
    """Frozen encoders held on each rank: none when the cell trained on precomputed latents, else
    every text-encoder and VAE parameter in the training precision (models.frozen_dtype), or
    1/world of them under model.frozen_encoders=shard (plus the largest block gathered at a time,
    small beside them: ignored)."""
    if cell.get("precomputed"):
        return 0.0
    per_param = compute_bytes(cell.get("precision", "fp32"))
    share = cell.get("world_size", 1) if cell.get("frozen_encoders") == "shard" else 1
    return per_param * cell.get("params_frozen", facts.frozen) / share


def fit_activations(cells: list[dict], host_is_device: bool = True) -> ActivationFit:
    """Fit from measured cells: residual = peak - baseline - states - frozen encoders
    = a[preset] x micro_batch x S^2 + c[engine]. An engine constant is only fitted where its
    cells span at least two activation sizes (otherwise it is not separable from the slope).

    Cells that carry a measured memory split (``memory_split_mib``: torch's tracker, tensor by
    tensor) give ``a`` directly: their activation bytes (activations + temporaries), not a
    residual that also holds allocator slack. Their engine constant is then what the residual
    keeps beyond those activations. Presets without such cells use the joint residual fit."""
    import numpy as np

    rows, measured = [], []
    for c in cells:
        if c["status"] != "ok" or c.get("search_probe"):
            continue
        facts = model_facts(c["preset"])
        rest = (c["peak_memory_gib"] - c["baseline_gib"]) * 2**30 - state_bytes(
            c["engine"], facts, c["world_size"], c.get("precision", "fp32"), host_is_device) - frozen_bytes(c, facts)
        x = c["micro_batch"] * act_elems(c["preset"], c["resolution"], c.get("frames", 0)) / c.get("context", 1)
        split = c.get("memory_split_mib")
        if split and split.get("activations") is not None:
            measured.append((c["preset"], c["engine"], x, split["activations"] * 2**20, rest))
        else:
            rows.append((c["preset"], c["engine"], x, rest))
    fit = ActivationFit()
    for preset in sorted({m[0] for m in measured}):
        mine = [m for m in measured if m[0] == preset]
        # least squares through the origin: activations are proportional to images x S^2
        fit.per_elem[preset] = max(0.0, sum(x * act for _, _, x, act, _ in mine) / sum(x * x for _, _, x, _, _ in mine))
        fit.points[preset] = len(mine)
        fit.from_split.add(preset)
    for engine in sorted({m[1] for m in measured}):
        left = [rest - fit.per_elem[p] * x for p, e, x, _, rest in measured if e == engine]
        fit.engine_bytes[engine] = float(np.mean(left))
    rows = [r for r in rows if r[0] not in fit.per_elem]
    if not rows:
        return fit
    presets = sorted({r[0] for r in rows})
    engines = sorted(e for e in {r[1] for r in rows} if len({r[2] for r in rows if r[1] == e}) >= 2
                     and e not in fit.engine_bytes)
    cols = presets + engines
    a = np.zeros((len(rows), len(cols)))
    for i, (preset, engine, x, _) in enumerate(rows):
        a[i, cols.index(preset)] = x
        if engine in engines:
            a[i, cols.index(engine)] = 1.0
    coef = np.linalg.lstsq(a, np.array([r[3] for r in rows]), rcond=None)[0]
    for k, name in enumerate(cols):
        if name in presets:
            fit.per_elem[name] = max(0.0, float(coef[k]))
            fit.points[name] = sum(1 for r in rows if r[0] == name)
        else:
            fit.engine_bytes[name] = float(coef[k])
    return fit


def predict_memory_gib(cell: dict, fit: ActivationFit, baseline_gib: float, host_is_device: bool = True) -> float | None:
    facts = model_facts(cell["preset"])
    act = fit.bytes(cell["preset"], cell["micro_batch"], cell["resolution"], cell["engine"], cell.get("frames", 0),
                    cell.get("context", 1))
    if act is None:
        return None
    states = state_bytes(cell["engine"], facts, cell["world_size"], cell.get("precision", "fp32"), host_is_device)
    return baseline_gib + (states + frozen_bytes(cell, facts) + act) / 2**30


# ----------------------------------------------------------------------------- communication


SWEEP_WINDOW = 4.0  # the size-local fit of a sweep's curve takes sizes within this factor


def comm_from_sweep(collectives: dict, world: int, overlap: float = 0.0) -> CommModel:
    """Fit time = latency + bytes x factor / busbw per op (least squares over the sweep sizes),
    and the curve of bus bandwidth against message size: at each swept size the same fit over
    the sizes within a factor ``SWEEP_WINDOW`` of it (at least 3), relative to the global one.

    One line over the whole sweep is set by its largest messages, and a collective of another
    size can see a different bandwidth (on this project's tc-limited veth a gloo all-gather
    moved 1-2 MiB at 5-6 MB/s but 8 MiB at 4; GPU links reach their plateau only at tens of MiB),
    so ``Fabric`` costs each call at its own size (``CommModel.bw``)."""
    lat, bw, curve = {}, {}, {}
    for op, rows in collectives.items():
        factor = 2 * (world - 1) / world if op == "all_reduce" else (world - 1) / world
        pts = sorted((r["size_bytes"] * factor, r["time_us"] * 1e-6, r["size_bytes"]) for r in rows)
        lat[op], bw[op] = _line([(x, y) for x, y, _ in pts])
        local = []
        for x, _, size in pts:
            near = [(a, b) for a, b, _ in pts if x / SWEEP_WINDOW <= a <= x * SWEEP_WINDOW]
            if len(near) < 3:
                near = [(a, b) for a, b, _ in sorted(pts, key=lambda p: abs(math.log(p[0] / x)))[:3]]
            local.append((size, min(_line(near)[1], 1e30) / bw[op] if math.isfinite(bw[op]) else 1.0))
        curve[op] = local
    return CommModel(lat, bw, f"measured: {world}-rank sweep", overlap, curve)


def _line(pts: list[tuple[float, float]]) -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) of the least-squares line time = latency + bytes / bandwidth."""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    slope, icept = statistics.linear_regression(xs, ys)
    # A negative intercept (noise at small sizes) would mean free calls; fall back to the smallest time.
    return (icept if icept > 0 else min(ys)), (1 / slope if slope > 0 else float("inf"))


def comm_given(busbw_gbps: float, latency_us: float, overlap: float) -> CommModel:
    ops = ("all_reduce", "all_gather", "reduce_scatter")
    return CommModel({o: latency_us * 1e-6 for o in ops}, {o: busbw_gbps * 1e9 for o in ops},
                     f"given: busbw {busbw_gbps} GB/s, latency {latency_us} us", overlap)


def step_collectives(engine: str, facts: ModelFacts, precision: str = "fp32") -> list[tuple[str, float, int]]:
    """(op, total bytes, number of calls) one optimizer step issues, the grad-norm all-reduce last
    (the engine's collectives on one flat group)."""
    return [(c.op, c.nbytes, c.calls) for c in layout(engine).step_comms(facts, precision, 1, 1)]


def exposed_comm_seconds(engine: str, facts: ModelFacts, world: int, comm: CommModel, precision: str = "fp32") -> float:
    total = 0.0
    for op, nbytes, calls in step_collectives(engine, facts, precision):
        if world > 1:
            total += calls * comm.latency[op] + comm.time(op, nbytes, world) - comm.latency[op]
    return total * (1 - comm.overlap)


def predict_step_seconds(solo_step: float, engine: str, preset: str, world: int, comm: CommModel,
                         precision: str = "fp32") -> float:
    """1-rank measured step time + modelled exposed communication at ``world`` ranks."""
    return solo_step + exposed_comm_seconds(engine, model_facts(preset), world, comm, precision)


def calibrate(results: dict, overlap: float = 0.0) -> list[dict]:
    """Predict every measured cell from the model (memory from the fit, N-rank throughput from
    the 1-rank cell and the measured collective sweep) and return prediction vs measurement."""
    cells = [c for c in results["cells"] if c["status"] == "ok" and not c.get("search_probe")]
    host_is_device = not results["hardware"]["gpus"]
    fit = fit_activations([c for c in cells if c["world_size"] == 1], host_is_device)
    world = max(c["world_size"] for c in cells)
    comm = comm_from_sweep(results["comm"], world, overlap) if results.get("comm") and "error" not in results["comm"] else None
    solo = {(c["preset"], c["resolution"], c.get("frames", 0), c["engine"], c["micro_batch"]): c
            for c in cells if c["world_size"] == 1}
    rows = []
    for c in cells:
        mem = predict_memory_gib(c, fit, c["baseline_gib"], host_is_device)
        row = {k: c[k] for k in ("preset", "resolution", "engine", "micro_batch", "world_size")}
        row.update(memory_measured_gib=c["peak_memory_gib"], memory_predicted_gib=mem,
                   memory_error=(mem - c["peak_memory_gib"]) / c["peak_memory_gib"],
                   above_baseline_error=(mem - c["peak_memory_gib"]) / (c["peak_memory_gib"] - c["baseline_gib"]))
        base = solo.get((c["preset"], c["resolution"], c.get("frames", 0), c["engine"], c["micro_batch"]))
        if c["world_size"] > 1 and base is not None and comm is not None:
            t = predict_step_seconds(solo_basis(base)[0], c["engine"], c["preset"], c["world_size"], comm,
                                     c.get("precision", "fp32"))
            pred = c["micro_batch"] * c["world_size"] / t
            meas = c["images_per_second"]["median"]
            row.update(ips_measured=meas, ips_predicted=pred, ips_error=(pred - meas) / meas)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- the size command


@dataclass
class SizeInputs:
    preset: str
    # (resolution, images, largest micro-batch per GPU[, global batch]); the global batch
    # defaults to that micro-batch on every GPU of the largest node count
    stages: list[tuple[int, ...]]
    gpu: str
    gpus_per_node: int
    price_per_gpu_hour: float | None  # None: throughput and time only, no cost columns
    engines: list[str]
    nodes: list[int]
    precision: str = "bf16"
    bench: dict | None = None  # a `scaletrain bench` results.json measured on this GPU type
    comm: CommModel | None = None  # the inter-node link (given or a cross-node sweep)
    act_gib_per_image: tuple[float, int] | None = None  # (GiB, at resolution)
    assumed_mfu: float = 0.35
    assumed_baseline_gib: float = 1.5
    memory_headroom: float = 0.9  # plan to fill at most this fraction of the card
    precomputed: bool = False  # train on precomputed latents: no encoders on the GPUs
    frozen_encoders: str = "replicate"  # model.frozen_encoders: shard keeps 1/world of them per GPU
    intra: CommModel | None = None  # the intra-node link (given or a one-node sweep)
    eta: float | None = None  # overlap: fraction of compute time the network can use (None: measured/assumed)
    measured: list[tuple[int, float, int, str | None]] = field(default_factory=list)  # (GPUs, img/s, res, engine)
    plot: str | None = None  # PNG: img/s and scaling efficiency vs GPUs


def context_degrees(preset: str, gpus_per_node: int) -> list[int]:
    """Context-parallel degrees the preset can use inside one node: 1, and the powers of two
    that divide its attention heads, when its diffusers network has a context-parallel plan."""
    from scaletrain.models import get_preset
    from scaletrain.models.context_parallel import has_context_parallel_plan
    from scaletrain.models.family import get_family

    p = get_preset(preset)
    if not has_context_parallel_plan(get_family(p.family).net_class):
        return [1]
    heads = p.denoiser_config.get("num_attention_heads", 1)
    return [1] + [k for k in (2, 4, 8, 16) if k <= gpus_per_node and heads % k == 0]


def ulysses_seconds(preset: str, resolution: int, frames: int, k: int, link: CommModel, precision: str) -> float:
    """All-to-all seconds per sample at context degree ``k``: each self-attention layer runs 4
    (query, key and value in, the output back) in forward and 4 in backward, each moving a rank's
    N/K tokens x hidden width, (K-1)/K of it off the rank; costed as an all-gather of that size
    on ``link`` (the same bytes leave each rank; nccl-tests' busbw convention)."""
    from scaletrain.models import get_preset
    from scaletrain.models.family import get_family

    p = get_preset(preset)
    cfg = p.denoiser_config
    layers = cfg.get("num_layers") or len(cfg.get("block_out_channels", ())) or 1
    width = get_family(p.family).hidden_size(cfg)
    nbytes = p.tokens(resolution, resolution, frames) * width * compute_bytes(precision) / k
    one = link.latency["all_gather"] + nbytes * (k - 1) / k / link.bw("all_gather", nbytes)
    return 8 * layers * one


def _measured_solo(bench: dict | None, preset: str, res: int, engine: str, mb: int, frames: int = 0) -> float | None:
    for c in (bench or {}).get("cells", []):
        if (c["status"] == "ok" and not c.get("search_probe") and c["world_size"] == 1 and c["preset"] == preset
                and c["resolution"] == res and c["engine"] == engine and c["micro_batch"] == mb
                and c.get("frames", 0) == frames):
            return solo_basis(c)[0]
    return None


def _bench_points(bench: dict | None, preset: str, res: int, engine: str, frames: int = 0) -> list[tuple[int, float]]:
    """(micro-batch, 1-rank step s) of the bench's cells for this preset, resolution, frames and engine."""
    want = {engine, layout(engine).compute}  # a variant's base engine gives the compute
    return [(c["micro_batch"], solo_basis(c)[0]) for c in (bench or {}).get("cells", [])
            if c["status"] == "ok" and not c.get("search_probe") and c["world_size"] == 1
            and c["preset"] == preset and c["resolution"] == res and c["engine"] in want
            and c.get("frames", 0) == frames and c.get("context", 1) == 1]


def _fabric(inp: SizeInputs, notes: list[str]):
    from scaletrain.bench.scaling import TYPICAL_LINKS, Fabric, link

    (intra_bw, intra_lat), (inter_bw, inter_lat) = TYPICAL_LINKS.get(inp.gpu, ((25.0, 3.0), (12.5, 6.0)))
    intra = inp.intra or link(intra_bw, intra_lat, f"ASSUMED typical for {inp.gpu}: busbw {intra_bw} GB/s, "
                                                   f"latency {intra_lat} us")
    inter = inp.comm or link(inter_bw, inter_lat, f"DEFAULT, assumed typical for {inp.gpu}: busbw {inter_bw} GB/s "
                                                  f"per GPU, latency {inter_lat} us (pass --busbw-gbps or --comm)")
    notes.append(f"intra-node link: {intra.source}")
    notes.append(f"inter-node link: {inter.source}")
    return Fabric(intra, inter, inp.gpus_per_node)


def eta_from_bench(bench: dict | None) -> tuple[float | None, int]:
    """(eta fitted on a bench file's multi-rank cells against its own collective sweep, number of
    cells used); (None, 0) without multi-rank cells or a sweep. The bench ran on one host, so its
    sweep is both links of the fabric."""
    from scaletrain.bench.scaling import Fabric, fit_eta, per_hop, step_comms

    bench = bench or {}
    cells = [c for c in bench.get("cells", []) if c["status"] == "ok" and not c.get("search_probe")]
    solo = {(c["preset"], c["resolution"], c.get("frames", 0), c["engine"], c["micro_batch"]): c
            for c in cells if c["world_size"] == 1}
    sweep = bench.get("comm")
    if not sweep or "error" in sweep:
        return None, 0
    rows = []
    for c in cells:
        base = solo.get((c["preset"], c["resolution"], c.get("frames", 0), c["engine"], c["micro_batch"]))
        if c["world_size"] > 1 and base is not None and c["engine"] in ENGINES and c.get("context", 1) == 1:
            measured_link = per_hop(comm_from_sweep(sweep, c["world_size"]), c["world_size"])
            fab = Fabric(measured_link, measured_link, c["world_size"])
            comms = step_comms(c["engine"], model_facts(c["preset"]), c.get("precision", "fp32"),
                               c["world_size"], c["world_size"])
            rows.append((c["step_seconds"]["median"], solo_basis(base)[0], comms, fab, c["world_size"]))
    return fit_eta(rows), len(rows)


def _eta(inp: SizeInputs, notes: list[str]) -> float:
    """Overlap efficiency: given, else fitted on the bench file's multi-rank cells against its own
    sweep, else assumed."""
    from scaletrain.bench.scaling import ASSUMED_ETA

    if inp.eta is not None:
        notes.append(f"overlap: eta = {inp.eta:g} given (fraction of compute time the network can use)")
        return inp.eta
    eta, n = eta_from_bench(inp.bench)
    if eta is not None:
        notes.append(f"overlap: eta = {eta:.2f} measured (fitted on {n} multi-rank bench cells "
                     "against the bench's own collective sweep)")
        return eta
    notes.append(f"overlap: eta = {ASSUMED_ETA} ASSUMED (no multi-rank bench cells): the fraction of compute "
                 "time during which collectives proceed")
    return ASSUMED_ETA


def check_measured(inp: SizeInputs, peak_tflops: float) -> None:
    """One line for a --measured point that cannot be right: two figures for the same GPUs,
    resolution and engine more than 25 % apart, or a throughput whose FLOPs per GPU exceed the
    GPU's peak for the precision (a wrong figure, resolution or --gpu)."""
    from scaletrain.models.flops import train_flops_per_image

    seen: dict[tuple[int, int, str], float] = {}
    for gpus, ips, res, engine in inp.measured:
        engine = engine or inp.engines[0]
        key = (gpus, res, engine)
        if key in seen and max(ips, seen[key]) / min(ips, seen[key]) > 1.25:
            raise ValueError(f"--measured {gpus}:{seen[key]:g}@{res} and {gpus}:{ips:g}@{res} ({engine}) contradict "
                             f"each other ({max(ips, seen[key]) / min(ips, seen[key]) - 1:.0%} apart); drop one")
        seen.setdefault(key, ips)
        tflops = train_flops_per_image(inp.preset, res) * ips / gpus / 1e12
        if tflops > peak_tflops:
            raise ValueError(f"--measured {gpus}:{ips:g}@{res} means {tflops:,.0f} TFLOP/s per GPU for {inp.preset}, "
                             f"above the {inp.gpu}'s {inp.precision} peak of {peak_tflops:,.0f}; check the figure, "
                             "the resolution and --gpu")


def size_report(inp: SizeInputs, rows: list[dict] | None = None) -> str:
    """Plain-text sizing: per stage and engine, memory per GPU, the smallest node count that
    fits, and at each node count (global batch fixed) the micro-batch x accumulation, img/s,
    scaling efficiency, time and cost; then which inputs were measured and which assumed
    (scaling model: scaletrain/bench/scaling.py). ``rows``, when given, receives each printed
    row as a dict (stage index, resolution, engine, nodes, GPUs, micro-batch, accumulation,
    img/s, efficiency) for callers that compare the predictions with other figures."""
    from scaletrain.models.flops import gpu_peak_tflops, train_flops_per_image
    from scaletrain.models import get_preset
    from scaletrain.bench.scaling import (
        SMALL_MICRO_EFFICIENCY, MicroTime, fit_micro_time, plan_step, step_comms,
    )

    facts = model_facts(inp.preset)
    gpu_mem = GPU_MEMORY_GIB.get(inp.gpu)
    if gpu_mem is None:
        raise ValueError(f"--gpu {inp.gpu!r} is unknown; choose from {', '.join(GPU_MEMORY_GIB)}")
    unknown = [e for e in inp.engines if e not in ENGINES + VARIANTS]
    if unknown:
        raise ValueError(f"engine {unknown[0]!r} is unknown; choose from {', '.join(ENGINES + VARIANTS)}")
    peak = gpu_peak_tflops(inp.gpu, inp.precision)
    notes: list[str] = [f"GPU {inp.gpu}: {gpu_mem} GiB (table), peak {peak[0]} TFLOP/s ({peak[1]}); "
                        f"plan to fill <= {inp.memory_headroom:.0%} of memory"]
    bench_cells = [c for c in (inp.bench or {}).get("cells", []) if c["status"] == "ok"]
    fit = fit_activations([c for c in bench_cells if c["world_size"] == 1], host_is_device=False)
    if inp.preset in fit.per_elem:
        how = "measured memory split (torch's tracker)" if inp.preset in fit.from_split else "residual fit"
        notes.append(f"activations: from {fit.points[inp.preset]} measured cells (bench results, {how})")
    elif inp.act_gib_per_image:
        gib, res = inp.act_gib_per_image
        fit.per_elem[inp.preset] = gib * 2**30 / denoiser_side(inp.preset, res) ** 2
        notes.append(f"activations: given, {gib} GiB per image at {res} px, scaled with S^2")
    else:
        notes.append("activations: UNKNOWN (no bench cells for this preset; pass --act-gib-per-image GIB@RES): "
                     "memory below is model states + encoders + baseline only")
    baselines = [c["baseline_gib"] for c in bench_cells if c["preset"] == inp.preset]
    base = max(baselines) if baselines else inp.assumed_baseline_gib
    notes.append(f"baseline (CUDA context, runtime): {base:.2f} GiB " + ("measured" if baselines else "assumed"))
    fabric = _fabric(inp, notes)
    eta = _eta(inp, notes)
    notes.append(f"params: {facts.params / 1e6:.1f}M trainable, {facts.frozen / 1e6:.1f}M frozen (counted from the preset"
                 + ("; not on the GPUs: precomputed latents)" if inp.precomputed else
                    f", held in {inp.precision} on every GPU)"))
    max_gpus = max(inp.nodes) * inp.gpus_per_node
    # (res, images, micro, global, frames): frames 0 = images; a video stage counts clips
    stages = [(s[0], s[1], s[2], s[3] if len(s) > 3 and s[3] else s[2] * max_gpus, s[4] if len(s) > 4 else 0)
              for s in inp.stages]

    # Compute where no bench cell measured it: an assumed MFU, or what the --measured points fit.
    compute = {"mfu": inp.assumed_mfu, "fixed": 0.0, "source": f"assumed MFU {inp.assumed_mfu:.0%}", "by": {}}

    def micro_time(res: int, mb: int, engine: str, frames: int = 0, mfu: float | None = None,
                   fixed: float | None = None) -> MicroTime:
        points = _bench_points(inp.bench, inp.preset, res, engine, frames)
        if points:
            return fit_micro_time(points, "measured (bench)")
        source = compute["source"]
        if mfu is None:  # an engine with --measured points of its own (or its compute group's)
            group = layout(engine).compute
            mfu = compute["by"].get(group, compute["mfu"])
            if compute["by"]:
                source = (f"calibrated: MFU {mfu:.1%} fitted on {group}'s --measured points" if group in compute["by"]
                          else f"calibrated: MFU {mfu:.1%}, the geometric mean of the engines measured")
                source += f" + {compute['fixed'] * 1e3:.1f} ms per micro-batch" if compute["fixed"] else ""
        per_image = train_flops_per_image(inp.preset, res, frames) / (peak[0] * 1e12 * mfu)
        return MicroTime(compute["fixed"] if fixed is None else fixed, per_image, source)

    degrees = context_degrees(inp.preset, inp.gpus_per_node)

    def with_context(mt: MicroTime, res: int, frames: int, k: int) -> MicroTime:
        """A context group's time per micro-batch: the compute split K ways, plus the Ulysses
        all-to-alls over the intra-node link (none are hidden: attention waits for them)."""
        if k == 1:
            return mt
        a2a = ulysses_seconds(inp.preset, res, frames, k, fabric.intra, inp.precision)
        return MicroTime(mt.fixed, mt.per_image / k + a2a, f"{mt.source}, / K={k} + {a2a * 1e3:.1f} ms all-to-all "
                                                            "per sample")

    # --measured points (any GPU counts, engines, resolutions), fitted jointly: the compute
    # (MFU; a fixed cost per micro-batch where the points ran at several) first, then the links
    # the multi-GPU points crossed, each only as far as compute cannot explain (scaling.
    # calibrate_points). A point that contradicts the bench file is one line.
    warnings: list[str] = []
    check_measured(inp, peak[0])
    if inp.measured:
        from dataclasses import replace as _replace

        from scaletrain.bench.scaling import PHYSICAL_LINKS, calibrate_points

        def scaled(fab, factors: dict[str, float]):
            out = fab
            for which, k in factors.items():
                base = getattr(out, which)
                out = _replace(out, **{which: _replace(base, busbw={op: v * k for op, v in base.busbw.items()})})
            return out

        pts, crossed, micros = [], set(), set()
        for gpus, ips, res, engine in inp.measured:
            st = next((s for s in stages if s[0] == res and not s[4]), None)
            if st is None:
                raise ValueError(f"--measured {gpus}:{ips:g}@{res}: no stage at {res} px")
            label = f"{gpus}:{ips:g}@{res}" + (f":{engine}" if engine else "")
            engine = engine or inp.engines[0]
            same = [c for c in bench_cells if c["world_size"] == gpus and c["resolution"] == res
                    and c["preset"] == inp.preset and c["engine"] == engine and not c.get("search_probe")]
            if same:
                best = max(c["images_per_second"]["median"] for c in same)
                if abs(ips / best - 1) > 0.25:
                    raise ValueError(f"--measured {gpus}:{ips:g}@{res} contradicts the bench file's {best:,.1f} img/s "
                                     f"({engine}, {gpus} GPU(s), {res} px); drop one of the two")
            if gpus > 1:
                crossed.add("intra" if gpus <= inp.gpus_per_node else "inter")
            comms = step_comms(engine, facts, inp.precision, inp.gpus_per_node, gpus)

            def pred(mfu, fixed, factors, gpus=gpus, st=st, res=res, engine=engine, comms=comms) -> float:
                p = plan_step(gpus=gpus, global_batch=st[3], max_micro=st[2], comms=comms,
                              micro_time=micro_time(res, st[2], engine, mfu=mfu, fixed=fixed),
                              fabric=scaled(fabric, factors), eta=eta)
                return p.images_per_second if p is not None else 1e-12

            plan = plan_step(gpus=gpus, global_batch=st[3], max_micro=st[2], comms=comms,
                             micro_time=micro_time(res, st[2], engine), fabric=fabric, eta=eta)
            if plan is None:
                raise ValueError(f"--measured {label}: the stage's global batch {st[3]} is smaller than {gpus} GPUs")
            micros.add(plan.micro)
            pts.append((gpus, ips, pred, label, layout(engine).compute))
        physical = PHYSICAL_LINKS.get(inp.gpu, ((1.0, 1e4), (0.1, 1e4)))
        links = {w: (getattr(fabric, w).busbw["all_reduce"] / 1e9, physical[0 if w == "intra" else 1])
                 for w in sorted(crossed)}
        cal = calibrate_points(pts, mfu0=inp.assumed_mfu, fixed_free=len(micros) >= 2, links=links)
        compute.update(mfu=cal.mfu, fixed=cal.fixed, by=cal.mfu_by, source=f"calibrated: MFU {cal.mfu:.1%}"
                       + (f" + {cal.fixed * 1e3:.1f} ms per micro-batch" if cal.fixed else "") + " (--measured)")
        notes.extend(cal.notes)
        fabric = scaled(fabric, cal.factors)
        for which, k in cal.factors.items():
            bw = getattr(fabric, which).busbw["all_reduce"] / 1e9
            src = (f"calibrated from --measured: {bw:.3g} GB/s busbw ({k:.3g} x {getattr(fabric, which).source})"
                   if abs(k - 1) > 0.01 else f"{getattr(fabric, which).source}; the --measured points need no change")
            fabric = _replace(fabric, **{which: _replace(getattr(fabric, which), source=src)})
            notes[:] = [n for n in notes if not n.startswith(f"{which}-node link:")] + [f"{which}-node link: {src}"]
        warnings = cal.warnings
        notes.extend(warnings)

    priced = inp.price_per_gpu_hour is not None
    lines = [f"scaletrain size: {inp.preset}, {inp.gpu} x{inp.gpus_per_node} per node, {inp.precision}, "
             + (f"${inp.price_per_gpu_hour}/GPU-hour" if priced else "no --price: throughput and time only"),
             *warnings, ""]
    total: dict[tuple[str, int], list[float]] = {}
    curves: dict[tuple[int, str], list[tuple[int, float, float]]] = {}
    for stage_index, (res, images, mb, gb, frames) in enumerate(stages):
        what = "clips" if frames else "images"
        clip = (f" x {frames} frame{'s' if frames != 1 else ''} "
                f"({get_preset(inp.preset).tokens(res, res, frames):,} tokens)") if frames else ""
        count = f"{images:,} {what}" if images else f"no {what[:-1]} count: throughput only"
        lines.append(f"stage {res} px{clip}, {count}, global batch {gb} (micro-batch <= {mb} per GPU)")
        for engine in inp.engines:
            cell = {"preset": inp.preset, "resolution": res, "engine": engine, "micro_batch": mb,
                    "precision": inp.precision, "precomputed": inp.precomputed, "frames": frames,
                    "frozen_encoders": inp.frozen_encoders}

            def mem(nodes: int, micro: int, engine=engine, cell=cell, k: int = 1) -> float:
                world = nodes * inp.gpus_per_node
                lay = layout(engine)
                c = {**cell, "engine": lay.memory, "micro_batch": micro, "context": k,
                     "world_size": lay.state_world(world, inp.gpus_per_node)}
                m = predict_memory_gib(c, fit, base, host_is_device=False)
                if m is None:
                    m = base + (state_bytes(lay.memory, facts, c["world_size"], inp.precision, False)
                                + frozen_bytes(c, facts)) / 2**30
                return m + lay.extra_bytes(facts, world, inp.gpus_per_node, inp.precision) / 2**30

            def fits(nodes: int, k: int = 1) -> int | None:
                """Largest micro-batch <= mb that fits at this node count (context degree k)."""
                return next((m for m in range(mb, 0, -1) if mem(nodes, m, k=k) <= inp.memory_headroom * gpu_mem), None)

            # Context parallelism where one sample's activations do not fit: at each node count
            # the smallest K (inside a node, dividing the heads and the tokens) that fits.
            tokens = get_preset(inp.preset).tokens(res, res, frames)
            usable = [c for c in degrees if tokens % c == 0]

            def best_k(nodes: int) -> int | None:
                return next((c for c in usable if fits(nodes, c)), None)

            min_nodes = next((n for n in range(1, 4097) if best_k(n)), None)
            k = best_k(min_nodes) if min_nodes else 1
            if not fits(min_nodes or 1) and (min_nodes is None or k > 1) and len(degrees) > 1:
                one = mem(max(inp.nodes), 1) - mem(max(inp.nodes), 1, k=10**9)  # one sample's activations
                budget = inp.memory_headroom * gpu_mem - mem(max(inp.nodes), 1, k=10**9)
                lines.append(f"  {engine:<14}context parallelism needed: one {'clip' if frames else 'image'}'s "
                             f"activations are {one:.1f} GiB per GPU, above the {budget:.1f} GiB left beside the "
                             "model states at micro-batch 1; "
                             + ("engine.context_parallel=K splits them (K per row below, the smallest that fits)"
                                if k > 1 else f"no K in {degrees[1:]} that divides its {tokens:,} tokens fits"))
            base_mt = micro_time(res, mb, engine, frames)
            mt = with_context(base_mt, res, frames, k)
            lines.append(f"  {engine:<14}{mem(1, mb, k=k):>8.1f} GiB/GPU at 1 node (micro-batch {mb}"
                         + (f", K={k}" if k > 1 else "") + "); "
                         + (f"fits from {min_nodes} node(s) at micro-batch {fits(min_nodes, k)}"
                            + (f" with K={k}" if k > 1 else "") if min_nodes else "no fit up to 4096 nodes")
                         + f"; 1-{'group' if k > 1 else 'GPU'} step {mt(mb):.3f} s at micro-batch {mb} ({mt.source})")
            lines.append(f"    {'nodes':>5}{'GPUs':>6}{'micro x accum':>15}{'clips/s' if frames else 'img/s':>11}"
                         f"{'scaling eff.':>14}" + (f"{'hours':>9}" if images else "")
                         + (f"{'$':>11}" if images and priced else ""))
            small = None
            for n in inp.nodes:
                world = n * inp.gpus_per_node
                k = best_k(n) or 1
                mt = with_context(base_mt, res, frames, k)
                top = fits(n, k)
                if top is None:
                    lines.append(f"    {n:>5}{world:>6}{'no fit':>15}")
                    continue
                p = plan_step(gpus=world, global_batch=gb, max_micro=top, micro_time=mt,
                              comms=step_comms(engine, facts, inp.precision, inp.gpus_per_node, world),
                              fabric=fabric, eta=eta, context=k)
                if p is None:
                    lines.append(f"    {n:>5}{world:>6}{'batch < GPUs':>15}")
                    continue
                ips = p.images_per_second
                hours = images / ips / 3600 if images else None
                cost = hours * world * inp.price_per_gpu_hour if hours is not None and priced else None
                if hours is not None:
                    total.setdefault((engine, n), []).extend([hours, cost or 0.0])
                curves.setdefault((res, engine), []).append((world, ips, p.efficiency))
                if rows is not None:
                    rows.append({"stage": stage_index, "resolution": res, "engine": engine, "nodes": n, "gpus": world,
                                 "micro_batch": p.micro, "accumulation": p.accum, "images_per_second": ips,
                                 "efficiency": p.efficiency})
                flag = " *" if mt.efficiency(p.micro) < SMALL_MICRO_EFFICIENCY * mt.efficiency(mb) else ""
                if flag and small is None:
                    small = (world, p.micro, mt.efficiency(p.micro) / mt.efficiency(mb))
                lines.append(f"    {n:>5}{world:>6}{f'{p.micro} x {p.accum}':>15}{ips:>11,.{0 if ips >= 10 else 2}f}"
                             f"{p.efficiency:>13.0%}" + (f"{hours:>9.1f}" if hours is not None else "")
                             + (f"{cost:>11,.0f}" if cost is not None else "") + flag + (f"  K={k}" if k > 1 else ""))
            if small:
                lines.append(f"    * from {small[0]} GPUs the micro-batch per GPU is {small[1]}: each GPU runs at "
                             f"{small[2]:.0%} of its speed at micro-batch {mb} (fixed costs per step dominate)")
        lines.append("")
    lines.append(f"start-up floor per GPU at the first step (frozen encoders in {inp.precision}"
                 + (", none: precomputed latents" if inp.precomputed else
                    ", sharded over the GPUs" if inp.frozen_encoders == "shard" else ", whole on every GPU")
                 + "; the denoiser as each engine holds it at its first step, ZeRO-3 with the buffers DeepSpeed's "
                 "constructor allocates; no activations, no Adam moments, no allocator slack):")
    for engine in inp.engines:
        lay, row = layout(engine), []
        for n in inp.nodes:
            world = lay.state_world(n * inp.gpus_per_node, inp.gpus_per_node)
            row.append(f"{n} node(s) {startup_floor_bytes(engine, facts, world, inp.precision, inp.precomputed, inp.frozen_encoders) / 2**30:.1f} GiB")
        whole = "  (whole parameters on every GPU by design)" if lay.whole_params else ""
        lines.append(f"  {engine:<14}" + ", ".join(row) + whole)
    lines.append("")
    done = {k: v for k, v in total.items() if len(v) == 2 * len(stages)}
    if done:
        lines.append("whole curriculum (all stages fit):")
        for (engine, n), v in sorted(done.items(), key=lambda kv: sum(kv[1][1::2] if priced else kv[1][0::2])):
            lines.append(f"  {engine:<14}{n:>4} nodes: {sum(v[0::2]):8.1f} h" + (f"  ${sum(v[1::2]):,.0f}" if priced else ""))
        lines.append("")
    if inp.plot:
        _plot_scaling(curves, inp, inp.plot)
        notes.append(f"plot: {inp.plot}")
    lines.append("inputs (measured vs assumed):")
    lines += [f"  - {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _plot_scaling(curves: dict, inp: SizeInputs, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: nodes and CI have no display
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for (res, engine), pts in sorted(curves.items()):
        xs = [p[0] for p in pts]
        ax1.plot(xs, [p[1] for p in pts], marker="o", label=f"{engine} @ {res} px")
        ax2.plot(xs, [100 * p[2] for p in pts], marker="o", label=f"{engine} @ {res} px")
    for ax, label in ((ax1, "images/s"), (ax2, "scaling efficiency (%)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    ax1.set_yscale("log")
    ax2.set_ylim(0, 105)
    ax1.legend(fontsize=7)
    fig.suptitle(f"scaletrain size: {inp.preset} on {inp.gpu} x{inp.gpus_per_node} per node (global batch fixed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
