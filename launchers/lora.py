"""LoRA entry point: peft adapters on the attention/projection layers of `init.*` weights, the
base frozen; `scaletrain ckpt export-lora RUN OUT` writes the adapter for diffusers.

    torchrun --nproc_per_node 2 launchers/lora.py --config configs/lora.yaml
    deepspeed --hostfile hosts launchers/lora.py --config configs/lora.yaml --set engine.kind=deepspeed \
        --set engine.deepspeed_config=ds_configs/zero2.json
"""

import sys
from pathlib import Path

# Run from a checkout without installing: the launchers sit beside the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scaletrain.cli import lora_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(lora_main())
