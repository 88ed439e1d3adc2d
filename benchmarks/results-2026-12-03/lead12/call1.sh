#!/bin/bash
# session 12, call 1 (lead): re-decide executor.AUTO_USES_KERNELS on main 5624d12. Reduce-overhead,
# the gated and dropout cells (not remeasured since session 7) and plain LoRA, grouped vs Triton,
# every model of a block compiled at once (speed_turns.py), two timing passes each.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH=. TORCHINDUCTOR_COMPILE_THREADS=4
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/gpu.txt
python3 -c "import torch,triton,transformers;print(torch.__version__,triton.__version__,transformers.__version__)" >> $OUT/gpu.txt
t0=$SECONDS
blk() {  # name scenario phase variants ready turn cap
  timeout $7 python3 benchmarks/speed_turns.py --scenario $2 --phase $3 --variants $4 --ready-s $5 --turn-s $6 \
    --warmup 8 --iters 30 --out $OUT/$1.jsonl > $OUT/$1.log 2>&1
  echo "== $1 rc=$? $((SECONDS-t0)) s"
  python3 benchmarks/speed.py --report $OUT/$1.pass1.jsonl $OUT/$1.pass2.jsonl 2>&1 | grep -v '^$' | tail -12
}
blk llama-train llama train lora-r16-all,lora-r16-all-triton,lora-r16-all-d01,lora-r16-all-d01-triton,unipelt,unipelt-triton 170 30 240
blk bert-train bert train lora-r16-all,lora-r16-all-triton,unipelt,unipelt-triton 120 25 170
blk llama-infer llama infer lora-r16-all,lora-r16-all-triton,unipelt,unipelt-triton 80 15 110
cd $OUT && tar czf logs.tgz *.log *.jsonl && rm -f *.log *.jsonl
