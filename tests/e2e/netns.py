"""Two "hosts" on one machine: two network namespaces joined by a veth pair, each with its own IP.

Each namespace has only its loopback and its end of the veth, so a process launched with
``ip netns exec`` in host A reaches host B over that link and nothing else, as two nodes on
a private network would (the filesystem stays shared, like a cluster's NFS). Needs root and
``ip netns``. Also a script, to reproduce the benchmarks by hand:

    python -m tests.e2e.netns -- torchrun --nnodes 2 --nproc_per_node 1 --node_rank {node_rank} \\
        --master_addr {master} --master_port 29611 -m scaletrain.cli preflight

runs the command on both hosts at once, with ``{node_rank}``, ``{master}`` (host A's IP) and
``{ifname}`` (that host's veth, exported as GLOO_SOCKET_IFNAME too) and ``{ip}`` (that host's
address) filled in per host.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

SUBNET = "10.200.0.{}/24"
_counter = itertools.count()


@dataclass(frozen=True)
class Host:
    netns: str
    ifname: str
    ip: str
    node_rank: int

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def unavailable_reason() -> str | None:
    """Why two namespaced hosts cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns add)"
    if not shutil.which("ip"):
        return "iproute2 `ip` not found"
    probe = f"stprobe{os.getpid()}x{next(_counter)}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


@contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    """Create hosts A (10.200.0.1) and B (10.200.0.2); always removed on exit, even on failure.

    Names carry the pid and a counter so concurrent runs never collide; the addresses may
    repeat across runs because each pair lives only inside its own namespaces.
    """
    tag = f"{os.getpid()}{next(_counter)}"
    hosts = tuple(Host(f"st{tag}{c}", f"v{tag}{c}", SUBNET.format(i + 1).split("/")[0], i)
                  for i, c in enumerate("ab"))
    a, b = hosts
    created: list[str] = []
    try:
        for h in hosts:
            _ip("netns", "add", h.netns)
            created.append(h.netns)
        _ip("link", "add", a.ifname, "type", "veth", "peer", "name", b.ifname)
        for i, h in enumerate(hosts):
            _ip("link", "set", h.ifname, "netns", h.netns)
            _ip("-n", h.netns, "addr", "add", SUBNET.format(i + 1), "dev", h.ifname)
            _ip("-n", h.netns, "link", "set", h.ifname, "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")  # torchrun/gloo also talk to themselves
        yield a, b
    finally:
        # Deleting a namespace destroys the veth end inside it (and so the pair).
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", a.ifname], capture_output=True, timeout=30)  # if never moved


def host_env(h: Host, master: Host) -> dict[str, str]:
    """What a node needs to talk over its veth: gloo bound to it, the rendezvous on host A."""
    return {"GLOO_SOCKET_IFNAME": h.ifname, "TP_SOCKET_IFNAME": h.ifname, "NCCL_SOCKET_IFNAME": h.ifname,
            "MASTER_ADDR": master.ip}


def launch_on(hosts: tuple[Host, Host], cmd_for, *, env: dict[str, str], cwd: str,
              timeout: float) -> list[subprocess.CompletedProcess]:
    """Start ``cmd_for(host)`` on every host at once and wait for all; kill the rest if one hangs."""
    procs = []
    for h in hosts:  # `ip netns exec` keeps the caller's environment
        full_env = {**os.environ, **env, **host_env(h, hosts[0])}
        procs.append(subprocess.Popen(h.exec_prefix() + cmd_for(h), cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:  # a node that outlived the timeout: its whole process group
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return results


def _main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(__doc__)
        return 2
    reason = unavailable_reason()
    if reason:
        print(f"netns: {reason}", file=sys.stderr)
        return 2
    # SIGTERM (e.g. from `timeout`) must still run the clean-up in two_hosts/launch_on.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with two_hosts() as hosts:
        def fill(h: Host) -> list[str]:  # plain replace: recipes contain other braces ({name: ...})
            subs = {"{node_rank}": str(h.node_rank), "{master}": hosts[0].ip, "{ifname}": h.ifname, "{ip}": h.ip}
            out = []
            for x in argv:
                for k, v in subs.items():
                    x = x.replace(k, v)
                out.append(x)
            return out

        results = launch_on(hosts, fill, env={}, cwd=os.getcwd(), timeout=3600)
    for h, r in zip(hosts, results):
        print(f"===== host {h.node_rank} ({h.ip}) exit {r.returncode}\n{r.stdout}", end="")
        print(r.stderr, end="", file=sys.stderr)
    return max(r.returncode for r in results)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
