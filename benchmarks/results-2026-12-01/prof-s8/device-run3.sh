#!/bin/bash
# Prepared, NOT run (helper prof, session 8: its device minutes were spent): the remeasure after
# the mixed-batch fix (e8c1c7b), plain speed.py, BERT reduce-overhead train. Run from the tree's
# root on the GPU machine (PYTHONPATH=.), ~5-6 minutes cold: a cold BERT compile in speed.py took
# 34 s for lora-r8-qv and more than 40 s for lora-r8-qv-mixed8 (call 2 stopped there, by its own
# timeouts of 75/50 s), so the timeouts below leave room.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
SP="--modes reduce-overhead --phases train --warmup 5 --iters 20 --gpu-warmup-s 1"
# issue 12: mixed8 / one adapter, fused AdamW on both, two runs (the second on a warm compile cache)
TORCH_LOGS=cudagraphs timeout 200 python3 benchmarks/speed.py $SP --scenarios bert --no-floors --adamw fused --variants lora-r8-qv,lora-r8-qv-mixed8 --out $OUT/mixed-1.jsonl > $OUT/mixed-1.log 2>&1
echo "run 1 rc=$? re-recordings: $(grep -c 'Re-recording' $OUT/mixed-1.log)"; gzip $OUT/mixed-1.log
timeout 120 python3 benchmarks/speed.py $SP --scenarios bert --no-floors --adamw fused --variants lora-r8-qv,lora-r8-qv-mixed8 --out $OUT/mixed-2.jsonl > $OUT/mixed-2.log 2>&1; echo "run 2 rc=$?"
# issue 9: the LoRA r16 rows with floors (one run; a second needs its own call)
timeout 250 python3 benchmarks/speed.py $SP --scenarios bert --variants lora-r16-all,peft-lora-r16-all,lora-r16-all-triton --budget-s 240 --out $OUT/r16-1.jsonl > $OUT/r16-1.log 2>&1; echo "r16 rc=$?"
python3 benchmarks/speed.py --report $OUT/mixed-1.jsonl $OUT/mixed-2.jsonl 2>&1 | tail -20
