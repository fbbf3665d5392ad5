"""Diffusion-DPO entry point (preference pairs; reference = the start weights, frozen).

    torchrun --nproc_per_node 2 launchers/dpo.py --config configs/dpo.yaml
    deepspeed --hostfile hosts launchers/dpo.py --config configs/dpo.yaml --set engine.kind=deepspeed
    python launchers/dpo.py --config configs/dpo.yaml --set dpo.beta=2000
"""

import sys
from pathlib import Path

# Run from a checkout without installing: the launchers sit beside the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scaletrain.cli import dpo_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(dpo_main())
