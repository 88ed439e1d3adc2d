"""Counts the aten ops of one BERT train step (forward + backward + AdamW) on CPU, per variant,
by a TorchDispatchMode: which ops the LoRA adds to the floor, and with what shapes/strides (a
strided ``copy_`` / ``clone`` / elementwise op is what runs on the GPU as a non-vectorized
``elementwise_kernel<128, 4>``). Tiny BERT from speed.py's TINY (or ``--full`` BERT-base shapes
with 1 layer).

    PYTHONPATH=.pyshim:. python benchmarks/results-2026-12-02/bert10/op_count.py --variants floor,lora-r16-all
"""
from __future__ import annotations

import argparse
import collections
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VIEWS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "split", "split_with_sizes",
         "unsqueeze", "squeeze", "as_strided", "alias", "detach", "select", "reshape", "unbind", "narrow",
         "_reshape_alias", "lift_fresh", "view_as", "split_with_sizes_copy"}


def _desc(t):
    if isinstance(t, torch.Tensor):
        c = "c" if t.is_contiguous() else "S"
        return f"{str(t.dtype)[6:]}{list(t.shape)}{c}"
    return None


class Count(TorchDispatchMode):
    def __init__(self, stacks: bool):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.where: dict = {}
        self.stacks = stacks

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            ins = [d for d in (_desc(a) for a in args) if d]
            outs = out if isinstance(out, (tuple, list)) else [out]
            od = [d for d in (_desc(o) for o in outs) if d]
            key = f"{name}({', '.join(ins[:3])}) -> {', '.join(od[:2])}"
            self.ops[key] += 1
            if self.stacks and key not in self.where:
                fr = [f for f in traceback.extract_stack()[:-1]
                      if ("unipelt" in f.filename or "plugins" in f.filename or "kernels" in f.filename
                          or "transformers" in f.filename or "optim" in f.filename)]
                self.where[key] = " <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in fr[-4:][::-1])
        return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="floor,lora-r16-all")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--stacks", action="store_true")
    p.add_argument("--layers", type=int, default=1)
    a = p.parse_args()
    import speed

    speed.ensure_plugins()
    dtype = getattr(torch, a.dtype)
    base = speed.TINY["bert"]
    scn = speed.Scenario(**{**base.__dict__, "config": {**base.config, "num_hidden_layers": a.layers}})
    dev = torch.device("cpu")
    results = {}
    for v in a.variants.split(","):
        torch.manual_seed(0)
        variant = speed.FLOOR if v == "floor" else speed.VARIANTS[v]
        prep = speed.prepare(variant, scn, "train", dev, dtype)
        prep.model.train()
        opt = torch.optim.AdamW(prep.params, lr=1e-4, foreach=True) if prep.params else None
        batch = speed.make_batch(scn, "train", prep.model.get_input_embeddings().num_embeddings, dev)

        def step():
            out = prep.model(**batch, **prep.call_kwargs)
            out.loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        for _ in range(2):
            step()
        m = Count(a.stacks)
        with m:
            step()
        results[v] = m
        print(f"== {v}: {sum(m.ops.values())} non-view aten ops per step ({a.layers} layers)")
    names = list(results)
    floor = results.get("floor")
    for v in names:
        if v == "floor":
            continue
        m = results[v]
        print(f"\n== {v} minus floor (count difference per step), by op")
        diff = collections.Counter(m.ops)
        if floor is not None:
            diff.subtract(floor.ops)
        for k, n in sorted(diff.items(), key=lambda kv: -kv[1]):
            if n:
                print(f"{n:5d}  {k}" + (f"   @ {m.where.get(k, '')}" if a.stacks else ""))


if __name__ == "__main__":
    main()
