"""How a training step's time grows with the GPU count: the part of ``scaletrain size`` that
says what N nodes buy (equations: benchmarks/README.md, "Scaling with N").

- **Two links.** A ``Fabric`` holds an intra-node and an inter-node link (latency and bus
  bandwidth per collective, the nccl-tests convention, latency per ring hop) and the GPUs per
  node g. Collectives are hierarchical, as NCCL runs them across nodes: an all-reduce of B
  bytes over n nodes x g GPUs is a reduce-scatter and an all-gather inside each node (B (g-1)/g
  each over the intra link, g-1 hops each) around an all-reduce across nodes of each GPU's
  B/g (2 (n-1)/n over the inter link, 2 (n-1) hops, every GPU on its own share of the NICs);
  an all-gather or reduce-scatter is the intra step on B plus the inter step on B/g. On one
  node this is the flat ring; with one GPU per node, the flat ring over the inter link. Rings
  make latency grow with the ring size, which is what favours HSDP and hpZ at many nodes:
  their per-micro-batch gathers run on rings of g, not of n x g.
- **Per engine and variant**, the collectives of one step (``step_comms``): per micro-batch
  parameter gathers (FSDP2, ZeRO-3: prefetched, so they overlap compute), per-step gradient
  reduction (overlapping the last micro-batch's backward), and what cannot overlap (the
  grad-norm all-reduce, ZeRO-1/2's parameter all-gather after the optimizer step). HSDP
  shards inside a node and all-reduces the shards across nodes; ZeRO++ hpZ keeps a secondary
  parameter copy per node, so backward gathers stay on the intra link.
- **Overlap from measured times**, not an assumed fraction: a collective hides behind the
  compute it can run under (the micro-batch's compute for prefetched gathers, the backward,
  2/3 of it, for gradient reduction), scaled by eta, the fraction of that compute time during
  which the network can actually move data; the first gather and the last reduction of each
  pass are never hidden. eta is fitted from multi-rank cells of a bench file (their measured
  step times against the model), else assumed (stated in the report).
- **Fixed global batch.** The recipe's global batch B stays fixed as N grows: each GPU takes
  B/N samples a step, as the largest micro-batch that divides it and fits, times accumulation.
  Per-GPU speed depends on the micro-batch (``MicroTime``: t(m) = a + b m, fitted from bench
  cells at several micro-batches), so the report says where the micro-batch gets too small.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Callable

from scaletrain.bench.facts import CommModel
from scaletrain.models.facts import ModelFacts
from scaletrain.engines.spec import Collective

OPS = ("all_reduce", "all_gather", "reduce_scatter")
# Typical links per GPU type (busbw GB/s, latency per ring hop us), used only where nothing was
# measured or given, and reported as assumed: NVLink/NVSwitch inside a node (nccl-tests
# all-reduce busbw on 8 GPUs; small messages ~1-2 us per hop), one InfiniBand NIC per GPU
# between nodes (NDR 400 Gb/s ~ 40 GB/s achieved, HDR 200 Gb/s ~ 20; a few us per hop); PCIe
# cards without NVLink share the host's links.
TYPICAL_LINKS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "H100": ((360.0, 1.5), (40.0, 4.0)), "H200": ((360.0, 1.5), (40.0, 4.0)),
    "B200": ((700.0, 1.5), (80.0, 4.0)), "A100": ((230.0, 2.0), (20.0, 5.0)),
    "A100-40GB": ((230.0, 2.0), (20.0, 5.0)), "H100 PCIe": ((25.0, 3.0), (20.0, 5.0)),
    "L40S": ((20.0, 3.0), (10.0, 6.0)), "L4": ((20.0, 3.0), (10.0, 6.0)), "A10": ((20.0, 3.0), (10.0, 6.0)),
}
ASSUMED_ETA = 0.8  # GPUs: NCCL runs on its own SMs and streams; used only without a measurement
SMALL_MICRO_EFFICIENCY = 0.8  # below this per-GPU efficiency the report flags the micro-batch


def link(busbw_gbps: float, latency_us: float, source: str) -> CommModel:
    """A link from its bus bandwidth and its latency per ring hop (the small-message time of a
    2-GPU all-gather)."""
    return CommModel({o: latency_us * 1e-6 for o in OPS}, {o: busbw_gbps * 1e9 for o in OPS}, source)


def per_hop(comm: CommModel, world: int) -> CommModel:
    """A sweep fitted at ``world`` ranks (``sizing.comm_from_sweep``: latency per call there)
    as a link with latency per ring hop, which the Fabric scales to any ring size."""
    hops = {o: max(1, (2 if o == "all_reduce" else 1) * (world - 1)) for o in OPS}
    return CommModel({o: comm.latency[o] / hops[o] for o in OPS}, dict(comm.busbw), comm.source, comm.overlap,
                     comm.curve)


@dataclass(frozen=True)
class Fabric:
    intra: CommModel
    inter: CommModel
    gpus_per_node: int

    def split(self, world: int) -> tuple[int, int]:
        """(nodes, GPUs per node) of ``world`` GPUs, filling nodes first."""
        g = max(1, min(self.gpus_per_node, world))
        return math.ceil(world / g), g

    def time(self, op: str, nbytes: float, world: int, scope: str = "global", calls: int = 1) -> float:
        """Seconds for ``calls`` collectives moving ``nbytes`` in all (the full tensor size, as
        nccl-tests counts it). scope: global (all GPUs), intra (each node's GPUs only), inter
        (one GPU per node, ``nbytes`` per GPU: HSDP's replica all-reduce)."""
        n, g = self.split(world)
        if scope == "intra":
            n = 1
        elif scope == "inter":
            g = 1
        t = 0.0
        steps = 2 if op == "all_reduce" else 1  # all-reduce inside a node = reduce-scatter + all-gather
        # each call at the bandwidth its own message size gets (CommModel.bw: a sweep's curve)
        if g > 1:  # a ring of g: g-1 hops, each paying the link's per-hop latency
            bw = self.intra.bw(op, nbytes / calls)
            t += steps * (calls * (g - 1) * self.intra.latency[op] + nbytes * (g - 1) / g / bw)
        if n > 1:
            bw = self.inter.bw(op, nbytes / g / calls)
            t += steps * calls * (n - 1) * self.inter.latency[op] + nbytes / g * steps * (n - 1) / n / bw
        return t


Comm = Collective  # one kind of collective in a step (engines/spec.py)


def step_comms(engine: str, facts: ModelFacts, precision: str, gpus_per_node: int, world: int) -> list[Comm]:
    """The collectives of one optimizer step of ``engine`` (any sized label: ``sizing.ENGINES``
    plus the variants ``hsdp`` and ``zero3-hpz``): the engine's own sizing entry says them."""
    from scaletrain.engines.spec import LAYOUTS, load_layouts

    if engine not in load_layouts() or not LAYOUTS[engine].sized:
        raise ValueError(f"engine {engine!r} is unknown to the scaling model")
    return LAYOUTS[engine].step_comms(facts, precision, gpus_per_node, world)


@dataclass(frozen=True)
class MicroTime:
    """Seconds of one micro-batch's forward + backward on one GPU, t(m) = fixed + per_image x m
    (optimizer step included in ``fixed``), and where that came from."""

    fixed: float
    per_image: float
    source: str

    def __call__(self, micro: int) -> float:
        return self.fixed + self.per_image * micro

    def efficiency(self, micro: int) -> float:
        """Images/s per GPU at ``micro`` relative to a very large micro-batch."""
        return self.per_image * micro / self(micro)


def fit_micro_time(points: list[tuple[int, float]], source: str) -> MicroTime:
    """From (micro-batch, step seconds) of 1-GPU cells: a line through two or more points (a
    negative intercept from noise is clipped to 0), else proportional through one."""
    if len({m for m, _ in points}) >= 2:
        slope, icept = statistics.linear_regression([float(m) for m, _ in points], [t for _, t in points])
        if slope > 0:
            if icept < 0:
                slope, icept = sum(t for _, t in points) / sum(m for m, _ in points), 0.0
            return MicroTime(icept, slope, f"{source}, fitted over micro-batches {sorted({m for m, _ in points})}")
    m, t = max(points)
    return MicroTime(0.0, t / m, f"{source}, one micro-batch ({m}): time taken proportional to it")


def exposed(comms: list[Comm], fabric: Fabric, world: int, t_micro: float,
            eta: float) -> tuple[float, float, float, float]:
    """For ``comms`` under ``eta`` overlap (module doc): (exposed seconds per micro-batch,
    exposed seconds per step, gather seconds per micro-batch, other comm seconds per step)."""
    per_micro = per_step = gathers = others = 0.0
    for kind, window in (("gather", t_micro), ("grad", 2 / 3 * t_micro), ("tail", 0.0)):
        mine = [c for c in comms if c.kind == kind]
        t = sum(fabric.time(c.op, c.nbytes, world, c.scope, c.calls) for c in mine)
        if not mine or t == 0.0:
            continue
        # one call of the pass is always exposed: the first gather, the last reduction
        unhidden = max(fabric.time(c.op, c.nbytes / c.calls, world, c.scope) for c in mine)
        left = max(t - eta * window, min(t, unhidden)) if kind != "tail" else t
        if kind == "gather":
            per_micro, gathers = per_micro + left, gathers + t
        else:
            per_step, others = per_step + left, others + t
    return per_micro, per_step, gathers, others


@dataclass(frozen=True)
class StepPlan:
    gpus: int
    micro: int
    accum: int
    global_batch: int
    step_seconds: float
    comm_seconds: float  # all collectives of the step, hidden or not
    exposed_seconds: float
    images_per_second: float
    efficiency: float  # vs one GPU at the largest micro-batch, no communication


def plan_step(*, gpus: int, global_batch: int, max_micro: int, micro_time: MicroTime, comms: list[Comm],
              fabric: Fabric, eta: float, context: int = 1) -> StepPlan | None:
    """Largest micro-batch <= ``max_micro`` dividing the per-GPU share of ``global_batch``, the
    accumulation it needs, and the step time; None when the batch is smaller than the GPUs.
    ``context`` > 1: groups of that many GPUs share each sample (context parallelism), so the
    batch is split over gpus / context replicas and ``micro_time`` is a group's (per sample, its
    share of the compute plus its all-to-alls); the engine's collectives still span all GPUs."""
    replicas = gpus // context
    per_gpu = global_batch // replicas if replicas else 0
    if per_gpu < 1:
        return None
    micro = max(d for d in range(1, min(max_micro, per_gpu) + 1) if per_gpu % d == 0)
    accum = per_gpu // micro
    t = micro_time(micro)
    per_micro, per_step, gathers, others = exposed(comms, fabric, gpus, t, eta)
    step = accum * (t + per_micro) + per_step
    ips = per_gpu * replicas / step
    ideal = max_micro / micro_time(max_micro)
    return StepPlan(gpus, micro, accum, per_gpu * replicas, step, accum * gathers + others,
                    accum * per_micro + per_step, ips, ips / (replicas * ideal))


def fit_eta(cells: list[tuple[float, float, list[Comm], Fabric, int]]) -> float | None:
    """eta from measured multi-rank cells, each (measured step s, 1-rank step s at the same
    micro-batch, comms, fabric, world): the eta whose predicted step is closest, per cell
    (bisection: exposure falls as eta grows), then the median."""
    etas = []
    for measured, solo, comms, fabric, world in cells:
        target = measured - solo
        lo, hi = 0.0, 1.0
        def f(e: float) -> float:
            return sum(exposed(comms, fabric, world, solo, e)[:2]) - target

        if f(0.0) <= 0:
            etas.append(0.0)
            continue
        if f(1.0) >= 0:
            etas.append(1.0)
            continue
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
        etas.append((lo + hi) / 2)
    return statistics.median(etas) if etas else None


# Bus bandwidth a link can physically have per GPU (GB/s, nccl-tests busbw): (intra-node,
# inter-node) ranges. A calibration that lands outside them is printed as a warning naming the
# number: the point it came from is more likely wrong (or slowed by something else) than the link.
PHYSICAL_LINKS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "H100": ((100.0, 480.0), (5.0, 50.0)), "H200": ((100.0, 480.0), (5.0, 50.0)),
    "B200": ((200.0, 900.0), (10.0, 100.0)), "A100": ((80.0, 300.0), (3.0, 25.0)),
    "A100-40GB": ((80.0, 300.0), (3.0, 25.0)), "H100 PCIe": ((5.0, 64.0), (3.0, 50.0)),
    "L40S": ((5.0, 32.0), (1.0, 25.0)), "L4": ((5.0, 32.0), (1.0, 25.0)), "A10": ((5.0, 32.0), (1.0, 25.0)),
}
PLAUSIBLE_MFU = (0.05, 0.8)  # a fitted compute efficiency outside this is a warning


@dataclass
class Calibration:
    """What ``calibrate_points`` fitted: the compute (MFU, fixed seconds per micro-batch), each
    link's bandwidth factor against its starting value, and the lines that say so."""

    mfu: float  # the one MFU, or with points on several engines their geometric mean (for the others)
    fixed: float
    factors: dict[str, float]
    notes: list[str]
    warnings: list[str]
    mfu_by: dict[str, float] = field(default_factory=dict)  # per compute group, where points on several


def _nelder_mead(f, x0: list[float], step: float = 0.5, iters: int = 600) -> list[float]:
    """Minimise ``f`` from ``x0`` (a handful of parameters, a cheap objective). Hand-written: the
    only optimizer needed here, and scipy is not otherwise a dependency."""
    n = len(x0)
    pts = [list(x0)] + [[x + (step if i == j else 0.0) for j, x in enumerate(x0)] for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = sorted(range(n + 1), key=vals.__getitem__)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if vals[-1] - vals[0] < 1e-14:
            break
        centroid = [sum(p[j] for p in pts[:-1]) / n for j in range(n)]
        refl = [c + (c - w) for c, w in zip(centroid, pts[-1])]
        fr = f(refl)
        if fr < vals[0]:
            exp = [c + 2 * (c - w) for c, w in zip(centroid, pts[-1])]
            fe = f(exp)
            pts[-1], vals[-1] = (exp, fe) if fe < fr else (refl, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = refl, fr
        else:
            con = [c + 0.5 * (w - c) for c, w in zip(centroid, pts[-1])]
            fc = f(con)
            if fc < vals[-1]:
                pts[-1], vals[-1] = con, fc
            else:
                pts = [pts[0]] + [[b + 0.5 * (p - b) for b, p in zip(pts[0], q)] for q in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    return pts[min(range(n + 1), key=vals.__getitem__)]


def calibrate_points(points: list[tuple], *, mfu0: float, fixed_free: bool,
                     links: dict[str, tuple[float, tuple[float, float]]]) -> Calibration:
    """Fit the compute and the links jointly to measured throughputs.

    ``points``: (GPUs, measured img/s, predict(mfu, fixed, factors) -> img/s, label[, group]);
    with points in two or more groups (engines that compute differently: the caller's key),
    each group gets an MFU of its own, the fixed cost and the links stay shared. ``links``:
    the links the points crossed, name -> (starting busbw GB/s, physical (lo, hi) GB/s).
    Compute comes first: the links are pulled towards their starting values by a weak prior, so
    a point that one compute speed explains moves no link (one 8-GPU point sets the MFU, not the
    NVLink bandwidth), and only what compute cannot explain across the points goes to the link
    crossed. The fixed cost per micro-batch is fitted only where the points ran at two or more
    micro-batches (``fixed_free``). Least squares in log img/s over log parameters."""
    names = sorted(links)
    groups = sorted({p[4] for p in points if len(p) > 4})
    if len(groups) < 2:
        groups = []
    ng = max(1, len(groups))
    # Per unit of log factor squared: a 2 % residual outweighs a 4x inter-node change. The
    # intra-node link (NVLink-class, rarely the bottleneck) is held 10x firmer, so what one
    # compute speed cannot explain goes to the inter-node link first.
    prior = {"intra": 1e-2, "inter": 1e-3}

    def unpack(x: list[float]) -> tuple[list[float], float, dict[str, float]]:
        mfus = [math.exp(v) for v in x[:ng]]
        fixed = math.exp(x[ng]) if fixed_free else 0.0
        return mfus, fixed, {n: math.exp(v) for n, v in zip(names, x[ng + 1:])}

    def mfu_of(mfus: list[float], p: tuple) -> float:
        return mfus[groups.index(p[4])] if groups else mfus[0]

    def loss(x: list[float]) -> float:
        mfus, fixed, factors = unpack(x)
        if not all(1e-4 < m < 1.0 for m in mfus):
            return 1e9
        r = sum(math.log(max(p[2](mfu_of(mfus, p), fixed, factors), 1e-12) / p[1]) ** 2 for p in points)
        return r + sum(prior.get(n, 1e-3) * v * v for n, v in zip(names, x[ng + 1:]))

    # Starts at each link factor in {1, 1/8, 1/64, 1/512}: where collectives hide under compute the
    # prediction is flat in the link, and a simplex started there never finds the slow link a
    # multi-node point needs. Then restarts from the best point shake off a collapsed simplex.
    import itertools

    starts = [[math.log(mfu0)] * ng + [math.log(1e-3)] + [math.log(k) for k in ks]
              for ks in itertools.product((1.0, 1 / 8, 1 / 64, 1 / 512), repeat=len(names))]
    x = min((_nelder_mead(loss, x0) for x0 in starts), key=loss)
    for _ in range(3):
        x = _nelder_mead(loss, x, step=0.2)
    mfus, fixed, factors = unpack(x)
    mfu = math.exp(sum(math.log(m) for m in mfus) / len(mfus))
    mfu_by = dict(zip(groups, mfus))
    notes, warnings = [], []
    labels = ", ".join(p[3] for p in points)
    fixed_note = (f"; fixed cost {fixed * 1e3:.1f} ms per micro-batch fitted (the points ran at several "
                  "micro-batches)" if fixed_free else "; fixed cost per micro-batch 0 (one micro-batch among the points)")
    if mfu_by:
        notes.append("compute: MFU fitted per engine on --measured " + labels + ": "
                     + ", ".join(f"{g} {m:.1%}" for g, m in mfu_by.items())
                     + f"; engines without a point take their geometric mean {mfu:.1%}" + fixed_note)
    else:
        notes.append(f"compute: MFU {mfu:.1%} fitted on --measured {labels}" + fixed_note)
    for m, g in ((m, g) for g, m in (mfu_by.items() or [("", mfu)])):
        if not PLAUSIBLE_MFU[0] <= m <= PLAUSIBLE_MFU[1]:
            warnings.append(f"WARNING: the fitted MFU {m:.1%}{f' ({g})' if g else ''} is outside the plausible "
                            f"{PLAUSIBLE_MFU[0]:.0%}-{PLAUSIBLE_MFU[1]:.0%}; check the --measured points, --gpu and "
                            "--precision")
    for name in names:
        start, (lo, hi) = links[name]
        bw = start * factors[name]
        if not lo <= bw <= hi:
            warnings.append(f"WARNING: the {name}-node link fitted to {bw:.3g} GB/s busbw, outside the physical "
                            f"{lo:g}-{hi:g} GB/s for this GPU's interconnect; a --measured point is probably off "
                            "(or slowed by something the model does not have)")
    for p in points:
        got = p[2](mfu_of(mfus, p), fixed, factors)
        if abs(got / p[1] - 1) > 0.02:
            warnings.append(f"WARNING: --measured {p[3]} is reproduced as {got:,.0f} img/s ({got / p[1] - 1:+.1%}): "
                            "the points disagree with each other under this model")
    return Calibration(mfu, fixed, factors, notes, warnings, mfu_by)
