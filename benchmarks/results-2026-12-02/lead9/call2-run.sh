#!/bin/bash
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=. TORCHINDUCTOR_COMPILE_THREADS=8
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/gpu.txt
timeout 230 python3 benchmarks/kernel_sweep.py --out $OUT/sweep.json --write-best $OUT/best.json > $OUT/sweep.log 2>&1; echo "sweep rc=$?"
grep -E '^\[|^best' $OUT/sweep.log | tail -30; cat $OUT/best.json; echo
SP="--scenarios llama --modes reduce-overhead --phases train --warmup 5 --iters 20 --gpu-warmup-s 1"
if [ -s $OUT/best.json ]; then
UNIPELT_KERNEL_CONFIGS=$OUT/best.json timeout 200 python3 benchmarks/speed.py $SP --variants lora-r16-all-triton,lora-r16-all --budget-s 190 --out $OUT/e2e-new.jsonl > $OUT/e2e-new.log 2>&1; echo "e2e new rc=$?"
fi
grep -h -E 'ms|ratio' $OUT/e2e-*.log | tail -20
