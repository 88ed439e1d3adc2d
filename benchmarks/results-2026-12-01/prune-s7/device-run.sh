#!/bin/bash
# issue 12, session 7 (helper "prune"): the pruning quality check on the H200.
# Phase 1: the sweep prepared in session 6 (RESULTS.md "Session 6 ... the pruning check"): four
# configurations of UniPELT (APL), each unpruned and pruned to half, eight processes on the one GPU,
# 500 steps, seeds 0,1,2, dev scored on every seed.
# Phase 2 (same call, if time is left), chosen by select.py on dev alone (written before any result):
#   A. a configuration whose unpruned dev F1 beats the majority on every seed: the best such by mean
#      dev F1 gets seeds 3-5 and 6-8 too, unpruned and pruned (4 processes): a tighter estimate of
#      the difference than 3 seeds give.
#   B. none: the best candidate (most seeds above the majority on dev, then mean dev F1) with 1000
#      steps, seeds 0,1,2 one process each, unpruned and pruned (6 processes).
# Test scores are never read by the selection.
# CPU check: SCALE="--ks 20 --steps 30 --seeds 0,1 --max-len 32 --batch-size 4" P2SCALE=... PY=... bash run.sh
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
C=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/prune-out}; mkdir -p $OUT
W=${W:-/tmp/w}; rm -rf $W; mkdir -p $W/p1 $W/p2
PY=${PY:-python3}
SCALE=${SCALE:-"--steps 500"}
P1WAIT=${P1WAIT:-190}    # seconds phase 1 may take
END=${END:-300}          # seconds the whole script may take (the call's timeout_s is above it)
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
pack() {  # $1 = phase dir name: an atomic tar of what is there now (partial JSON files included)
  tar czf $OUT/.$1.tgz -C $W $1 2>/dev/null && mv $OUT/.$1.tgz $OUT/$1.tgz
}
wait_for() {  # $1 = phase, $2 = deadline in seconds since T0
  while [ -n "$(jobs -rp)" ] && [ "$(el)" -lt "$2" ]; do sleep 5; [ $(( $(el) % 30 )) -lt 5 ] && pack $1; done
  for p in $(jobs -rp); do pkill -TERM -P $p 2>/dev/null; kill $p 2>/dev/null; done  # the python under each job, then the job
  wait; pack $1
}
(nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv; $PY -c "import torch, transformers; print(torch.__version__, transformers.__version__)") > $W/p1/gpu.txt 2>&1
Q="--task cls --ks all --model $C/minilm --data-dir $C/data --dev-every-seed"
qrun() {  # phase tag lr lr-scales head-scale method extra-args...
  local ph=$1 tag=$2 lr=$3 ls=$4 hs=$5 m=$6; shift 6
  (cd $C/code && PYTHONPATH=. $PY benchmarks/quality.py $Q $SCALE "$@" --lrs $lr --lr-scale $ls --head-lr-scale $hs \
     --methods "$m" --out $W/$ph/$tag.json > $W/$ph/$tag.log 2>&1; echo "$tag rc=$? at $(el)s") &
}
# the four configurations: tag lr lr-scales head-lr-scale (session 6's list)
CONFIGS="q1 3e-3 prefix=0.1 1
q2 3e-3 prefix=0.1,adapter=0.3 1
q3 1e-2 prefix=0.03,adapter=0.1 1
q4 3e-3 prefix=0.1,adapter=0.3 3"
while read tag lr ls hs; do
  qrun p1 $tag $lr $ls $hs "UniPELT (APL)"
  qrun p1 $tag-pruned $lr $ls $hs "UniPELT (APL) pruned to half"
done <<< "$CONFIGS"
wait_for p1 $P1WAIT
echo "phase 1 done at $(el)s"
grep -h "K=" $W/p1/*.log
# the dev-only choice of phase 2
PLAN=$($PY $C/select.py $C/data/dev.jsonl $W/p1 2> $W/p2/select.txt); cat $W/p2/select.txt; echo "plan: $PLAN"
if [ -n "$PLAN" ] && [ "$(el)" -lt $(( END - 100 )) ]; then
  read mode tag <<< "$PLAN"
  read _ lr ls hs <<< "$(grep "^$tag " <<< "$CONFIGS")"
  P2SCALE=${P2SCALE:-}
  if [ "$mode" = A ]; then
    for seeds in 3,4,5 6,7,8; do
      qrun p2 $tag-s${seeds//,/} $lr $ls $hs "UniPELT (APL)" $P2SCALE --seeds $seeds
      qrun p2 $tag-pruned-s${seeds//,/} $lr $ls $hs "UniPELT (APL) pruned to half" $P2SCALE --seeds $seeds
    done
  else
    for s in 0 1 2; do
      qrun p2 $tag-long-s$s $lr $ls $hs "UniPELT (APL)" --steps ${P2STEPS:-1000} $P2SCALE --seeds $s
      qrun p2 $tag-long-pruned-s$s $lr $ls $hs "UniPELT (APL) pruned to half" --steps ${P2STEPS:-1000} $P2SCALE --seeds $s
    done
  fi
  wait_for p2 $END
  echo "phase 2 done at $(el)s"
  grep -h "K=" $W/p2/*.log
else
  echo "phase 2 not started (plan '$PLAN', $(el)s elapsed)"; pack p2
fi
tail -n 2 $W/p1/*.log $W/p2/*.log 2>/dev/null | grep -i -B1 "error\|Traceback" | head -20
echo "end at $(el)s"
