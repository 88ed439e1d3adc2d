#!/usr/bin/env bash
# kern helper, session 6, call 1: end to end under reduce-overhead with the kernels.
# Phase A compiles every (scenario, variant) in 4 parallel processes (1 warm-up, 1 iteration) only
# to fill the on-disk inductor/triton caches; phase B is the measurement, sequential, caches warm.
set -u
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
export TORCHINDUCTOR_CACHE_DIR=/tmp/ic TRITON_CACHE_DIR=/tmp/ic/triton
log() { echo "[$(date +%T)] $*"; }
nvidia-smi --query-gpu=name,memory.used --format=csv
V1=lora-r16-all,lora-r16-all-triton,lora-r16-all-d01,lora-r16-all-d01-triton
V2=unipelt,unipelt-triton,peft-lora-r16-all,peft-lora-r16-all-d01
log "phase A (cache warm-up, parallel)"
for s in llama bert; do for v in $V1 $V2; do
  timeout 130 python3 benchmarks/speed.py --scenarios $s --modes reduce-overhead --phases train --variants $v --warmup 1 --iters 1 --gpu-warmup-s 0 --out /tmp/warm-$s-${v:0:8}.jsonl > /tmp/warm-$s-${v:0:8}.log 2>&1 &
done; done
wait
log "phase A done"; grep -h "reduce-overhead" /tmp/warm-*.log | cut -c1-200
log "phase B (measurement)"
timeout 170 python3 benchmarks/speed.py --scenarios llama,bert --modes reduce-overhead --phases train --variants lora-r16-all,lora-r16-all-triton,peft-lora-r16-all,lora-r16-all-d01,lora-r16-all-d01-triton,peft-lora-r16-all-d01,unipelt,unipelt-triton --gpu-warmup-s 2 --budget-s 160 --out $OUT/e2e-ro-1.jsonl > $OUT/e2e-ro-1.log 2>&1
log "phase B rc=$?"
grep -E "^\[" $OUT/e2e-ro-1.log | cut -c1-220
cat /tmp/warm-*.log | grep -iE "error|Traceback" | head -20 > $OUT/warm-errors.log
du -sh /tmp/ic; tar -czf $OUT/ic.tgz -C /tmp ic; ls -la $OUT
log done
