"""Quality benchmark: does the gated combination (UniPELT) match or beat the best single method?

Classification (``--task cls``): MiniLM (real BERT encoder, 6 layers, d=384) on the drug-review
sentiment task (3 classes). Training data: ``train-nodev`` (540 rows) or a K-example sample of it
per seed; the learning rate of every method is chosen on ``dev`` (60 rows carved from train) with
seed 0; the ``test`` split (379 rows) is read only for the final table. Every method gets the same
number of optimizer steps. Methods: head only, full fine-tuning, LoRA, prefix, Pfeiffer adapter,
UniPELT (AP), UniPELT (APL), MAM — the specs in ``specs/`` plus a trained head — and the
investigation variants of UniPELT (``VARIANTS``: one published choice changed at a time).

Causal LM (``--task lm``): SmolLM2-135M-Instruct (real Llama, grouped-query attention) on the
chatterbot dialogue pairs, loss on the response tokens (chat template). The learning rate is
chosen on a dev split carved from train (every 10th prompt by a stable hash); the table reports
held-out test perplexity. Methods: no training, LoRA, prefix, Pfeiffer adapter, UniPELT (APL).

    python benchmarks/quality.py --task cls --out benchmarks/quality-cls.json       # CPU or GPU
    python benchmarks/quality.py --task lm --out benchmarks/quality-lm.json
    python benchmarks/quality.py --report a.json b.json ...                          # markdown tables
    python benchmarks/quality.py --task cls --ks all --steps 500 --lrs 3e-3 --lr-scale prefix=0.1,adapter=0.3 \
        --dev-every-seed --methods "UniPELT (APL),UniPELT (APL) pruned to half" \
        --out benchmarks/quality-prune.json    # issue 12: pruned to half its parameters vs unpruned, 3 seeds
    python benchmarks/quality.py ... --methods "UniPELT (APL) pruned to half" --prune-min-step 250 \
        --prune-opts '{"rewarm_steps": 20, "rewarm_peak": 1.0}'    # more prune: fields (session 9's dev choice)
    python benchmarks/quality.py --export-data DIR                                   # JSONL copies for a machine without the data packages

``--model`` is a built-in name or a model directory; ``--data-dir`` holds JSONL copies of the splits
(``--export-data`` writes them: train-nodev/dev/test for cls, lm-train/lm-test for lm); without it
the bundled data sets are read through unipelt.data, the readers users get.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import unipelt  # noqa: E402
from unipelt.data import Example, collate, encode_lm  # noqa: E402
from unipelt.spec import load_spec_data  # noqa: E402
from unipelt.train import param_groups  # noqa: E402

HEAD = {"method": "train", "sites": "head"}
CLS_METHODS: dict[str, str | dict | None] = {
    "head only": {"modules": {"head": HEAD}},
    "full fine-tuning": None,
    "LoRA": "lora.yaml",
    "prefix": "prefix.yaml",
    "Pfeiffer adapter": "pfeiffer.yaml",
    "Houlsby adapter": "houlsby.yaml",
    "UniPELT (AP)": "unipelt-ap.yaml",
    "UniPELT (APL)": "unipelt.yaml",
    "MAM": "mam.yaml",
}
LM_METHODS: dict[str, str | None] = {
    "no training": None,
    "LoRA": "lora.yaml",
    "prefix": "prefix.yaml",
    "Pfeiffer adapter": "pfeiffer.yaml",
    "UniPELT (APL)": "unipelt.yaml",
}


# The investigation of why UniPELT trails (issue 4): each variant changes one published choice of
# specs/unipelt.yaml, so a difference is attributable to it.
def _gates(**fields):
    def edit(spec: dict) -> dict:
        for node in spec["modules"].values():
            if isinstance(node.get("gate"), dict):
                node["gate"].update(fields)
        return spec
    return edit


def _lora_gate(**fields):
    def edit(spec: dict) -> dict:
        spec["modules"]["lora"]["gate"].update(fields)
        return spec
    return edit


def _shared_lora_gate(spec: dict) -> dict:
    spec.setdefault("gates", {})["g_lora"] = dict(spec["modules"]["lora"]["gate"])
    spec["modules"]["lora"]["gate"] = "g_lora"
    return spec


def _scale(node: str, scale: float):
    def edit(spec: dict) -> dict:
        spec["modules"][node]["lr_scale"] = scale
        return spec
    return edit


# name: (spec file, spec edit or None, gate learning-rate multiplier or None)
VARIANTS: dict[str, tuple[str, object, float | None]] = {
    "UniPELT (AL)": ("unipelt-al.yaml", None, None),
    "UniPELT (APL) lora_scale=multiply": ("unipelt.yaml", _lora_gate(lora_scale="multiply"), None),
    "UniPELT (APL) gate bias +2": ("unipelt.yaml", _gates(init_bias=2.0), None),
    "UniPELT (APL) gate lr x10": ("unipelt.yaml", None, 10.0),
    "UniPELT (APL) unmasked mean": ("unipelt.yaml", _gates(pooling="mean"), None),
    # the prefix MLP multiplies each optimizer step by its fan-in, so at the rates that suit LoRA
    # and the adapter the prefix swamps attention: give it a smaller rate (spec ``lr_scale``)
    # the shipped specs now set lr_scale on the prefix; these rows keep the published single rate
    "prefix (published rate)": ("prefix.yaml", _scale("prefix", 1.0), None),
    "UniPELT (AP) (published rate)": ("unipelt-ap.yaml", _scale("prefix", 1.0), None),
    "UniPELT (APL) (published rate)": ("unipelt.yaml", _scale("prefix", 1.0), None),
    "prefix lr_scale=0.1": ("prefix.yaml", _scale("prefix", 0.1), None),
    "prefix lr_scale=0.03": ("prefix.yaml", _scale("prefix", 0.03), None),
    "UniPELT (APL) prefix lr_scale=0.1": ("unipelt.yaml", _scale("prefix", 0.1), None),
    "UniPELT (APL) prefix lr_scale=0.03": ("unipelt.yaml", _scale("prefix", 0.03), None),
    "UniPELT (AP) prefix lr_scale=0.1": ("unipelt-ap.yaml", _scale("prefix", 0.1), None),
    "MAM prefix lr_scale=0.1": ("mam.yaml", _scale("prefix", 0.1), None),
    # issue 13: the reference gives q and v a LoRA gate each (now the default); this row shares one
    "UniPELT (APL) shared LoRA gate": ("unipelt.yaml", _shared_lora_gate, None),
    "UniPELT (APL) adapter lr_scale=3": ("unipelt.yaml", _scale("adapter", 3.0), None),
}
# Variants whose grid is the learning rate times per-node lr_scale values, chosen jointly on dev
# (issue 13: "an lr_scale grid for the prefix chosen on dev"): name -> (spec file, {node: scales}).
GRID_VARIANTS: dict[str, tuple[str, dict[str, list[float]]]] = {
    "UniPELT (APL) prefix lr_scale grid": ("unipelt.yaml", {"prefix": [0.03, 0.1, 0.3]}),
    "UniPELT (AP) prefix lr_scale grid": ("unipelt-ap.yaml", {"prefix": [0.03, 0.1, 0.3]}),
    "prefix lr_scale grid": ("prefix.yaml", {"prefix": [0.03, 0.1, 0.3]}),
}
# issue 12: UniPELT pruned during training to a fraction of its parameters (budget on the kept
# parameters, `prune: {to_budget: true}`: the lowest gates first, one gate a step from min_step on,
# after `patience` steps of gate statistics). name -> (spec file, fraction of the unpruned count)
PRUNE_VARIANTS: dict[str, tuple[str, float] | tuple[str, float, object]] = {
    "UniPELT (APL) pruned to half": ("unipelt.yaml", 0.5),
    # the configuration under which UniPELT (APL) learns at K=all in 250 steps (the third pass's
    # prefix lr_scale grid chose x0.03 at lr 1e-2 on dev), pruned: its unpruned row is
    # "UniPELT (APL) prefix lr_scale=0.03"
    "UniPELT (APL) prefix lr_scale=0.03 pruned to half": ("unipelt.yaml", 0.5, _scale("prefix", 0.03)),
}
HEAD_LR_SCALE = [1.0]  # set from --head-lr-scale (the classifier head's lr_scale in every PEFT spec)
NODE_LR_SCALES: dict[str, float] = {}  # set from --lr-scale (a node's lr_scale in every spec that has it)
LR_GRID = {
    "cls": {"full fine-tuning": [2e-5, 5e-5, 1e-4], "head only": [1e-3, 3e-3, 1e-2], None: [1e-3, 3e-3, 1e-2]},
    "lm": {None: [3e-4, 1e-3, 3e-3]},
}


def spec_for(name: str, task: str, scales: dict[str, float] | None = None) -> dict | None:
    edit = None
    if name in VARIANTS:
        source, edit, _ = VARIANTS[name]
    elif name in PRUNE_VARIANTS:
        source = PRUNE_VARIANTS[name][0]  # the budget is set in run(), from the model's count
        edit = PRUNE_VARIANTS[name][2] if len(PRUNE_VARIANTS[name]) > 2 else None
    elif name in GRID_VARIANTS:
        source = GRID_VARIANTS[name][0]

        def edit(spec: dict) -> dict:
            for node, value in (scales or {}).items():
                spec["modules"][node]["lr_scale"] = value
            return spec
    else:
        source = (CLS_METHODS if task == "cls" else LM_METHODS)[name]
    if source is None or isinstance(source, dict):
        return copy.deepcopy(source)
    data = copy.deepcopy(load_spec_data(ROOT / "specs" / source)[0])
    if edit is not None:
        data = edit(data)
    for node, value in NODE_LR_SCALES.items():  # --lr-scale node=value: over the method's own
        if node in data.get("modules", {}):
            data["modules"][node]["lr_scale"] = value
    if task == "cls":
        data["modules"]["head"] = dict(HEAD)  # a new classifier head is trained by every PEFT method
        if HEAD_LR_SCALE[0] != 1.0:  # --head-lr-scale: the head's rate = this x the run's
            data["modules"]["head"]["lr_scale"] = HEAD_LR_SCALE[0]
    return data


# ------------------------------------------------------------------------------------------ data
def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def read_split(data_dir: Path | None, task: str, split: str) -> list[Example]:
    """cls: train-nodev / dev / test of drugreview; lm: train / dev / test of chatterbot, where dev
    is carved from train by a stable hash of the prompt (test is the package split's held-out 10%)."""
    if task == "lm":
        source = "test" if split == "test" else "train"
        if data_dir is not None:
            rows = _read_jsonl(data_dir / f"lm-{source}.jsonl")
            exs = [Example(prompt=r["prompt"], response=r["response"], line=i + 1) for i, r in enumerate(rows)]
        else:
            from unipelt.data import builtin_dataset

            exs = builtin_dataset("chatterbot", source)
        if split == "test":
            return exs
        # salted so dev is not correlated with the package's own train/test cut
        return [e for e in exs if (_stable_hash("dev:" + e.prompt.lower()) % 10 == 0) == (split == "dev")]
    if data_dir is not None:
        rows = _read_jsonl(data_dir / f"{split}.jsonl")
        return [Example(text=r["text"], label=r["label"], line=i + 1) for i, r in enumerate(rows)]
    from unipelt.data import builtin_dataset

    return builtin_dataset("drugreview", split)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def export_data(out: Path) -> None:
    from unipelt.data import builtin_dataset

    out.mkdir(parents=True, exist_ok=True)
    for split in ("train-nodev", "dev", "test"):
        rows = [{"text": e.text, "label": e.label} for e in builtin_dataset("drugreview", split)]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for split in ("train", "test"):
        rows = [{"prompt": e.prompt, "response": e.response} for e in builtin_dataset("chatterbot", split)]
        (out / f"lm-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"written {out}")


def encode_cls(tok, rows: list[Example], labels, max_len):
    enc = tok([e.text for e in rows], truncation=True, max_length=max_len, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([labels.index(e.label) for e in rows])}


def encode_lm_tensors(tok, rows: list[Example], max_len):
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return collate(encode_lm(rows, tok, max_len), pad, padding_side="right")


def macro_f1(pred: torch.Tensor, gold: torch.Tensor, n: int) -> float:
    f1s = []
    for c in range(n):
        tp = ((pred == c) & (gold == c)).sum().item()
        fp = ((pred == c) & (gold != c)).sum().item()
        fn = ((pred != c) & (gold == c)).sum().item()
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / n


@torch.no_grad()
def evaluate(model, data: dict, task: str, n_labels: int, device, bs=64) -> dict:
    model.eval()
    n = len(data["input_ids"])
    if task == "cls":
        preds = []
        for i in range(0, n, bs):
            out = model(input_ids=data["input_ids"][i:i + bs].to(device),
                        attention_mask=data["attention_mask"][i:i + bs].to(device))
            preds.append(out.logits.argmax(-1).cpu())
        p, y = torch.cat(preds), data["labels"]
        return {"acc": (p == y).float().mean().item(), "f1": macro_f1(p, y, n_labels)}
    nll, tokens = 0.0, 0
    for i in range(0, n, bs):
        ids, mask = data["input_ids"][i:i + bs].to(device), data["attention_mask"][i:i + bs].to(device)
        labels = data["labels"][i:i + bs].to(device)
        width = int(mask.sum(1).max())  # the batch was padded to the longest row of the whole split
        logits = model(input_ids=ids[:, :width], attention_mask=mask[:, :width]).logits.float()
        target = labels[:, 1:width]
        nll += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum").item()
        tokens += int((target != -100).sum())
    loss = nll / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(loss)}


# ------------------------------------------------------------------------------------------ runs
def _config(point) -> tuple[float, dict[str, float] | None]:
    """A grid point: a learning rate, or (learning rate, {node: lr_scale}) for GRID_VARIANTS."""
    return (point[0], dict(point[1])) if isinstance(point, tuple) else (point, None)


def _key(point) -> str:
    lr, scales = _config(point)
    return f"{lr:g}" + "".join(f" {n}x{v:g}" for n, v in (scales or {}).items())


def run(method: str, point, seed: int, train: dict | None, evalsets: list[dict], args, device, n_labels: int) -> list[dict]:
    """Train ``method`` once at grid point ``point`` and return its metrics on each of ``evalsets``."""
    lr, scales = _config(point)
    from unipelt.models import load_model

    torch.manual_seed(seed)
    random.seed(seed)
    task = "classification" if args.task == "cls" else "causal-lm"
    model, _ = load_model(args.model, task=task, num_labels=n_labels if args.task == "cls" else None)
    model.to(device)
    spec = spec_for(method, args.task, scales)
    if spec is None and (method == "no training"):
        return [{**evaluate(model, e, args.task, n_labels, device), "params": 0, "s_per_step": 0.0} for e in evalsets]
    if spec is None:  # full fine-tuning
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        n_train = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    else:
        if method in PRUNE_VARIANTS:
            _ensure_prune_plugin()
            # the budget: a fraction of the unpruned adapter's kept parameters, counted on this model;
            # then the same initialisation as the unpruned run (re-seeded)
            probe = unipelt.compile(model, spec)
            full = probe.summary().kept
            probe.detach()
            spec = dict(spec, budget={"max_params": int(full * PRUNE_VARIANTS[method][1])},
                        prune={"to_budget": True, "patience": 10, "min_step": _prune_min_step(args),
                               **args.prune_opts})
            torch.manual_seed(seed)
            random.seed(seed)
        handle = unipelt.compile(model, spec)
        params = handle.parameters()
        n_train = handle.summary().kept
        mult = VARIANTS[method][2] if method in VARIANTS else None
        opt = torch.optim.AdamW(param_groups(handle, lr, gate_lr=lr * mult if mult else None), lr=lr, weight_decay=0.0)
    warm = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (args.steps - s) / max(1, args.steps - warm)))
    n = len(train["input_ids"])
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    # the plugins' training controllers (gate pruning), driven as `unipelt train` drives them
    from unipelt.training.optim import apply_lr_factors, collect_controllers, controller_loss

    controllers = collect_controllers(handle) if spec is not None else []
    if method in PRUNE_VARIANTS and not any(getattr(c, "name", "") == "prune" for c in controllers):
        raise SystemExit(f"{method}: no pruning controller (unipelt_plugins.prune) is registered")
    model.train()
    t0 = None
    for step in range(args.steps):
        for c in controllers:
            if hasattr(c, "before_step"):
                c.before_step(step)
        apply_lr_factors(controllers, opt, sched, step)  # pruning's re-warm (prune.rewarm_steps), else none
        if len(order) < args.batch_size:
            order += torch.randperm(n, generator=g).tolist()
        idx = torch.tensor(order[:args.batch_size])
        order = order[args.batch_size:]
        if step == 5:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        mask = train["attention_mask"][idx]
        width = int(mask.sum(1).max())  # right-padded: drop the columns no row of this batch uses
        out = model(input_ids=train["input_ids"][idx, :width].to(device), attention_mask=mask[:, :width].to(device),
                    labels=(train["labels"][idx] if args.task == "cls" else train["labels"][idx, :width]).to(device))
        controller_loss(controllers, out.loss).backward()  # + pruning's budget pressure (prune.pressure)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        for c in controllers:
            if hasattr(c, "on_step"):
                c.on_step(step + 1, None)
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - t0) / max(1, args.steps - 5) if t0 else float("nan")
    extra = {}
    if spec is not None and handle.spec.pruned:
        # what was pruned (the table says it) and the active parameters after pruning
        extra = {"pruned": list(handle.spec.pruned), "params_unpruned": n_train, "prune_events": [
            e for c in controllers if hasattr(c, "events") for e in c.events()]}
        n_train = handle.summary().kept
    return [{**evaluate(model, e, args.task, n_labels, device), "params": n_train, "s_per_step": per_step, **extra}
            for e in evalsets]


def _prune_min_step(args) -> int:
    """The first step the pruned variants may prune at: --prune-min-step, else a fifth of the steps."""
    return args.prune_min_step if args.prune_min_step is not None else max(1, args.steps // 5)


def _ensure_prune_plugin() -> None:
    """The gate-pruning controller's plugin, registered where the installed entry points predate it
    (or where the repository is only on PYTHONPATH)."""
    from unipelt.registry import Registry, get_registry, make_plugin_manager, use_registry

    import unipelt_plugins.prune as plugin

    reg = get_registry()
    if not reg.pm.is_registered(plugin):
        use_registry(Registry(make_plugin_manager(extra_plugins=(plugin,))))


def _score(task: str, r: dict) -> tuple:
    # cls: dev macro-F1 (with 64% of one class, dev accuracy ties at the majority rate), then accuracy;
    # lm: lower dev loss is better
    return (r["f1"], r["acc"]) if task == "cls" else (-r["loss"],)


def _summary(task: str, runs: list[dict]) -> dict:
    keys = ("acc", "f1") if task == "cls" else ("ppl",)
    out = {}
    for k in keys:
        vals = [r[k] for r in runs]
        out[f"{k}_mean"], out[f"{k}_std"] = statistics.mean(vals), statistics.pstdev(vals)
    out["params"] = runs[0]["params"]
    if any(r.get("pruned") for r in runs):
        from collections import Counter

        # how often each module (kind) was pruned over the seeds, e.g. {"adapter": 12, "lora": 5}
        out["pruned_modules"] = dict(Counter(k.split(".", 1)[0] for r in runs for k in r.get("pruned", [])))
        out["pruned_per_run"] = statistics.mean(len(r.get("pruned", [])) for r in runs)
    out["ms_per_step"] = 1000 * statistics.median(r["s_per_step"] for r in runs)
    if task == "cls" and all("dev" in r for r in runs):  # --dev-every-seed
        out["dev_f1_per_seed"] = [r["dev"]["f1"] for r in runs]
    return out


def _line(task: str, k: str, m: str, lr, r: dict) -> str:
    head = f"K={k:<4} {m:<36} lr={lr!s:<7}"
    if task == "cls":
        body = f"acc {100*r['acc_mean']:.1f}±{100*r['acc_std']:.1f}  F1 {100*r['f1_mean']:.1f}±{100*r['f1_std']:.1f}"
    else:
        body = f"test ppl {r['ppl_mean']:.2f}±{r['ppl_std']:.2f}"
    pruned = (f"  pruned {r['pruned_per_run']:.1f} branches/run ({', '.join(f'{k} {v}' for k, v in r['pruned_modules'].items())})"
              if r.get("pruned_modules") else "")
    dev = (f"  dev F1 per seed {', '.join(f'{100*v:.1f}' for v in r['dev_f1_per_seed'])}"
           if r.get("dev_f1_per_seed") else "")
    return f"{head} {body}  params {r['params']:,}  {r['ms_per_step']:.1f} ms/step{pruned}{dev}"


def report(paths: list[Path]) -> None:
    """Markdown tables (one per task and K) from result files of this script."""
    for path in paths:
        res = json.loads(path.read_text())
        task = res.get("task", "cls")
        for k, kres in res["k"].items():
            print(f"\n{path.name} — {res['device']}, {res['steps']} steps × batch {res['batch_size']}, K={k}\n")
            if task == "cls":
                print("| method | lr | accuracy % | macro-F1 % | kept params | ms/step |\n|---|---|---|---|---|---|")
                for m, r in kres.items():
                    lr = r["lr"] if isinstance(r["lr"], str) else f"{r['lr']:g}"
                    print(f"| {m} | {lr} | {100*r['acc_mean']:.1f} ± {100*r['acc_std']:.1f} | "
                          f"{100*r['f1_mean']:.1f} ± {100*r['f1_std']:.1f} | {r['params']:,} | {r['ms_per_step']:.1f} |")
            else:
                print("| method | lr | test perplexity | kept params | ms/step |\n|---|---|---|---|---|")
                for m, r in kres.items():
                    lr = "—" if r["lr"] is None else r["lr"] if isinstance(r["lr"], str) else f"{r['lr']:g}"
                    print(f"| {m} | {lr} | {r['ppl_mean']:.2f} ± {r['ppl_std']:.2f} | {r['params']:,} | {r['ms_per_step']:.1f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=("cls", "lm"), default="cls")
    ap.add_argument("--model", help="built-in name or model directory (default: minilm for cls, smollm2 for lm)")
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--ks", default="100,all", help="cls only: training-set sizes")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--lrs", help="comma-separated learning rates replacing the grid (e.g. the rate an earlier "
                                  "pass chose on dev); the choice among them is still made on dev")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--methods", help="comma-separated; default: every method of the task (variants: see VARIANTS)")
    ap.add_argument("--head-lr-scale", type=float, default=1.0,
                    help="cls: the new classifier head learns at this x the run's rate (spec lr_scale on the head)")
    ap.add_argument("--lr-scale", default="",
                    help="node=value,...: set these modules' lr_scale in every spec that has them (e.g. "
                         "prefix=0.03,adapter=0.3), after the method's own edits")
    ap.add_argument("--dev-every-seed", action="store_true",
                    help="score dev on every seed, not only on the selection seed 0 (runs[i]['dev']): tells on dev "
                         "alone whether a configuration learns on every seed")
    ap.add_argument("--prune-min-step", type=int,
                    help="the pruned variants' prune.min_step (default: a fifth of --steps): how long the gates "
                         "train before the budget is enforced")
    ap.add_argument("--prune-opts", default="{}",
                    help="JSON mapping of more prune: fields for the pruned variants, e.g. '{\"end_step\": 300, "
                         "\"pressure\": 1.0}' (gradual cut, budget pressure, re-warm: unipelt.spec.PruneSpec); "
                         "the spec validates them")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--report", type=Path, nargs="+", help="print markdown tables of these result files and exit")
    ap.add_argument("--export-data", type=Path, help="write the JSONL splits into this directory and exit")
    args = ap.parse_args()
    # on a machine where the repository is only on PYTHONPATH (the GPU machine) there are no
    # installed entry points: register the in-tree plugins as the speed benchmark does
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speed import ensure_plugins

    ensure_plugins()
    if args.report:
        return report(args.report)
    if args.export_data:
        return export_data(args.export_data)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from unipelt.models import load_model

    task = args.task
    HEAD_LR_SCALE[0] = args.head_lr_scale
    for item in filter(None, (v.strip() for v in args.lr_scale.split(","))):
        node, _, value = item.partition("=")
        try:
            NODE_LR_SCALES[node.strip()] = float(value)
        except ValueError:
            ap.error(f"--lr-scale: expected node=number, got {item!r}")
    args.model = args.model or ("minilm" if task == "cls" else "smollm2")
    args.out = args.out or ROOT / "benchmarks" / f"quality-{task}.json"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    catalog = CLS_METHODS if task == "cls" else LM_METHODS
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(catalog)
    unknown = [m for m in methods if m not in catalog and m not in VARIANTS and m not in GRID_VARIANTS
               and m not in PRUNE_VARIANTS]
    if args.prune_min_step is not None and not 1 <= args.prune_min_step < args.steps:
        ap.error(f"--prune-min-step: expected 1 <= N < --steps ({args.steps}), got {args.prune_min_step}")
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from "
                 f"{list(catalog) + list(VARIANTS) + list(GRID_VARIANTS) + list(PRUNE_VARIANTS)}")
    try:
        args.prune_opts = json.loads(args.prune_opts)
    except ValueError as e:
        ap.error(f"--prune-opts: expected a JSON mapping, got {args.prune_opts!r} ({e})")
    if not isinstance(args.prune_opts, dict):
        ap.error(f"--prune-opts: expected a JSON mapping, got {args.prune_opts!r}")
    seeds = [int(s) for s in args.seeds.split(",")]
    _, tok = load_model(args.model, task="classification" if task == "cls" else "causal-lm",
                        num_labels=3 if task == "cls" else None)
    full, dev, test = (read_split(args.data_dir, task, s) for s in
                       (("train-nodev", "dev", "test") if task == "cls" else ("train", "dev", "test")))
    labels = sorted({e.label for e in full}) if task == "cls" else []
    enc = (lambda rows: encode_cls(tok, rows, labels, args.max_len)) if task == "cls" else \
          (lambda rows: encode_lm_tensors(tok, rows, args.max_len))
    dev_enc, test_enc = enc(dev), enc(test)
    results = {"task": task, "device": str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
               "torch": torch.__version__, "model": args.model, "steps": args.steps, "batch_size": args.batch_size,
               "lr_grid": args.lrs or "default", "head_lr_scale": args.head_lr_scale,
               "lr_scales": NODE_LR_SCALES, "prune_min_step": _prune_min_step(args), "prune_opts": args.prune_opts,
               "sizes": {"train": len(full), "dev": len(dev), "test": len(test)}, "labels": labels, "k": {}}
    for k in (args.ks.split(",") if task == "cls" else ["all"]):
        def sample(seed):
            rows = full if k == "all" else random.Random(seed).sample(full, int(k))
            return enc(rows)
        kres = {}
        for m in methods:
            if m == "no training":
                runs = run(m, 0.0, 0, None, [test_enc], args, device, len(labels))
                best, dev_scores = None, {}
            else:
                grid = LR_GRID[task].get(m, LR_GRID[task][None])
                if args.lrs:
                    grid = [float(v) for v in args.lrs.split(",")]
                if m in GRID_VARIANTS:  # learning rate x every combination of the nodes' lr_scales
                    import itertools

                    nodes = GRID_VARIANTS[m][1]
                    grid = [(lr, tuple(zip(nodes, combo))) for lr in grid for combo in itertools.product(*nodes.values())]
                # the selection runs (seed 0) are also scored on test, but only the chosen rate's
                # test score is used: it is the seed-0 run of the table, not trained twice. With one
                # grid point there is nothing to choose: seed 0 runs only if --seeds names it
                # (so --seeds 3,4,5 adds new seeds to an earlier run's configuration)
                if len(grid) == 1 and 0 not in seeds:
                    both = {}
                else:
                    both = {pt: run(m, pt, 0, sample(0), [dev_enc, test_enc], args, device, len(labels)) for pt in grid}
                dev_scores = {_key(pt): r[0] for pt, r in both.items()}
                best_pt = max(grid, key=lambda pt: _score(task, dev_scores[_key(pt)])) if both else grid[0]
                best = _key(best_pt) if isinstance(best_pt, tuple) else best_pt
                runs = []
                for s in seeds:
                    if s == 0:
                        runs.append({**both[best_pt][1], "dev": both[best_pt][0]})
                    elif args.dev_every_seed:
                        d, t = run(m, best_pt, s, sample(s), [dev_enc, test_enc], args, device, len(labels))
                        runs.append({**t, "dev": d})
                    else:
                        runs.append(run(m, best_pt, s, sample(s), [test_enc], args, device, len(labels))[0])
                    # after every seed, so a process stopped at a time limit keeps the seeds it finished
                    # (the summary then covers those seeds only: "runs" says how many)
                    kres[m] = {"lr": best, "dev_by_lr": dev_scores, "runs": runs, "complete": False,
                               **_summary(task, runs)}
                    results["k"][k] = kres
                    _write_results(args.out, results)
            kres[m] = {"lr": best, "dev_by_lr": dev_scores, "runs": runs, **_summary(task, runs)}
            print(_line(task, k, m, best, kres[m]), flush=True)
            results["k"][k] = kres
            _write_results(args.out, results)  # after every method, so a run cut short keeps what it finished
    print(f"written {args.out}")


def _write_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)  # atomic: a reader (or a kill) never sees half a file


if __name__ == "__main__":
    main()
