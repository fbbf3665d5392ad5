"""Start weights read by slices: a diffusers model folder's safetensors, one file or sharded
(``*.safetensors.index.json``), opened with safetensors' ``safe_open`` so a rank reads only the
rows it keeps (``read(name, slices)``), never the whole file. safetensors holds tensors and a
JSON header only: nothing it reads can run code.

Used by ``models.meta_init.materialize`` (FSDP2: each rank its shards; DDP and ZeRO-1/2 whole)
and ZeRO-3's module-by-module start-up (``engines.deepspeed``) as ``PendingInit.source``.

``DCPCheckpoint``: a scaletrain checkpoint written through DCP (FSDP2, DDP) as start weights,
loaded by one collective ``dcp.load`` straight into the sharded module (``load_into``): each
rank reads the stored chunks that overlap its shards, at any world size (DCP reshards), with
the checkpoint's EMA in place of the raw weights when asked.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from scaletrain.common.safe_load import SafeFileSystemReader

WEIGHTS = "diffusion_pytorch_model.safetensors"


class SafetensorsFolder:
    """The tensors of a diffusers model folder (``save_pretrained``'s layout), by name."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / (WEIGHTS + ".index.json")
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no weight_map; a sharded save_pretrained folder's index has one")
            self.files = {name: self.folder / f for name, f in weight_map.items()}
        elif (self.folder / WEIGHTS).is_file():
            self.files = None
        else:
            raise ValueError(f"{self.folder} has neither {WEIGHTS} nor {WEIGHTS}.index.json")
        self._open: dict[Path, object] = {}
        self.bytes_read = 0  # what this process read, counted (the sharded-load test reads it)
        if self.files is None:
            self.files = {name: self.folder / WEIGHTS for name in self._handle(self.folder / WEIGHTS).keys()}
        for f in set(self.files.values()):
            if not f.is_file():
                raise ValueError(f"{f} is named by the folder's index but missing")

    @staticmethod
    def has_weights(folder: str | Path) -> bool:
        folder = Path(folder)
        return (folder / WEIGHTS).is_file() or (folder / (WEIGHTS + ".index.json")).is_file()

    def _handle(self, path: Path):
        from safetensors import safe_open

        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._open[path]

    def names(self) -> set[str]:
        return set(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.files[name]).get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> Tensor:
        """The tensor ``name``, or only ``index`` of it (one slice per leading dimension)."""
        sl = self._handle(self.files[name]).get_slice(name)
        t = sl[index] if index else sl[:]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def check_names(self, expected: dict[str, tuple[int, ...]], what: str) -> None:
        """The folder's tensors are exactly ``expected`` (name -> shape): otherwise one error
        naming the keys that are missing, unexpected or of another shape."""
        have = self.names()
        missing, unexpected = sorted(set(expected) - have), sorted(have - set(expected))
        wrong = [f"{n} {self.shape(n)} vs the model's {tuple(expected[n])}" for n in sorted(have & set(expected))
                 if tuple(self.shape(n)) != tuple(expected[n])]
        if missing or unexpected or wrong:
            def some(keys: list[str]) -> str:
                return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

            parts = ([f"missing {len(missing)}: {some(missing)}"] if missing else []) + (
                [f"unexpected {len(unexpected)}: {some(unexpected)}"] if unexpected else []) + (
                [f"other shape {len(wrong)}: {some(wrong)}"] if wrong else [])
            raise ValueError(f"{what}: its weights do not match the model's keys ({'; '.join(parts)}); "
                             "give the folder of the model model.preset names")

    def close(self) -> None:
        self._open.clear()

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.files.values()))


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


class DCPCheckpoint:
    """The model entries of a scaletrain DCP checkpoint (``<ckpt>/engine``, keyed ``model.net.*``)
    and, with ``use_ema``, its EMA's (``<ckpt>/ema``, ``params.net.*``) as start weights. Read
    through the restricted reader (common/safe_load.py: metadata and non-tensor entries
    weights-only); ``bytes_read`` counts what this process read."""

    def __init__(self, path: str | Path, use_ema: bool) -> None:
        self.path = Path(path)
        self.model_dir = self.path / "engine"
        ema = self.path / "ema"
        self.ema_dir = ema if use_ema and ema.is_dir() else None
        self.saved = {k.removeprefix("model.net."): tuple(m.size)
                      for k, m in SafeFileSystemReader(str(self.model_dir)).read_metadata().state_dict_metadata.items()
                      if k.startswith("model.net.") and hasattr(m, "size")}
        self.ema_saved = {} if self.ema_dir is None else {
            k.removeprefix("params.net."): tuple(m.size)
            for k, m in SafeFileSystemReader(str(self.ema_dir)).read_metadata().state_dict_metadata.items()
            if k.startswith("params.net.") and hasattr(m, "size")}
        self.bytes_read = 0
        self.total_bytes = 0

    @staticmethod
    def usable(info, use_ema: bool) -> bool:
        """A DCP checkpoint (not DeepSpeed's ZeRO files) whose EMA, if it is used, keeps the
        parameters' shapes (a ZeRO-3 run's EMA is flat partitions: read whole instead)."""
        if info.engine_format == "zero" or not (Path(info.path) / "engine" / ".metadata").is_file():
            return False
        if not use_ema or not (Path(info.path) / "ema").is_dir():
            return True
        src = DCPCheckpoint(info.path, use_ema)
        return all(src.ema_saved.get(n) == shape for n, shape in src.saved.items() if n in src.ema_saved)

    def check_names(self, expected: dict[str, tuple[int, ...]], what: str) -> None:
        """The checkpoint's model (and EMA) tensors cover ``expected`` (name -> shape) exactly;
        otherwise one error naming the keys that are missing, unexpected or of another shape."""
        missing = sorted(set(expected) - set(self.saved))
        unexpected = sorted(set(self.saved) - set(expected))
        wrong = [f"{n} {self.saved[n]} vs the model's {tuple(expected[n])}" for n in sorted(set(expected) & set(self.saved))
                 if self.saved[n] != tuple(expected[n])]
        if missing or unexpected or wrong:
            parts = ([f"missing {len(missing)}: {_some(missing)}"] if missing else []) + (
                [f"unexpected {len(unexpected)}: {_some(unexpected)}"] if unexpected else []) + (
                [f"other shape {len(wrong)}: {_some(wrong)}"] if wrong else [])
            raise ValueError(f"{what}: its weights do not match the model's keys ({'; '.join(parts)}); "
                             "pick the preset it was trained with")

    def load_into(self, net) -> None:
        """Collective: fill ``net`` (a Denoiser's ``.net``, sharded or whole, allocated) from the
        checkpoint: parameters and persistent buffers in place, then the EMA over the
        parameters it covers."""
        from scaletrain.common.safe_load import load_dcp

        state = {"model": {f"net.{n}": t for n, t in net.state_dict().items()}}
        reader = _CountingReader(str(self.model_dir))
        load_dcp(state, self.model_dir, reader)
        self.bytes_read += reader.bytes_read
        self.total_bytes += reader.bytes_stored("model.net.")
        if self.ema_dir is not None:
            params = {f"net.{n}": p for n, p in net.named_parameters() if n in self.ema_saved}
            reader = _CountingReader(str(self.ema_dir))
            load_dcp({"params": params}, self.ema_dir, reader)
            self.bytes_read += reader.bytes_read
            self.total_bytes += reader.bytes_stored("params.net.")


class _CountingReader(SafeFileSystemReader):
    """The restricted reader, counting the stored bytes this process's plan reads."""

    bytes_read = 0

    def read_data(self, plan, planner):
        self.bytes_read += sum(self.storage_data[item.storage_index].length for item in plan.items)
        return super().read_data(plan, planner)

    def bytes_stored(self, prefix: str) -> int:
        return sum(info.length for index, info in self.storage_data.items() if index.fqn.startswith(prefix))


__all__ = ["DCPCheckpoint", "SafetensorsFolder"]
