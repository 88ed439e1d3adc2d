"""The dev-only choice between the later pruning schedules (session 8; written before the run):
the schedule whose pruned runs have the higher mean dev macro-F1 over seeds 0, 1, 2 (test scores
are not read); a tie goes to the earlier min_step (more steps to recover after the cut).
    python select8.py DIR 250 400      # DIR holds m<step>-s<seed>.json from quality.py
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
    d, steps = Path(sys.argv[1]), [int(s) for s in sys.argv[2:]]
    means = {}
    for ms in steps:
        vals = [dev_f1(d / f"m{ms}-s{s}.json") for s in (0, 1, 2)]
        print(f"min_step {ms}: dev F1 seeds 0-2 " + ", ".join("—" if v is None else f"{100 * v:.1f}" for v in vals))
        if all(v is not None for v in vals):
            means[ms] = sum(vals) / 3
    if len(means) < len(steps):
        print("choice: none (a schedule lacks a seed's dev score)")
        return
    best = max(sorted(means), key=lambda ms: (round(means[ms], 12), -ms))
    print("choice: min_step " + str(best) + " (" + ", ".join(f"{ms}: {100 * m:.2f}" for ms, m in means.items()) + ")")


if __name__ == "__main__":
    main()
