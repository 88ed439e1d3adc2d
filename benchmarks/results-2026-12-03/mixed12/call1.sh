#!/bin/bash
# session 12, helper mixed12, call 1: issue 12's mixed batches after unipelt.pack_mixed. BERT train
# under reduce-overhead: floor, lora-r8-qv, lora-r8-qv-mixed8 (packed: one A and one B tensor per
# projection) and lora-r8-qv-mixed8-unpacked (each adapter's own tensors), every model of the block
# compiled at once (speed_turns.py), two timing passes each; then llama lora-r8-qv vs mixed8 if the
# share (about 255 s of command) leaves room for its compilations.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH=. TORCHINDUCTOR_COMPILE_THREADS=4
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/gpu.txt
python3 -c "import torch,triton,transformers;print(torch.__version__,triton.__version__,transformers.__version__)" >> $OUT/gpu.txt
cat ../COMMIT >> $OUT/gpu.txt 2>/dev/null
t0=$SECONDS
blk() {  # name scenario phase variants ready turn cap
  timeout $7 python3 benchmarks/speed_turns.py --scenario $2 --phase $3 --variants $4 --ready-s $5 --turn-s $6 \
    --warmup 8 --iters 30 --out $OUT/$1.jsonl > $OUT/$1.log 2>&1
  echo "== $1 rc=$? $((SECONDS-t0)) s"
  python3 benchmarks/speed.py --report $OUT/$1.pass1.jsonl $OUT/$1.pass2.jsonl 2>&1 | grep -v '^$' | tail -12
}
blk bert-train bert train lora-r8-qv,lora-r8-qv-mixed8,lora-r8-qv-mixed8-unpacked 120 25 170
left=$((255 - (SECONDS - t0)))
if [ $left -ge 100 ]; then
  blk llama-train llama train lora-r8-qv,lora-r8-qv-mixed8 $((left - 25)) 20 $left
else
  echo "== llama skipped: $left s left"
fi
cd $OUT && tar czf logs.tgz *.log *.jsonl && rm -f *.log *.jsonl
