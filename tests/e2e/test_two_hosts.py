"""Two hosts, one rank each, over a real network link: two network namespaces joined by a veth
pair (10.200.0.1 and 10.200.0.2, see tests/e2e/netns.py).

The same pre-training recipe and seed run three ways: on one host with 2 ranks (the reference),
across the two hosts with `torchrun --nnodes 2` (c10d rendezvous on host A's IP), and across
the two hosts with the `deepspeed` launcher's multi-node mode (a hostfile naming both IPs,
each node started with --no_ssh --node_rank K, as on a cluster without pdsh). The per-step
losses must match the reference, and the veth counters must show the gradients really
crossed the link. Runs by default where root and `ip netns` work (CI runs as root);
skips with the reason otherwise.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import require_or_skip, BIN, REPO, run_cmd, shard_pattern
from tests.distributed.util import free_port, read_metrics
from tests.e2e import netns

pytestmark = pytest.mark.e2e

STEPS = 4
# Same bound and reasoning as tests/distributed/test_engine_equivalence.py: only float
# summation order may differ (measured there: 0 for ZeRO-3 vs FSDP2), a real bug moves the
# loss by > 1e-2.
RTOL = 1e-5


@pytest.fixture(scope="module")
def hosts():
    reason = netns.unavailable_reason()
    if reason:
        require_or_skip("netns", f"two-host test: {reason}")
    with netns.two_hosts() as pair:
        yield pair


def _recipe(synth_shards, run_dir, *extra: str) -> list[str]:
    sets = [
        f"data.shards={shard_pattern(synth_shards)}", "data.split=sample", "data.shuffle_buffer=0",
        "data.num_workers=0", f"run.dir={run_dir}", "log.wandb=disabled", "log.progress=false",
        "sample.at_end=false", "validate.every_steps=0", "validate.at_end=false", "optim.warmup_steps=0", "checkpoint.at_stage_end=false",
        f"train.stages=[{{name: s0, resolution: 32, steps: {STEPS}, micro_batch: 4, grad_accum: 1, global_batch: 8}}]",
        *extra,
    ]
    return ["launchers/pretrain.py", "--config", "configs/demo.yaml", *[x for s in sets for x in ("--set", s)]]


# Threads fixed for comparable float results (torchrun sets 1 only when it starts >1 process).
# CPU and gloo even on a GPU machine: both "hosts" would otherwise share its GPU 0.
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def reference(synth_shards, tmp_path_factory) -> list[float]:
    run_dir = tmp_path_factory.mktemp("one-host")
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *_recipe(synth_shards, run_dir)]
    r = run_cmd(cmd, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    losses = [m["loss"] for m in read_metrics(run_dir)]
    assert len(losses) == STEPS and len(set(losses)) == STEPS
    return losses


def _link_bytes(h: netns.Host) -> tuple[int, int]:
    out = subprocess.run(["ip", "-n", h.netns, "-s", "-j", "link", "show", "dev", h.ifname],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    stats = json.loads(out)[0]["stats64"]
    return stats["tx"]["bytes"], stats["rx"]["bytes"]


def _run_two_hosts(hosts, cmd_for) -> None:
    before = [_link_bytes(h) for h in hosts]
    results = netns.launch_on(hosts, cmd_for, env=ENV, cwd=str(REPO), timeout=480)
    for h, r in zip(hosts, results):
        assert r.returncode == 0, f"host {h.ip} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    # ~1 M parameters: every step all-gathers and reduce-scatters megabytes across the link.
    for h, b in zip(hosts, before):
        tx, rx = _link_bytes(h)
        assert tx - b[0] > 1_000_000 and rx - b[1] > 1_000_000, f"{h.ifname}: little traffic over the veth"


def _assert_same_curve(run_dir, reference, engine):
    losses = [m["loss"] for m in read_metrics(run_dir)]
    assert losses == pytest.approx(reference, rel=RTOL), f"two hosts {losses} vs one host {reference}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["engine"] == engine


def test_torchrun_two_nodes(hosts, synth_shards, reference, tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    a = hosts[0]

    def cmd(h: netns.Host) -> list[str]:
        # torchrun guesses from the hostname whether it hosts the rendezvous store and what address
        # to publish; on a node whose training IP is not its hostname's (a secondary NIC, as
        # here) both guesses are wrong, so say them: is_host on host A, --local-addr on each.
        return [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"{a.ip}:{port}", "--rdzv-id", f"two-hosts-{port}", "--local-addr", h.ip,
                "--rdzv-conf", f"is_host={int(h is a)}",
                *_recipe(synth_shards, run_dir, "engine.kind=fsdp")]

    _run_two_hosts(hosts, cmd)
    _assert_same_curve(run_dir, reference, "fsdp")


def test_deepspeed_launcher_two_nodes(hosts, synth_shards, reference, tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    hostfile = tmp_path / "hosts"
    hostfile.write_text("".join(f"{h.ip} slots=1\n" for h in hosts))

    def cmd(h: netns.Host) -> list[str]:
        return [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(h.node_rank),
                "--master_addr", hosts[0].ip, "--master_port", str(port),
                *_recipe(synth_shards, run_dir, "engine.kind=deepspeed", "engine.deepspeed_config=ds_configs/zero3.json")]

    _run_two_hosts(hosts, cmd)
    _assert_same_curve(run_dir, reference, "deepspeed")


def test_preflight_across_hosts(hosts, tmp_path):
    """The link test sees two nodes joined by an inter-node link, in both directions."""
    out, port = tmp_path / "pf.json", free_port()

    def cmd(h: netns.Host) -> list[str]:
        return [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(h.node_rank),
                "--master_addr", hosts[0].ip, "--master_port", str(port), "-m", "scaletrain.cli", "preflight",
                "--max-size", "64KiB", "--iters", "5", "--warmup", "1", "--json", str(out)]

    results = netns.launch_on(hosts, cmd, env=ENV, cwd=str(REPO), timeout=300)
    assert all(r.returncode == 0 for r in results), [r.stderr[-2000:] for r in results]
    rep = json.loads(out.read_text())
    assert rep["world_size"] == 2 and rep["nodes"] == 2
    assert {(x["src"], x["dst"], x["link_class"]) for x in rep["links"]} == {(0, 1, "inter-node"), (1, 0, "inter-node")}
    assert rep["env"]["GLOO_SOCKET_IFNAME"] == hosts[0].ifname and rep["env"]["MASTER_ADDR"] == hosts[0].ip
