"""Kernel-launching ATen ops in one eager inference forward (issue 12, helper serve, session 7).

The CPU stand-in for what an eager GPU forward launches (and what a CUDA graph of it replays):
every ATen op dispatched in one ``torch.no_grad()`` forward, views (no kernel) left out, per
speed.py tiny scenario (2 layers; per layer = (variant - floor) / 2), bf16 as on the GPU, after
one warm-up call (caches filled). Run from a tree's root: PYTHONPATH=<shim> python opcount.py OUT.jsonl
"""
from __future__ import annotations

import collections
import json
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, "benchmarks")
import speed  # noqa: E402


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket not in (torch.ops.aten.detach, torch.ops.aten.lift_fresh):
            self.ops[str(func.overloadpacket).replace("aten.", "")] += 1
        return func(*args, **(kwargs or {}))


def main(out: str) -> None:
    speed.ensure_plugins()
    rows = []
    for scn_name in ("bert", "llama"):
        scn = speed.TINY[scn_name]
        for name in ("floor", "lora-r8-qv", "lora-r8-qv-mixed8", "unipelt-collapsed", "unipelt-collapsed-closed"):
            v = speed.FLOOR if name == "floor" else speed.VARIANTS[name]
            prep = speed.prepare(v, scn, "infer", torch.device("cpu"), torch.bfloat16)
            model = prep.model.eval()
            batch = {**speed.make_batch(scn, "infer", model.get_input_embeddings().num_embeddings,
                                        torch.device("cpu")), **prep.call_kwargs}
            with torch.no_grad():
                model(**batch)
                with Count() as c:
                    model(**batch)
            rows.append({"scenario": scn_name, "variant": name, "ops": sum(c.ops.values()), "by_op": dict(c.ops)})
            print(scn_name, name, sum(c.ops.values()), flush=True)
    with open(out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
