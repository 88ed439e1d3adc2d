#!/usr/bin/env bash
# kern helper, session 6, call 2: the kernels end to end under reduce-overhead after the fix
# (constexpr tile table), llama train: the three kernel variants (call 1 measured the others).
set -u
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
log() { echo "[$(date +%T)] $*"; }
log smoke
timeout 25 python3 - > $OUT/smoke.log 2>&1 <<'PY'
import sys; sys.path.insert(0, "kernels")
import torch, lora_group as lg
g = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(3000, 2048, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
w = (torch.randn(50, 2048, device="cuda", generator=g) * 0.02).to(torch.bfloat16).requires_grad_()
b = torch.zeros(2, device="cuda", requires_grad=True)
seed = lg.new_seed(x.device)
for segs in ([(16, 0.1), (16, 0.1), (18, 0.0)], [(50, 0.0)]):
    z = lg.lora_shrink(x, w, b, 48, segs, seed)
    z.float().square().sum().backward()
    masks = [lg.dropout_mask(seed, i, (3000, 2048), p) if p > 0 else None for i, (_, p) in enumerate(segs)]
    ref = lg.reference_shrink(x.float(), w.float(), b, 48, segs, masks)
    print(segs, "max err", (z.float() - ref).abs().max().item(), "ref max", ref.abs().max().item())
torch.cuda.synchronize(); print("SMOKE OK")
PY
cat $OUT/smoke.log | tail -5
if ! grep -q "SMOKE OK" $OUT/smoke.log; then log "smoke failed: the previous lora_group.py"; cp old/lora_group.py kernels/lora_group.py; fi
log e2e
timeout 128 python3 benchmarks/speed.py --scenarios llama --modes reduce-overhead --phases train --variants lora-r16-all-triton,unipelt-triton,lora-r16-all-d01-triton --gpu-warmup-s 1 --budget-s 118 --out $OUT/e2e-ro-2.jsonl > $OUT/e2e-ro-2.log 2>&1
log "e2e rc=$?"
grep -E "^\[" $OUT/e2e-ro-2.log | cut -c1-240
grep -iE "error" $OUT/e2e-ro-2.log | head -5 | cut -c1-400
log done
