"""Does "lowest gate mean first" pick the branches that matter least? (issue 12, session 8)

Trains UniPELT (APL) unpruned in benchmarks/quality.py's run() loop (the q2 configuration: lr 3e-3,
prefix x0.1, adapter x0.3, 500-step schedule, same seed use) and at each mark (e.g. steps 100, 250,
400) measures, for each of the 24 gates (each gate's branches together, as the controller prunes
them):
  - the gate's mean over the last 10 steps (what the budget ranks by, plugins/prune.py);
  - the damage of switching that gate's branches off alone (``Entry.pruned`` set, refresh, evaluate,
    set back): the rise of the cross-entropy on a fixed probe of 256 training rows and on dev.
Then, at the half budget (half the unpruned kept count), two sets pruned greedily until under it:
"gate" (lowest window mean first: the seed documents' rule) and "ablation" (least probe-loss damage
first: an oracle for comparison, not a rule the controller has), and the damage of each whole set
switched off at once (probe loss, dev loss, dev macro-F1). Nothing is trained while measuring and
nothing is pruned for good: training continues unpruned after each mark. The ranking is read from
training rows only; dev is reported, not used to choose. Writes JSON; run from the repository root:
    python benchmarks/results-2026-12-01/prune-s8/contrib.py --model M --data-dir D --seed 0 --out OUT.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, "benchmarks")
import quality as q  # noqa: E402
from speed import ensure_plugins  # noqa: E402

ensure_plugins()
import unipelt  # noqa: E402
from unipelt.models import load_model  # noqa: E402
from unipelt.state import get_state  # noqa: E402
from unipelt.train import param_groups  # noqa: E402


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for pos, i in enumerate(order):
            r[i] = float(pos)
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else float("nan")


@torch.no_grad()
def _eval(model, data: dict, device, bs: int = 64) -> dict:
    was = model.training
    model.eval()
    losses, preds = [], []
    for i in range(0, len(data["input_ids"]), bs):
        mask = data["attention_mask"][i:i + bs]
        width = int(mask.sum(1).max())
        out = model(input_ids=data["input_ids"][i:i + bs, :width].to(device), attention_mask=mask[:, :width].to(device))
        logits = out.logits.float()
        y = data["labels"][i:i + bs].to(device)
        losses.append(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        preds.append(logits.argmax(-1).cpu())
    model.train(was)
    return {"loss": (torch.stack(losses).sum() / len(data["input_ids"])).item(),
            "f1": q.macro_f1(torch.cat(preds), data["labels"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--data-dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=500, help="the schedule's length (warm-up and decay)")
    ap.add_argument("--marks", default="100,250,400", help="steps to measure at; training stops at the last")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lr-scale", default="prefix=0.1,adapter=0.3")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--probe-rows", type=int, default=256)
    ap.add_argument("--train-rows", type=int, help="use only this many training rows (CPU check)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from pathlib import Path

    for item in filter(None, args.lr_scale.split(",")):
        node, _, v = item.partition("=")
        q.NODE_LR_SCALES[node] = float(v)
    marks = sorted(int(m) for m in args.marks.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data_dir = Path(args.data_dir) if args.data_dir else None
    _, tok = load_model(args.model, task="classification", num_labels=3)
    full = q.read_split(data_dir, "cls", "train-nodev")
    dev = q.read_split(data_dir, "cls", "dev")
    labels = sorted({e.label for e in full})
    if args.train_rows:
        full = full[:args.train_rows]
    enc = lambda rows: q.encode_cls(tok, rows, labels, args.max_len)  # noqa: E731
    train, dev_enc = enc(full), enc(dev)
    probe = enc(full[:args.probe_rows])

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model, _ = load_model(args.model, task="classification", num_labels=3)
    model.to(device)
    h = unipelt.compile(model, q.spec_for("UniPELT (APL)", "cls"))
    state = get_state(model)
    ctx = state.ctx
    params = h.parameters()
    opt = torch.optim.AdamW(param_groups(h, args.lr), lr=args.lr, weight_decay=0.0)
    steps = args.steps
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    full_kept = h.summary().kept
    limit = int(full_kept * 0.5)
    gates = {k: list(gp.users) for k, gp in h.graph.gates.items()}

    def kept_without(keys: list[str]) -> int:
        old = h.spec.pruned
        h.spec.pruned = [u for k in keys for u in gates[k]]
        try:
            return h.summary().kept
        finally:
            h.spec.pruned = old

    def switched_off(keys: list[str], data: dict) -> dict:
        users = [u for k in keys for u in gates[k]]
        for u in users:
            h.entries[u].pruned = True
        state.refresh()
        try:
            return _eval(model, data, device)
        finally:
            for u in users:
                h.entries[u].pruned = False
            state.refresh()

    def greedy(order: list[str]) -> list[str]:
        chosen: list[str] = []
        for k in order:
            if kept_without(chosen) <= limit:
                break
            chosen.append(k)
        return chosen

    sizes = {k: full_kept - kept_without([k]) for k in gates}
    n = len(train["input_ids"])
    g = torch.Generator().manual_seed(args.seed)
    order: list[int] = []
    hist: dict[str, list[float]] = defaultdict(list)
    out = {"seed": args.seed, "steps": steps, "marks": marks, "lr": args.lr, "lr_scales": q.NODE_LR_SCALES,
           "device": str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
           "full_kept": full_kept, "limit": limit, "probe_rows": len(probe["input_ids"]), "dev_rows": len(dev),
           "gate_params": sizes, "gate_users": gates, "at": {}}
    model.train()
    t0 = time.time()
    for step in range(marks[-1]):
        ctx.gate_log = []
        if len(order) < args.batch_size:
            order += torch.randperm(n, generator=g).tolist()
        idx = torch.tensor(order[:args.batch_size])
        order = order[args.batch_size:]
        mask = train["attention_mask"][idx]
        width = int(mask.sum(1).max())
        o = model(input_ids=train["input_ids"][idx, :width].to(device), attention_mask=mask[:, :width].to(device),
                  labels=train["labels"][idx].to(device))
        o.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        log, ctx.gate_log = ctx.gate_log, None
        by = defaultdict(list)
        for _, key, m in log:
            by[key].append(m)
        # one transfer per step, as the controller does it
        keys = list(by)
        vals = torch.stack([torch.stack(by[k]).mean(0).max() for k in keys]).tolist()
        for k, v in zip(keys, vals):
            hist[k].append(v)
        if step + 1 not in marks:
            continue
        window = {k: sum(v[-10:]) / len(v[-10:]) for k, v in hist.items()}
        base_probe, base_dev = _eval(model, probe, device), _eval(model, dev_enc, device)
        per_gate = {}
        for k in gates:
            p, d = switched_off([k], probe), switched_off([k], dev_enc)
            per_gate[k] = {"gate_mean": window.get(k), "params": sizes[k],
                           "d_probe_loss": p["loss"] - base_probe["loss"], "d_dev_loss": d["loss"] - base_dev["loss"],
                           "d_dev_f1": d["f1"] - base_dev["f1"]}
        ks = [k for k in gates if window.get(k) is not None]
        by_gate = sorted(ks, key=lambda k: window[k])
        by_abl = sorted(ks, key=lambda k: per_gate[k]["d_probe_loss"])
        sets = {}
        for name, ordering in (("gate", by_gate), ("ablation", by_abl)):
            chosen = greedy(ordering)
            p, d = switched_off(chosen, probe), switched_off(chosen, dev_enc)
            sets[name] = {"pruned": chosen, "kept": kept_without(chosen), "probe_loss": p["loss"], "dev_loss": d["loss"],
                          "dev_f1": d["f1"], "sum_single_d_probe": sum(per_gate[k]["d_probe_loss"] for k in chosen)}
        out["at"][str(step + 1)] = {
            "base": {"probe_loss": base_probe["loss"], "dev_loss": base_dev["loss"], "dev_f1": base_dev["f1"]},
            "gates": per_gate, "sets": sets,
            "spearman_gate_vs_damage": _spearman([window[k] for k in ks], [per_gate[k]["d_probe_loss"] for k in ks]),
            "shared_of_gate_set": len(set(sets["gate"]["pruned"]) & set(sets["ablation"]["pruned"]))}
        s = out["at"][str(step + 1)]
        print(f"seed {args.seed} step {step + 1} ({time.time() - t0:.0f}s): base dev F1 {100*base_dev['f1']:.1f} "
              f"probe loss {base_probe['loss']:.3f}; spearman(gate, damage) {s['spearman_gate_vs_damage']:.2f}; "
              + "; ".join(f"{nm} set {len(v['pruned'])} gates kept {v['kept']:,}: probe loss {v['probe_loss']:.3f}, "
                          f"dev F1 {100*v['dev_f1']:.1f}" for nm, v in sets.items()), flush=True)
        Path(args.out).write_text(json.dumps(out, indent=1))  # after every mark: a stopped run keeps them
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
