"""Gate means of UniPELT (APL) over training, unpruned, on CPU (session 7): how far apart are the
gates at the steps where the budget would prune? Mirrors benchmarks/quality.py's run() loop (q2: lr
3e-3, prefix x0.1, adapter x0.3, same seed use). From the repository root:
    python benchmarks/results-2026-12-01/prune-s7/cpu_gate_trajectory.py 500 0 50,100,150,250,400 OUT.json
"""
from __future__ import annotations
import json, random, sys, time
from collections import defaultdict
import torch
sys.path.insert(0, "benchmarks")  # run from the repository root
import quality as q
from speed import ensure_plugins
ensure_plugins()
import unipelt
from unipelt.models import load_model
from unipelt.state import get_state
from unipelt.train import param_groups

steps, seed, marks = int(sys.argv[1]), int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")]
stop = max(marks)  # the schedule is the full run's; training stops at the last mark
q.NODE_LR_SCALES.update({"prefix": 0.1, "adapter": 0.3})
lr, bs, max_len = 3e-3, 16, 128
_, tok = load_model("minilm", task="classification", num_labels=3)
full = q.read_split(None, "cls", "train-nodev")
labels = sorted({e.label for e in full})
train = q.encode_cls(tok, full, labels, max_len)
torch.manual_seed(seed); random.seed(seed)
model, _ = load_model("minilm", task="classification", num_labels=3)
h = unipelt.compile(model, q.spec_for("UniPELT (APL)", "cls"))
params = h.parameters()
opt = torch.optim.AdamW(param_groups(h, lr), lr=lr, weight_decay=0.0)
warm = max(1, steps // 10)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
ctx = get_state(model).ctx
n = len(train["input_ids"]); g = torch.Generator().manual_seed(seed); order = []
hist = defaultdict(list); out = {}
model.train(); t0 = time.time()
for step in range(stop):
    ctx.gate_log = []
    if len(order) < bs:
        order += torch.randperm(n, generator=g).tolist()
    idx = torch.tensor(order[:bs]); order = order[bs:]
    mask = train["attention_mask"][idx]; width = int(mask.sum(1).max())
    o = model(input_ids=train["input_ids"][idx, :width], attention_mask=mask[:, :width], labels=train["labels"][idx])
    o.loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
    by = defaultdict(list)
    for adapter, key, m in ctx.gate_log:
        by[key].append(m)
    ctx.gate_log = None
    for k, v in by.items():
        hist[k].append(torch.stack(v).mean(0).max().item())
    if step + 1 in marks:
        out[step + 1] = {k: sum(v[-10:]) / len(v[-10:]) for k, v in hist.items()}
        vals = sorted(out[step + 1].values())
        print(f"step {step + 1}: {len(vals)} gates, 10-step means {vals[0]:.3f}..{vals[-1]:.3f}, median {vals[len(vals)//2]:.3f}, "
              f"loss {o.loss.item():.3f}, {time.time() - t0:.0f}s", flush=True)
json.dump({"steps": steps, "stopped_at": stop, "seed": seed, "lr": lr, "lr_scales": q.NODE_LR_SCALES, "window_means": out}, open(sys.argv[4], "w"), indent=1)
