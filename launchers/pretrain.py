"""Pre-training entry point.

    torchrun --nproc_per_node 2 launchers/pretrain.py --config configs/demo.yaml
    deepspeed --hostfile hosts launchers/pretrain.py --config configs/demo.yaml --set engine.kind=deepspeed
    python launchers/pretrain.py --config configs/demo.yaml --set optim.lr=3e-4
"""

import sys
from pathlib import Path

# Run from a checkout without installing: the launchers sit beside the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scaletrain.cli import pretrain_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(pretrain_main())
