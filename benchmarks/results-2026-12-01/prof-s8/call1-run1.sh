#!/bin/bash
# call 1 (helper prof, session 8): host profiles of BERT reduce-overhead train steps, main vs 3ea2c1b vs PEFT, and the mixed rows
C=$(cd "$(dirname "$0")" && pwd)
P=$OUT/p; mkdir -p $P
export TORCHINDUCTOR_COMPILE_THREADS=4 PYTHONUNBUFFERED=1 TORCH_LOGS=perf_hints,cudagraphs TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version --format=csv > $P/gpu.txt 2>&1
python3 -c "import torch,transformers,peft;print(torch.__version__,transformers.__version__,peft.__version__)" >> $P/gpu.txt 2>&1
B="--barrier /tmp/bar --parties 3 --lock /tmp/prof.lock --barrier-s 150 --out $P"
(cd $C/new && PYTHONPATH=. timeout 300 python3 benchmarks/host_profile.py $B --tag new- --trace --variants lora-r16-all,peft-lora-r16-all > $P/new.log 2>&1) &
(cd $C/new && PYTHONPATH=. timeout 300 python3 benchmarks/host_profile.py $B --tag mixed- --adamw fused --variants lora-r8-qv,lora-r8-qv-mixed8 > $P/mixed.log 2>&1) &
(cd $C/old && PYTHONPATH=. timeout 300 python3 benchmarks/host_profile.py $B --tag old- --trace --variants lora-r16-all > $P/old.log 2>&1) &
wait
cat $P/*summary.jsonl > $OUT/summary.jsonl
grep -h '^{' $P/*.log | cut -c1-1500
grep -hi "skipping cudagraph\|re-record\|rerecord\|cudagraph_skips\|non-static\|static input" $P/*.log | sort | uniq -c | sort -rn | head -30
cd $OUT && tar czf prof1.tgz p && rm -rf p
