"""Check ``scaletrain size``'s scaling model where it can be measured on one machine: 1 -> 2
ranks on one host, and 1 -> 2 hosts over a slow link.

The two hosts are network namespaces joined by a veth pair (``tests/e2e/netns.py``), with both
ends of the veth rate-limited by ``tc`` (tbf) so that the inter-node term dominates the step.
Per engine and round, back to back:

1. two loaded 1-rank copies of the cell (the compute basis ``scaletrain bench`` predicts N
   ranks from: both ranks of an N-rank run share this host's 2 cores);
2. the cell at 2 ranks on one host (loopback);
3. the cell at 1 rank on each of the two hosts, over the limited veth;

and per round the collective sweep (``scaletrain preflight``) on each of the two set-ups,
measured first. The prediction for (2) and (3) is ``scaling.plan_step`` (what ``scaletrain
size`` prints) from (1), the set-up's own sweep as its link, and an overlap eta fitted on data
this check does not predict: the committed bench file ``--eta-bench`` (its multi-rank cells
against its own sweep, a different run). Each prediction is made, time-stamped and written to
``--out`` before the cell it predicts is launched; the measurement is stored beside it with its
own start time, so the file shows that no prediction saw its measurement (schema 2; the unit
test checks the order). The global batch is the same at 1 and 2 ranks (2 x the cell's
micro-batch). The bar (issue 17): predicted step time within +-20 % of measured. Needs root, ``ip netns`` and ``tc``.

    python benchmarks/two_host_scaling.py --rate 50mbit --out benchmarks/results/cpu_two_hosts.json

writes the JSON and a Markdown table beside it (``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scaletrain.bench.runner import (cell_records, launch, launch_loaded, solo_basis,  # noqa: E402
                                     summarize_cell, write_cell_spec, add_loaded)
from scaletrain.bench.scaling import Fabric, fit_micro_time, per_hop, plan_step, step_comms  # noqa: E402
from scaletrain.bench.sizing import comm_from_sweep, eta_from_bench, model_facts  # noqa: E402
from tests.e2e import netns  # noqa: E402

BAR = 0.20


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)


def limit_link(hosts, rate: str) -> None:
    """Both directions of the veth: egress of each end through a token bucket (tbf; this
    machine's kernel has no netem) with a queue long enough (1 s) that bursts wait instead of
    being dropped, and a bucket larger than one GSO packet."""
    for h in hosts:
        sh("ip", "netns", "exec", h.netns, "tc", "qdisc", "add", "dev", h.ifname, "root", "tbf",
           "rate", rate, "burst", "128kb", "latency", "1000ms")


def torchrun_on(hosts, module_args: list[str], port: int, timeout: float) -> list[subprocess.CompletedProcess]:
    def cmd(h) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(hosts)), "--nproc_per_node", "1",
                "--node_rank", str(h.node_rank), "--master_addr", hosts[0].ip, "--master_port", str(port),
                *module_args]
    env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return netns.launch_on(hosts, cmd, env=env, cwd=str(REPO), timeout=timeout)


def sweep_one_host(path: Path, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "scaletrain.cli", "preflight", *sweep_flags(args), "--json", str(path)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise SystemExit(f"one-host sweep failed:\n{r.stderr[-3000:]}")
    return json.loads(path.read_text())


def sweep_flags(args) -> list[str]:
    return ["--max-size", args.sweep_max, "--link-size", "1MiB", "--iters", str(args.sweep_iters), "--warmup", "2"]


def sweep_two_hosts(hosts, path: Path, port: int, args) -> dict:
    res = torchrun_on(hosts, ["-m", "scaletrain.cli", "preflight", *sweep_flags(args), "--json", str(path)],
                      port, 1800)
    if any(r.returncode for r in res):
        raise SystemExit("two-host sweep failed:\n" + "\n".join(r.stderr[-2000:] for r in res))
    return json.loads(path.read_text())


def cell_two_hosts(hosts, spec: dict, work: Path, port: int, args) -> dict:
    path = write_cell_spec(spec, work)
    res = torchrun_on(hosts, ["-m", "scaletrain.bench.cell", "--cell", path], port, args.timeout)
    records = cell_records(path, 2)
    if len(records) < 2:
        raise SystemExit("two-host cell failed:\n" + "\n".join(r.stderr[-2000:] for r in res))
    return summarize_cell(records, cell_of(spec))


def cell_of(spec: dict) -> dict:
    """The cell fields ``summarize_cell`` records (the spec minus paths and launch settings)."""
    return {k: spec[k] for k in ("preset", "resolution", "engine", "micro_batch", "world_size", "warmup", "reps")}


def predict(engine: str, preset: str, micro: int, solo_step: float, sweep: dict, gpus_per_node: int,
            eta: float) -> dict:
    """``scaletrain size``'s step at 2 GPUs and global batch 2 x micro, from one measured 1-GPU
    step at ``micro`` and a 2-rank sweep of the link the two GPUs talk over."""
    link = per_hop(comm_from_sweep(sweep["collectives"], 2), 2)
    fabric = Fabric(link, link, gpus_per_node)  # gpus_per_node 1: the sweep's link is the inter-node one
    comms = step_comms(engine, model_facts(preset), "fp32", gpus_per_node, 2)
    plan = plan_step(gpus=2, global_batch=2 * micro, max_micro=micro,
                     micro_time=fit_micro_time([(micro, solo_step)], "loaded 1-rank cell"), comms=comms,
                     fabric=fabric, eta=eta)
    return {"step_seconds": plan.step_seconds, "comm_seconds": plan.comm_seconds,
            "exposed_seconds": plan.exposed_seconds, "micro": plan.micro, "accum": plan.accum,
            "link_busbw_gbps": {op: bw / 1e9 for op, bw in link.busbw.items()},
            "link_latency_us_per_hop": {op: v * 1e6 for op, v in link.latency.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", default="50mbit", help="tc (tbf) rate of each direction of the inter-host veth")
    p.add_argument("--engines", nargs="+", default=["ddp", "fsdp"])
    p.add_argument("--preset", default="unet-tiny")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=4, help="per rank; the global batch is twice this")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sweep-max", default="8MiB")
    p.add_argument("--sweep-iters", type=int, default=5)
    p.add_argument("--eta-bench", default=str(REPO / "benchmarks/results/cpu_matrix_rounds.json"),
                   help="bench file the overlap eta is fitted on (data this check does not predict)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--work", default="/tmp/scaletrain-two-hosts")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    reason = netns.unavailable_reason()
    if reason:
        print(f"two_host_scaling: {reason}", file=sys.stderr)
        return 2

    from scaletrain.data.synth import write_synthetic_shards

    work = Path(args.work)
    shards = work / "shards"
    if not shards.is_dir():
        write_synthetic_shards(str(shards), num_samples=256, samples_per_shard=32, resolution=args.resolution, seed=0)
    base = {"preset": args.preset, "resolution": args.resolution, "micro_batch": args.micro_batch,
            "precision": "fp32", "activation_checkpointing": "none", "compile": False, "num_workers": 1,
            "shards": str(shards), "max_memory_gib": None, "peak_tflops": None, "warmup": args.warmup,
            "reps": args.reps, "run_dir": str(work / "run")}
    load_before = os.getloadavg()
    t0 = time.time()
    # Overlap, fitted before anything runs on data this check does not predict.
    eta, n_eta = eta_from_bench(json.loads(Path(args.eta_bench).read_text()))
    eta = 0.0 if eta is None else eta
    eta_src = f"fitted on {Path(args.eta_bench).name} ({n_eta} multi-rank cells, another run)"
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
    import torch

    out = {"schema": "scaletrain.two_host_scaling/2", "command": "python " + " ".join(sys.argv),
           "git_commit": git, "git_dirty": dirty, "torch": torch.__version__, "python": platform.python_version(),
           "cpus": os.cpu_count(), "loadavg_before": load_before, "seconds": None,
           "link": {"qdisc": "tbf", "rate": args.rate, "burst": "128kb", "latency": "1000ms"},
           "preset": args.preset, "resolution": args.resolution, "micro_batch": args.micro_batch,
           "global_batch": 2 * args.micro_batch, "bar": BAR, "eta": eta, "eta_source": eta_src,
           "rows": [], "rounds": []}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every prediction and every measurement
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")

    port = 29700
    for k in range(args.rounds):
        rnd: dict = {"engines": {}}
        out["rounds"].append(rnd)
        with netns.two_hosts() as hosts:
            limit_link(hosts, args.rate)
            port += 1
            rnd["sweep_two_hosts"] = sweep_two_hosts(hosts, work / f"sweep2h-{k}.json", port, args)
            rnd["sweep_one_host"] = sweep_one_host(work / f"sweep1h-{k}.json", args)
            for engine in args.engines:
                spec = {**base, "engine": engine, "world_size": 1}
                solo = summarize_cell(launch(spec, 1, work, args.timeout), cell_of(spec))
                add_loaded(solo, launch_loaded(spec, 2, work, args.timeout))
                if solo["status"] != "ok" or solo["loaded"]["status"] != "ok":
                    raise SystemExit(f"{engine} 1-rank cell failed: {solo.get('error') or solo['loaded']}")
                rnd["engines"][engine] = {"solo": solo}
                t_solo = solo_basis(solo)[0]
                for setup, key, sweep, g in (("2 ranks, one host", "one_host", rnd["sweep_one_host"], 2),
                                             ("2 hosts, limited veth", "two_hosts", rnd["sweep_two_hosts"], 1)):
                    pred = predict(engine, args.preset, args.micro_batch, t_solo, sweep, g, eta)
                    pred0 = predict(engine, args.preset, args.micro_batch, t_solo, sweep, g, 0.0)
                    row = {"round": k, "engine": engine, "setup": setup,
                           "solo_idle_step_s": solo["step_seconds"]["median"], "solo_loaded_step_s": t_solo,
                           "eta": eta, "eta_source": eta_src, "predicted": pred,
                           "predicted_eta0_step_s": pred0["step_seconds"], "predicted_at": time.time()}
                    out["rows"].append(row)
                    save()  # on disk before the cell it predicts starts
                    row["measured_started_at"] = time.time()
                    if key == "one_host":
                        cell = summarize_cell(launch({**spec, "world_size": 2}, 2, work, args.timeout),
                                              cell_of({**spec, "world_size": 2}))
                    else:
                        port += 1
                        cell = cell_two_hosts(hosts, {**spec, "world_size": 2}, work, port, args)
                    if cell["status"] != "ok":
                        raise SystemExit(f"{engine} {setup} cell failed: {cell.get('error')}")
                    rnd["engines"][engine][key] = cell
                    measured = cell["step_seconds"]["median"]
                    row.update(measured_at=time.time(), measured_step_s=measured,
                               measured_p25_p75=[cell["step_seconds"]["p25"], cell["step_seconds"]["p75"]],
                               error=pred["step_seconds"] / measured - 1,
                               error_eta0=pred0["step_seconds"] / measured - 1)
                    save()
                print(f"round {k} {engine}: loaded 1-rank {t_solo:.3f} s, 2 ranks one host "
                      f"{rnd['engines'][engine]['one_host']['step_seconds']['median']:.3f} s, 2 hosts "
                      f"{rnd['engines'][engine]['two_hosts']['step_seconds']['median']:.3f} s", flush=True)
    out.update(loadavg_after=os.getloadavg(), seconds=time.time() - t0)
    save()
    Path(args.out).with_suffix(".md").write_text(markdown(out))
    print(markdown(out))
    worst = max(abs(r["error"]) for r in out["rows"])
    return 0 if worst <= BAR else 1


def markdown(out: dict) -> str:
    lines = [f"# Sizing model vs measured: 1 -> 2 ranks and 1 -> 2 hosts ({out['preset']}, {out['resolution']} px, "
             f"global batch {out['global_batch']})", "",
             f"Written by `{out['command']}` at commit {out['git_commit'][:10]}"
             f"{' (dirty tree)' if out['git_dirty'] else ''}; torch {out['torch']}, {out['cpus']} CPUs, load average "
             f"{out['loadavg_before'][0]:.1f} before and {out['loadavg_after'][0]:.1f} after; "
             f"{out['seconds'] / 60:.0f} min.", "",
             f"Inter-host link: veth between two network namespaces, each direction limited by `tc qdisc ... tbf rate "
             f"{out['link']['rate']} burst {out['link']['burst']} latency {out['link']['latency']}`. Prediction = `scaletrain size`'s step "
             "(`scaling.plan_step`) from the loaded 1-rank step, the set-up's own collective sweep and eta "
             f"{out['eta']:.2f} {out['eta_source']}. Each prediction was written to the JSON before its cell "
             "started (`predicted_at` < `measured_started_at` in every row). Bar: within +-20 %.", "",
             "| round | engine | set-up | 1-rank step s (idle / loaded) | link busbw GB/s (all-reduce) | eta | "
             "comm s (all) | predicted step s | measured step s (p25-p75) | error | error at eta 0 |",
             "|" + "---|" * 11]
    for r in out["rows"]:
        p = r["predicted"]
        lines.append(f"| {r['round']} | {r['engine']} | {r['setup']} | {r['solo_idle_step_s']:.3f} / "
                     f"{r['solo_loaded_step_s']:.3f} | {p['link_busbw_gbps']['all_reduce']:.4f} | {r['eta']:.2f} | "
                     f"{p['comm_seconds']:.3f} | {p['step_seconds']:.3f} | {r['measured_step_s']:.3f} "
                     f"({r['measured_p25_p75'][0]:.3f}-{r['measured_p25_p75'][1]:.3f}) | {r['error']:+.1%} | "
                     f"{r['error_eta0']:+.1%} |")
    worst = {s: max(abs(r["error"]) for r in out["rows"] if r["setup"] == s) for s in {r["setup"] for r in out["rows"]}}
    lines += ["", "Worst error: " + ", ".join(f"{s} {w:.1%}" for s, w in sorted(worst.items()))
              + f" (bar {out['bar']:.0%})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
