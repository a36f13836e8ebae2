#!/usr/bin/env bash
# Weight-sync benchmark on one CUDA machine, time-boxed (default 270 s, under 5 minutes).
#
# Its own script because gpu_run.sh already fills its 520 s budget (one device call is at most 10 min).
# Runs benchmarks/weight_sync.py at SD1.5 size: the object store (what the platform does) against
# nccl broadcast and Ray Direct Transport (nccl; cuda_ipc on a single GPU), bf16 full fine-tune and
# bf16 LoRA rank 4 / 16 payloads. Transports this machine cannot run (nccl needs one GPU per rank)
# are skipped with the reason in the table. Leaves in $OUT: weight_sync-<gpu>.json / .md, run.log.
#
# Needs torch with CUDA, Ray and diffusers importable (installed, or in /root/site: see
# ../shared/gpu/README.md for carrying the Ray and diffusers wheels there). The project is imported
# from the checkout (platform/ on PYTHONPATH).
#
#   OUT=/tmp/gpu-results bash benchmarks/gpu_weight_sync.sh
#   OUT=/tmp/ws WS_DEVICE=cpu bash benchmarks/gpu_weight_sync.sh --size tiny --rounds 2   # CPU smoke run
#
# Extra arguments go to weight_sync.py after the defaults below (the last of a flag wins).
# WS_BUDGET_S: time limit of the benchmark; WS_DEVICE: cuda (default) or cpu.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled RAY_ADDRESS=local
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
OUT="${OUT:-$REPO/benchmarks/results/gpu-weight-sync}"
BUDGET="${WS_BUDGET_S:-270}"
DEVICE="${WS_DEVICE:-cuda}"
PY="${PYTHON:-python3}"
case "$BUDGET" in ''|*[!0-9]*) echo "WS_BUDGET_S must be a whole number of seconds, got '$BUDGET'" >&2; exit 2;; esac
case "$DEVICE" in cuda|cpu) ;; *) echo "WS_DEVICE must be cuda or cpu, got '$DEVICE'" >&2; exit 2;; esac
mkdir -p "$OUT"
LOG="$OUT/run.log"
: > "$LOG"
SECONDS=0
log() { echo "[gpu_weight_sync ${SECONDS}s] $*" | tee -a "$LOG"; }

export PYTHONPATH="$REPO/platform:/root/site${PYTHONPATH:+:$PYTHONPATH}"
# One interpreter start for the import check and the versions (each start imports torch: seconds).
if ! "$PY" -c "import torch, ray, diffusers, diffalign.models.lora; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'available', torch.cuda.is_available(), 'ray', ray.__version__, 'diffusers', diffusers.__version__)" \
    2>&1 | tee -a "$LOG" | grep -q '^torch '; then
  log "FATAL: torch, ray, diffusers or diffalign does not import (see $LOG); carry the wheels first"
  exit 1
fi
if [ "$DEVICE" = cuda ]; then
  if ! grep -q "available True" "$LOG"; then
    log "FATAL: torch sees no CUDA device (WS_DEVICE=cpu runs the CPU path)"
    exit 1
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
  DEFAULTS=(--size sd15 --device cuda --receivers 2 --rounds 5 --warmup 1
            --payloads full_bf16,lora4_bf16,lora16_bf16 --transports object_store,broadcast,rdt,rdt_ipc)
else
  DEFAULTS=(--size sd15 --device cpu --receivers 1 --rounds 3 --warmup 1
            --payloads full_bf16,lora4_bf16,lora16_bf16 --transports object_store,broadcast)
fi

log "weight_sync: start (limit ${BUDGET}s)"
timeout --signal=TERM --kill-after=30 "$BUDGET" "$PY" benchmarks/weight_sync.py "${DEFAULTS[@]}" "$@" \
  --out-dir "$OUT" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 0 ]; then log "weight_sync: ok"; else log "weight_sync: FAILED rc=$rc (124 = time limit)"; fi
echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$rc"
