#!/bin/bash
# session 13, call 3 (lead): auto's PyTorch form in inductor's default mode now the grouped executor's graph (out, u kept N-D);
# the new GPU tests; llama train, default mode and reduce-overhead: auto vs grouped
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH=. TORCHINDUCTOR_COMPILE_THREADS=4
mkdir -p $OUT/logs; t0=$SECONDS; D=benchmarks/results-2026-12-03/lead13
S=/tmp/shim; mkdir -p $S/unipelt-0.0.dist-info
ln -sfn $PWD/unipelt $S/unipelt; ln -sfn $PWD/plugins $S/unipelt_plugins; ln -sfn $PWD/kernels $S/unipelt_kernels
printf 'Metadata-Version: 2.1\nName: unipelt\nVersion: 0.0\n' > $S/unipelt-0.0.dist-info/METADATA
python3 - > $S/unipelt-0.0.dist-info/entry_points.txt <<'PY'
import tomllib
eps = tomllib.load(open("pyproject.toml", "rb"))["project"]["entry-points"]["unipelt"]
print("[unipelt]"); [print(f"{k} = {v}") for k, v in eps.items()]
PY
(timeout 80 env PYTHONPATH=$S python3 -m pytest tests/test_kernels.py -q -p no:cacheprovider -p no:logging --tb=short -k "inductor_launches or only_where_cuda_graphs or twins or auto" 2>&1 | grep -v DEBUG | tail -60) > $OUT/logs/gpu-tests.log
echo "tests $((SECONDS-t0)) s:"; tail -4 $OUT/logs/gpu-tests.log
SP="--scenarios llama --phases train --warmup 5 --iters 20 --gpu-warmup-s 1"
timeout 170 python3 benchmarks/speed.py $SP --modes reduce-overhead --variants lora-r16-all,lora-r16-all-grouped --budget-s 160 --out $OUT/logs/ro-a.jsonl > $OUT/logs/ro-a.log 2>&1
echo "== ro-a rc=$? $((SECONDS-t0)) s"; grep -h " ms" $OUT/logs/ro-a.log | tail -5
L=$((420 - SECONDS + t0)); [ $L -gt 170 ] && L=170
[ $L -gt 60 ] && timeout $L python3 benchmarks/speed.py $SP --modes compiled --variants lora-r16-all,lora-r16-all-grouped --budget-s $((L-15)) --out $OUT/logs/comp-a.jsonl > $OUT/logs/comp-a.log 2>&1
echo "== comp-a rc=$? $((SECONDS-t0)) s"; grep -h " ms" $OUT/logs/comp-a.log | tail -6
cd $OUT && tar czf logs.tgz logs && rm -rf logs
