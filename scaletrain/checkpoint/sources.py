"""Start weights read by slices: a diffusers model folder's safetensors, one file or sharded
(``*.safetensors.index.json``), opened with safetensors' ``safe_open`` so a rank reads only the
rows it keeps (``read(name, slices)``), never the whole file. safetensors holds tensors and a
JSON header only: nothing it reads can run code.

Used by ``models.meta_init.materialize`` (FSDP2: each rank its shards; DDP and ZeRO-1/2 whole)
and ZeRO-3's module-by-module start-up (``engines.deepspeed``) as ``PendingInit.source``.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

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


__all__ = ["SafetensorsFolder"]
