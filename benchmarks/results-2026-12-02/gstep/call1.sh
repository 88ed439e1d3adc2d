#!/bin/bash
# Device call 1 (helper gstep, session 9): the GPU tests of tests/test_graphed_step.py, then
# BERT train in the graph-step modes (one run). Run from the tree's root on the GPU machine.
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
S=/tmp/shim; mkdir -p $S/unipelt-0.0.dist-info
ln -sfn $PWD/unipelt $S/unipelt; ln -sfn $PWD/plugins $S/unipelt_plugins; ln -sfn $PWD/kernels $S/unipelt_kernels
printf 'Metadata-Version: 2.1\nName: unipelt\nVersion: 0.0\n' > $S/unipelt-0.0.dist-info/METADATA
{ echo "[unipelt]"; sed -n '/^\[project.entry-points.unipelt\]/,/^\[tool/p' pyproject.toml | grep ' = ' | tr -d '"'; } \
  > $S/unipelt-0.0.dist-info/entry_points.txt
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/gpu.txt 2>&1
t0=$SECONDS
PYTHONPATH=$S timeout 170 python3 -m pytest tests/test_graphed_step.py -q -p no:cacheprovider -rs > $OUT/pytest.txt 2>&1
echo "pytest rc=$? ($((SECONDS - t0)) s)" | tee -a $OUT/pytest.txt; tail -4 $OUT/pytest.txt
SP="--scenarios bert --phases train --gpu-warmup-s 2"
t0=$SECONDS
PYTHONPATH=. timeout 110 python3 benchmarks/speed.py $SP --modes graph-step --variants lora-r16-all,lora-r16-all-triton,peft-lora-r16-all --out $OUT/gs-1.jsonl > $OUT/gs-1.log 2>&1
echo "gs-1 rc=$? ($((SECONDS - t0)) s)"; grep -E "ms|ERROR" $OUT/gs-1.log | tail -8
t0=$SECONDS
PYTHONPATH=. timeout 60 python3 benchmarks/speed.py $SP --modes graph-step --no-floors --adamw fused --variants lora-r8-qv,lora-r8-qv-mixed8 --out $OUT/gsm-1.jsonl > $OUT/gsm-1.log 2>&1
echo "gsm-1 rc=$? ($((SECONDS - t0)) s)"; grep -E "ms|ERROR" $OUT/gsm-1.log | tail -3
t0=$SECONDS
PYTHONPATH=. timeout 150 python3 benchmarks/speed.py $SP --modes graph-step-compiled --variants lora-r16-all --out $OUT/gsc-1.jsonl > $OUT/gsc-1.log 2>&1
echo "gsc-1 rc=$? ($((SECONDS - t0)) s)"; grep -E "ms|ERROR" $OUT/gsc-1.log | tail -4
cd $OUT && tar czf logs1.tgz *.log && rm -f *.log
