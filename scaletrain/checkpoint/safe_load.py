"""Safe checkpoint loading, and DeepSpeed's universal-checkpoint conversion.

DeepSpeed's loaders (engine ``load_checkpoint``, ``zero_to_fp32``, ``ds_to_universal``)
and DCP's default load planner (for non-tensor entries such as optimizer hyper-parameters)
call ``torch.load(..., weights_only=False)``, which unpickles arbitrary objects: a
tampered checkpoint could run code on every rank. Neither offers a switch, so
``weights_only_torch_load`` forces ``weights_only=True`` for every ``torch.load`` made
inside it, allowing beyond tensors and containers only the plain DeepSpeed value types
its ZeRO files hold (an enum, the loss-scaler record, ZeRO-1/2's fragment addresses). Anything else fails with a
one-line error instead of running.

Run as a module it converts a ZeRO checkpoint to DeepSpeed's universal format (the
documented route to resume at another data-parallel world size), under the same guard::

    python -m scaletrain.checkpoint.safe_load CKPT/engine/zero CKPT/engine/zero_universal
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import torch


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds objects outside the allowlist (one-line message)."""


def _allowed_globals() -> list:
    if "deepspeed" not in sys.modules:  # a DCP-only load: no reason to import DeepSpeed
        return []
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO-1/2 param_slice_mappings: (numel, start)

    return [ZeroStageEnum, LossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Every ``torch.load`` inside this block loads with ``weights_only=True``."""
    original = torch.load

    def guarded(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except Exception as e:  # torch raises UnpicklingError with a multi-line explanation
            if "Weights only load failed" not in str(e):
                raise
            found = str(e).split("GLOBAL ")[1].split(" ")[0] if "GLOBAL " in str(e) else "an object"
            raise UnsafeCheckpointError(
                f"{f}: refusing to unpickle {found} (weights_only load); the file is not a plain "
                "DeepSpeed ZeRO checkpoint or was tampered with"
            ) from None

    with torch.serialization.safe_globals(_allowed_globals()):
        torch.load = guarded
        try:
            yield
        finally:
            torch.load = original


def zero_dp_world_size(zero_dir: Path) -> int:
    """Data-parallel size a ZeRO checkpoint was written at: one optimizer partition per rank."""
    return len(list(zero_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))


def convert_to_universal(zero_dir: Path, out_dir: Path, *, workers: int = 1) -> None:
    """ZeRO checkpoint -> universal checkpoint, atomically (``out_dir`` appears complete or not
    at all). Runs DeepSpeed's converter in a subprocess: it forks worker pools, which must not
    happen inside a rank process holding live process-group threads."""
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "scaletrain.checkpoint.safe_load", str(zero_dir), str(tmp), str(workers)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"converting {zero_dir} to a universal checkpoint failed: {tail}")
    # the converter writes `latest_universal` beside its output folder; we always pass the tag
    (tmp.parent / "latest_universal").unlink(missing_ok=True)
    os.rename(tmp, out_dir)


def _main(argv: list[str]) -> int:
    from deepspeed.checkpoint import ds_to_universal

    zero_dir, out_dir = argv[0], argv[1]
    workers = argv[2] if len(argv) > 2 else "1"
    sys.argv = ["ds_to_universal", "--input_folder", zero_dir, "--output_folder", out_dir,
                "--inject_missing_state", "--num_extract_workers", workers, "--num_merge_workers", workers]
    with weights_only_torch_load():
        ds_to_universal.main(ds_to_universal.parse_arguments())
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
