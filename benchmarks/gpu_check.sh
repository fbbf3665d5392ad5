#!/usr/bin/env bash
# GPU check: one call on one GPU, at most GPU_CHECK_LIMIT seconds in all (default 540: 9 min).
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine, from the repo root
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh OUT # the same script on CPU with tiny presets
#                                                    # (tests/e2e/test_gpu_check.py runs it)
#
# Built so that a lent GPU is never wasted:
#  - an import and device check runs first; nothing else runs if it fails;
#  - every cell runs under `timeout` with the smaller of its own limit and what is left of the
#    global limit (minus a reserve for the report); a cell that would get under 20 s is recorded
#    as skipped, not started;
#  - a cell's processes are killed as a whole when it ends: timeout signals its process group,
#    then every process still carrying the cell's GPU_CHECK_CELL marker in its environment is
#    killed (torchrun and `scaletrain bench` start ranks in sessions of their own, which a
#    process-group kill does not reach), so no timed-out cell keeps the GPU into the next one;
#  - after every cell its status goes to OUT/cells.tsv and the report (OUT/gpu_<device>.md, by
#    benchmarks/gpu_report.py) is rewritten: a check cut short still leaves its figures;
#  - the most valuable cells first: unet-sd2 256 px on precomputed latents (the img/s goal), the
#    DiT MFU cell, the start-up device-memory rows (issue 26), then the rest; compile last.
#
# Cells (GPU; the dry run's tiny stand-ins in brackets):
#   encode-sd2     `scaletrain data encode` of 512 synthetic 512 px images for unet-sd2 at 256/512 px
#   sd2-256        bench unet-sd2 256 px, precomputed latents, FSDP2 bf16, micro-batch 32   [unet-tiny-latent 32 px]
#   encode-dit / dit-256   pixart-xl-2 (DiT-XL/2 size) 256 px: the MFU goal                 [dit-tiny, online]
#   dit-256-fp8    the same in engine.precision=fp8 (torchao float8 Linear layers, tensorwise, fp8
#                  all-gather; MFU against the bf16 peak, so its MFU over dit-256's is the speed-up)
#                                                              [dit-tiny, online, torchao's CPU emulation]
#   startup-fsdp / startup-deepspeed   unet-sd2 to the `start-up:` line (peak device memory) [unet-tiny]
#   sd2-512, sd2-online (VAE + text encoder every step), sd2-ac (activation checkpointing)
#   profile        where one unet-sd2 256 px step's time goes (top kernels, exposed host time)
#   encode-sdxl / sdxl-256, encode-sd3 / sd3-256   the published SDXL base 1.0 (2.57B UNet, two
#                  CLIPs) and SD3 medium (2.03B MMDiT, CLIP-L + CLIP-G + T5-XXL) on their
#                  precomputed latents and conditioning, FSDP2 bf16 (FLUX.1-dev, 11.9B, does not
#                  train on one 80 GB GPU: `scaletrain size` and the meta-device cells cover it)
#                                                                            [sdxl-tiny, mmdit-tiny online]
#   sd3-256-fp8    SD3 medium (MMDiT) in fp8, beside sd3-256                  [mmdit-tiny online, emulated]
#   (TINY=1) tiny-<engine>-<precision>: the CUDA paths of FSDP2, DDP, ZeRO-3 in bf16 and fp16
#   (EXTRA=1) micro-batch sweep, offload
#   sd2-compile, (EXTRA=1) dit-compile: regional compile, last (compiling costs minutes)
# Wheels for packages the node lacks may be placed in .whl/ (installed to /tmp/site).
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
START=$(date +%s)
LIMIT=${GPU_CHECK_LIMIT:-540}
DEADLINE=$((START + LIMIT))
RESERVE=${GPU_CHECK_RESERVE:-15}  # seconds kept for the last report
DRY=${GPU_CHECK_DRY:-0}
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
TMP=${GPU_CHECK_TMP:-/tmp/gpu_check_data}
mkdir -p "$TMP"

if [ "$DRY" = 1 ]; then  # the same cells on CPU, tiny presets, a few steps
  P_SD2=unet-tiny-latent; P_DIT=dit-tiny; P_START=unet-tiny; P_SDXL=sdxl-tiny; P_SD3=mmdit-tiny; R1=32; R2=64; MB=2; PREC=fp32
  SRC_RES=64; NSAMPLES=64; BENCH_STEPS="--warmup 1 --reps 2 --num-workers 0"; ENC_BATCH=16
  BACKEND=aot_eager  # the compile cell's wiring without minutes of CPU code generation
else
  P_SD2=unet-sd2; P_DIT=pixart-xl-2; P_START=unet-sd2; P_SDXL=sdxl-base-1.0; P_SD3=sd3-medium; R1=256; R2=512; MB=32; PREC=bf16
  SRC_RES=512; NSAMPLES=512; BENCH_STEPS="--warmup 3 --reps 6 --num-workers 6"; ENC_BATCH=64
  BACKEND=inductor
fi
printf "cell\trc\tseconds\tlimit\n" > "$OUT/cells.tsv"

left() { echo $((DEADLINE - RESERVE - $(date +%s))); }

reap() {  # NAME: kill every process whose environment carries GPU_CHECK_CELL=NAME
  local e pid
  for e in /proc/[0-9]*/environ; do
    pid=${e#/proc/}; pid=${pid%/environ}
    [ "$pid" = "$$" ] && continue
    if tr '\0' '\n' < "$e" 2>/dev/null | grep -qx "GPU_CHECK_CELL=$1"; then kill -9 "$pid" 2>/dev/null; fi
  done
}

report() { $PY benchmarks/gpu_report.py "$OUT" > "$OUT/gpu_report.log" 2>&1; }

cell() {  # NAME LIMIT CMD...: run one cell (output in OUT/NAME.log), record it, rewrite the report
  local name=$1 limit=$2 rest t0 rc
  shift 2
  rest=$(left)
  if [ "$rest" -lt 20 ]; then
    echo "== $name: skipped (global limit ${LIMIT}s reached)"
    printf "%s\tskipped\t0\t0\n" "$name" >> "$OUT/cells.tsv"
    return 0
  fi
  [ "$limit" -gt "$rest" ] && limit=$rest
  echo "== $name (limit ${limit}s): $*"
  t0=$(date +%s)
  GPU_CHECK_CELL=$name timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  reap "$name"
  printf "%s\t%s\t%s\t%s\n" "$name" "$rc" "$(($(date +%s) - t0))" "$limit" >> "$OUT/cells.tsv"
  echo "rc=$rc ($(($(date +%s) - t0))s)"; tail -n 2 "$OUT/$name.log"
  report
  return 0
}

# -- the machine: nothing else runs unless torch imports and (outside the dry run) sees a GPU
if [ "$DRY" = 1 ]; then
  echo "cpu: dry run (GPU_CHECK_DRY=1, tiny presets)" > "$OUT/gpu.txt"
else
  nvidia-smi -L > "$OUT/gpu.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/gpu.txt"
fi
cell imports 60 $PY -c "
import sys, torch, diffusers, transformers, deepspeed, scaletrain
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__,
      'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)
import importlib.util, importlib.metadata  # the fp8 cells need torchao; without it they fail in one line each
print('torchao', importlib.metadata.version('torchao') if importlib.util.find_spec('torchao') else 'missing')
if '$DRY' != '1':
    assert torch.cuda.is_available(), 'torch sees no GPU'
    x = torch.ones(1024, 1024, device='cuda', dtype=torch.bfloat16); print('device', torch.cuda.get_device_name(), float((x @ x).sum()))
"
cat "$OUT/imports.log" >> "$OUT/gpu.txt"
if [ "${GPU_CHECK_SELFTEST-0}" = 1 ]; then  # the reaper: a child in a session of its own outlives timeout's group kill
  cell reap-selftest 3 bash -c 'setsid sleep 600 & sleep 600'
fi
if ! grep -q "^imports	0	" "$OUT/cells.tsv"; then
  echo "import or device check failed: see $OUT/imports.log"; exit 1
fi

cell synth 60 $PY -m scaletrain.cli data synth --out "$TMP/synth" --num-samples "$NSAMPLES" --per-shard 64 \
  --resolution "$SRC_RES"
SH="$TMP/synth/shard-{000000..000007}.tar"
[ "$DRY" = 1 ] && SH="$TMP/synth/shard-{000000..000000}.tar"

encode() {  # NAME PRESET OUT RESOLUTION...: precomputed latents (bf16 encoders, as a bf16 recipe runs them)
  local name=$1 preset=$2 out=$3
  shift 3
  cell "$name" 150 $PY -m scaletrain.cli data encode --config configs/latent.yaml --no-progress --batch-size $ENC_BATCH \
    --shards "$SH" --out "$out" --set model.preset=$preset --set engine.precision=$PREC \
    --set "train.stages=[{name: a, resolution: $R1, steps: 1, micro_batch: 1}]" \
    $(for r in "$@"; do echo --resolution "$r"; done)
}

bench() {  # NAME LIMIT SHARDS ARGS...: one `scaletrain bench` call (each records its levers)
  local name=$1 limit=$2 shards=$3
  shift 3
  cell "$name" "$limit" $PY -m scaletrain.cli bench --precision $PREC --world-sizes 1 $BENCH_STEPS \
    --no-loaded --no-comm-sweep --shards "$shards" --out "$OUT/bench-$name" "$@"
}

startup() {  # ENGINE: the preset to the `start-up:` line (peak host and device memory per rank)
  cell "startup-$1" 150 $PY -m torch.distributed.run --standalone --nproc_per_node 1 launchers/pretrain.py \
    --config configs/demo.yaml --set model.preset=$P_START --set engine.kind=$1 --set engine.precision=$PREC \
    --set run.stop_at_step=0 --set checkpoint.resume=never --set "data.shards=$SH" \
    --set "train.stages=[{name: s, resolution: 64, steps: 1, micro_batch: 1, global_batch: 1}]" \
    --set log.wandb=disabled --set log.progress=false --set sample.at_end=false --set validate.at_end=false \
    --set "run.dir=$OUT/startup-$1"
  grep -ho "start-up:.*" "$OUT/startup-$1.log" | sed "s/^/$P_START on $1, 1 rank: /" >> "$OUT/gpu.txt"
}

# -- the goals first
encode encode-sd2 $P_SD2 "$TMP/lat-sd2" $R1 $R2
bench sd2-256 120 "$TMP/lat-sd2" --presets $P_SD2 --resolutions $R1 --engines fsdp --micro-batches $MB
if [ "$DRY" = 1 ]; then  # dit-tiny is a pixel-space model: the same cell online
  LAT_DIT=$SH
else
  encode encode-dit $P_DIT "$TMP/lat-dit" $R1
  LAT_DIT="$TMP/lat-dit"
fi
bench dit-256 90 "$LAT_DIT" --presets $P_DIT --resolutions $R1 --engines fsdp --micro-batches $MB
# fp8 beside it (the last --precision wins); on a GPU below compute capability 8.9 a one-line config error
bench dit-256-fp8 90 "$LAT_DIT" --presets $P_DIT --resolutions $R1 --engines fsdp --micro-batches $MB --precision fp8
startup fsdp
startup deepspeed

# -- then the rest
bench sd2-512 90 "$TMP/lat-sd2" --presets $P_SD2 --resolutions $R2 --engines fsdp --micro-batches $MB
bench sd2-online 90 "$SH" --presets $P_SD2 --resolutions $R1 --engines fsdp --micro-batches $MB
bench sd2-ac 120 "$TMP/lat-sd2" --presets $P_SD2 --resolutions $R1 $R2 --engines fsdp --micro-batches $MB \
  --activation-checkpointing full
cell profile 120 $PY benchmarks/profile_step.py --preset $P_SD2 --resolution $R1 --micro-batch $MB \
  --out "$OUT/profile_${P_SD2}_${R1}.txt"
if [ "${TINY-0}" = 1 ]; then  # the CUDA paths of every engine (tiny recipe, activation checkpointing on)
  for e in ${ENGINES-fsdp ddp deepspeed}; do
    for pr in ${PRECISIONS-bf16 fp16}; do  # fp16: dynamic loss scaling (GradScaler / ShardedGradScaler / DeepSpeed's)
      cell "tiny-$e-$pr" 150 $PY -m torch.distributed.run --standalone --nproc_per_node 1 launchers/pretrain.py \
        --config configs/demo.yaml --set "data.shards=$SH" --set log.wandb=disabled --set log.progress=false \
        --set train.stages.0.global_batch=null --set train.stages.1.global_batch=null --set train.stages.0.steps=20 \
        --set train.stages.1.steps=10 --set validate.every_steps=0 --set model.activation_checkpointing=full \
        --set engine.kind=$e --set engine.precision=$pr --set "run.dir=$OUT/tiny-$e-$pr"
    done
  done
fi
# the published SDXL and SD3 on their own conditioning (issue 28)
encode encode-sdxl $P_SDXL "$TMP/lat-sdxl" $R1
bench sdxl-256 150 "$TMP/lat-sdxl" --presets $P_SDXL --resolutions $R1 --engines fsdp --micro-batches $((MB / 2 > 0 ? MB / 2 : 1))
if [ "$DRY" = 1 ]; then  # mmdit-tiny is a pixel-space model: the same cell online
  LAT_SD3=$SH; MB_SD3=$MB
else
  encode encode-sd3 $P_SD3 "$TMP/lat-sd3" $R1
  LAT_SD3="$TMP/lat-sd3"; MB_SD3=16
fi
bench sd3-256 150 "$LAT_SD3" --presets $P_SD3 --resolutions $R1 --engines fsdp --micro-batches $MB_SD3
bench sd3-256-fp8 150 "$LAT_SD3" --presets $P_SD3 --resolutions $R1 --engines fsdp --micro-batches $MB_SD3 \
  --precision fp8
if [ "${EXTRA-0}" = 1 ]; then  # micro-batch sweep and the FSDP2 offload
  bench sd2-sweep 200 "$TMP/lat-sd2" --presets $P_SD2 --resolutions $R1 --engines ddp --micro-batches 64 128 \
    --activation-checkpointing full
  bench sd2-offload 120 "$TMP/lat-sd2" --presets $P_SD2 --resolutions $R1 --engines fsdp-offload --micro-batches $MB
fi
# -- compile last: minutes of compilation before the first figure
bench sd2-compile 150 "$TMP/lat-sd2" --presets $P_SD2 --resolutions $R1 --engines fsdp --micro-batches $MB --compile \
  --compile-backend $BACKEND
if [ "${EXTRA-0}" = 1 ]; then
  bench dit-compile 200 "$TMP/lat-dit" --presets $P_DIT --resolutions $R1 --engines fsdp --micro-batches $MB --compile
fi

report
cat "$OUT/gpu_report.log"
echo "cells: $OUT/cells.tsv; $(($(date +%s) - START))s of ${LIMIT}s"
