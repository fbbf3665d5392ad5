"""Several recipes, one after another, in one launch (``tests/launch.py``'s ``run_batch``).

The process group is formed once; each recipe then goes through the same ``cli`` entry a
launcher calls (config validation, Trainer, train, close). Between recipes only the group's
teardown is skipped (a barrier and a collection instead) and compiled graphs are dropped, so a
recipe sees what a fresh launch would: the Trainer seeds every generator it uses from the recipe.
tests/distributed/test_engine_equivalence.py checks the curves equal those of separate launches.

One difference was measured: a recipe that runs after a DeepSpeed recipe in the same process
can differ from a fresh launch in the last float bits (1.5e-8 relative on the first loss, seen
2026-12-05). Recipes a test compares bit for bit therefore come before any DeepSpeed recipe of
their batch; tolerance comparisons (1e-5) are unaffected.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import scaletrain.distributed as sd  # noqa: E402
from scaletrain import cli  # noqa: E402


def main(plan_file: str) -> int:
    plan = json.loads(Path(plan_file).read_text())
    runs = plan["runs"]
    entry = {"pretrain": cli.pretrain_main, "dpo": cli.dpo_main, "sft": cli.sft_main, "lora": cli.lora_main}[plan["entry"]]
    uses_ds = any("engine.kind=deepspeed" in r["argv"] for r in runs)
    info = sd.init_distributed("deepspeed" if uses_ds else "ddp")
    real_shutdown = sd.shutdown_distributed

    def keep_group() -> None:
        gc.collect()
        if sd.dist.is_initialized():
            sd.dist.barrier()

    sd.shutdown_distributed = keep_group  # run_training imports it from the module at call time
    import torch._dynamo
    from torch._dynamo.utils import counters

    for r in runs:
        if info.is_main:
            for stream in (sys.stdout, sys.stderr):
                print(f"@@batch-begin {r['name']}", file=stream, flush=True)
        start = time.time()
        try:
            rc = entry(r["argv"])
        except BaseException:  # the group may be mid-collective: end the batch here
            traceback.print_exc()
            sys.stderr.flush()
            return 1
        torch._dynamo.reset()
        counters.clear()  # the next recipe's summary counts its own compiled graphs
        gc.collect()
        if info.is_main:
            for stream in (sys.stdout, sys.stderr):
                print(f"@@batch-end {r['name']} rc={rc} seconds={time.time() - start:.2f}", file=stream, flush=True)
    sd.shutdown_distributed = real_shutdown
    real_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
