#!/bin/bash
# call 2 (helper prof, session 8): plain speed.py after the mixed-batch fix (prof branch), BERT reduce-overhead train
C=$(cd "$(dirname "$0")" && pwd)
cd $C/new
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
SP="--modes reduce-overhead --phases train --warmup 5 --iters 20 --gpu-warmup-s 1"
set -o pipefail
TORCH_LOGS=cudagraphs timeout 75 python3 benchmarks/speed.py $SP --scenarios bert --no-floors --adamw fused --variants lora-r8-qv,lora-r8-qv-mixed8 --out $OUT/mixed-1.jsonl > $OUT/log1.txt 2>&1
echo "run 1 rc=$? re-recordings: $(grep -c 'Re-recording' $OUT/log1.txt) recordings: $(grep -c 'Recording function' $OUT/log1.txt)"; gzip $OUT/log1.txt
timeout 50 python3 benchmarks/speed.py $SP --scenarios bert --no-floors --adamw fused --variants lora-r8-qv,lora-r8-qv-mixed8 --out $OUT/mixed-2.jsonl 2>&1 | grep -v Warning | tail -4 | tee $OUT/log2.txt
timeout 50 python3 benchmarks/speed.py $SP --scenarios bert --no-floors --variants lora-r16-all --out $OUT/r16-1.jsonl 2>&1 | grep -v Warning | tail -4 | tee $OUT/log3.txt
python3 - <<'PY'
import json, os, glob
for f in sorted(glob.glob(os.environ["OUT"] + "/*.jsonl")):
    for l in open(f):
        r = json.loads(l)
        if r.get("kind") == "measurement":
            t = sorted(r.get("times_ms") or [0])
            print(os.path.basename(f), r["variant"], r.get("floor_at", ""), r["median_ms"], r.get("ratio"), "min", t[0], "max", t[-1], "compile", r.get("compile_s"), "err", r.get("error"), r.get("graph_breaks"), r.get("recompiles"))
PY
