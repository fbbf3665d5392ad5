"""Communication tooling: the preflight network check (`scaletrain preflight`)."""

from scaletrain.comm.preflight import (
    NCCL_PRESETS,
    bus_bandwidth,
    flag_slow,
    recommend_bucket,
    slow_ranks,
    sweep_sizes,
)

__all__ = ["NCCL_PRESETS", "bus_bandwidth", "flag_slow", "recommend_bucket", "slow_ranks", "sweep_sizes"]
