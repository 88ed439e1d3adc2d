#!/bin/bash
# session 8 (lead): mixed batches of LoRA with dropout 0.1 on the Triton path (stacked kernels) against the
# grouped executor (segments) and one adapter per batch; llama train, reduce-overhead, two runs in one call
set -u
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
T0=$(date +%s)
DEADLINE=${DEADLINE:-300}
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
LOG=$OUT/all.log
echo "start $(date -u) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)" > $LOG
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" >> $LOG 2>&1
SP="--modes reduce-overhead --warmup 5 --iters 20 --gpu-warmup-s 2 --no-floors --adamw fused --phases train"
V="--scenarios llama --variants ${VARIANTS:-lora-r8-qv-d01,lora-r8-qv-d01-triton,lora-r8-qv-d01-mixed8,lora-r8-qv-d01-mixed8-triton}"
run() {
  local name=$1; shift
  local l=$(left)
  if [ $l -lt 30 ]; then echo "== $name: skipped ($l s left)" >> $LOG; return; fi
  echo "== $name ($l s left): speed.py $SP $*" >> $LOG
  timeout $((l - 5)) python3 benchmarks/speed.py $SP --budget-s $((l - 15)) "$@" --out $OUT/$name.jsonl >> $LOG 2>&1
  echo "== $name rc=$? at $(( $(date +%s) - T0 ))s" >> $LOG
}
run mixd-1 $V
run mixd-2 $V
echo "end $(( $(date +%s) - T0 ))s" >> $LOG
