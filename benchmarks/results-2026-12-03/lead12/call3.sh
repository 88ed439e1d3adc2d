#!/bin/bash
# session 12, call 3 (lead, on main a2547f3 = lead + bert12 + mixed12 merged): the GPU test that failed
# in call 2, alone with its traceback; then mixed12's BERT block (helper mixed12's call1.sh, which
# could not get a machine): floor, lora-r8-qv, lora-r8-qv-mixed8 (packed), -unpacked, reduce-overhead train
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
timeout 75 env PYTHONPATH=$S python3 -m pytest tests/test_kernels.py -q -p no:cacheprovider -x -k "test_gpu_group_step_under_reduce_overhead" > $OUT/logs/gpu-test.log 2>&1
echo "test rc=$? $((SECONDS-t0)) s"; grep -E "^E |Error|passed|failed" $OUT/logs/gpu-test.log | head -30
timeout 170 python3 benchmarks/speed_turns.py --scenario bert --phase train --variants lora-r8-qv,lora-r8-qv-mixed8,lora-r8-qv-mixed8-unpacked --ready-s 120 --turn-s 25 --warmup 8 --iters 30 --out $OUT/logs/bert-mixed.jsonl > $OUT/logs/bert-mixed.log 2>&1
echo "== bert-mixed rc=$? $((SECONDS-t0)) s"
python3 benchmarks/speed.py --report $OUT/logs/bert-mixed.pass1.jsonl $OUT/logs/bert-mixed.pass2.jsonl 2>&1 | grep "^| [12] |"
cd $OUT && tar czf logs.tgz logs && rm -rf logs
