#!/bin/bash
# issue 12 (helper "life"): mixed-batch speed (new segments vs the code before them) then the pruning quality sweep
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
C=$(cd "$(dirname "$0")" && pwd)
W=/tmp/w; mkdir -p $W/s $W/q
nvidia-smi --query-gpu=name,memory.used --format=csv > $W/s/gpu.txt
SP="--scenarios llama,bert --modes eager --split-optimizer --warmup 5 --iters 15 --gpu-warmup-s 2"
for i in 1 2; do
  (cd $C/new && PYTHONPATH=. python3 benchmarks/speed.py $SP --variants lora-r8-qv,lora-r8-qv-mixed8,unipelt,unipelt-mixed4 --out $W/s/new-$i.jsonl) > $W/s/new-$i.log 2>&1
  (cd $C/old && PYTHONPATH=. python3 benchmarks/speed.py $SP --variants unipelt,unipelt-mixed4 --out $W/s/old-$i.jsonl) > $W/s/old-$i.log 2>&1
done
(cd $C/new && PYTHONPATH=. python3 benchmarks/speed.py $SP --scenarios llama --adamw fused --variants lora-r8-qv,lora-r8-qv-mixed8 --out $W/s/fused-1.jsonl) > $W/s/fused-1.log 2>&1
tar czf $OUT/speed.tgz -C $W s
echo "speed done $(date)"
Q="--task cls --ks all --model $C/minilm --data-dir $C/data --steps 500 --dev-every-seed"
run_q() {  # name lr lr-scales head-scale
  for m in "UniPELT (APL)" "UniPELT (APL) pruned to half"; do
    tag=$1; [ "$m" != "UniPELT (APL)" ] && tag=$1-pruned
    (cd $C/new && PYTHONPATH=. python3 benchmarks/quality.py $Q --lrs $2 --lr-scale $3 --head-lr-scale $4 --methods "$m" --out $W/q/$tag.json > $W/q/$tag.log 2>&1) &
  done
}
run_q q1 3e-3 prefix=0.1 1
run_q q2 3e-3 prefix=0.1,adapter=0.3 1
run_q q3 1e-2 prefix=0.03,adapter=0.1 1
run_q q4 3e-3 prefix=0.1,adapter=0.3 3
for t in $(seq 1 ${QWAIT:-300}); do [ -z "$(jobs -r)" ] && break; sleep 1; done
tar czf $OUT/quality.tgz -C $W q
echo "quality done $(date)"
grep -h "K=all" $W/q/*.log; tail -n 3 $W/q/*.log | grep -i error
