"""Per-kernel diff of collapse profiles (collapse_profile.py / collapse_profile2.py JSON): every kernel
name (inductor's numeric suffix dropped, so the same fused kernel matches across models) with its
time and count per forward in each row, and each row's difference to the floor.

    python3 benchmarks/results-2026-12-02/coll10/kernel_diff.py PROFILE.json [--md]
"""
from __future__ import annotations

import collections
import json
import re
import sys


def _key(name: str) -> str:
    return re.sub(r"_\d+$", "", name)


def table(path: str) -> tuple[list[str], dict[str, dict[str, list[float]]]]:
    d = json.load(open(path))
    rows = d.get("kernels") or d.get("rows")
    per: dict[str, dict[str, list[float]]] = collections.defaultdict(dict)
    for label, r in rows.items():
        for k in r["by_kernel"]:
            cur = per[_key(k["name"])].setdefault(label, [0.0, 0.0])
            cur[0] += k["us"]
            cur[1] += k["count"]
    return list(rows), per


def main() -> None:
    path = sys.argv[1]
    labels, per = table(path)
    base = labels[0]
    order = sorted(per, key=lambda k: -max(v[0] for v in per[k].values()))
    head = ["kernel"] + [f"{l} us (n)" for l in labels] + [f"{l} - {base} us" for l in labels[1:]]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    tot = {l: [0.0, 0.0] for l in labels}
    for k in order:
        cells = []
        for l in labels:
            us, n = per[k].get(l, [0.0, 0.0])
            tot[l][0] += us
            tot[l][1] += n
            cells.append(f"{us:.1f} ({n:g})" if n else "-")
        b = per[k].get(base, [0.0, 0.0])[0]
        diffs = [f"{per[k].get(l, [0.0, 0.0])[0] - b:+.1f}" for l in labels[1:]]
        print(f"| `{k[:70]}` | " + " | ".join(cells + diffs) + " |")
    cells = [f"{tot[l][0]:.1f} ({tot[l][1]:g})" for l in labels]
    diffs = [f"{tot[l][0] - tot[base][0]:+.1f}" for l in labels[1:]]
    print("| **total** | " + " | ".join(cells + diffs) + " |")


if __name__ == "__main__":
    main()
