#!/bin/bash
# session 10, call 2 (lead): the one-read expand backward on the H200
cd "$(dirname "$0")/tree"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TORCHINDUCTOR_COMPILE_THREADS=8
S=/tmp/shim; mkdir -p $S/unipelt-0.0.dist-info
ln -sfn $PWD/unipelt $S/unipelt; ln -sfn $PWD/plugins $S/unipelt_plugins; ln -sfn $PWD/kernels $S/unipelt_kernels
printf 'Metadata-Version: 2.1\nName: unipelt\nVersion: 0.0\n' > $S/unipelt-0.0.dist-info/METADATA
python3 - > $S/unipelt-0.0.dist-info/entry_points.txt <<'PY'
import tomllib
eps = tomllib.load(open("pyproject.toml", "rb"))["project"]["entry-points"]["unipelt"]
print("[unipelt]"); [print(f"{k} = {v}") for k, v in eps.items()]
PY
t0=$SECONDS
(cd tests && timeout 75 env PYTHONPATH=$S python3 -m pytest test_kernels.py -q -p no:cacheprovider -k "one and (expand_forward or gpu_bf16_large)" 2>&1 | tail -5) > $OUT/gpu-tests.log
echo "tests $((SECONDS-t0)) s:"; tail -2 $OUT/gpu-tests.log
export PYTHONPATH=.
timeout 110 python3 benchmarks/kernel_sweep.py --kinds expand_one,expand_fin --current expand_dh --out $OUT/sweep.json --write-best $OUT/best.json > $OUT/sweep.log 2>&1
echo "sweep rc=$? $((SECONDS-t0)) s"; grep -E "one-read|current|best" $OUT/sweep.log | tail -12
SP="--scenarios llama --modes reduce-overhead --phases train --warmup 5 --iters 20 --gpu-warmup-s 1 --variants lora-r16-all-triton"
for run in 1 2; do
  for mode in one split; do
    cfg=""; [ $mode = one ] && [ -s $OUT/best.json ] && grep -q expand $OUT/best.json && cfg="UNIPELT_KERNEL_CONFIGS=$OUT/best.json"
    lim=$([ $run = 1 ] && echo 95 || echo 70)
    timeout $lim env UNIPELT_KERNEL_BWD=$mode $cfg python3 benchmarks/speed.py $SP --budget-s $((lim - 8)) --out $OUT/e2e-$mode-$run.jsonl > $OUT/e2e-$mode-$run.log 2>&1
    echo "e2e $mode run $run rc=$? $((SECONDS-t0)) s $cfg"; grep -h -E ' ms' $OUT/e2e-$mode-$run.log | tail -3
  done
done
cd $OUT && tar czf logs.tgz *.log *.jsonl && rm -f *.log *.jsonl
