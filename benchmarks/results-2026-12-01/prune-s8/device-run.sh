#!/bin/bash
# issue 12, session 8 (helper "prune2"): the dev-chosen configuration q2 (lr 3e-3, prefix x0.1,
# adapter x0.3, 500 steps) pruned to half later in training, one device call, every process at once
# on the one GPU (one seed per process):
#   m250, m400: prune.min_step 250 / 400, seeds 0-5 (12 processes). The choice between them is made
#       by select8.py on the dev macro-F1 of seeds 0-2 alone (written before the run); seeds 3-5 of the
#       chosen one are the added seeds, against session 7's unpruned seeds 3-5 (p2/q2-s345.json).
#   m10: prune.min_step 10 (the budget as early as the windows allow), seeds 0-2: exploration only.
#   u: unpruned, seeds 0-2: session 7's unpruned numbers are reused; this re-run says how far the same
#       seed moves between calls (nondeterministic GPU kernels) on today's tree.
#   contrib: contrib.py, unpruned seeds 0-2 to step 400: gate mean vs the damage of switching each
#       gate's branches off, at steps 100/250/400 (does lowest-gate-first pick the harmless ones?).
# CPU check: SCALE="--ks 20 --steps 30 --max-len 32 --batch-size 4" MS="12 20" CSCALE="--steps 30 --marks 12,20
#   --batch-size 4 --max-len 32 --probe-rows 32 --train-rows 64" SEEDS="0 1" PY=... bash device-run.sh
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
C=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/prune2-out}; mkdir -p $OUT
W=${W:-/tmp/w8}; rm -rf $W; mkdir -p $W/p8
PY=${PY:-python3}
SCALE=${SCALE:-"--steps 500"}
CSCALE=${CSCALE:-"--steps 500 --marks 100,250,400"}
MS=${MS:-"250 400"}
EARLY=${EARLY:-10}
SEEDS=${SEEDS:-"0 1 2 3 4 5"}
END=${END:-250}
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
pack() { tar czf $OUT/.p8.tgz -C $W p8 2>/dev/null && mv $OUT/.p8.tgz $OUT/p8.tgz; }
(nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv; nproc
 $PY -c "import torch, transformers; print(torch.__version__, transformers.__version__)") > $W/p8/gpu.txt 2>&1
Q="--task cls --ks all --model $C/minilm --data-dir $C/data --dev-every-seed --lrs 3e-3 --lr-scale prefix=0.1,adapter=0.3"
qrun() {  # tag seed extra-args...
  local tag=$1 s=$2; shift 2
  (cd $C/code && PYTHONPATH=. $PY benchmarks/quality.py $Q $SCALE --seeds $s "$@" --out $W/p8/$tag-s$s.json \
     > $W/p8/$tag-s$s.log 2>&1; echo "$tag s$s rc=$? at $(el)s") &
}
for s in $SEEDS; do
  for ms in $MS; do qrun m$ms $s --prune-min-step $ms --methods "UniPELT (APL) pruned to half"; done
done
for s in $SEEDS; do
  [ $s -le 2 ] || continue
  qrun m$EARLY $s --prune-min-step $EARLY --methods "UniPELT (APL) pruned to half"
  qrun u $s --methods "UniPELT (APL)"
  (cd $C/code && PYTHONPATH=. $PY benchmarks/results-2026-12-01/prune-s8/contrib.py --model $C/minilm --data-dir $C/data \
     --seed $s $CSCALE --out $W/p8/contrib-s$s.json > $W/p8/contrib-s$s.log 2>&1; echo "contrib s$s rc=$? at $(el)s") &
done
while [ -n "$(jobs -rp)" ] && [ "$(el)" -lt "$END" ]; do sleep 5; [ $(( $(el) % 30 )) -lt 5 ] && pack; done
for p in $(jobs -rp); do pkill -TERM -P $p 2>/dev/null; kill $p 2>/dev/null; done
wait; pack
echo "all done at $(el)s"
grep -h "K=" $W/p8/*.log
grep -h "^seed" $W/p8/contrib-*.log
$PY $C/code/benchmarks/results-2026-12-01/prune-s8/select8.py $W/p8 $MS
tail -n 3 $W/p8/*.log | grep -i -B2 "error\|Traceback" | head -20
echo "end at $(el)s"
