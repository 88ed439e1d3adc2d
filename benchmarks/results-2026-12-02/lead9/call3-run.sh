#!/bin/bash
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TORCHINDUCTOR_COMPILE_THREADS=8
S=/tmp/shim; mkdir -p $S/unipelt-0.0.dist-info
ln -sfn $PWD/unipelt $S/unipelt; ln -sfn $PWD/plugins $S/unipelt_plugins; ln -sfn $PWD/kernels $S/unipelt_kernels
printf 'Metadata-Version: 2.1\nName: unipelt\nVersion: 0.0\n' > $S/unipelt-0.0.dist-info/METADATA
python3 - > $S/unipelt-0.0.dist-info/entry_points.txt <<'PY'
import tomllib
eps = tomllib.load(open("pyproject.toml", "rb"))["project"]["entry-points"]["unipelt"]
print("[unipelt]"); [print(f"{k} = {v}") for k, v in eps.items()]
PY
(cd tests && timeout 100 env PYTHONPATH=$S python3 -m pytest test_kernels.py test_mixed_kernels.py -q -p no:cacheprovider 2>&1 | tail -8) > $OUT/gpu-tests.log; echo "tests:"; tail -3 $OUT/gpu-tests.log
export PYTHONPATH=.
timeout 60 python3 benchmarks/results-2026-12-02/lead9/kcat_probe.py --out $OUT/kcat.json > $OUT/kcat.log 2>&1; echo "kcat rc=$?"; tail -6 $OUT/kcat.log
SP="--scenarios llama --modes reduce-overhead --phases train --warmup 5 --iters 20 --gpu-warmup-s 1"
timeout 200 python3 benchmarks/speed.py $SP --variants lora-r16-all-triton,lora-r16-all --budget-s 190 --out $OUT/e2e-2.jsonl > $OUT/e2e-2.log 2>&1; echo "e2e rc=$?"
grep -h -E 'ms' $OUT/e2e-2.log | tail -8
