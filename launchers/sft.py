"""Supervised fine-tuning entry point: all weights, starting from `init.*` (a pre-training run's
checkpoint or an exported diffusers model), on curated data (`data.filters`).

    torchrun --nproc_per_node 2 launchers/sft.py --config configs/sft.yaml
    deepspeed --hostfile hosts launchers/sft.py --config configs/sft.yaml --set engine.kind=deepspeed
"""

import sys
from pathlib import Path

# Run from a checkout without installing: the launchers sit beside the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scaletrain.cli import sft_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(sft_main())
