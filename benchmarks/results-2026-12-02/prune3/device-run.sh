#!/bin/bash
# issue 12, session 9 (helper "prune3"): UniPELT (APL) pruned to half at the dev-chosen configuration
# q2 (lr 3e-3, prefix x0.1, adapter x0.3, 500 steps; session 7), with the new opt-in prune: fields,
# one device call, one seed per process, every process of a phase at once on the one GPU:
#   phase 1: six variants x seeds 0-2 (18 processes):
#     grad   min_step 150, end_step 400            gradual cut on the cubic schedule
#     pcut   pressure 1.0 (cut set) from 150, min_step 250
#     psoft  pressure 0.3 (cut set) from 100, min_step 250
#     pall   pressure 1.0 (all gates) from 100, min_step 250
#     rewarm min_step 250, rewarm_steps 20 to the peak rate (rewarm_peak 1.0)
#     combo  pressure 1.0 (cut set) from 150, min_step 200, end_step 350, rewarm_steps 20
#   select9.py chooses on the dev macro-F1 of seeds 0-2 alone (rule written before the run);
#   phase 2: the chosen variant, seeds 3-8 (6 processes), against session 7's unpruned seeds 3-8.
# The unpruned side is session 7's q2 runs (prune-s7/p1/q2.json, p2/q2-s345.json, p2/q2-s678.json).
# CPU check: SCALE="--ks 20 --steps 30 --max-len 32 --batch-size 4" TINY=1 PY=... PP=/tmp/shim:. bash device-run.sh
#   (PP: a folder whose unipelt_plugins links to this code's plugins/, ahead of an installed unipelt's
#   entry points, which would load another checkout's controller; the GPU machine has none)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
C=${C:-$(cd "$(dirname "$0")" && pwd)}
OUT=${OUT:-/tmp/prune3-out}; mkdir -p $OUT
W=${W:-/tmp/w9}; rm -rf $W; mkdir -p $W/p9
PY=${PY:-python3}
SCALE=${SCALE:-"--steps 500"}
END1=${END1:-165}; END=${END:-205}
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
pack() { tar czf $OUT/.p9.tgz -C $W p9 2>/dev/null && mv $OUT/.p9.tgz $OUT/p9.tgz; }
(nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv; nproc
 $PY -c "import torch, transformers; print(torch.__version__, transformers.__version__)") > $W/p9/gpu.txt 2>&1
Q="--task cls --ks all --model $C/minilm --data-dir $C/data --dev-every-seed --lrs 3e-3 --lr-scale prefix=0.1,adapter=0.3"
M="UniPELT (APL) pruned to half"
TAGS=${TAGS:-"grad pcut psoft pall rewarm combo"}
if [ -n "$TINY" ]; then  # the same command lines at the CPU check's 30 steps
  declare -A MS=([grad]=8 [pcut]=12 [psoft]=12 [pall]=12 [rewarm]=12 [combo]=10)
  declare -A PO=([grad]='{"end_step": 25}' [pcut]='{"pressure": 1.0, "pressure_from": 8}'
    [psoft]='{"pressure": 0.3, "pressure_from": 5}' [pall]='{"pressure": 1.0, "pressure_on": "all", "pressure_from": 5}'
    [rewarm]='{"rewarm_steps": 4, "rewarm_peak": 1.0}'
    [combo]='{"pressure": 1.0, "pressure_from": 8, "end_step": 20, "rewarm_steps": 4}')
else
  declare -A MS=([grad]=150 [pcut]=250 [psoft]=250 [pall]=250 [rewarm]=250 [combo]=200)
  declare -A PO=([grad]='{"end_step": 400}' [pcut]='{"pressure": 1.0, "pressure_from": 150}'
    [psoft]='{"pressure": 0.3, "pressure_from": 100}' [pall]='{"pressure": 1.0, "pressure_on": "all", "pressure_from": 100}'
    [rewarm]='{"rewarm_steps": 20, "rewarm_peak": 1.0}'
    [combo]='{"pressure": 1.0, "pressure_from": 150, "end_step": 350, "rewarm_steps": 20}')
fi
qrun() {  # tag seed
  local tag=$1 s=$2
  (cd $C/code && PYTHONPATH=${PP:-.} $PY benchmarks/quality.py $Q $SCALE --seeds $s --prune-min-step ${MS[$tag]} \
     --prune-opts "${PO[$tag]}" --methods "$M" --out $W/p9/$tag-s$s.json > $W/p9/$tag-s$s.log 2>&1
   echo "$tag s$s rc=$? at $(el)s") &
}
waitfor() {  # seconds since the start
  while [ -n "$(jobs -rp)" ] && [ "$(el)" -lt "$1" ]; do sleep 5; [ $(( $(el) % 30 )) -lt 5 ] && pack; done
  for p in $(jobs -rp); do pkill -TERM -P $p 2>/dev/null; kill $p 2>/dev/null; done
  wait
}
for s in 0 1 2; do for tag in $TAGS; do qrun $tag $s; done; done
waitfor $END1; pack
echo "phase 1 done at $(el)s"
$PY $C/code/benchmarks/results-2026-12-02/prune3/select9.py $W/p9 $TAGS | tee $W/p9/select.txt
CH=$(sed -n 's/^choice: \([a-z]*\).*/\1/p' $W/p9/select.txt)
if [ -n "$CH" ] && [ "$CH" != none ]; then
  for s in 3 4 5 6 7 8; do qrun $CH $s; done
  waitfor $END; pack
fi
echo "all done at $(el)s"
grep -h "K=" $W/p9/*.log
tail -n 3 $W/p9/*.log | grep -i -B2 "error\|Traceback" | head -20
echo "end at $(el)s"
