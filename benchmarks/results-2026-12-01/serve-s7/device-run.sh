#!/bin/bash
# issue 12 (helper serve, session 7): mixed batches and collapse under reduce-overhead, one call
set -u
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
DEADLINE=${DEADLINE:-375}
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
LOG=$OUT/all.log
echo "start $(date -u) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)" > $LOG
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >> $LOG 2>&1
# pytest shim (no installed entry points on the device)
S=/tmp/shim; mkdir -p $S/unipelt-0.0.dist-info
ln -sfn $PWD/unipelt $S/unipelt; ln -sfn $PWD/plugins $S/unipelt_plugins; ln -sfn $PWD/kernels $S/unipelt_kernels
printf 'Metadata-Version: 2.1\nName: unipelt\nVersion: 0.0\n' > $S/unipelt-0.0.dist-info/METADATA
python3 - > $S/unipelt-0.0.dist-info/entry_points.txt <<'PY'
import tomllib
eps = tomllib.load(open("pyproject.toml", "rb"))["project"]["entry-points"]["unipelt"]
print("[unipelt]"); [print(f"{k} = {v}") for k, v in eps.items()]
PY
echo "== pytest (CUDA flash path) $(left)s left" >> $LOG
(cd tests && timeout 75 env PYTHONPATH=$S python3 -m pytest test_collapse_compile.py -q -p no:cacheprovider -x 2>&1 | tail -25) >> $LOG
export PYTHONPATH=.
SP="--modes reduce-overhead --warmup 5 --iters 20 --gpu-warmup-s 2"
run() {  # name, args...
  local name=$1; shift
  local l=$(left)
  if [ $l -lt 25 ]; then echo "== $name: skipped ($l s left)" >> $LOG; return; fi
  echo "== $name ($l s left): speed.py $SP $*" >> $LOG
  timeout $((l - 5)) python3 benchmarks/speed.py $SP --budget-s $((l - 15)) "$@" --out $OUT/$name.jsonl >> $LOG 2>&1
  echo "== $name rc=$? at $(( $(date +%s) - T0 ))s" >> $LOG
}
MIX="--scenarios llama,bert --no-floors --adamw fused --variants lora-r8-qv,lora-r8-qv-mixed8 --phases train,infer"
COL="--scenarios llama,bert --variants unipelt-collapsed,unipelt-collapsed-closed --phases infer"
run mixed-1 $MIX
run collapse-1 $COL
run mixed-2 $MIX
run collapse-2 $COL
echo "end $(( $(date +%s) - T0 ))s" >> $LOG
