#!/bin/bash
# session 14, call 3 (lead), main at e18bc04 (+ this script): ops14's GPU tests and default-mode rows
# (benchmarks/results-2026-12-03/ops14/call.sh, the same steps, under one deadline), then llama
# `executor: triton` in default mode with the static launcher as unipelt_kernels now sets it (no variable).
# Carry: .whl (bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl) for the QLoRA rows.
. benchmarks/device_env.sh; t0=$SECONDS; END=${END:-350}; D=benchmarks/results-2026-12-03/ops14
left() { echo $((END - SECONDS + t0)); }
timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/logs/bnb.log 2>&1
echo "== bnb rc=$? $((SECONDS-t0)) s"
export PYTHONPATH=/tmp/site:.
SHIM=/tmp/site:$SHIM gpu_tests gpu-tests.log 120 tests/test_kernel_ops.py tests/test_kernels.py \
    -k "(test_kernel_ops and not variable) or bottleneck or inductor_launches"
echo "== tests $((SECONDS-t0)) s"
SP="--scenarios llama --phases train --modes compiled --warmup 5 --iters 20 --gpu-warmup-s 1 --no-floors --variant-timeout 75"
for v in qlora-nf4-r16-all-triton houlsby-triton; do
  X=; [ $v = qlora-nf4-r16-all-triton ] && X=UNIPELT_EXECUTOR=grouped
  for ops in triton_op custom_op; do
    [ $(left) -lt 60 ] && { echo "== $v $ops skipped (time)"; continue; }
    T=$(left); [ $T -gt 85 ] && T=85
    timeout $T env UNIPELT_KERNEL_OPS=$ops $X python3 $D/speed_houlsby.py $SP --variants $v \
        --out $OUT/logs/comp-$v-$ops.jsonl > $OUT/logs/comp-$v-$ops.log 2>&1
    echo "== $v $ops rc=$? $((SECONDS-t0)) s"; grep -h " ms\|ERROR" $OUT/logs/comp-$v-$ops.log | tail -2
  done
done
T=$(left)
[ $T -gt 70 ] && timeout $T python3 benchmarks/speed.py --scenarios llama --phases train --warmup 5 --iters 20 --gpu-warmup-s 1 \
    --modes compiled --variants lora-r16-all-triton --budget-s $((T-5)) --out $OUT/logs/comp-static2.jsonl > $OUT/logs/comp-static2.log 2>&1
echo "== static2 $((SECONDS-t0)) s"; grep -h " ms" $OUT/logs/comp-static2.log | tail -4
cd $OUT && tar czf logs.tgz logs && rm -rf logs
