#!/bin/bash
# issue 12, session 7 (helper "prune"), call 2: the dev-chosen configuration (q2: lr 3e-3, prefix x0.1,
# adapter x0.3) pruned to half later in training: prune.min_step 250 and 400 of 500 (call 1: 100,
# where the pruned gates' means were still 0.13-0.76). Seeds 0,1,2, one process each (6 processes).
# An exploration: its test scores are reported, a choice between the schedules is made on dev alone.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
C=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/prune-out}; mkdir -p $OUT
W=${W:-/tmp/w3}; rm -rf $W; mkdir -p $W/p3
PY=${PY:-python3}
SCALE=${SCALE:-"--steps 500"}
END=${END:-85}
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
Q="--task cls --ks all --model $C/minilm --data-dir $C/data --dev-every-seed --lrs 3e-3 --lr-scale prefix=0.1,adapter=0.3"
for ms in ${MINSTEPS:-250 400}; do
  for s in 0 1 2; do
    (cd $C/code && PYTHONPATH=. $PY benchmarks/quality.py $Q $SCALE --prune-min-step $ms --seeds $s \
       --methods "UniPELT (APL) pruned to half" --out $W/p3/q2-pruned-m$ms-s$s.json > $W/p3/q2-pruned-m$ms-s$s.log 2>&1
     echo "m$ms s$s rc=$? at $(el)s") &
  done
done
while [ -n "$(jobs -rp)" ] && [ "$(el)" -lt "$END" ]; do sleep 2; done
for p in $(jobs -rp); do pkill -TERM -P $p 2>/dev/null; kill $p 2>/dev/null; done
wait
tar czf $OUT/p3.tgz -C $W p3
grep -h "K=" $W/p3/*.log
echo "end at $(el)s"
