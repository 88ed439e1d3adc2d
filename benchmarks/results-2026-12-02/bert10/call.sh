#!/bin/bash
# helper bert10, session 10: one device call (<= 300 s of command)
cd "$(dirname "$0")"
export PYTHONPATH=. TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/logs
left() { echo $(( 295 - SECONDS )); }
run() {  # name limit cmd...
  local name=$1 lim=$2; shift 2
  local l=$(left); [ $l -lt $lim ] && lim=$l
  [ $lim -lt 15 ] && { echo "skip $name (no time)" >> $OUT/logs/steps.txt; return; }
  echo "$(date -u +%T) start $name limit $lim: $*" >> $OUT/logs/steps.txt
  timeout $lim "$@" > $OUT/logs/$name.log 2>&1; echo "$(date -u +%T) end $name rc=$? at ${SECONDS}s" >> $OUT/logs/steps.txt
  tar czf $OUT/logs.tgz -C $OUT logs
}
{ nvidia-smi --query-gpu=name,driver_version --format=csv; python3 -c "import torch, triton, transformers, peft; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__)"; } > $OUT/gpu.txt 2>&1
GS="python3 benchmarks/speed.py --scenarios bert --phases train --gpu-warmup-s 2 --modes graph-step --variants lora-r16-all,lora-r16-all-triton,peft-lora-r16-all"
RO="python3 benchmarks/speed.py --scenarios bert --phases train --gpu-warmup-s 1 --modes reduce-overhead --no-floors --adamw fused --variants lora-r8-qv,lora-r8-qv-mixed8"
GP="python3 benchmarks/results-2026-12-02/bert10/graph_profile.py"
run gs-1 75 $GS --out $OUT/gs-1.jsonl
run gprof-triton 40 $GP --variant lora-r16-all-triton --out $OUT/gprof-lora-r16-all-triton-fused.txt
run gs-2 70 $GS --out $OUT/gs-2.jsonl
run ro-1 90 $RO --out $OUT/ro-1.jsonl
run ro-2 60 $RO --out $OUT/ro-2.jsonl
run gprof-grouped 35 $GP --variant lora-r16-all --out $OUT/gprof-lora-r16-all-fused.txt
run gs-foreach 45 python3 benchmarks/speed.py --scenarios bert --phases train --gpu-warmup-s 1 --modes graph-step --no-floors --adamw foreach --variants lora-r16-all,lora-r16-all-triton --out $OUT/logs/gs-foreach.jsonl
tar czf $OUT/logs.tgz -C $OUT logs
