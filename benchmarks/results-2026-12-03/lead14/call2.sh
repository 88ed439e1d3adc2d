#!/bin/bash
# session 14, call 2 (lead), main at 14636f3: every CUDA-only test again, with the refused capture's
# recovery (call 1: 3 failed after a refused capture); then llama train in inductor's default mode,
# explicit triton with and without inductor's static launcher for user-defined Triton kernels
# (TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=1), the host cost call 1's profile showed
. benchmarks/device_env.sh; t0=$SECONDS
gpu_tests gpu-tests.log 170 "tests/test_fold.py::test_gpu_folded_node" tests/test_graphed_step.py \
    tests/test_kernels.py::test_gpu_inductor_launches_the_triton_op_kernels \
    tests/test_kernels.py::test_gpu_auto_runs_the_kernels_only_where_cuda_graphs_replay \
    tests/test_kernels.py::test_gpu_bf16_large_group_matches_reference tests/test_kernels.py::test_gpu_group_step_under_reduce_overhead
echo "== tests $((SECONDS-t0)) s"
SP="--scenarios llama --phases train --warmup 5 --iters 20 --gpu-warmup-s 1 --modes compiled"
timeout 150 python3 benchmarks/speed.py $SP --variants lora-r16-all-triton,lora-r16-all --budget-s 140 --out $OUT/logs/comp-off.jsonl > $OUT/logs/comp-off.log 2>&1
echo "== comp-off rc=$? $((SECONDS-t0)) s"; grep -h " ms" $OUT/logs/comp-off.log | tail -5
L=$((420 - SECONDS + t0)); [ $L -gt 150 ] && L=150
[ $L -gt 60 ] && TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=1 timeout $L python3 benchmarks/speed.py $SP --variants lora-r16-all-triton,lora-r16-all --budget-s $((L-10)) --out $OUT/logs/comp-static.jsonl > $OUT/logs/comp-static.log 2>&1
echo "== comp-static rc=$? $((SECONDS-t0)) s"; grep -h " ms" $OUT/logs/comp-static.log | tail -5
grep -il "static" $OUT/logs/comp-static.log | head -2; grep -i "warn.*static\|static.*launch" $OUT/logs/comp-static.log | sort | uniq -c | head -5
cd $OUT && tar czf logs.tgz logs && rm -rf logs
