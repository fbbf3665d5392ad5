"""Restricted readers for everything a checkpoint load reads, and DeepSpeed's universal-checkpoint
conversion.

Nothing read from disk may run code. The files a load touches, and how each is read:

- DCP ``.metadata`` (engine state under FSDP2/DDP, and every engine's EMA): torch's
  ``FileSystemReader.read_metadata`` calls plain ``pickle.load``. ``SafeFileSystemReader``
  reads it with ``DcpMetadataUnpickler``, whose ``find_class`` admits only DCP's own metadata
  classes, ``torch.Size``, dtypes/layouts, paths and basic containers.
- DCP ``*.distcp`` data: tensors are read weights-only by torch; non-tensor entries (optimizer
  hyper-parameters) go through the planner's ``load_bytes``, which asks for
  ``weights_only=False``. ``SafeLoadPlanner`` / ``SafeEmptyStateDictLoadPlanner`` load them
  weights-only and name the file on refusal.
- DeepSpeed ZeRO partitions and universal files: DeepSpeed's loaders (engine
  ``load_checkpoint``, ``zero_to_fp32``, ``ds_to_universal``) call ``torch.load(...,
  weights_only=False)`` and offer no switch, so ``weights_only_torch_load`` forces
  ``weights_only=True`` for every ``torch.load`` inside it, allowing beyond tensors and
  containers only the plain DeepSpeed value types its ZeRO files hold (an enum, the
  loss-scaler record, ZeRO-1/2's fragment addresses). ``check_torch_files`` scans them the
  same way before a collective load, so that every rank agrees on a refusal (a rank that
  raised alone would leave the others waiting in DeepSpeed's collectives).
- RNG files are safetensors, trainer state and ``meta.json`` JSON (``read_json``,
  ``read_safetensors``): neither format can carry code; a damaged one fails naming the file.

A refusal is a ``CheckpointLoadError`` (``UnsafeCheckpointError`` when the file holds objects
outside the allowlist) whose message is one line starting with the file's path; the launchers
and ``scaletrain ckpt`` print it as is and exit 2.

Run as a module it converts a ZeRO checkpoint to DeepSpeed's universal format (the
documented route to resume at another data-parallel world size), under the same guard::

    python -m scaletrain.common.safe_load CKPT/engine/zero CKPT/engine/zero_universal
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta


class CheckpointLoadError(RuntimeError):
    """A checkpoint file could not be read; the message is one line naming the file."""


class UnsafeCheckpointError(CheckpointLoadError):
    """A checkpoint file holds objects outside the allowlist (one-line message)."""


# ------------------------------------------------------------------ DCP metadata

_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
# Exactly the globals a DCP .metadata pickle names (torch 2.6-2.13), besides the metadata
# module's own classes: the storage record, torch.Size, dtypes/layouts (by name) and the
# checkpoint id a save records (a path). Each is a plain value or a constructor of one.
_DCP_EXTRA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
}


class DcpMetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the globals a DCP ``.metadata`` file needs.

    Written here because torch's reader has no restricted mode and ``torch.load``'s
    weights-only unpickler rejects DCP's dataclasses (and expects a zip archive)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == _DCP_METADATA_MODULE:
            import torch.distributed.checkpoint.metadata as md

            obj = getattr(md, name, None)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        elif module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)):
            return getattr(torch, name)
        elif (module, name) in _DCP_EXTRA_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def read_dcp_metadata(path: Path) -> Metadata:
    """Parse one DCP ``.metadata`` file with the restricted unpickler."""
    try:
        with open(path, "rb") as f:
            metadata = DcpMetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        if "is not allowed" in str(e):
            raise UnsafeCheckpointError(f"{path}: refusing to unpickle {str(e).split(' is not')[0].removeprefix('GLOBAL ')} "
                                        "(restricted DCP metadata reader); the file was tampered with or is "
                                        "not DCP metadata") from None
        raise CheckpointLoadError(f"{path}: unreadable DCP metadata ({e})") from None
    except OSError as e:
        raise CheckpointLoadError(f"{path}: cannot read DCP metadata ({e.strerror or e})") from None
    except Exception as e:  # truncated or garbled: EOFError, ValueError, struct errors
        raise CheckpointLoadError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointLoadError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's filesystem reader with ``.metadata`` parsed by ``DcpMetadataUnpickler``, once:
    the first call reads it (callers make that call themselves, so a refusal surfaces as
    one line rather than inside DCP, which logs a traceback and falls back to per-rank
    metadata files scaletrain never writes); later calls return the same object."""

    _metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # Mirrors FileSystemReader.read_metadata (torch 2.13) with the pickle.load swapped.
        if self._metadata is None or kwargs.get("rank") is not None:
            metadata = read_dcp_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            if kwargs.get("rank") is not None:
                return metadata
            self._metadata = metadata
        return self._metadata


class _WeightsOnlyBytes:
    """Planner mixin: DCP's non-tensor entries are read weights-only; a refusal names the file."""

    def __init__(self, checkpoint_dir: Path, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.checkpoint_dir = Path(checkpoint_dir)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            with weights_only_torch_load():
                super().load_bytes(read_item, value)
        except UnsafeCheckpointError as e:
            info = self.metadata.storage_data.get(read_item.storage_index)
            where = self.checkpoint_dir / info.relative_path if info is not None else self.checkpoint_dir
            found = str(e).split("refusing to unpickle ")[1].split(" ")[0]
            raise UnsafeCheckpointError(f"{where}: refusing to unpickle {found} in entry "
                                        f"{read_item.dest_index.fqn!r} (weights_only load); the file was "
                                        "tampered with") from None


class SafeLoadPlanner(_WeightsOnlyBytes, DefaultLoadPlanner):
    """``dcp.load`` planner for a template state dict (resume, EMA)."""


class SafeEmptyStateDictLoadPlanner(_WeightsOnlyBytes, _EmptyStateDictLoadPlanner):
    """Planner that builds the whole state dict from the metadata (consolidation, export)."""


def _dcp_failure(e: BaseException, path: Path) -> BaseException:
    """The first load error inside DCP's ``CheckpointException`` (it gathers every rank's
    failure into one multi-line message), as a one-line ``CheckpointLoadError`` naming the
    folder when it is not one already (a truncated or missing shard file); other exceptions
    (KeyboardInterrupt, a shape mismatch raised outside DCP) as they are."""
    from torch.distributed.checkpoint.api import CheckpointException

    if not isinstance(e, CheckpointException):
        return e
    found = [exc for exc, _ in e.failures.values()]
    for exc in found:
        if isinstance(exc, CheckpointLoadError):
            return exc
    first = found[0] if found else e
    line = (str(first).strip().splitlines() or [""])[0]
    return CheckpointLoadError(f"{path}: unreadable DCP checkpoint ({type(first).__name__}: {line})")


def load_dcp(state: dict, path: Path, reader: SafeFileSystemReader | None = None) -> None:
    """Collective ``dcp.load`` of ``state`` (filled in place, resharding) from ``path`` with the
    restricted readers. A failure on any rank raises on every rank: the metadata read is
    agreed here, the data reads by DCP (it gathers every rank's failures)."""
    import torch.distributed.checkpoint as dcp

    reader = reader or SafeFileSystemReader(str(path))
    error = None
    try:
        reader.read_metadata()
    except CheckpointLoadError as e:
        error = e
    raise_agreed(error)
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(path))
    except BaseException as e:  # CheckpointException derives from BaseException
        inner = _dcp_failure(e, path)
        if inner is e:
            raise
        raise inner from None


def load_dcp_full(path: Path) -> dict:
    """Every entry of a DCP checkpoint as full tensors, in this process alone (no process
    group): what ``dcp_to_torch_save`` does, without the temporary file, restricted."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    reader = SafeFileSystemReader(str(path))
    reader.read_metadata()  # raises the one-line error here, not inside DCP's logging
    try:
        _load_state_dict(state, storage_reader=reader,
                         planner=SafeEmptyStateDictLoadPlanner(path), no_dist=True)
    except BaseException as e:
        inner = _dcp_failure(e, path)
        if inner is e:
            raise
        raise inner from None
    return state


# ------------------------------------------------------------------ small files

def read_json(path: Path) -> Any:
    """A checkpoint's JSON file (trainer state, meta.json); damage fails naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointLoadError(f"{path}: unreadable ({type(e).__name__}: {e})".replace("\n", " ")) from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file (RNG state): a header and raw bytes, so nothing in it can run."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError: truncated, not safetensors (e.g. a pickle)
        raise CheckpointLoadError(f"{path}: not a readable safetensors file ({e})".replace("\n", " ")) from None


# ------------------------------------------------------------------ torch.load (DeepSpeed)

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


def check_torch_files(files: list[Path]) -> None:
    """Parse each ``torch.save`` file weights-only (tensors memory-mapped, not read), raising
    ``CheckpointLoadError`` naming the first file that is refused or unreadable."""
    with weights_only_torch_load():
        for f in files:
            try:
                torch.load(f, map_location="cpu", mmap=True)
            except CheckpointLoadError:
                raise
            except Exception as e:  # truncated zip, not a torch file, ...
                first = (str(e).strip().splitlines() or [""])[0]
                raise CheckpointLoadError(f"{f}: unreadable ({type(e).__name__}: {first})") from None


def raise_agreed(error: CheckpointLoadError | None) -> None:
    """Collective: every rank raises the first error any rank found (in rank order), so no rank
    enters a collective load that another has left. No-op when no rank found one."""
    import torch.distributed as dist

    found = None if error is None else (isinstance(error, UnsafeCheckpointError), str(error))
    gathered = [found]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, found)  # between this job's own ranks, not from disk
    for item in gathered:
        if item is not None:
            raise (UnsafeCheckpointError if item[0] else CheckpointLoadError)(item[1])


def agreed_check_torch_files(files: list[Path]) -> None:
    """Collective: each rank scans its share of ``files``; all raise the first failure found."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    error = None
    try:
        check_torch_files(sorted(files)[rank::world])
    except CheckpointLoadError as e:
        error = e
    raise_agreed(error)


def zero_dp_world_size(zero_dir: Path) -> int:
    """Data-parallel size a ZeRO checkpoint was written at: one optimizer partition per rank."""
    return len(list(zero_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))


def convert_to_universal(zero_dir: Path, out_dir: Path, *, workers: int = 1) -> None:
    """ZeRO checkpoint -> universal checkpoint, atomically (``out_dir`` appears complete or not
    at all). Runs DeepSpeed's converter in a subprocess: it forks worker pools, which must not
    happen inside a rank process holding live process-group threads."""
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "scaletrain.common.safe_load", str(zero_dir), str(tmp), str(workers)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckpointLoadError(f"{zero_dir}: converting to a universal checkpoint failed: {tail}")
    # the converter writes `latest_universal` beside its output folder; we always pass the tag
    (tmp.parent / "latest_universal").unlink(missing_ok=True)
    os.rename(tmp, out_dir)


def _main(argv: list[str]) -> int:
    from deepspeed.checkpoint import ds_to_universal

    zero_dir, out_dir = argv[0], argv[1]
    workers = argv[2] if len(argv) > 2 else "1"
    sys.argv = ["ds_to_universal", "--input_folder", zero_dir, "--output_folder", out_dir,
                "--inject_missing_state", "--num_extract_workers", workers, "--num_merge_workers", workers]
    try:
        check_torch_files(list(Path(zero_dir).glob("*.pt")))  # one line naming a refused file
        with weights_only_torch_load():
            ds_to_universal.main(ds_to_universal.parse_arguments())
    except CheckpointLoadError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
