"""What a Slurm job needs before any training process starts: its hosts, the rendezvous and
a DeepSpeed hostfile, from Slurm's environment, checked once (one-line errors).

``launchers/slurm/*.sbatch`` call ``scaletrain slurm plan``, which prints shell ``export``
lines (MASTER_ADDR, NNODES, NPROC_PER_NODE, ...) for the batch script to ``eval``. The node
list is expanded here rather than with ``scontrol show hostnames`` so that a malformed
``SLURM_JOB_NODELIST`` is one clear line before anything launches, and so the planner is
testable without a Slurm. Slurm's hostlist syntax: comma-separated names, each with bracketed
ranges or lists (``gpu[01-03,07]``, zero padding kept), possibly several brackets
(``rack[1-2]-n[1-2]``: their product).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

_NAME = re.compile(r"[A-Za-z0-9._-]+")
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a Slurm hostlist expression, in order; ValueError names what is wrong."""
    where = f"SLURM_JOB_NODELIST={nodelist!r}"
    hosts: list[str] = []
    for item in _split_top_level(nodelist, where):
        names = [""]
        rest = item
        while rest:
            m = _NAME.match(rest)
            if m:
                names = [n + m.group(0) for n in names]
                rest = rest[m.end():]
                continue
            if rest[0] != "[" or "]" not in rest:
                raise ValueError(f"{where} is malformed at {rest!r}: expected a host name or a [range]")
            inner, rest = rest[1:rest.index("]")], rest[rest.index("]") + 1:]
            names = [n + s for n in names for s in _expand_brackets(inner, where)]
        hosts += names
    if not hosts:
        raise ValueError(f"{where} names no host")
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"{where} names a host twice")
    return hosts


def _split_top_level(nodelist: str, where: str) -> list[str]:
    items, depth, cur = [], 0, ""
    for ch in nodelist.strip():
        depth += ch == "["
        depth -= ch == "]"
        if depth < 0 or depth > 1:
            raise ValueError(f"{where} is malformed: unbalanced brackets")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ValueError(f"{where} is malformed: unbalanced brackets")
    items.append(cur)
    if any(not i for i in items):
        raise ValueError(f"{where} is malformed: an empty name between commas")
    return items


def _expand_brackets(inner: str, where: str) -> list[str]:
    out: list[str] = []
    for part in inner.split(","):
        m = _RANGE.fullmatch(part)
        if not m:
            raise ValueError(f"{where} is malformed: [{inner}] holds {part!r}, not N or N-M")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"{where} is malformed: range {part!r} runs backwards")
        width = len(lo) if lo.startswith("0") else 0  # gpu[01-03]: zero padding is kept
        out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return out


def parse_hostfile(text: str, where: str = "hostfile") -> dict[str, int]:
    """DeepSpeed's hostfile (``HOST slots=N`` per line, # comments): host -> slots, or a
    ValueError naming the bad line."""
    hosts: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not m or int(m.group(2)) < 1:
            raise ValueError(f"{where} line {lineno} {raw.strip()!r} is not 'HOST slots=N' (N >= 1)")
        if m.group(1) in hosts:
            raise ValueError(f"{where} line {lineno} names {m.group(1)!r} a second time")
        hosts[m.group(1)] = int(m.group(2))
    if not hosts:
        raise ValueError(f"{where} lists no host")
    return hosts


def _gpus_on_node(env: Mapping[str, str]) -> int:
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key, "")
        m = re.search(r"(\d+)$", value)  # "8" or "h100:8"
        if m:
            return int(m.group(1))
    return 0


def plan(env: Mapping[str, str], *, nproc_per_node: int | None = None, port: int | None = None) -> dict[str, str]:
    """The job's rendezvous from Slurm's environment: first host of the node list as master,
    one launcher task per node, ``nproc_per_node`` ranks per node (default: the GPUs Slurm
    gave the node, else 1), a port derived from the job id (two jobs sharing a first node
    do not collide)."""
    if "SLURM_JOB_ID" not in env:
        raise ValueError("SLURM_JOB_ID is not set: run this inside a Slurm job (sbatch launchers/slurm/...)")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ValueError("SLURM_JOB_NODELIST is not set: run this inside a Slurm job")
    hosts = expand_nodelist(nodelist)
    nnodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or str(len(hosts))
    if not nnodes.isdigit() or int(nnodes) != len(hosts):
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} has {len(hosts)} hosts but SLURM_JOB_NUM_NODES={nnodes}")
    nproc = nproc_per_node or _gpus_on_node(env) or 1
    job_id = env["SLURM_JOB_ID"]
    if port is None:
        port = 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000
    return {
        "MASTER_ADDR": hosts[0], "MASTER_PORT": str(port), "NNODES": str(len(hosts)), "NPROC_PER_NODE": str(nproc),
        "JOB_WORLD_SIZE": str(len(hosts) * nproc), "SCALETRAIN_HOSTS": " ".join(hosts),
        "RESTART_COUNT": env.get("SLURM_RESTART_COUNT", "0"),
    }


def _plan_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scaletrain slurm plan",
                                description="print the job's rendezvous as shell exports (for eval in an sbatch script)")
    p.add_argument("--nproc-per-node", type=int, default=None, help="ranks per node (default: GPUs on the node, else 1)")
    p.add_argument("--port", type=int, default=None, help="rendezvous port (default: 20000 + job id mod 20000)")
    p.add_argument("--hostfile", default=None,
                   help="write a DeepSpeed hostfile (HOST slots=NPROC_PER_NODE) here; an existing one given by "
                        "DS_HOSTFILE is checked instead")
    args = p.parse_args(argv)
    try:
        out = plan(os.environ, nproc_per_node=args.nproc_per_node, port=args.port)
        if os.environ.get("DS_HOSTFILE"):
            given = Path(os.environ["DS_HOSTFILE"])
            if not given.is_file():
                raise ValueError(f"DS_HOSTFILE={str(given)!r} does not exist")
            hosts = parse_hostfile(given.read_text(), f"DS_HOSTFILE={str(given)!r}")
            missing = [h for h in out["SCALETRAIN_HOSTS"].split() if h not in hosts]
            if missing:
                raise ValueError(f"DS_HOSTFILE={str(given)!r} lacks {missing[0]!r}, a node of this job")
            out["HOSTFILE"] = str(given)
        elif args.hostfile:
            path = Path(args.hostfile)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(f"{h} slots={out['NPROC_PER_NODE']}\n" for h in out["SCALETRAIN_HOSTS"].split()))
            out["HOSTFILE"] = str(path)
    except ValueError as e:
        print(f"scaletrain: {e}", file=sys.stderr)
        return 2
    print("".join(f"export {k}={shlex.quote(v)}\n" for k, v in out.items()), end="")
    return 0


if __name__ == "__main__":  # launchers/slurm/common.sh: `python -m scaletrain.slurm plan ...` (no torch import)
    if sys.argv[1:2] != ["plan"]:
        sys.exit("usage: python -m scaletrain.slurm plan [--nproc-per-node N] [--port P] [--hostfile FILE]")
    sys.exit(_plan_main(sys.argv[2:]))
