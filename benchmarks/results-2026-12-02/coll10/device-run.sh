#!/bin/bash
# coll10 device call: speed.py twice (collapse rows, reduce-overhead, infer) and the extended profile
# As run on 2026-12-02 from a copy of branch coll10 at d982806; the llama profile row closed-flash
# (an opt-in attention path, since removed) no longer exists in collapse_profile2.py, which skips unknown rows.
cd "$(dirname "$0")"
FINAL=$OUT; OUT=$OUT/r; mkdir -p $OUT
export PYTHONPATH=.
T0=$(date +%s); DEADLINE=${DEADLINE:-300}
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
cap() { local l=$(left); [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt 2>&1
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> $OUT/gpu.txt 2>&1
SP="--modes reduce-overhead --phases infer --warmup 5 --iters 20 --gpu-warmup-s 2 --scenarios llama,bert --variants unipelt-collapsed,unipelt-collapsed-closed"
t=$(cap 125); echo "[$(( $(date +%s) - T0 ))s] speed-1 (timeout $t)" >> $OUT/all.log
timeout $t python3 benchmarks/speed.py $SP --budget-s $(( t - 12 )) --out $OUT/speed-1.jsonl > $OUT/speed-1.log 2>&1; echo "rc $?" >> $OUT/all.log
t=$(cap 70); echo "[$(( $(date +%s) - T0 ))s] profile llama (timeout $t)" >> $OUT/all.log
timeout $t python3 benchmarks/results-2026-12-02/coll10/collapse_profile2.py $OUT llama --rows=floor,closed,collapsed,closed-flash > $OUT/prof-llama.log 2>&1; echo "rc $?" >> $OUT/all.log
t=$(cap 70); echo "[$(( $(date +%s) - T0 ))s] speed-2 (timeout $t)" >> $OUT/all.log
[ "$t" -gt 30 ] && { timeout $t python3 benchmarks/speed.py $SP --budget-s $(( t - 12 )) --out $OUT/speed-2.jsonl > $OUT/speed-2.log 2>&1; echo "rc $?" >> $OUT/all.log; }
t=$(cap 60); echo "[$(( $(date +%s) - T0 ))s] profile bert (timeout $t)" >> $OUT/all.log
[ "$t" -gt 20 ] && { timeout $t python3 benchmarks/results-2026-12-02/coll10/collapse_profile2.py $OUT bert --rows=floor,closed,collapsed > $OUT/prof-bert.log 2>&1; echo "rc $?" >> $OUT/all.log; }
echo "[$(( $(date +%s) - T0 ))s] done" >> $OUT/all.log
cp $OUT/*.jsonl $OUT/*.json $OUT/all.log $FINAL/ 2>/dev/null
tar czf $FINAL/coll10.tgz -C $FINAL r
