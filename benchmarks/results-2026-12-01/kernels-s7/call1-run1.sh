#!/usr/bin/env bash
# kern helper, session 7, call 1: bert and llama train under reduce-overhead, every model of a block
# compiled at once in its own process (speed_turns.py), timed one at a time, two passes.
set -u
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
export TORCHINDUCTOR_COMPILE_THREADS=4
log() { echo "[$(date +%T)] $*"; }
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
mkdir -p /tmp/res
log bert
timeout -k 5 200 python3 benchmarks/speed_turns.py --scenario bert --variants lora-r16-all,lora-r16-all-triton,unipelt,unipelt-triton --ready-s 150 --turn-s 30 --out /tmp/res/bert-ro.jsonl > /tmp/res/bert-ro.log 2>&1
log "bert rc=$?"; grep -E "ready|FAIL|pass [12]" /tmp/res/bert-ro.log | cut -c1-200
tar -czf $OUT/bert-ro.tgz -C /tmp/res $(cd /tmp/res && ls -d bert-ro*)
log llama
timeout -k 5 215 python3 benchmarks/speed_turns.py --scenario llama --variants lora-r16-all-d01,lora-r16-all-d01-triton,unipelt,unipelt-triton --ready-s 165 --turn-s 30 --out /tmp/res/llama-ro.jsonl > /tmp/res/llama-ro.log 2>&1
log "llama rc=$?"; grep -E "ready|FAIL|pass [12]" /tmp/res/llama-ro.log | cut -c1-200
tar -czf $OUT/llama-ro.tgz -C /tmp/res $(cd /tmp/res && ls -d llama-ro*)
log done
