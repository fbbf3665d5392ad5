"""Soak: random SIGKILLs with automatic relaunch; the final weights must be bit-identical to an
uninterrupted run's.

    python benchmarks/soak.py --engine fsdp --kills 20 --out benchmarks/results/soak_fsdp.json
    python benchmarks/soak.py --engine deepspeed --kills 20 --out benchmarks/results/soak_deepspeed.json

One uninterrupted 2-rank run of the recipe first (the reference), then the same command in a
loop: launch it, SIGKILL one of its ranks (chosen at random) either at a random moment or while
a checkpoint is being written (a ``.partial`` folder exists: mid-save), wait for the launcher to
exit, relaunch the same command. After ``--kills`` kills the last launch runs to the end. A
checkpoint is written every step, so every kill costs at most one step plus a start-up; random
kills land within ``--window`` seconds after the launch's first trained step, mid-save kills in
its 1st to 3rd save.

Recorded (JSON + a Markdown summary beside it): kills (mid-save among them), launches,
resumes and the step each resumed from, partial loads (a resume that had to skip an unusable
checkpoint: must be 0), the final weights' comparison with the reference (bit for bit), the
soak's wall time and the time lost against the reference. Exit status 1 when the weights
differ or a partial load happened.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _command(run_dir: Path, shards: str, engine: str, steps: int, port: int) -> list[str]:
    sets = [f"data.shards={shards}", "data.split=sample", "data.shuffle_buffer=64", "data.num_workers=1",
            f"run.dir={run_dir}", "log.wandb=disabled", "log.progress=false", "sample.at_end=false",
            "validate.every_steps=0", "validate.at_end=false", "checkpoint.every_steps=1", "checkpoint.keep_last=2",
            f"train.stages=[{{name: a, resolution: 32, steps: {steps // 2}, micro_batch: 4, global_batch: 8}}, "
            f"{{name: b, resolution: 32, steps: {steps - steps // 2}, micro_batch: 2, global_batch: 4}}]",
            f"engine.kind={engine}", "engine.deepspeed_config=ds_configs/zero3.json"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(port), "launchers/pretrain.py", "--config", "configs/demo.yaml",
            *[x for s in sets for x in ("--set", s)]]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from scaletrain.checkpoint.export import consolidated_state_dict, resolve_checkpoint

    return consolidated_state_dict(resolve_checkpoint(run_dir))


def _run_to_end(cmd_for, log) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd_for(), cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log(proc.stdout + proc.stderr)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def _metric_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _launch_and_kill(cmd: list[str], run_dir: Path, rng: random.Random, mid_save: bool,
                     window: tuple[float, float], log) -> dict:
    """One launch, killed: at a random moment after this launch's first trained step, or during
    the 1st-3rd checkpoint save it starts (a new ``.partial`` folder). Returns what happened."""
    ckpts = run_dir / "checkpoints"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    t0 = time.perf_counter()
    killed_at, when = None, "random"
    lines0, deadline = _metric_lines(run_dir), None
    target_save, saves_seen, in_save = rng.randint(1, 3), 0, False
    # A killed save's .partial stays until the relaunch's checkpoint manager removes it; only a
    # .partial this launch writes is a save in progress.
    stale = {p.name for p in ckpts.iterdir() if p.name.endswith(".partial")} if ckpts.is_dir() else set()
    while proc.poll() is None:
        now = time.perf_counter()
        partials = {p.name for p in ckpts.iterdir() if p.name.endswith(".partial")} if ckpts.is_dir() else set()
        stale &= partials  # once gone, a folder of that name is a new save
        saving = bool(partials - stale)
        if saving and not in_save:
            saves_seen += 1
        in_save = saving
        if deadline is None and _metric_lines(run_dir) > lines0:  # this launch trained a step
            deadline = now + rng.uniform(*window)
        fire = (saving and saves_seen >= target_save) if mid_save else (deadline is not None and now >= deadline)
        if fire or now - t0 > 900:
            ranks = [c for c in psutil.Process(proc.pid).children() if "pretrain.py" in " ".join(c.cmdline())]
            if ranks:
                ranks[rng.randrange(len(ranks))].send_signal(signal.SIGKILL)
                killed_at, when = now - t0, ("mid-save" if saving else "random")
                break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=600)
    log(out)
    return {"killed": killed_at is not None, "when": when, "seconds": time.perf_counter() - t0,
            "rc": proc.returncode, "resumed_from": _resumed(out), "skipped_checkpoints": out.count("skipping checkpoint"),
            "finished": "done:" in out}


def _resumed(out: str) -> int | None:
    m = re.search(r"resumed at step (\d+)", out)
    return int(m.group(1)) if m else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=["fsdp", "deepspeed"], default="fsdp")
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--steps", type=int, default=120, help="enough that every kill lands before the end")
    p.add_argument("--mid-save-share", type=float, default=0.5, help="share of kills aimed at an open save")
    p.add_argument("--window", type=float, nargs=2, default=(0.0, 8.0),
                   help="random kill time after the launch's first trained step (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/scaletrain_soak")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import shutil

    from scaletrain.data.synth import write_synthetic_shards

    work = Path(args.work) / args.engine
    shutil.rmtree(work, ignore_errors=True)
    write_synthetic_shards(work / "shards", num_samples=256, samples_per_shard=32, resolution=64, seed=0)
    shards = str(work / "shards" / "shard-{000000..000007}.tar")
    log_file = open(work / "soak.log", "w")

    def log(text: str) -> None:
        log_file.write(text + "\n")
        log_file.flush()

    rng = random.Random(args.seed)
    ref_dir, soak_dir = work / "reference", work / "soak"
    rc, _, ref_seconds = _run_to_end(lambda: _command(ref_dir, shards, args.engine, args.steps, _free_port()), log)
    if rc != 0:
        print(f"reference run failed (rc={rc}); see {work / 'soak.log'}", file=sys.stderr)
        return 2
    launches = []
    t0 = time.perf_counter()
    kills = 0
    while kills < args.kills:
        mid = rng.random() < args.mid_save_share
        rec = _launch_and_kill(_command(soak_dir, shards, args.engine, args.steps, _free_port()),
                               soak_dir, rng, mid, tuple(args.window), log)
        launches.append(rec)
        if rec["finished"] and not rec["killed"]:
            break  # the run ended before a kill landed: nothing left to interrupt
        kills += rec["killed"]
        print(f"kill {kills}/{args.kills}: {rec['when']} after {rec['seconds']:.1f}s "
              f"(resumed from {rec['resumed_from']})", flush=True)
    rc, out, seconds = _run_to_end(lambda: _command(soak_dir, shards, args.engine, args.steps, _free_port()), log)
    launches.append({"killed": False, "when": None, "seconds": seconds, "rc": rc, "resumed_from": _resumed(out),
                     "skipped_checkpoints": out.count("skipping checkpoint"), "finished": "done:" in out})
    soak_seconds = time.perf_counter() - t0
    ref, got = _final_weights(ref_dir), _final_weights(soak_dir)
    identical = ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    result = {
        "command": "python benchmarks/soak.py " + " ".join(sys.argv[1:]),
        "host": {"platform": platform.platform(), "torch": torch.__version__},
        "engine": args.engine, "steps": args.steps, "kills": sum(x["killed"] for x in launches),
        "mid_save_kills": sum(x["killed"] and x["when"] == "mid-save" for x in launches),
        "launches": len(launches), "resumes": sum(x["resumed_from"] is not None for x in launches),
        "resumed_from_steps": [x["resumed_from"] for x in launches],
        "partial_loads": sum(x["skipped_checkpoints"] for x in launches),
        "final_rc": rc, "final_weights_bit_identical": identical, "tensors_compared": len(ref),
        "reference_seconds": ref_seconds, "soak_seconds": soak_seconds,
        "time_lost_seconds": soak_seconds - ref_seconds, "launch_records": launches,
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    md = "\n".join([
        f"# Soak: {args.engine}, {result['kills']} SIGKILLs ({result['mid_save_kills']} mid-save), {args.steps} steps, 2 ranks",
        "", f"Command: `{result['command']}`", "",
        "| kills | mid-save | launches | resumes | partial loads | final weights vs uninterrupted | reference s | soak s | time lost s |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {result['kills']} | {result['mid_save_kills']} | {result['launches']} | {result['resumes']} | "
        f"{result['partial_loads']} | {'bit-identical' if identical else 'DIFFERENT'} ({len(ref)} tensors) | "
        f"{ref_seconds:.0f} | {soak_seconds:.0f} | {soak_seconds - ref_seconds:.0f} |", "",
        f"Resumed from steps: {result['resumed_from_steps']}", ""])
    out_path.with_suffix(".md").write_text(md)
    print(md)
    return 0 if identical and result["partial_loads"] == 0 and rc == 0 and result["resumes"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
