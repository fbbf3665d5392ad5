"""Data: synthetic captioned shards and the webdataset training pipeline.

The names below load on first use (PEP 562): ``config`` imports ``data.buckets`` and
``data.filters`` (pydantic only), which must not pull the pipeline's torch, PIL and PyAV.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LoaderSpec": "pipeline",
    "build_loader": "pipeline",
    "caption_is_dropped": "pipeline",
    "decode_image": "samples",
    "expand_shards": "scaletrain.common.tars",
    "iter_epoch_samples": "pipeline",
    "missing_local_shards": "pipeline",
    "resolve_split": "pipeline",
    "make_synthetic_sample": "synth",
    "write_synthetic_shards": "synth",
    "write_tar_shard": "synth",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'scaletrain.data' has no attribute {name!r}")
    module = _EXPORTS[name]
    return getattr(importlib.import_module(module if "." in module else f"scaletrain.data.{module}"), name)
