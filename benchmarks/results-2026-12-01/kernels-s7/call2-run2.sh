#!/usr/bin/env bash
# kern helper, session 7, call 2: BERT's variants ran 1.7x slower in call 1 than in the issue-8 runs
# (14.5 vs 8.27 ms). Is it the harness (speed_turns) or the code? speed_turns again with PEFT as the
# control, then plain speed.py (sequential, as the protocol) on the warm caches.
set -u
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
export TORCHINDUCTOR_COMPILE_THREADS=4
log() { echo "[$(date +%T)] $*"; }
mkdir -p /tmp/res
log turns
timeout -k 5 100 python3 benchmarks/speed_turns.py --scenario bert --variants lora-r16-all,lora-r16-all-triton,peft-lora-r16-all --ready-s 75 --turn-s 20 --out /tmp/res/bert-ro2.jsonl > /tmp/res/bert-ro2.log 2>&1
log "turns rc=$?"; grep -E "ready|FAIL|pass [12]" /tmp/res/bert-ro2.log | cut -c1-200
tar -czf $OUT/bert-ro2.tgz -C /tmp/res $(cd /tmp/res && ls -d bert-ro2*)
log plain
timeout -k 5 100 python3 benchmarks/speed.py --scenarios bert --modes reduce-overhead --phases train --variants lora-r16-all,peft-lora-r16-all,lora-r16-all-triton --gpu-warmup-s 1 --budget-s 88 --out $OUT/bert-ro-plain.jsonl > $OUT/bert-ro-plain.log 2>&1
log "plain rc=$?"; grep -E "^\[" $OUT/bert-ro-plain.log | cut -c1-200
log done
