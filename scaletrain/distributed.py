"""Process-group set-up that works the same under torchrun, the deepspeed launcher and plain python.

torchrun and ``deepspeed`` both export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; a plain ``python`` run gets a one-rank group on a free loopback port so every
engine (FSDP2 and DeepSpeed both need a group) runs the same code path.
"""

from __future__ import annotations

import gc
import os
import shutil
import socket
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_environment() -> None:
    """Env defaults that must exist before torch.distributed or DeepSpeed is imported/initialised."""
    if "RANK" not in os.environ:  # plain `python launchers/pretrain.py`
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not torch.cuda.is_available():
        # DeepSpeed picks its accelerator at import; without this it probes for CUDA and fails.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed JIT-builds C++ ops into TORCH_EXTENSIONS_DIR (default: one folder under
    # ~/.cache for every environment). Two virtualenvs sharing it rebuild the op on every
    # alternate start, each waiting on the other's lock; keep the build beside the venv.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    # torch's JIT build runs whichever `ninja` PATH finds first. A machine with a system ninja
    # (1.11: .ninja_log v5) beside the venv's (pip's, 1.13: v7) then rebuilds every op whenever
    # the two alternate (each discards the other's log): DeepSpeed's shm comm op costs ~45 s of
    # two cores per start. The venv's own ninja goes first, whoever launched the process.
    own_ninja = os.path.join(os.path.dirname(sys.executable), "ninja")
    if os.access(own_ninja, os.X_OK) and shutil.which("ninja") != own_ninja:
        os.environ["PATH"] = os.path.dirname(own_ninja) + os.pathsep + os.environ.get("PATH", "")
    # DeepSpeed emits a FutureWarning per collective on recent torch; keep logs readable.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"deepspeed\..*")
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.reduce_op.*")


def init_distributed(engine_kind: str | None = None) -> DistInfo:
    """The process group (NCCL on GPUs, gloo on CPU) and this rank's place in it. The group is the
    same for every engine (``engine_kind`` names the caller's, for readability): DeepSpeed's comm
    layer wraps it when the DeepSpeed engine starts."""
    prepare_environment()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        store = restart_safe_store(rank, world)
        if store is not None:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, **kwargs)
        else:
            dist.init_process_group(backend=backend, **kwargs)
        # DeepSpeed's comm layer wraps this group when the DeepSpeed engine first needs it
        # (engines/deepspeed.py, ensure_deepspeed_comm)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def restart_safe_store(rank: int, world: int) -> dist.Store | None:
    """The worker store, scoped to this torchrun restart attempt; None = let torch build it.

    torchrun's c10d rendezvous hands every round the same agent-hosted TCPStore, so after
    ``--max-restarts`` relaunches a round, a worker can read the previous round's gloo/NCCL
    bootstrap keys and connect to a dead peer: init_process_group then hangs
    (pytorch/pytorch#135712; measured here: 2 hangs in 5 SIGKILL-and-restart runs). Prefixing
    the keys with the restart count isolates the rounds. The count is per agent, so this is
    only consistent when one agent runs every rank (one node); on several nodes, set
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun, which gives each round a fresh store.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if int(os.environ.get("LOCAL_WORLD_SIZE", world)) != world:
        if rank == 0 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
            print("scaletrain: torchrun --max-restarts on several nodes with a shared rendezvous store can hang "
                  "restarted rounds (pytorch#135712); export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun",
                  file=sys.stderr)
        return None
    from datetime import timedelta

    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                         timeout=timedelta(minutes=30))
    return dist.PrefixStore(f"scaletrain/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)


def shutdown_distributed() -> None:
    """Tear down cleanly. Callers must drop their model/engine references first.

    FINDINGS: about one run in three aborted at exit (SIGABRT, "terminate called without an
    active exception") when DTensor/DeviceMesh objects outlived the process group; collecting
    them before ``destroy_process_group`` made it 0 in 50.
    """
    gc.collect()
    if dist.is_initialized():
        rank = dist.get_rank()
        try:
            dist.barrier()  # every rank is past its last collective: the peers' buffers are mapped
            remove_deepspeed_shm(rank)
        finally:
            dist.destroy_process_group()
    gc.collect()


def remove_deepspeed_shm(rank: int) -> bool:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer (``/dev/shm/deepspeed_allreduce_buffer_
    {uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}``, 66 MiB; DeepSpeed's ``csrc/cpu/comm/shm.cpp``
    creates one per rank of a multi-rank CPU run and never removes it). Left behind, every such
    run leaked 132 MiB of tmpfs, which counts against the host's memory until reboot (5.9 GB
    here after a day of test runs). Mapped peers keep their mapping; the name goes. Returns
    whether there was one."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return False
    path = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
    try:
        path.unlink()
        return True
    except OSError:
        return False


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """Average a few Python floats over ranks in one collective."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()
