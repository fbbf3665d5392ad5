"""`scaletrain preflight`: measure the network a job will train on before it trains.

Three measurements, all through ``torch.distributed`` on the backend a run would use (NCCL on
GPUs, gloo on CPU):

1. A size sweep of all-reduce, all-gather and reduce-scatter, reported as nccl-tests does
   (https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md): ``algbw = bytes /
   time`` with ``bytes`` the full (not per-rank) buffer, and ``busbw = algbw x 2(n-1)/n`` for
   all-reduce, ``x (n-1)/n`` for all-gather and reduce-scatter, so busbw is comparable with
   the link's speed whatever the rank count.
2. A bucket-size recommendation per collective: the smallest size whose busbw reaches 90 %
   of the curve's plateau. Smaller buckets pay latency; larger ones only delay overlap.
3. A point-to-point test of each ring-neighbour pair, in both directions, to name slow links
   and ranks. Collective timings cannot do that: a late rank makes the others wait *inside*
   the collective, so per-rank collective times blame the wrong ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from scaletrain.config import ConfigError

OPS = ("all_reduce", "all_gather", "reduce_scatter")
_BUSBW_FACTOR: dict[str, Callable[[int], float]] = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Presets fill only variables the user has not set (explicit environment wins). Values are the
# documented system-configuration knobs of NCCL's env reference, not tuning guesses.
NCCL_PRESETS: dict[str, dict[str, str]] = {
    # TCP sockets only (no InfiniBand/RoCE): more sockets and threads per connection help
    # NCCL fill a fast Ethernet link (NSOCKS_PERTHREAD x SOCKET_NTHREADS must stay <= 64).
    "socket": {"NCCL_IB_DISABLE": "1", "NCCL_SOCKET_IFNAME": "^lo,docker",
               "NCCL_SOCKET_NTHREADS": "4", "NCCL_NSOCKS_PERTHREAD": "4"},
    # InfiniBand: data over the mlx5 HCAs; the socket interface carries only bootstrap traffic.
    "ib": {"NCCL_IB_DISABLE": "0", "NCCL_IB_HCA": "mlx5", "NCCL_SOCKET_IFNAME": "^lo,docker"},
    # RoCE v2 is InfiniBand verbs over Ethernet; GID index 3 is RoCE v2 on most mlx5 set-ups.
    "roce": {"NCCL_IB_DISABLE": "0", "NCCL_IB_HCA": "mlx5", "NCCL_IB_GID_INDEX": "3",
             "NCCL_SOCKET_IFNAME": "^lo,docker"},
}
NCCL_NOTES = [
    "NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME pick the interface (NCCL takes prefixes, '=eth0' exact, '^lo' excludes; gloo takes one exact name).",
    "NCCL_ALGO (Ring, Tree, NVLS, CollNet) and NCCL_PROTO (Simple, LL, LL128) are debugging knobs: force one only to compare curves, never keep it in a job script.",
    "Ring gives the best busbw on large all-reduces; Tree has lower latency for small ones at many nodes, which is why NCCL switches by size.",
    "NCCL_DEBUG=INFO prints the transport chosen per peer (NET/IB, NET/Socket, P2P, SHM): check it says IB where you paid for IB.",
]
_ENV_PREFIXES = ("NCCL_", "GLOO_", "TP_SOCKET_IFNAME", "FI_", "UCX_", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
# Variables expected to differ between ranks; a difference elsewhere is a mis-configured node.
_PER_RANK_ENV = {"NCCL_COMM_ID"}


def parse_size(text: str, flag: str) -> int:
    """'4MiB', '64M', '1KiB', '1048576' -> bytes (binary units, as nccl-tests prints them)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not m or int(m.group(1)) <= 0:
        raise ConfigError(f"{flag}={text!r} is not a size; use e.g. 4MiB, 512KiB or 1048576")
    return int(m.group(1)) * 1024 ** " KMG".index((m.group(2) or " ").upper())


def fmt_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def sweep_sizes(min_bytes: int, max_bytes: int) -> list[int]:
    """Powers of two from min to max (max included even when it is not a power of two)."""
    if min_bytes > max_bytes:
        raise ConfigError(f"--min-size={min_bytes} exceeds --max-size={max_bytes}; lower --min-size")
    sizes, s = [], min_bytes
    while s < max_bytes:
        sizes.append(s)
        s *= 2
    return sizes + [max_bytes]


def bus_bandwidth(op: str, algbw: float, world: int) -> float:
    return algbw * _BUSBW_FACTOR[op](world)


def recommend_bucket(sizes: list[int], busbw: list[float], frac: float = 0.9, rise_tol: float = 0.05) -> dict:
    """Smallest size whose busbw reaches ``frac`` of the plateau, read off a median-of-3 curve.

    The smoothing keeps one lucky (or unlucky) point from moving the plateau. The curve counts
    as still rising (the answer is then a lower bound: sweep further) when its maximum sits
    at the largest sizes and the last doubling still gained ``rise_tol`` or more. A curve that
    peaks and then falls (host caches, contention) has reached its plateau.
    """
    smooth = [statistics.median(busbw[max(0, i - 1): i + 2]) for i in range(len(busbw))]
    plateau = max(smooth)
    idx = next(i for i, v in enumerate(smooth) if v >= frac * plateau)
    rising = smooth.index(plateau) >= len(sizes) - 2 and busbw[-1] >= (1 + rise_tol) * busbw[-2]
    reached = idx < len(sizes) - 1 and not rising
    return {"bucket_bytes": sizes[idx], "plateau_busbw_gbps": plateau / 1e9, "plateau_reached": reached,
            "fraction": frac}


def flag_slow(times: dict, factor: float, classes: dict | None = None) -> set:
    """Keys whose time exceeds ``factor`` x the median of the *other* keys of the same class.

    Leave-one-out keeps a single outlier from dragging its own reference (with two links the
    plain median is their mean). Classes keep like with like: an inter-node link is not slow
    for being slower than NVLink neighbours.
    """
    classes = classes or {k: "" for k in times}
    slow = set()
    for key, t in times.items():
        others = [v for k, v in times.items() if k != key and classes[k] == classes[key]]
        if others and t > factor * statistics.median(others):
            slow.add(key)
    return slow


def slow_ranks(links: list[dict]) -> list[dict]:
    """A rank whose every outgoing (or incoming) link is slow, measured against >= 2 peers.

    With a single peer a slow direction a->b cannot say whether a sends or b receives slowly,
    so only the link is reported.
    """
    out = []
    ranks = sorted({x["src"] for x in links} | {x["dst"] for x in links})
    for r in ranks:
        for side, mine, peer in (("send", "src", "dst"), ("receive", "dst", "src")):
            own = [x for x in links if x[mine] == r]
            if len({x[peer] for x in own}) >= 2 and all(x["slow"] for x in own):
                out.append({"rank": r, "side": side, "peers": sorted(x[peer] for x in own)})
    return out


def ring_rounds(world: int) -> list[list[tuple[int, int]]]:
    """Ring-neighbour pairs, greedily grouped into rounds where no rank appears twice."""
    pairs = sorted({tuple(sorted((r, (r + 1) % world))) for r in range(world) if world > 1})
    rounds: list[list[tuple[int, int]]] = []
    for p in pairs:
        for rnd in rounds:
            if not any(set(p) & set(q) for q in rnd):
                rnd.append(p)
                break
        else:
            rounds.append([p])
    return rounds


def apply_preset(name: str | None) -> dict[str, str]:
    """Set the preset's variables that are unset; return what was set (must run before NCCL init)."""
    if name is None:
        return {}
    applied = {k: v for k, v in NCCL_PRESETS[name].items() if k not in os.environ}
    os.environ.update(applied)
    return applied


# ---------------------------------------------------------------- measurement (collective calls)

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# all_gather_single / reduce_scatter_single are torch 2.13's names for the deprecated *_tensor
# calls; the fallbacks keep older torch (the dependency is a range) working.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _collective(op: str, buf_in: torch.Tensor, buf_out: torch.Tensor, count: int, world: int) -> Callable[[], None]:
    shard = count // world
    if op == "all_reduce":
        return lambda: dist.all_reduce(buf_in[:count])
    if op == "all_gather":
        return lambda: _all_gather(buf_out[:count], buf_in[:shard])
    return lambda: _reduce_scatter(buf_out[:shard], buf_in[:count])


def _time(fn: Callable[[], None], iters: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def measure_collectives(sizes: list[int], ops: list[str], dtype: torch.dtype, iters: int, warmup: int,
                        device: torch.device) -> dict[str, list[dict]]:
    """Every rank times each (op, size); rank times are gathered so rank 0 can report them all."""
    world, esize = dist.get_world_size(), torch.empty((), dtype=dtype).element_size()
    # Element counts divisible by the world size so all-gather/reduce-scatter shards are equal.
    counts = [max(world, (s // esize) // world * world) for s in sizes]
    buf_in = torch.zeros(max(counts), dtype=dtype, device=device)  # in-place sums of zeros never overflow
    buf_out = torch.empty_like(buf_in)
    mine = [_time(_collective(op, buf_in, buf_out, c, world), iters, warmup, device) for op in ops for c in counts]
    gathered = torch.zeros(world, len(mine), dtype=torch.float64, device=device)
    _all_gather(gathered.view(-1), torch.tensor(mine, dtype=torch.float64, device=device))
    per_rank = gathered.cpu().tolist()
    out: dict[str, list[dict]] = {}
    for i, op in enumerate(ops):
        rows = []
        for j, c in enumerate(counts):
            ts = [per_rank[r][i * len(counts) + j] for r in range(world)]
            t = statistics.fmean(ts)  # nccl-tests' default: the rank-average time
            algbw = c * esize / t
            rows.append({"size_bytes": c * esize, "count": c, "time_us": t * 1e6, "time_max_us": max(ts) * 1e6,
                         "algbw_gbps": algbw / 1e9, "busbw_gbps": bus_bandwidth(op, algbw, world) / 1e9,
                         "rank_time_us": [x * 1e6 for x in ts]})
        out[op] = rows
    return out


def _one_way(src: int, dst: int, buf: torch.Tensor, ack: torch.Tensor, iters: int, delay_s: float,
             device: torch.device) -> float | None:
    """``iters`` back-to-back sends src->dst closed by one tiny ack; the time per message on src."""
    rank = dist.get_rank()
    if rank == src:
        t0 = time.perf_counter()
        for _ in range(iters):
            if delay_s:
                time.sleep(delay_s)  # --inject-delay: a slow sender, to check the detector end to end
            dist.send(buf, dst)
        dist.recv(ack, dst)
        _sync(device)
        return (time.perf_counter() - t0) / iters
    if rank == dst:
        for _ in range(iters):
            dist.recv(buf, src)
        dist.send(ack, src)
        _sync(device)
    return None


def measure_links(size: int, iters: int, trials: int, delay: tuple[int, float] | None,
                  device: torch.device) -> list[dict]:
    """Both directions of each ring-neighbour pair, best of ``trials`` (the link's capability)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    buf = torch.ones(max(1, size // 4), dtype=torch.float32, device=device)
    ack = torch.zeros(1, dtype=torch.float32, device=device)
    delay_s = delay[1] if delay and delay[0] == rank else 0.0
    mine: dict[tuple[int, int], float] = {}
    for rnd in ring_rounds(world):
        pair = next((p for p in rnd if rank in p), None)
        if pair is not None:
            a, b = pair
            _one_way(a, b, buf, ack, 1, 0.0, device)  # warm-up: NCCL sets up p2p channels lazily
            _one_way(b, a, buf, ack, 1, 0.0, device)
            for _ in range(trials):  # interleaved, so a burst of noise hits both directions alike
                for s, d in ((a, b), (b, a)):
                    t = _one_way(s, d, buf, ack, iters, delay_s, device)
                    if t is not None:
                        mine[(s, d)] = min(t, mine.get((s, d), float("inf")))
        dist.barrier()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    links = []
    for part in gathered:
        for (s, d), t in part.items():
            links.append({"src": s, "dst": d, "size_bytes": buf.numel() * 4, "time_us": t * 1e6,
                          "gbps": buf.numel() * 4 / t / 1e9})
    return sorted(links, key=lambda x: (x["src"], x["dst"]))


def _rank_info() -> dict:
    # Node identity: torchrun exports GROUP_RANK, the deepspeed launcher CROSS_RANK; two
    # namespaces or containers on one machine share a hostname but not a node rank.
    node = os.environ.get("GROUP_RANK", os.environ.get("CROSS_RANK", "0"))
    env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
    return {"host": socket.gethostname(), "node": f"{socket.gethostname()}#{node}", "env": env}


@dataclass
class PreflightOptions:
    min_size: int = 1024
    max_size: int = 4 << 20
    ops: tuple[str, ...] = OPS
    dtype: str = "float32"
    iters: int = 20
    warmup: int = 5
    link_size: int | None = None  # default: max_size
    link_iters: int = 5
    link_trials: int = 3
    slow_factor: float = 2.0
    bucket_fraction: float = 0.9
    preset: str | None = None
    inject_delay: tuple[int, float] | None = None


def run_preflight(opts: PreflightOptions, device: torch.device, preset_applied: dict[str, str]) -> dict:
    """Collective call on every rank; returns the report (rank 0 prints and writes its copy)."""
    world = dist.get_world_size()
    infos: list = [None] * world
    dist.all_gather_object(infos, _rank_info())
    sizes = sweep_sizes(opts.min_size, opts.max_size)
    colls = measure_collectives(sizes, list(opts.ops), _DTYPES[opts.dtype], opts.iters, opts.warmup, device)
    links = measure_links(opts.link_size or opts.max_size, opts.link_iters, opts.link_trials, opts.inject_delay, device)
    nodes = [i["node"] for i in infos]
    for x in links:
        x.update(src_node=nodes[x["src"]], dst_node=nodes[x["dst"]])
    key = {(x["src"], x["dst"]): x for x in links}
    cls = {k: ("intra-node" if x["src_node"] == x["dst_node"] else "inter-node") for k, x in key.items()}
    slow = flag_slow({k: x["time_us"] for k, x in key.items()}, opts.slow_factor, cls)
    for k, x in key.items():
        x.update(link_class=cls[k], slow=k in slow)
    esize = torch.empty((), dtype=_DTYPES[opts.dtype]).element_size()
    recs = {}
    for op, rows in colls.items() if world > 1 else ():  # one rank: busbw is 0, nothing to recommend
        rec = recommend_bucket([r["size_bytes"] for r in rows], [r["busbw_gbps"] * 1e9 for r in rows], opts.bucket_fraction)
        rec["knobs"] = _knobs(op, rec["bucket_bytes"], esize)
        recs[op] = rec
    envs = [i["env"] for i in infos]
    mismatch = {}
    for var in sorted({k for e in envs for k in e} - _PER_RANK_ENV):
        if var.startswith(("NCCL_", "GLOO_", "FI_", "UCX_", "TP_")):
            vals: dict[str, list[int]] = {}
            for r, e in enumerate(envs):
                vals.setdefault(e.get(var, "<unset>"), []).append(r)
            if len(vals) > 1:
                mismatch[var] = vals
    return {
        "schema": "scaletrain.preflight/1", "world_size": world, "nodes": len(set(nodes)),
        "backend": dist.get_backend(), "device": device.type, "dtype": opts.dtype,
        "torch": torch.__version__, "loadavg_rank0": list(os.getloadavg()),  # numbers need their conditions
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
        "iters": opts.iters, "warmup": opts.warmup, "busbw_factor": {op: _BUSBW_FACTOR[op](world) for op in opts.ops},
        "collectives": colls, "recommendations": recs,
        "links": links, "slow_factor": opts.slow_factor, "slow_links": [[x["src"], x["dst"]] for x in links if x["slow"]],
        "slow_ranks": slow_ranks(links), "inject_delay": list(opts.inject_delay) if opts.inject_delay else None,
        "ranks": [{"rank": r, "host": i["host"], "node": i["node"]} for r, i in enumerate(infos)],
        "env": envs[0], "env_mismatch": mismatch, "preset": opts.preset, "preset_applied": preset_applied,
        "nccl_notes": NCCL_NOTES, "command": " ".join(sys.argv),
    }


def _knobs(op: str, nbytes: int, esize: int) -> dict[str, float | int]:
    """Recipe keys (`--set KEY=VALUE`) the size maps to: DDP counts MiB, DeepSpeed elements.

    FSDP2 has no bucket knob: each sharded unit is one all-gather and one reduce-scatter, so
    the same size says how small a unit may be before its collectives turn latency-bound.
    """
    elems = nbytes // esize // 2 * 2  # DeepSpeed wants an even allgather bucket
    if op == "all_reduce":
        return {"engine.ddp.bucket_cap_mb": nbytes / 2**20, "engine.deepspeed.reduce_bucket_size": elems}
    if op == "all_gather":
        return {"engine.deepspeed.allgather_bucket_size": elems, "engine.deepspeed.stage3_prefetch_bucket_size": elems}
    return {"engine.deepspeed.reduce_bucket_size": elems}


# ---------------------------------------------------------------- reporting

def format_report(rep: dict, markdown: bool = False) -> str:
    """The human-readable report: a table per collective, links, recommendations, environment."""
    head = (f"preflight: {rep['world_size']} rank(s) on {rep['nodes']} node(s), backend {rep['backend']}, "
            f"device {rep['device']}, {rep['dtype']}, {rep['iters']} iters after {rep['warmup']} warm-up, "
            f"load average {rep['loadavg_rank0'][0]:.1f} on rank 0's host")
    lines = [f"# scaletrain {head}" if markdown else f"scaletrain {head}", ""]
    cols = ["op", "size", "count", "time (us)", "algbw (GB/s)", "busbw (GB/s)"]
    lines += (["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] if markdown
              else [f"{cols[0]:<15}{cols[1]:>10}{cols[2]:>12}{cols[3]:>12}{cols[4]:>14}{cols[5]:>14}"])
    for op, rows in rep["collectives"].items():
        for r in rows:
            vals = [op, fmt_bytes(r["size_bytes"]), str(r["count"]), f"{r['time_us']:.1f}",
                    f"{r['algbw_gbps']:.3f}", f"{r['busbw_gbps']:.3f}"]
            lines.append("| " + " | ".join(vals) + " |" if markdown else
                         f"{vals[0]:<15}{vals[1]:>10}{vals[2]:>12}{vals[3]:>12}{vals[4]:>14}{vals[5]:>14}")
    bullet = "- " if markdown else "  "
    lines += ["", f"Links (ring neighbours, each way; slow = time > {rep['slow_factor']}x the median of the "
                  "other links of its class):"]
    for x in rep["links"]:
        lines.append(f"{bullet}{x['src']} -> {x['dst']} ({x['link_class']}): {x['gbps']:.3f} GB/s, "
                     f"{x['time_us']:.0f} us per {fmt_bytes(x['size_bytes'])}" + ("  SLOW" if x["slow"] else ""))
    if not rep["links"]:
        lines.append(f"{bullet}none (one rank)")
    for s in rep["slow_ranks"]:
        lines.append(f"{bullet}SLOW RANK {s['rank']} ({rep['ranks'][s['rank']]['node']}): every {s['side']} "
                     f"link is slow (peers {s['peers']})")
    if rep["recommendations"]:
        frac = next(iter(rep["recommendations"].values()))["fraction"]
        lines += ["", f"Recommended bucket sizes (smallest size reaching {100 * frac:.0f} % of the busbw plateau):"]
    for op, rec in rep["recommendations"].items():
        knobs = " ".join(f"--set {k}={v:g}" if isinstance(v, float) else f"--set {k}={v}" for k, v in rec["knobs"].items())
        note = "" if rec["plateau_reached"] else " (plateau not reached: a lower bound; rerun with a larger --max-size)"
        lines.append(f"{bullet}{op}: {fmt_bytes(rec['bucket_bytes'])} at plateau "
                     f"{rec['plateau_busbw_gbps']:.3f} GB/s{note} -> {knobs}")
    if rep["recommendations"]:
        lines.append(f"{bullet}FSDP2 has no bucket knob: a sharded unit smaller than the all-gather/reduce-scatter "
                     "size above spends its collectives on latency; shard coarser units.")
    lines += ["", "Environment (rank 0):"] + [f"{bullet}{k}={v}" for k, v in sorted(rep["env"].items())]
    if rep["preset_applied"]:
        lines.append(f"{bullet}preset {rep['preset']!r} set: " + " ".join(f"{k}={v}" for k, v in rep["preset_applied"].items()))
    for var, vals in rep["env_mismatch"].items():
        lines.append(f"{bullet}differs across ranks: {var}: " + "; ".join(f"{v!r} on ranks {rs}" for v, rs in vals.items()))
    lines += ["", "NCCL notes:"] + [f"{bullet}{n}" for n in rep["nccl_notes"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command line

def add_preflight_args(p: argparse.ArgumentParser) -> None:
    # Flag names avoid prefixes of torchrun's own flags (torchrun parses abbreviations).
    p.add_argument("--min-size", default="1KiB", help="smallest message (default 1KiB)")
    p.add_argument("--max-size", default="4MiB", help="largest message (default 4MiB: seconds on CPU; use 1GiB on GPUs)")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per size")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations per size")
    p.add_argument("--link-size", default=None, help="message size of the link test (default: --max-size)")
    p.add_argument("--slow-factor", type=float, default=2.0,
                   help="a link is slow when its time exceeds this x the median of its class (default 2)")
    p.add_argument("--nccl-preset", choices=sorted(NCCL_PRESETS), default=None,
                   help="set NCCL variables you have not set yourself (see docs/clusters.md, 'Preflight')")
    p.add_argument("--inject-delay", default=None, metavar="RANK:SECONDS",
                   help="sleep before each link-test send on RANK: check that the detector names it")
    p.add_argument("--json", dest="json_out", default=None, help="write the report as JSON (rank 0)")
    p.add_argument("--markdown", dest="md_out", default=None, help="write the report as Markdown (rank 0)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def options_from_args(args: argparse.Namespace) -> PreflightOptions:
    ops = tuple(o.strip() for o in args.ops.split(",") if o.strip())
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        raise ConfigError(f"--ops={args.ops!r} names {bad or 'nothing'}; use a comma-separated subset of {','.join(OPS)}")
    if args.iters < 1 or args.warmup < 0:
        raise ConfigError(f"--iters={args.iters} --warmup={args.warmup}: use iters >= 1 and warmup >= 0")
    if args.slow_factor <= 1:
        raise ConfigError(f"--slow-factor={args.slow_factor} flags every link; use a factor > 1, e.g. 2")
    delay = None
    if args.inject_delay:
        m = re.fullmatch(r"(\d+):(\d+(?:\.\d+)?)", args.inject_delay)
        if not m:
            raise ConfigError(f"--inject-delay={args.inject_delay!r} is not RANK:SECONDS; use e.g. 1:0.05")
        delay = (int(m.group(1)), float(m.group(2)))
    return PreflightOptions(
        min_size=parse_size(args.min_size, "--min-size"), max_size=parse_size(args.max_size, "--max-size"),
        ops=ops, dtype=args.dtype, iters=args.iters, warmup=args.warmup,
        link_size=parse_size(args.link_size, "--link-size") if args.link_size else None,
        slow_factor=args.slow_factor, preset=args.nccl_preset, inject_delay=delay)


def preflight_main(argv: list[str] | None = None) -> int:
    """Entry of `scaletrain preflight` on every rank (torchrun, deepspeed launcher, or one python)."""
    from scaletrain.distributed import init_distributed, shutdown_distributed

    p = argparse.ArgumentParser(prog="scaletrain preflight", description=__doc__.split("\n\n")[0])
    add_preflight_args(p)
    args = p.parse_args(argv)
    try:
        opts = options_from_args(args)
        sweep_sizes(opts.min_size, opts.max_size)
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"scaletrain: preflight error: {e}", file=sys.stderr)
        return 2
    applied = apply_preset(opts.preset)  # before the process group: NCCL reads env at init
    info = init_distributed("ddp")
    rep = run_preflight(opts, info.device, applied)
    if info.is_main:
        print(format_report(rep), end="", flush=True)
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps(rep, indent=1) + "\n")
        if args.md_out:
            Path(args.md_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.md_out).write_text(format_report(rep, markdown=True))
    shutdown_distributed()
    return 0

