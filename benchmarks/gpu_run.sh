#!/usr/bin/env bash
# All GPU benchmarks in one go, on one CUDA machine (H100 / H200 class).
#
# Runs, each in its own time-boxed step so that one failure or overrun loses nothing else:
#   1. step_time  SD1.5-size UNet, bf16, gradient checkpointing, 8 pairs   (all objectives + baseline)
#   2. step_time  SDXL-size UNet,  bf16, gradient checkpointing, 4 pairs
#   3. max_batch  MaPO vs DPO, SD1.5- and SDXL-size, bf16, gradient checkpointing
#   4. mfu        SD1.5-size DPO step, 8 pairs, bf16: eager / fused AdamW / channels_last / SDPA
#                 backends / torch.compile (+ tuned), with a kernel-time profile
# and leaves in $OUT (at most 8 files, so they are easy to copy off the machine):
#   summary.md        every table, the machine and the commands
#   run.log           the whole console output
#   results.tar.gz    every JSON + markdown result (unpack into benchmarks/results/)
#   *.json            the JSON results (at most 4)
#
# Needs torch with CUDA and diffusers importable: installed, in /root/site (PYTHONPATH=/root/site), or
# as wheels in .gpu-wheels/a/ (diffusers and its small dependencies; installed offline into /root/site).
# The project is imported from the checkout (platform/ on PYTHONPATH); no pip install is needed.
#
#   OUT=/tmp/gpu-results bash benchmarks/gpu_run.sh
#
# Total wall time is kept under GPU_RUN_BUDGET_S (default 520 s) by giving each step what is left.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
OUT="${OUT:-$REPO/benchmarks/results/gpu-run}"
mkdir -p "$OUT"
STAGE="$(mktemp -d /tmp/diffalign-gpu-run.XXXXXX)"
LOG="$STAGE/run.log"
BUDGET="${GPU_RUN_BUDGET_S:-520}"
PY="${PYTHON:-python3}"
SECONDS=0

log() { echo "[gpu_run ${SECONDS}s] $*" | tee -a "$LOG"; }

finish() {
  log "done; packing results"
  {
    echo "# diffalign GPU benchmarks"
    echo
    for f in "$STAGE"/*.md; do
      [ -e "$f" ] || continue
      echo; cat "$f"; echo
    done
    echo "## Step log"
    echo '```'
    grep '^\[gpu_run' "$LOG"
    echo '```'
  } > "$STAGE/summary.md"
  (cd "$STAGE" && tar czf results.tar.gz ./*.json ./*.md run.log 2>/dev/null)
  cp "$STAGE/summary.md" "$STAGE/run.log" "$STAGE/results.tar.gz" "$OUT/" 2>/dev/null
  n=0
  for f in "$STAGE"/*.json; do
    [ -e "$f" ] || continue
    n=$((n + 1)); [ "$n" -le 4 ] && cp "$f" "$OUT/"
  done
  echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
}
trap finish EXIT

# ---------------------------------------------------------------- environment
export PYTHONPATH="$REPO/platform:/root/site${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  if ls .gpu-wheels/a/*.whl >/dev/null 2>&1; then
    log "installing the carried wheels (diffusers and its small dependencies) into /root/site"
    mkdir -p /root/site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site \
      .gpu-wheels/a/*.whl 2>&1 | tee -a "$LOG"
  fi
fi
if ! "$PY" -c "import diffusers, diffalign.train.loop" >>"$LOG" 2>&1; then
  log "FATAL: diffusers or diffalign does not import (see run.log); carry .gpu-wheels/a"
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'diffusers', diffusers.__version__)" 2>&1 | tee -a "$LOG"

# ---------------------------------------------------------------- steps
# step <name> <share of the budget in s> <command...>: runs with timeout min(share, what is left - 10).
step() {
  local name="$1" share="$2"; shift 2
  local left=$((BUDGET - SECONDS - 10))
  local limit=$(( share < left ? share : left ))
  if [ "$limit" -lt 20 ]; then
    log "$name: SKIPPED (only ${left}s of the budget left)"
    return
  fi
  log "$name: start (limit ${limit}s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then log "$name: ok"; else log "$name: FAILED rc=$rc (124 = time limit)"; fi
}

B=benchmarks
# --reference-dtype fp32: the dpo row keeps an fp32 reference copy, so the dpo_bf16ref row shows the saving.
step step_time_sd15 85 "$PY" $B/step_time.py --model sd15 --device cuda --dtype bf16 --grad-checkpointing \
  --reference-dtype fp32 --batch 8 --steps 10 --warmup 3 --out-dir "$STAGE"
step step_time_sdxl 90 "$PY" $B/step_time.py --model sdxl --device cuda --dtype bf16 --grad-checkpointing \
  --reference-dtype fp32 --batch 4 --steps 5 --warmup 2 --variants sft,mapo,dpo,dpo_bf16ref,baseline,baseline_fused \
  --out-dir "$STAGE"
step max_batch 175 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "$PY" $B/max_batch.py \
  --models sd15,sdxl --objectives mapo,dpo --dtype bf16 --precision 0.1 --budget-s 160 --out-dir "$STAGE"
left=$((BUDGET - SECONDS - 25))
step mfu 170 "$PY" $B/mfu.py --model sd15 --objective dpo --batch 8 --dtype bf16 --steps 10 --warmup 3 \
  --variants eager,fused_adam,tuned,channels_last,sdpa_flash,sdpa_efficient,sdpa_math,compile_unet,compile_blocks \
  --budget-s $(( left < 150 ? left : 150 )) --compile-reserve-s 100 --out-dir "$STAGE"
