"""Engine state through torch.distributed.checkpoint (FSDP2 and DDP).

``get_state_dict`` gives the model and optimizer state with the same fully-qualified names
whether the module is FSDP2-sharded, DDP-wrapped or plain, so a checkpoint written by one
engine or world size loads into another: DCP reshards on load.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def save_dcp_state(module: nn.Module, optimizer, path: Path) -> None:
    model_sd, optim_sd = get_state_dict(module, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def async_save_dcp_state(module: nn.Module, optimizer, path: Path, process_group) -> Future:
    """Stage to CPU now (the caller may step the optimizer as soon as this returns), write in
    a background thread. ``process_group`` must be a separate gloo group: the background
    thread's collectives must not interleave with the training loop's on the default group."""
    model_sd, optim_sd = get_state_dict(module, optimizer)
    return dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path),
                          process_group=process_group)


def load_dcp_state(module: nn.Module, optimizer, path: Path) -> None:
    # The current state is the template: DCP fills it in place, each rank reading its shards.
    model_sd, optim_sd = get_state_dict(module, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
