#!/usr/bin/env bash
set -u
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mk() { d=$2; mkdir -p $d/unipelt-0.0.dist-info
  ln -sfn $PWD/unipelt $d/unipelt; ln -sfn $PWD/plugins $d/unipelt_plugins; ln -sfn $1 $d/unipelt_kernels
  printf 'Metadata-Version: 2.1\nName: unipelt\nVersion: 0.0\n' > $d/unipelt-0.0.dist-info/METADATA
  cp ep.txt $d/unipelt-0.0.dist-info/entry_points.txt; }
mk $PWD/kernels /tmp/shim; mk $PWD/old/kernels /tmp/shim_old
log() { echo "[$(date +%T)] $*"; }
export PYTHONPATH=/tmp/shim:.
log diag
for c in shrink_fwd expand_fwd shrink_bwd expand_bwd group_ref group_triton; do
  for m in global thread_local; do timeout 60 python diag_capture.py $c $m > /tmp/diag-$c-$m.log 2>&1 & done; done
timeout 50 python -m pytest tests/test_kernels.py -q -x -p no:cacheprovider -k "gpu and gemm" --tb=short > $OUT/pytest-gemm.log 2>&1
wait
cat /tmp/diag-*.log | grep -v Warn > $OUT/diag.log; grep CASE $OUT/diag.log
tail -30 $OUT/pytest-gemm.log
CM=global; grep -q "group_triton global: OK" $OUT/diag.log || CM=thread_local
log "capture mode $CM"
log e2e
timeout 70 python benchmarks/speed.py --scenarios llama,bert --modes eager --variants lora-r16-all,lora-r16-all-triton,peft-lora-r16-all,unipelt,unipelt-triton --warmup 5 --iters 15 --gpu-warmup-s 2 --budget-s 62 --out $OUT/e2e-eager-1.jsonl > $OUT/e2e-eager-1.log 2>&1
grep -E "^\[" $OUT/e2e-eager-1.log | grep -v "start ->" | tail -25
log kernels
KERNELS_CAPTURE_MODE=$CM timeout 90 python benchmarks/kernels.py --graphs --warmup 5 --iters 20 --out $OUT/kernels-graphs.jsonl > $OUT/kernels-graphs.log 2>&1
grep -E "^(group|layer)|Error" $OUT/kernels-graphs.log | cut -c1-400
log done
