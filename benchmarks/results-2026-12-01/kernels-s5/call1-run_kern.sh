#!/usr/bin/env bash
# issue 9 device run (kern helper, session 5): GPU tests, kernels --graphs, old-vs-new quick, e2e eager x2
set -u
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mk() {  # a shim folder: $1 = kernels dir
  d=$2; mkdir -p $d/unipelt-0.0.dist-info
  ln -sfn $PWD/unipelt $d/unipelt; ln -sfn $PWD/plugins $d/unipelt_plugins; ln -sfn $1 $d/unipelt_kernels
  printf 'Metadata-Version: 2.1\nName: unipelt\nVersion: 0.0\n' > $d/unipelt-0.0.dist-info/METADATA
  cp ep.txt $d/unipelt-0.0.dist-info/entry_points.txt
}
mk $PWD/kernels /tmp/shim; mk $PWD/old/kernels /tmp/shim_old
log() { echo "[$(date +%T)] $*"; }
export PYTHONPATH=/tmp/shim:.
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
python -c "import torch,triton,transformers,peft;print(torch.__version__,triton.__version__,transformers.__version__,peft.__version__)"
log pytest
timeout 60 python -m pytest tests/test_kernels.py -q -x -p no:cacheprovider -k gpu 2>&1 | tail -4 | tee $OUT/pytest-gpu.log
timeout 40 python -m pytest tests/test_kernels.py -q -x -p no:cacheprovider -k "not gpu" 2>&1 | tail -6 | tee -a $OUT/pytest-gpu.log
log kernels graphs
timeout 130 python benchmarks/kernels.py --graphs --warmup 5 --iters 20 --out $OUT/kernels-graphs.jsonl 2>&1 | grep -E "^(group|layer)|Error|error" | tee $OUT/kernels-graphs.log
log old kernels quick
PYTHONPATH=/tmp/shim_old:. timeout 20 python benchmarks/kernels.py --graphs --quick --warmup 5 --iters 20 --out $OUT/kernels-old-quick.jsonl 2>&1 | grep -E "^(group|layer)|Error" | tee $OUT/kernels-old-quick.log
for i in 1 2; do
  log e2e eager run $i
  timeout 62 python benchmarks/speed.py --scenarios llama,bert --modes eager --variants lora-r16-all,lora-r16-all-triton,peft-lora-r16-all,unipelt,unipelt-triton --warmup 5 --iters 15 --gpu-warmup-s 2 --budget-s 55 --out $OUT/e2e-eager-$i.jsonl 2>&1 | grep -E "^\[" | grep -v "start ->"
done
log done
