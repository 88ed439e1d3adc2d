#!/bin/bash
# Prepared for the next device call, NOT run (helper gstep, session 9: call 1 spent ~5.6 of its
# 7 device minutes, too little was left for a cold start). Run from the tree's root on the GPU
# machine; each part has its own timeout and writes to $OUT as it goes. Parts (estimates, cold):
#   tests  ~70 s  tests/test_graphed_step.py on the GPU (call 1: 6 of 8 GPU tests failed at the
#                 capture on transformers' eager attention mask; they now use SDPA)
#   gs     ~150 s graph-step, BERT train, two runs: floor, lora-r16-all, -triton, PEFT, unipelt;
#                 lora-r8-qv / -mixed8 with fused AdamW (no floors)
#   ro     ~330 s graph-step and reduce-overhead side by side in one process (each against its own
#                 floor), run 1 cold (~35 s a compile), run 2 from the inductor cache
#   prof   ~90 s  GPU time per graphed step by kernel (graph_profile.py), eager and compiled
# e.g. `bash call2.sh tests gs` in one call, `bash call2.sh ro` in another.
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
G=benchmarks/results-2026-12-02/gstep
SP="--scenarios bert --phases train --gpu-warmup-s 2"
for part in "$@"; do
  t0=$SECONDS
  case $part in
  tests)
    S=/tmp/shim; mkdir -p $S/unipelt-0.0.dist-info
    ln -sfn $PWD/unipelt $S/unipelt; ln -sfn $PWD/plugins $S/unipelt_plugins; ln -sfn $PWD/kernels $S/unipelt_kernels
    printf 'Metadata-Version: 2.1\nName: unipelt\nVersion: 0.0\n' > $S/unipelt-0.0.dist-info/METADATA
    { echo "[unipelt]"; sed -n '/^\[project.entry-points.unipelt\]/,/^\[tool/p' pyproject.toml | grep ' = ' | tr -d '"'; } \
      > $S/unipelt-0.0.dist-info/entry_points.txt
    PYTHONPATH=$S timeout 170 python3 -m pytest tests/test_graphed_step.py -q -p no:cacheprovider -rs > $OUT/pytest2.txt 2>&1
    echo "pytest rc=$?"; tail -3 $OUT/pytest2.txt ;;
  gs)
    for run in 1 2; do
      PYTHONPATH=. timeout 70 python3 benchmarks/speed.py $SP --modes graph-step --variants lora-r16-all,lora-r16-all-triton,peft-lora-r16-all,unipelt --out $OUT/gs2-$run.jsonl > $OUT/gs2-$run.log 2>&1
      echo "gs run $run rc=$?"; grep -E " ms|ERROR" $OUT/gs2-$run.log | tail -7
      PYTHONPATH=. timeout 45 python3 benchmarks/speed.py $SP --modes graph-step --no-floors --adamw fused --variants lora-r8-qv,lora-r8-qv-mixed8 --out $OUT/gsm2-$run.jsonl > $OUT/gsm2-$run.log 2>&1
      echo "gsm run $run rc=$?"; grep -E " ms|ERROR" $OUT/gsm2-$run.log | tail -2
    done ;;
  ro)
    for run in 1 2; do
      lim=$([ $run = 1 ] && echo 330 || echo 150)
      PYTHONPATH=. timeout $lim python3 benchmarks/speed.py $SP --modes graph-step,reduce-overhead --variants lora-r16-all,lora-r16-all-triton,peft-lora-r16-all --budget-s $((lim - 20)) --out $OUT/ro-$run.jsonl > $OUT/ro-$run.log 2>&1
      echo "ro run $run rc=$?"; grep -E " ms|ERROR" $OUT/ro-$run.log | tail -12
    done ;;
  prof)
    for c in none default; do
      arg=$([ $c = none ] && echo "" || echo "--compile default")
      PYTHONPATH=. timeout 80 python3 $G/graph_profile.py --variant lora-r16-all $arg --out $OUT/prof-$c.txt > $OUT/prof-$c.log 2>&1
      echo "prof $c rc=$?"; head -1 $OUT/prof-$c.txt
    done ;;
  esac
  echo "part $part: $((SECONDS - t0)) s"
done
cd $OUT && ls *.log >/dev/null 2>&1 && tar czf logs2.tgz *.log && rm -f *.log
