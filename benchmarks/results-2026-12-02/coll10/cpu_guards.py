"""Dynamo's guard count for speed.py's tiny rows (CPU): the floor, the collapsed model with the adapter
pruned and the collapsed model, each compiled fullgraph (backend "eager": only the guards matter).

    PYTHONPATH=.pyshim python benchmarks/results-2026-12-02/coll10/cpu_guards.py llama|bert

Session 10 (2026-12-02, torch 2.13 CPU): llama 791 / 1141 / 1273, bert 974 / 1279 / 1414.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import speed  # noqa: E402

ROWS = ("floor", "unipelt-collapsed-closed", "unipelt-collapsed")


def main() -> None:
    speed.ensure_plugins()
    scn = speed.TINY[sys.argv[1] if len(sys.argv) > 1 else "llama"]
    from torch._dynamo.utils import _compilation_metrics
    for label in ROWS:
        torch._dynamo.reset()
        v = speed.FLOOR if label == "floor" else speed.VARIANTS[label]
        prep = speed.prepare(v, scn, "infer", torch.device("cpu"), torch.bfloat16)
        model = prep.model.eval()
        batch = speed.make_batch(scn, "infer", model.get_input_embeddings().num_embeddings, torch.device("cpu"))
        fn = torch.compile(model, fullgraph=True, backend="eager")
        with torch.no_grad():
            fn(**batch)
        print(f"{scn.name} {label}: {_compilation_metrics[-1].guard_count} guards", flush=True)


if __name__ == "__main__":
    main()
