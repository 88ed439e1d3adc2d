#!/bin/bash
# session 10, call 3 (lead): the split backward with dB's shares summed in the dh launch, on the H200:
# GPU kernel tests, then llama LoRA r16 train end to end, this code (.leadcarry/tree) against main 492cc47
# (the tree's root), interleaved, two runs each
ROOT=$PWD; NEW=$(dirname "$0")/tree; NEW=$(cd $NEW && pwd)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TORCHINDUCTOR_COMPILE_THREADS=8
S=/tmp/shim; mkdir -p $S/unipelt-0.0.dist-info
ln -sfn $NEW/unipelt $S/unipelt; ln -sfn $NEW/plugins $S/unipelt_plugins; ln -sfn $NEW/kernels $S/unipelt_kernels
printf 'Metadata-Version: 2.1\nName: unipelt\nVersion: 0.0\n' > $S/unipelt-0.0.dist-info/METADATA
python3 - > $S/unipelt-0.0.dist-info/entry_points.txt <<'PY'
import tomllib
eps = tomllib.load(open("pyproject.toml", "rb"))["project"]["entry-points"]["unipelt"]
print("[unipelt]"); [print(f"{k} = {v}") for k, v in eps.items()]
PY
t0=$SECONDS
(cd $NEW/tests && timeout ${TEST_S:-60} env PYTHONPATH=$S python3 -m pytest test_kernels.py -q -p no:cacheprovider -k "expand or gpu" 2>&1 | tail -5) > $OUT/gpu-tests.log
echo "tests $((SECONDS-t0)) s:"; tail -2 $OUT/gpu-tests.log
SP="--scenarios llama --modes reduce-overhead --phases train --warmup 5 --iters 20 --gpu-warmup-s 1 --variants lora-r16-all-triton"
for run in 1 2; do
  for code in new main; do
    [ $((SECONDS-t0)) -gt 205 ] && { echo "skip $code run $run (time)"; continue; }
    dir=$([ $code = new ] && echo $NEW || echo $ROOT)
    lim=$([ $run = 1 ] && [ $code = new ] && echo 85 || echo 55)
    (cd $dir && timeout $lim env PYTHONPATH=. python3 benchmarks/speed.py $SP --budget-s $((lim - 8)) --out $OUT/e2e-$code-$run.jsonl > $OUT/e2e-$code-$run.log 2>&1)
    echo "e2e $code run $run rc=$? $((SECONDS-t0)) s"; grep -h -E ' ms' $OUT/e2e-$code-$run.log | tail -3
  done
done
cd $OUT && tar czf logs3.tgz *.log *.jsonl && rm -f *.log *.jsonl
