#!/bin/bash
# session 14, call 1 (lead), main at cfae7c4 (+ this script): every test that skips on CPU (CUDA-only);
# llama train under reduce-overhead, auto vs grouped (5d26805 and later were not measured);
# kernel_profile.py in inductor's default mode: floor, explicit triton, auto (session 13's unexplained 36.5 ms)
. benchmarks/device_env.sh; t0=$SECONDS; D=benchmarks/results-2026-12-03/lead14
gpu_tests gpu-tests.log 170 "tests/test_fold.py::test_gpu_folded_node" tests/test_graphed_step.py \
    tests/test_kernels.py::test_gpu_inductor_launches_the_triton_op_kernels \
    tests/test_kernels.py::test_gpu_auto_runs_the_kernels_only_where_cuda_graphs_replay \
    tests/test_kernels.py::test_gpu_bf16_large_group_matches_reference tests/test_kernels.py::test_gpu_group_step_under_reduce_overhead
echo "== tests $((SECONDS-t0)) s"
SP="--scenarios llama --phases train --warmup 5 --iters 20 --gpu-warmup-s 1"
timeout 170 python3 benchmarks/speed.py $SP --modes reduce-overhead --variants lora-r16-all,lora-r16-all-grouped --budget-s 160 --out $OUT/logs/ro.jsonl > $OUT/logs/ro.log 2>&1
echo "== ro rc=$? $((SECONDS-t0)) s"; grep -h " ms" $OUT/logs/ro.log | tail -5
L=$((500 - SECONDS + t0)); [ $L -gt 170 ] && L=170
[ $L -gt 60 ] && timeout $L python3 benchmarks/kernel_profile.py $OUT/logs --scenario llama --variants floor,lora-r16-all-triton,lora-r16-all > $OUT/logs/kprof.log 2>&1
echo "== kprof rc=$? $((SECONDS-t0)) s"; grep -v DEBUG $OUT/logs/kprof.log | tail -40
cd $OUT && tar czf logs.tgz logs && rm -rf logs
