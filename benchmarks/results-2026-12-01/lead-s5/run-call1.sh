#!/bin/bash
# lead, session 5: QLoRA reduce-overhead runs 2 and 3, and the kernels' CUDA-graph timing (kern branch tree)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
R=$PWD
export PYTHONPATH=/tmp/site:$R HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.used --format=csv > $OUT/gpu.txt
timeout 235 python3 benchmarks/speed.py --scenarios llama --modes reduce-overhead --phases train --variants lora-r16-all,qlora-nf4-r16-all,qlora-nf4-r16-all-triton,peft-qlora-nf4-r16-all,unipelt-nf4-triton --gpu-warmup-s 2 --budget-s 225 --out $OUT/qlora-ro-2.jsonl > $OUT/qlora-ro-2.log 2>&1
echo "run2 rc=$?" >> $OUT/gpu.txt
(cd .leadcarry/kern && mkdir -p /tmp/kshim && ln -sfn $PWD/unipelt /tmp/kshim/unipelt && ln -sfn $PWD/plugins /tmp/kshim/unipelt_plugins && ln -sfn $PWD/kernels /tmp/kshim/unipelt_kernels && PYTHONPATH=/tmp/site:/tmp/kshim timeout 110 python3 benchmarks/kernels.py --quick --graphs --warmup 5 --iters 20 --out $OUT/kern-graphs-quick.jsonl > $OUT/kern-graphs-quick.log 2>&1; echo "kern rc=$?" >> $OUT/gpu.txt)
timeout 110 python3 benchmarks/speed.py --scenarios llama --modes reduce-overhead --phases train --variants peft-qlora-nf4-r16-all,unipelt-nf4-triton --gpu-warmup-s 1 --budget-s 100 --out $OUT/qlora-ro-3.jsonl > $OUT/qlora-ro-3.log 2>&1
echo "run3 rc=$?" >> $OUT/gpu.txt
