"""One place that launches ranks for the tests: command builders (torchrun, deepspeed, plain
python), ``--set`` lists, a runner that never leaves a process behind, and batches of recipes
that share one 2-rank launch.

Why batches: a 2-rank launch of a 5-step tiny recipe spends most of its ~10 s importing torch
and diffusers in both ranks and forming the process group; the steps take 1-3 s. A test module
that compares N variants (engines, precisions, families) runs them one after another in one
torchrun launch (``tests/_batch_worker.py``): one import, one process group, every recipe
through the same ``cli.pretrain_main`` a launcher calls. The launch paths themselves (torchrun,
the deepspeed launcher, Slurm, two hosts, exit codes, error lines) keep their own launches in
tests/e2e and in the tests named for them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Bit-exact comparisons need a fixed thread count (torchrun sets 1; a plain python run would
# take every core).
ENV = {"OMP_NUM_THREADS": "1"}
_BEGIN, _END = "@@batch-begin ", "@@batch-end "


def sets(*pairs: str) -> list[str]:
    """``--set K=V`` for each pair."""
    return [x for p in pairs for x in ("--set", p)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, script: str | None = "launchers/pretrain.py", rdzv: bool = False,
             max_restarts: int | None = None) -> list[str]:
    """``python -m torch.distributed.run`` on loopback. ``rdzv``: c10d rendezvous (what a
    restarted round needs: fresh store keys); else a static master address. ``script=None``:
    the caller's ``args`` start with the script or ``-m module``."""
    if rdzv:
        head = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    else:
        head = ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    if max_restarts is not None:
        head += ["--max-restarts", str(max_restarts)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *head,
            *([script] if script else []), *args]


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def run(cmd: list[str], *, timeout: float = 600, env: dict | None = None, cwd: Path = REPO,
        input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on a timeout, or anything else that stops the
    test (KeyboardInterrupt, pytest-timeout), kill the whole group so no rank, DataLoader
    worker or launcher outlives the test and slows the next one."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PATH"] = f"{BIN}{os.pathsep}{full_env.get('PATH', '')}"
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except BaseException:
        kill_group(proc)
        raise
    kill_group(proc)  # a launcher that exited may leave orphans (a rank stuck in a collective)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.communicate(timeout=10)
    except (subprocess.TimeoutExpired, ValueError):
        pass


def read_metrics(run_dir: Path, *, steps_only: bool = True) -> list[dict]:
    """metrics.jsonl records; by default only the per-step ones (not checkpoint timings)."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in records if "loss" in r] if steps_only else records


@dataclass
class Run:
    """One recipe's result: its folder, exit code and rank 0's output."""

    name: str
    dir: Path
    rc: int
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    _metrics: list[dict] | None = field(default=None, repr=False)

    @property
    def metrics(self) -> list[dict]:
        if self._metrics is None:
            self._metrics = read_metrics(self.dir)
        return self._metrics

    @property
    def losses(self) -> list[float]:
        return [m["loss"] for m in self.metrics]

    @property
    def summary(self) -> dict:
        return json.loads((self.dir / "summary.json").read_text())

    def ok(self) -> "Run":
        assert self.rc == 0, f"{self.name}: rc={self.rc}\n{self.stdout[-3000:]}\n{self.stderr[-4000:]}"
        return self


def run_batch(recipes: dict[str, list[str]], root: Path, *, nproc: int = 2, timeout: float = 1200,
              env: dict | None = None, entry: str = "pretrain") -> dict[str, Run]:
    """Run each ``name -> launcher args`` (``--config ... --set ...``, without ``run.dir``) one
    after another in ONE ``nproc``-rank torchrun launch; each gets ``run.dir=root/name``.
    ``entry``: the cli function each recipe goes through (``pretrain``, ``dpo``, ``sft``, ``lora``).
    Returns every recipe's Run; a recipe that fails does not stop the ones after it."""
    root.mkdir(parents=True, exist_ok=True)
    dirs = {n: _run_dir(a) or root / n for n, a in recipes.items()}  # a recipe may name its own (a resume)
    plan = [{"name": n, "argv": [*a, "--set", f"run.dir={dirs[n]}"]} for n, a in recipes.items()]
    plan_file = root / "batch.json"
    plan_file.write_text(json.dumps({"entry": entry, "runs": plan}))
    worker = str(REPO / "tests" / "_batch_worker.py")
    cmd = torchrun(worker, str(plan_file), nproc=nproc, script=None) if nproc > 1 else python(worker, str(plan_file))
    start = time.time()
    r = run(cmd, timeout=timeout, env={**ENV, **(env or {})})
    out = {}
    for name in recipes:
        so, se = _segment(r.stdout, name), _segment(r.stderr, name)
        m = re.search(rf"^{re.escape(_END)}{re.escape(name)} rc=(-?\d+) seconds=([\d.]+)$", r.stdout, re.M)
        rc = int(m.group(1)) if m else (r.returncode or -1)
        if m is None:  # the launch died before this recipe ended: give it the whole output
            so, se = so or r.stdout, (se or "") + f"\n[batch launch rc={r.returncode} after {time.time() - start:.0f}s]\n" + r.stderr[-6000:]
        out[name] = Run(name, dirs[name], rc, so, se, float(m.group(2)) if m else 0.0)
    return out


def _run_dir(args: list[str]) -> Path | None:
    found = [a.split("=", 1)[1] for a in args if a.startswith("run.dir=")]
    return Path(found[-1]) if found else None


def _segment(text: str, name: str) -> str:
    a = text.find(f"{_BEGIN}{name}\n")
    if a < 0:
        return ""
    b = text.find(f"{_END}{name} ", a)
    return text[a + len(_BEGIN) + len(name) + 1: b if b >= 0 else len(text)]
