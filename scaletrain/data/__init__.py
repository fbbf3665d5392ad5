"""Data: synthetic captioned shards and the webdataset training pipeline."""

from scaletrain.data.pipeline import (
    LoaderSpec,
    build_loader,
    caption_is_dropped,
    decode_image,
    expand_shards,
    iter_epoch_samples,
    missing_local_shards,
    resolve_split,
)
from scaletrain.data.synth import make_synthetic_sample, write_synthetic_shards, write_tar_shard

__all__ = [
    "LoaderSpec",
    "build_loader",
    "caption_is_dropped",
    "decode_image",
    "expand_shards",
    "iter_epoch_samples",
    "make_synthetic_sample",
    "missing_local_shards",
    "resolve_split",
    "write_synthetic_shards",
    "write_tar_shard",
]
