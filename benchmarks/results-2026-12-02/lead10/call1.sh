#!/bin/bash
# session 10, call 1: profiles for the helpers (collapse per kernel, BERT graphed step per kernel)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/gpu.txt
python3 -c "import torch,triton,transformers;print(torch.__version__,triton.__version__,transformers.__version__)" >> $OUT/gpu.txt
t0=$SECONDS
for v in floor lora-r16-all lora-r16-all-triton; do
  timeout 40 python3 benchmarks/results-2026-12-02/gstep/graph_profile.py --variant $v --out $OUT/gprof-$v.txt > $OUT/gprof-$v.log 2>&1
  echo "gprof $v rc=$? $((SECONDS-t0)) s"; head -2 $OUT/gprof-$v.txt
done
mkdir -p $OUT/coll
timeout 150 python3 benchmarks/results-2026-12-01/coll-s8/collapse_profile.py $OUT/coll llama --rows=floor,closed-concat,collapsed-concat > $OUT/coll/llama.log 2>&1
echo "coll llama rc=$? $((SECONDS-t0)) s"; grep " ms \|GPU per" $OUT/coll/llama.log
timeout 120 python3 benchmarks/results-2026-12-01/coll-s8/collapse_profile.py $OUT/coll bert --rows=floor,closed-concat,collapsed-concat > $OUT/coll/bert.log 2>&1
echo "coll bert rc=$? $((SECONDS-t0)) s"; grep " ms \|GPU per" $OUT/coll/bert.log
cd $OUT && tar czf all.tgz gprof-* coll && rm -rf gprof-* coll
