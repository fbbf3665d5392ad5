#!/usr/bin/env bash
# GPU check, one call on one GPU (about 8 minutes; every part has its own timeout):
#  1. (TINY=1, +4 min) the CUDA paths of every engine (NCCL, FSDP2, DeepSpeed ZeRO-3, DDP autocast)
#     in bf16 and fp16 on the tiny demo recipe, with activation checkpointing on;
#  2. `scaletrain data encode` of 512 synthetic 512 px images for unet-sd2 (256, 512 px) and pixart;
#  3. real-size throughput and memory with `scaletrain bench` (bf16, one rank): unet-sd2 at 256 and
#     512 px and pixart-xl-2 (DiT-XL/2 size) at 256 px, activation checkpointing off and on,
#     regional compile on unet-sd2 256 px (EXTRA=1, +8 min: a micro-batch sweep, DiT compile and
#     the FSDP2 offload); img/s, TFLOP/s, MFU, peak memory and its split by category per cell;
#  4. a profile of one unet-sd2 256 px step (top CUDA kernels, exposed host time);
#  (MMDIT=1, +4 min) the SD3-medium-size MMDiT (2.0B) at 256 px on precomputed 16-channel latents;
#  5. (+1 min) start-up of unet-sd2 on FSDP2 and ZeRO-3: the `start-up:` line with peak device memory.
# Writes OUT/gpu_<device>.md (the table to commit as benchmarks/results/gpu_<device>.md with the
# bench JSON files beside it). Run from the repo root:  bash benchmarks/gpu_check.sh OUT_DIR
# Wheels for packages the node lacks may be placed in .whl/ (installed to /tmp/site).
# The real-size cells train on precomputed latents (`scaletrain data encode`, run here first on
# the GPU: no VAE or text encoder in the step); one unet-sd2 256 px cell runs online beside them
# (VAE + text encoder every step, its "encode" phase) for the precomputed-vs-online ratio.
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
python3 -m scaletrain.cli data synth --out /tmp/synth64 --num-samples 512 --per-shard 64 --resolution 64 > /dev/null
python3 -m scaletrain.cli data synth --out /tmp/synth512 --num-samples 512 --per-shard 64 --resolution 512 > /dev/null

# 1. (TINY=1) CUDA paths of every engine (tiny recipe, 30 steps, activation checkpointing on)
if [ "${TINY-0}" = 1 ]; then
  TR="python3 -m torch.distributed.run --standalone --nproc_per_node 1 launchers/pretrain.py --config configs/demo.yaml"
  COMMON="--set data.shards=/tmp/synth64/shard-{000000..000007}.tar --set log.wandb=disabled --set log.progress=false --set train.stages.0.global_batch=null --set train.stages.1.global_batch=null --set train.stages.0.steps=20 --set train.stages.1.steps=10 --set validate.every_steps=0 --set model.activation_checkpointing=full"
  for e in ${ENGINES-fsdp ddp deepspeed}; do
    for pr in ${PRECISIONS-bf16 fp16}; do  # fp16: dynamic loss scaling (GradScaler / ShardedGradScaler / DeepSpeed's)
      echo "== tiny demo recipe, $e $pr, activation checkpointing, 1 GPU"
      timeout 150 $TR $COMMON --set engine.kind=$e --set engine.precision=$pr --set run.dir=$OUT/tiny-$e-$pr > "$OUT/tiny-$e-$pr.log" 2>&1
      echo "rc=$?"; tail -n 2 "$OUT/tiny-$e-$pr.log"; cp "$OUT/tiny-$e-$pr/summary.json" "$OUT/tiny-$e-$pr.summary.json" 2>/dev/null
    done
  done
fi

# 2. precomputed latents for the real-size cells (bf16 encoders, as a bf16 recipe runs them)
SH="/tmp/synth512/shard-{000000..000007}.tar"
encode() {  # PRESET OUT RESOLUTION...
  local preset=$1 out=$2; shift 2
  echo "== data encode $preset: $*"
  timeout 150 python3 -m scaletrain.cli data encode --config configs/latent.yaml --no-progress --batch-size 64 \
    --shards "$SH" --out "$out" --set model.preset=$preset --set engine.precision=bf16 \
    --set "train.stages=[{name: a, resolution: 256, steps: 1, micro_batch: 1}]" \
    $(for r in "$@"; do echo --resolution $r; done) > "$OUT/encode-$preset.log" 2>&1
  echo "rc=$?"; tail -n 3 "$OUT/encode-$preset.log"
}
encode unet-sd2 /tmp/lat-sd2 256 512
encode pixart-xl-2 /tmp/lat-pixart 256

# 3. real-size bench cells: one `scaletrain bench` call per lever setting (each records its levers)
bench() {  # NAME TIMEOUT SHARDS ARGS...
  local name=$1 limit=$2 shards=$3; shift 3
  echo "== bench $name: $*"
  timeout "$limit" python3 -m scaletrain.cli bench --precision bf16 --world-sizes 1 --warmup 3 --reps 6 --num-workers 6 \
    --no-loaded --no-comm-sweep --shards "$shards" --out "$OUT/bench-$name" "$@" > "$OUT/bench-$name.log" 2>&1
  echo "rc=$?"; grep -E "^\| (unet|pixart|mmdit|flux)" "$OUT/bench-$name/results.md" 2>/dev/null | head -n 8 || tail -n 5 "$OUT/bench-$name.log"
}
bench sd2-online 90 "$SH" --presets unet-sd2 --resolutions 256 --engines fsdp --micro-batches 32
SH=/tmp/lat-sd2
bench sd2-eager 120 "$SH" --presets unet-sd2 --resolutions 256 512 --engines fsdp --micro-batches 32
bench sd2-ac 120 "$SH" --presets unet-sd2 --resolutions 256 512 --engines fsdp --micro-batches 32 --activation-checkpointing full
bench sd2-compile 150 "$SH" --presets unet-sd2 --resolutions 256 --engines fsdp --micro-batches 32 --compile
bench pixart-eager 90 /tmp/lat-pixart --presets pixart-xl-2 --resolutions 256 --engines fsdp --micro-batches 32
if [ "${MMDIT-0}" = 1 ]; then  # +4 min: the SD3-medium-size MMDiT (2.0B) at 256 px
  encode mmdit-sd3-medium /tmp/lat-mmdit 256
  bench mmdit-eager 150 /tmp/lat-mmdit --presets mmdit-sd3-medium --resolutions 256 --engines fsdp --micro-batches 16
  bench mmdit-ac 150 /tmp/lat-mmdit --presets mmdit-sd3-medium --resolutions 256 --engines fsdp --micro-batches 32 --activation-checkpointing full
fi
if [ "${EXTRA-0}" = 1 ]; then  # past the 8-minute budget: micro-batch sweep, DiT compile, offload
  bench sd2-sweep 200 "$SH" --presets unet-sd2 --resolutions 256 --engines ddp --micro-batches 64 128 --activation-checkpointing full
  bench pixart-compile 200 /tmp/lat-pixart --presets pixart-xl-2 --resolutions 256 --engines fsdp --micro-batches 32 --compile
  bench sd2-offload 120 "$SH" --presets unet-sd2 --resolutions 256 --engines fsdp-offload --micro-batches 32
fi

# 4. where one step's time goes
echo "== profile: unet-sd2 256 px, micro-batch 32, DDP bf16"
timeout 120 python3 benchmarks/profile_step.py --preset unet-sd2 --resolution 256 --micro-batch 32 \
  --out "$OUT/profile_unet-sd2_256.txt" > "$OUT/profile.log" 2>&1
echo "rc=$?"; head -n 30 "$OUT/profile_unet-sd2_256.txt" 2>/dev/null || tail -n 5 "$OUT/profile.log"

# 5. start-up on the device (issue 26): unet-sd2 on one GPU, FSDP2 and ZeRO-3, bf16, stopped right
#    after the `start-up:` line (peak host and device memory per rank), kept in gpu.txt
for e in fsdp deepspeed; do
  echo "== start-up: unet-sd2, $e, bf16, 1 GPU" | tee -a "$OUT/gpu.txt"
  timeout 150 python3 -m torch.distributed.run --standalone --nproc_per_node 1 launchers/pretrain.py \
    --config configs/demo.yaml --set model.preset=unet-sd2 --set engine.kind=$e --set engine.precision=bf16 \
    --set run.stop_at_step=0 --set checkpoint.resume=never --set "data.shards=/tmp/synth64/shard-{000000..000007}.tar" \
    --set "train.stages=[{name: s, resolution: 64, steps: 1, micro_batch: 1, global_batch: 1}]" \
    --set log.wandb=disabled --set sample.at_end=false --set validate.at_end=false --set run.dir=$OUT/startup-$e \
    > "$OUT/startup-$e.log" 2>&1
  echo "rc=$?"; grep -h "^start-up:" "$OUT/startup-$e.log" | tee -a "$OUT/gpu.txt"
done

python3 benchmarks/gpu_report.py "$OUT" | tee "$OUT/gpu_report.log"
