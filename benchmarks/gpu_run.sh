#!/usr/bin/env bash
# The speed measurements of benchmarks/RESULTS.md, in two device calls made back to back (the
# second finds the first's compile caches): the caches are warmed in parallel first (those timings
# are thrown away); every measurement quoted runs alone on the GPU, one process at a time.
#   bash benchmarks/gpu_run.sh 1 OUTDIR     # warm-up, reduce-overhead run 1, eager run 1 (~8.5 min)
#   bash benchmarks/gpu_run.sh 2 OUTDIR     # eager run 2, reduce-overhead run 2 (~5 min)
set -u
PHASE=${1:?phase 1 or 2}
OUT=${2:?output folder}
export PYTHONPATH=. PYTHONUNBUFFERED=1
V_EAGER=unipelt,lora-r16-all,lora-r8-qv,peft-lora-r16-all,peft-lora-r8-qv
V_RO=unipelt,lora-r16-all,peft-lora-r16-all
log() { echo "[$(date +%T)] $*"; }
show() { grep -E "^\[ *[0-9.]+s\]" | grep -v "start -> end" | tail -40; }
if [ "$PHASE" = 1 ]; then
  log "warm the inductor caches (parallel, timings discarded)"
  for s in bert llama; do for v in ${V_RO//,/ }; do
    timeout 200 python benchmarks/speed.py --scenarios $s --modes reduce-overhead --variants $v --warmup 2 --iters 2 \
      --gpu-warmup-s 0 --out /tmp/warm-$s-$v.jsonl > /tmp/warm-$s-$v.log 2>&1 &
  done; done
  wait
  log "reduce-overhead run 1"
  timeout 170 python benchmarks/speed.py --modes reduce-overhead --variants $V_RO --budget-s 160 --out $OUT/ro-1.jsonl 2>&1 | show
  log "eager run 1"
  timeout 150 python benchmarks/speed.py --modes eager --variants $V_EAGER --budget-s 140 --out $OUT/eager-1.jsonl 2>&1 | show
else
  log "eager run 2"
  timeout 150 python benchmarks/speed.py --modes eager --variants $V_EAGER --budget-s 140 --out $OUT/eager-2.jsonl 2>&1 | show
  log "reduce-overhead run 2"
  timeout 150 python benchmarks/speed.py --modes reduce-overhead --variants $V_RO --budget-s 140 --out $OUT/ro-2.jsonl 2>&1 | show
fi
log "done"
