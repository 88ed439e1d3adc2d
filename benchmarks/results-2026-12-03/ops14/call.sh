#!/bin/bash
# ops14 (for the lead): the NF4 and bottleneck kernels as triton_ops (issue 9), on the GPU.
#   1. the GPU tests: tests/test_kernel_ops.py (inductor's code launches _nf4_kernel, _up_fwd_kernel and
#      _up_bwd_kernel, no opaque op left, the custom ops' results; the twins on CUDA tensors) and
#      tests/test_kernels.py's bottleneck tests plus the LoRA inductor test (its COMPILED_OPS patch moved)
#   2. llama train in inductor's default mode (speed.py --modes compiled), each row once with the triton_ops
#      and once with UNIPELT_KERNEL_OPS=custom_op, in pairs (one process each: a cut call keeps whole pairs):
#      qlora-nf4-r16-all-triton (NF4 base through kernels/nf4.py + LoRA r16 all linears, with
#      UNIPELT_EXECUTOR=grouped: under auto, UNIPELT_KERNEL_OPS=custom_op would also move the LoRA groups from
#      PyTorch's products onto the custom-op kernels), then houlsby-triton (specs/houlsby.yaml, executor
#      triton: the adapters' down-projection as the LoRA shrink kernel, the rest the bottleneck kernel, so the
#      variable switches both; speed_houlsby.py adds the row to speed.py, whose pfeiffer row stays on the
#      PyTorch path on llama)
# Carry: .whl (bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl, built for the device's Python 3.12:
# ENVIRONMENT.md; the QLoRA row needs it, the tests do not). About 270 s expected (tests ~80 s, each row
# ~45 s: compile 30-40 s, as session 13's rows), 470 s at most: every step has its own timeout, and a failed
# step does not stop the next. Logs and JSONL: $OUT/logs.tgz.
set -x
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TORCHINDUCTOR_COMPILE_THREADS=4
mkdir -p $OUT/logs; t0=$SECONDS; D=benchmarks/results-2026-12-03/ops14
S=/tmp/shim; mkdir -p $S/unipelt-0.0.dist-info
ln -sfn $PWD/unipelt $S/unipelt; ln -sfn $PWD/plugins $S/unipelt_plugins; ln -sfn $PWD/kernels $S/unipelt_kernels
printf 'Metadata-Version: 2.1\nName: unipelt\nVersion: 0.0\n' > $S/unipelt-0.0.dist-info/METADATA
python3 - > $S/unipelt-0.0.dist-info/entry_points.txt <<'PY'
import tomllib
eps = tomllib.load(open("pyproject.toml", "rb"))["project"]["entry-points"]["unipelt"]
print("[unipelt]"); [print(f"{k} = {v}") for k, v in eps.items()]
PY
ls .whl/*.whl > $OUT/logs/bnb.log 2>&1 && timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >> $OUT/logs/bnb.log 2>&1
echo "== bnb rc=$? $((SECONDS-t0)) s"; tail -2 $OUT/logs/bnb.log
export PYTHONPATH=/tmp/site:.
nvidia-smi --query-gpu=name,memory.used --format=csv > $OUT/logs/gpu.txt 2>&1
(timeout 120 env PYTHONPATH=/tmp/site:$S python3 -m pytest tests/test_kernel_ops.py tests/test_kernels.py -q -p no:cacheprovider \
    -p no:logging --tb=short -k "(test_kernel_ops and not variable) or bottleneck or inductor_launches" 2>&1 \
    | grep -v DEBUG | tail -60) > $OUT/logs/gpu-tests.log
echo "== tests $((SECONDS-t0)) s:"; tail -6 $OUT/logs/gpu-tests.log
SP="--scenarios llama --phases train --modes compiled --warmup 5 --iters 20 --gpu-warmup-s 1 --no-floors --variant-timeout 75"
for v in qlora-nf4-r16-all-triton houlsby-triton; do
  X=; [ $v = qlora-nf4-r16-all-triton ] && X=UNIPELT_EXECUTOR=grouped  # LoRA the same in both rows: NF4 alone differs
  for ops in triton_op custom_op; do
    timeout 85 env UNIPELT_KERNEL_OPS=$ops $X python3 $D/speed_houlsby.py $SP --variants $v \
        --out $OUT/logs/comp-$v-$ops.jsonl > $OUT/logs/comp-$v-$ops.log 2>&1
    echo "== $v $ops rc=$? $((SECONDS-t0)) s"; grep -h " ms\|ERROR" $OUT/logs/comp-$v-$ops.log | tail -2
  done
done
cd $OUT && tar czf logs.tgz logs && rm -rf logs
