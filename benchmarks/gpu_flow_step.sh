#!/usr/bin/env bash
# Flow-transformer step benchmark on one CUDA machine, time-boxed (default 540 s, under 10 minutes).
#
# Runs benchmarks/flow_step.py at full size: random-init SD3.5-Medium (2.2B parameters) and FLUX.1-dev
# (11.9B) transformers at 1024 px, 1 preference pair per step, bf16 autocast, gradient checkpointing;
# MaPO vs Diffusion-DPO for LoRA rank 16, full fine-tuning (fp32 master weights + AdamW state) and
# bf16-only full fine-tuning. Each row runs in its own process with a time limit (FS_ROW_TIMEOUT_S);
# a row that runs out of GPU memory (FLUX full fine-tuning in fp32 needs ~190 GB for weights, gradients
# and AdamW state alone) is written with status oom, a row that would start too late with status
# skipped. LoRA rows run first. Leaves in $OUT: flow_step-<gpu>.json / .md, run.log.
#
# Needs torch with CUDA and diffusers / peft importable (installed, or in /root/site: see
# ../shared/gpu/README.md). The project is imported from the checkout (platform/ on PYTHONPATH).
#
#   OUT=/tmp/gpu-results bash benchmarks/gpu_flow_step.sh
#   OUT=/tmp/fs FS_DEVICE=cpu bash benchmarks/gpu_flow_step.sh          # CPU smoke run (tiny configs)
#
# Extra arguments go to flow_step.py after the defaults below (the last of a flag wins).
# FS_BUDGET_S: time limit of the benchmark; FS_ROW_TIMEOUT_S: limit of one row; FS_DEVICE: cuda or cpu.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
OUT="${OUT:-$REPO/benchmarks/results/gpu-flow-step}"
BUDGET="${FS_BUDGET_S:-540}"
ROW_TIMEOUT="${FS_ROW_TIMEOUT_S:-100}"
DEVICE="${FS_DEVICE:-cuda}"
PY="${PYTHON:-python3}"
for v in "$BUDGET" "$ROW_TIMEOUT"; do
  case "$v" in ''|*[!0-9]*) echo "FS_BUDGET_S / FS_ROW_TIMEOUT_S must be whole seconds, got '$v'" >&2; exit 2;; esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "FS_DEVICE must be cuda or cpu, got '$DEVICE'" >&2; exit 2;; esac
mkdir -p "$OUT"
LOG="$OUT/run.log"
: > "$LOG"
SECONDS=0
log() { echo "[gpu_flow_step ${SECONDS}s] $*" | tee -a "$LOG"; }

export PYTHONPATH="$REPO/platform:/root/site${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import torch, diffusers, peft, diffalign.models.lora; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'available', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'peft', peft.__version__)" \
    2>&1 | tee -a "$LOG" | grep -q '^torch '; then
  log "FATAL: torch, diffusers, peft or diffalign does not import (see $LOG); carry the wheels first"
  exit 1
fi
if [ "$DEVICE" = cuda ]; then
  if ! grep -q "available True" "$LOG"; then
    log "FATAL: torch sees no CUDA device (FS_DEVICE=cpu runs the CPU path)"
    exit 1
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
  DEFAULTS=(--size full --device cuda --pairs 1 --resolution 1024 --steps 3 --warmup 1 --rank 16
            --isolate yes --row-timeout-s "$ROW_TIMEOUT")
else
  DEFAULTS=(--size tiny --device cpu --isolate no)
fi

# The script stops starting rows 20 s before the budget, so it can write its files before `timeout`.
log "flow_step: start (limit ${BUDGET}s, ${ROW_TIMEOUT}s per row)"
timeout --signal=TERM --kill-after=20 "$BUDGET" "$PY" benchmarks/flow_step.py "${DEFAULTS[@]}" \
  --budget-s "$((BUDGET > 20 ? BUDGET - 20 : BUDGET))" "$@" --out-dir "$OUT" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 0 ]; then log "flow_step: ok"; else log "flow_step: FAILED rc=$rc (124 = time limit)"; fi
echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$rc"
