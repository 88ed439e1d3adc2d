"""Phase 2's choice, on dev alone (never test): prints "A tag" or "B tag" (run.sh says what each means).

A: among the unpruned configurations whose dev macro-F1 beats the majority class's on every seed,
the best mean dev F1. B (none does): the most seeds above the majority, then the best mean dev F1.
Usage: python select.py DEV.jsonl PHASE1_DIR
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import Counter
from pathlib import Path

dev_rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
counts = Counter(r["label"] for r in dev_rows)
p = max(counts.values()) / len(dev_rows)
majority_f1 = 2 * p / (p + 1) / len(counts)  # always the majority class: one class at F1 2p/(p+1), the others 0
print(f"dev: {len(dev_rows)} rows, majority macro-F1 {100 * majority_f1:.1f}", file=sys.stderr)
cands = []
for path in sorted(Path(sys.argv[2]).glob("q*.json")):
    if "pruned" in path.stem:
        continue
    res = json.loads(path.read_text())
    (entry,) = [r for k in res["k"].values() for r in k.values()]
    f1s = [r["dev"]["f1"] for r in entry["runs"]]
    above = sum(f > majority_f1 for f in f1s)
    every = above == len(f1s) and entry.get("complete", True)  # a cut-short run cannot say "every seed"
    print(f"{path.stem}: dev F1 per seed {', '.join(f'{100 * f:.1f}' for f in f1s)}; above the majority on "
          f"{above}/{len(f1s)}{'' if entry.get('complete', True) else ' (incomplete)'}", file=sys.stderr)
    cands.append((every, above, statistics.mean(f1s), path.stem))
if cands:
    every = [c for c in cands if c[0]]
    if every:
        print("A", max(every, key=lambda c: c[2])[3])
    else:
        print("B", max(cands, key=lambda c: (c[1], c[2]))[3])
