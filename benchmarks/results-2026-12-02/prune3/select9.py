"""The dev-only choice among session 9's pruning variants (written and committed before the run):
the variant whose pruned runs have the highest mean dev macro-F1 over seeds 0, 1, 2 (test scores
are not read); a tie goes to the variant listed first. A variant lacking a seed's dev score is
left out of the choice (and said so); the choice is printed as "choice: <tag>".

    python select9.py DIR tag1 tag2 ...     # DIR holds <tag>-s<seed>.json from quality.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def dev_f1(path: Path) -> float | None:
    if not path.is_file():
        return None
    k = json.loads(path.read_text())["k"]
    runs = next(iter(next(iter(k.values())).values()))["runs"]
    return runs[0]["dev"]["f1"] if runs and "dev" in runs[0] else None


def main() -> None:
    d, tags = Path(sys.argv[1]), sys.argv[2:]
    means = {}
    for tag in tags:
        vals = [dev_f1(d / f"{tag}-s{s}.json") for s in (0, 1, 2)]
        print(f"{tag}: dev F1 seeds 0-2 " + ", ".join("—" if v is None else f"{100 * v:.1f}" for v in vals)
              + ("" if all(v is not None for v in vals) else " (incomplete: not chosen)"))
        if all(v is not None for v in vals):
            means[tag] = sum(vals) / 3
    if not means:
        print("choice: none")
        return
    best = max(means, key=lambda t: (round(means[t], 12), -tags.index(t)))
    print(f"choice: {best} (" + ", ".join(f"{t}: {100 * m:.2f}" for t, m in means.items()) + ")")


if __name__ == "__main__":
    main()
