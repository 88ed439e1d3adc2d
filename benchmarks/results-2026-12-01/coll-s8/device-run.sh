#!/bin/bash
# issue 12 (helper coll, session 8): collapse compiled -- one call. Copied to the carry root and run
# from there (it cd's to its own directory). A CUDA check of the split path (tiny models, compiled vs
# the concatenation), speed.py twice (the split, the default), then the BERT kernel profile.
set -u
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
DEADLINE=${DEADLINE:-290}
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
LOG=$OUT/all.log
echo "start $(date -u) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)" > $LOG
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >> $LOG 2>&1
S=/tmp/shim; mkdir -p $S/unipelt-0.0.dist-info
ln -sfn $PWD/unipelt $S/unipelt; ln -sfn $PWD/plugins $S/unipelt_plugins; ln -sfn $PWD/kernels $S/unipelt_kernels
printf 'Metadata-Version: 2.1\nName: unipelt\nVersion: 0.0\n' > $S/unipelt-0.0.dist-info/METADATA
python3 - > $S/unipelt-0.0.dist-info/entry_points.txt <<'PY'
import tomllib
eps = tomllib.load(open("pyproject.toml", "rb"))["project"]["entry-points"]["unipelt"]
print("[unipelt]"); [print(f"{k} = {v}") for k, v in eps.items()]
PY
# the split path on CUDA: a tiny collapsed model's compiled outputs against the concatenation
cat > /tmp/gpu_check.py <<'PY'
import sys, torch
sys.path.insert(0, "benchmarks"); import speed; speed.ensure_plugins()
import unipelt.attention as A
for name in ("bert", "llama"):
    scn = speed.TINY[name]
    for v in ("unipelt-collapsed-closed",):
        prep = speed.prepare(speed.VARIANTS[v], scn, "infer", torch.device("cuda"), torch.bfloat16)
        m = prep.model.eval(); b = speed.make_batch(scn, "infer", m.get_input_embeddings().num_embeddings, torch.device("cuda"))
        if name == "bert":
            b["attention_mask"][0, -5:] = 0
        A.SPLIT_PREFIX = "never"
        with torch.no_grad(): ref = m(**b).logits.float()
        torch._dynamo.reset(); A.SPLIT_PREFIX = "compiled"
        calls = []
        real = A._split_prefix_attention
        A._split_prefix_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
        with torch.no_grad(): out = torch.compile(m, fullgraph=True)(**b).logits.float()
        A._split_prefix_attention = real
        print(name, v, "split traced", len(calls), "max|diff|", (out - ref).abs().max().item(), "max|ref|", ref.abs().max().item(), flush=True)
PY
echo "== gpu check $(left)s left" >> $LOG
timeout 45 env PYTHONPATH=. python3 /tmp/gpu_check.py >> $LOG 2>&1; echo "gpu check rc=$?" >> $LOG
export PYTHONPATH=.
SP="--modes reduce-overhead --warmup 5 --iters 20 --gpu-warmup-s 2"
COL="--scenarios llama,bert --variants unipelt-collapsed,unipelt-collapsed-closed --phases infer"
for i in 1 2; do
  l=$(left)
  if [ $i = 1 ]; then t=$(( l - 110 )); else t=$(( l - 45 )); fi
  if [ $t -lt 30 ]; then echo "== collapse-$i skipped ($l s left)" >> $LOG; continue; fi
  echo "== collapse-$i ($l s left, limit $t): speed.py $SP $COL" >> $LOG
  timeout $t python3 benchmarks/speed.py $SP --budget-s $(( t - 12 )) $COL --out $OUT/collapse-$i.jsonl >> $LOG 2>&1
  echo "== collapse-$i rc=$? at $(( $(date +%s) - T0 ))s" >> $LOG
done
# the kernels: what the GPU runs per forward (graphs mostly cached by now)
echo "== profile $(left)s left" >> $LOG
timeout $(( $(left) - 3 )) python3 benchmarks/results-2026-12-01/coll-s8/collapse_profile.py $OUT bert \
  --rows=floor,closed-concat,closed-split,collapsed-split >> $LOG 2>&1; echo "profile rc=$?" >> $LOG
echo "end $(( $(date +%s) - T0 ))s" >> $LOG
