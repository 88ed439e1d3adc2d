#!/bin/bash
# NOTE (added after the run): invoked as `cd .bert12carry/tree && bash ../call.sh`, ROOT=$PWD below is the
# carried tree, not the device tree's root: the "main" runs ran this branch too (RESULTS.md says so).
# session 12, helper bert12 (issue 9): the LoRA dX folded into the base layer's dX (unipelt/fold.py).
# GPU tests of the fold, then BERT graph-step train, this branch (.bert12carry/tree) against main
# (the tree's root), interleaved, two runs each; a kernel profile of the folded step; llama
# reduce-overhead train lora-r16-all-triton and lora-r16-all (speed_turns.py, this branch) if time is left.
ROOT=$PWD; NEW=$(dirname "$0")/tree; NEW=$(cd $NEW && pwd)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TORCHINDUCTOR_COMPILE_THREADS=8
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/gpu.txt
S=/tmp/shim; mkdir -p $S/unipelt-0.0.dist-info
ln -sfn $NEW/unipelt $S/unipelt; ln -sfn $NEW/plugins $S/unipelt_plugins; ln -sfn $NEW/kernels $S/unipelt_kernels
printf 'Metadata-Version: 2.1\nName: unipelt\nVersion: 0.0\n' > $S/unipelt-0.0.dist-info/METADATA
python3 - > $S/unipelt-0.0.dist-info/entry_points.txt <<'PY'
import tomllib
eps = tomllib.load(open("pyproject.toml", "rb"))["project"]["entry-points"]["unipelt"]
print("[unipelt]"); [print(f"{k} = {v}") for k, v in eps.items()]
PY
t0=$SECONDS
(cd $NEW/tests && timeout 60 env PYTHONPATH=$S python3 -m pytest test_fold.py -q -p no:cacheprovider -k gpu 2>&1 | tail -5) > $OUT/gpu-tests.log
echo "tests $((SECONDS-t0)) s:"; tail -2 $OUT/gpu-tests.log
SP="--scenarios bert --modes graph-step --phases train --warmup 5 --iters 30 --gpu-warmup-s 1 --variants lora-r16-all,lora-r16-all-triton"
for run in 1 2; do
  for code in new main; do
    [ $((SECONDS-t0)) -gt 200 ] && { echo "skip $code run $run (time)"; continue; }
    dir=$([ $code = new ] && echo $NEW || echo $ROOT)
    (cd $dir && timeout 60 env PYTHONPATH=. python3 benchmarks/speed.py $SP --out $OUT/gs-$code-$run.jsonl > $OUT/gs-$code-$run.log 2>&1)
    echo "gs $code run $run rc=$? $((SECONDS-t0)) s"; grep -h -E ' ms|ratio' $OUT/gs-$code-$run.log | tail -4
  done
done
python3 benchmarks/speed.py --report $OUT/gs-new-1.jsonl $OUT/gs-new-2.jsonl $OUT/gs-main-1.jsonl $OUT/gs-main-2.jsonl 2>&1 | grep -v '^$' | tail -14
if [ $((SECONDS-t0)) -lt 215 ]; then
  (cd $NEW && timeout 35 env PYTHONPATH=. python3 benchmarks/results-2026-12-02/bert10/graph_profile.py --variant lora-r16-all-triton --out $OUT/gprof-new-triton.txt > $OUT/gprof.log 2>&1)
  echo "profile rc=$? $((SECONDS-t0)) s"; head -5 $OUT/gprof-new-triton.txt
fi
left=$((315 - (SECONDS-t0)))
if [ $left -gt 110 ]; then
  (cd $NEW && timeout $left env PYTHONPATH=. python3 benchmarks/speed_turns.py --scenario llama --phase train --variants lora-r16-all-triton,lora-r16-all \
     --ready-s $((left - 40)) --turn-s 15 --warmup 8 --iters 30 --out $OUT/llama-ro.jsonl > $OUT/llama-ro.log 2>&1)
  echo "llama rc=$? $((SECONDS-t0)) s"
  python3 benchmarks/speed.py --report $OUT/llama-ro.pass1.jsonl $OUT/llama-ro.pass2.jsonl 2>&1 | grep -v '^$' | tail -8
else
  echo "llama skipped: $left s left"
fi
cd $OUT && tar czf logs.tgz *.log *.jsonl *.txt 2>/dev/null; rm -f *.log *.jsonl
