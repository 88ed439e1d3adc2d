#!/bin/bash
# session 12, call 2 (lead): executor auto's per-group rule (f9804c7) and the dropout kernels' own
# blocks: GPU tests; llama RO train auto vs grouped vs triton, LoRA r16 with and without dropout;
# BERT graph-step (auto now runs the kernels in a graphed step); the dropout kernels' block sweep
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH=. TORCHINDUCTOR_COMPILE_THREADS=4
mkdir -p $OUT/logs; t0=$SECONDS
S=/tmp/shim; mkdir -p $S/unipelt-0.0.dist-info
ln -sfn $PWD/unipelt $S/unipelt; ln -sfn $PWD/plugins $S/unipelt_plugins; ln -sfn $PWD/kernels $S/unipelt_kernels
printf 'Metadata-Version: 2.1\nName: unipelt\nVersion: 0.0\n' > $S/unipelt-0.0.dist-info/METADATA
python3 - > $S/unipelt-0.0.dist-info/entry_points.txt <<'PY'
import tomllib
eps = tomllib.load(open("pyproject.toml", "rb"))["project"]["entry-points"]["unipelt"]
print("[unipelt]"); [print(f"{k} = {v}") for k, v in eps.items()]
PY
(timeout 110 env PYTHONPATH=$S python3 -m pytest tests/test_graphed_step.py tests/test_kernels.py -q -p no:cacheprovider -x -k "gpu or cuda or graphed or replays or auto" 2>&1 | tail -15) > $OUT/logs/gpu-tests.log
echo "tests $((SECONDS-t0)) s:"; tail -3 $OUT/logs/gpu-tests.log
timeout 190 python3 benchmarks/speed_turns.py --scenario llama --phase train --variants lora-r16-all,lora-r16-all-grouped,lora-r16-all-d01,lora-r16-all-d01-triton --ready-s 150 --turn-s 30 --warmup 8 --iters 30 --out $OUT/logs/llama.jsonl > $OUT/logs/llama.log 2>&1
echo "== llama rc=$? $((SECONDS-t0)) s"
python3 benchmarks/speed.py --report $OUT/logs/llama.pass1.jsonl $OUT/logs/llama.pass2.jsonl 2>&1 | grep "^| [12] |"
for run in 1 2; do
  [ $((SECONDS-t0)) -gt 380 ] && { echo "skip gs $run"; continue; }
  timeout 45 python3 benchmarks/speed.py --scenarios bert --phases train --gpu-warmup-s 1 --modes graph-step --variants lora-r16-all,lora-r16-all-grouped --out $OUT/logs/gs-$run.jsonl > $OUT/logs/gs-$run.log 2>&1
  echo "== gs $run rc=$? $((SECONDS-t0)) s"; grep -h "graph-step" $OUT/logs/gs-$run.log | grep " ms" | tail -3
done
L=$((440 - SECONDS + t0)); [ $L -gt 60 ] && L=60
[ $L -gt 20 ] && timeout $L python3 benchmarks/kernel_sweep.py --kinds shrink_drop --rotate 4 --out $OUT/logs/sweep-drop.json > $OUT/logs/sweep-drop.log 2>&1
echo "== sweep rc=$? $((SECONDS-t0)) s"; grep -E "best|current" $OUT/logs/sweep-drop.log | tail -8
cd $OUT && tar czf logs.tgz logs && rm -rf logs
