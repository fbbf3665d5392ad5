#!/usr/bin/env bash
# GPU check of the CUDA paths (NCCL process group, FSDP2 bf16 mixed precision, DeepSpeed ZeRO-3
# bf16, DDP autocast) on one GPU, plus real-size measurements (unet-sd15 at 256 px, FSDP2
# bf16, through the trainer and through `scaletrain bench`). Run on a GPU node from the repo root:  bash benchmarks/gpu_check.sh OUT_DIR
# Wheels for packages the node lacks may be placed in .whl/ (installed to /tmp/site).
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m scaletrain.cli data synth --out /tmp/synth64 --num-samples 512 --per-shard 64 --resolution 64
python3 -m scaletrain.cli data synth --out /tmp/synth256 --num-samples 512 --per-shard 64 --resolution 256
TR="python3 -m torch.distributed.run --standalone --nproc_per_node 1 launchers/pretrain.py --config configs/demo.yaml"
COMMON="--set data.shards=/tmp/synth64/shard-{000000..000007}.tar --set log.wandb=disabled --set log.progress=false --set train.stages.0.global_batch=null --set train.stages.1.global_batch=null --set train.stages.0.steps=40 --set train.stages.1.steps=20"
for e in ${ENGINES-fsdp ddp deepspeed}; do
  echo "== tiny demo recipe, $e bf16, 1 GPU"
  timeout 240 $TR $COMMON --set engine.kind=$e --set engine.precision=bf16 --set run.dir=$OUT/tiny-$e > "$OUT/tiny-$e.log" 2>&1
  echo "rc=$?"; tail -n 2 "$OUT/tiny-$e.log"; cp "$OUT/tiny-$e/summary.json" "$OUT/tiny-$e.summary.json" 2>/dev/null
done
echo "== unet-sd15 256px (latent 32x32), FSDP2 bf16, micro-batch 16, 1 GPU"
timeout 300 $TR --set "data.shards=/tmp/synth256/shard-{000000..000007}.tar" --set log.wandb=disabled --set log.progress=false \
  --set model.preset=unet-sd15 --set engine.precision=bf16 --set run.dir=$OUT/sd15 --set sample.at_end=false \
  --set "train.stages=[{name: s256, resolution: 256, steps: 25, micro_batch: 16}]" --set data.num_workers=4 > "$OUT/sd15.log" 2>&1
echo "rc=$?"; tail -n 3 "$OUT/sd15.log"; cp "$OUT/sd15/summary.json" "$OUT/sd15.summary.json" 2>/dev/null
echo "== scaletrain bench on 1 GPU: unet-sd15 256 px, FSDP2 and DDP, bf16, micro-batch 16"
timeout 300 python3 -m scaletrain.cli bench --presets unet-sd15 --resolutions 256 --engines fsdp ddp --precision bf16 \
  --micro-batches 16 --world-sizes 1 --warmup 3 --reps 5 --num-workers 4 \
  --shards "/tmp/synth256/shard-{000000..000007}.tar" --out "$OUT/bench" > "$OUT/bench.log" 2>&1
echo "rc=$?"; cat "$OUT/bench/results.md" 2>/dev/null || tail -n 20 "$OUT/bench.log"
python3 - "$OUT" <<'PY'
import json, sys, glob, os
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.summary.json"))):
    s = json.load(open(f))
    print(os.path.basename(f), {k: s[k] for k in ("engine", "steps", "images_per_second", "final_loss", "peak_memory_gib_rank0")})
PY
