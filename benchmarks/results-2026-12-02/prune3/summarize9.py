"""Tables of the session-9 pruning runs (RESULTS.md "Session 9 (helper prune3)"). Reads p9/ (this
session's call) and ../../results-2026-12-01/prune-s7/p1, p2 (session 7's unpruned q2 seeds 0-8, the
reference of every difference, and its min_step-100 pruned runs) and ../../results-2026-12-01/
prune-s8/p8 (session 8's min_step 250). Run from this folder: python summarize9.py
"""
from __future__ import annotations

import json
import statistics as st
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
S7 = HERE.parents[1] / "results-2026-12-01" / "prune-s7"
S8 = HERE.parents[1] / "results-2026-12-01" / "prune-s8"
TAGS = ("grad", "pcut", "psoft", "pall", "rewarm", "combo")


def runs_of(path: Path, seeds) -> dict[int, dict]:
    k = json.loads(path.read_text())["k"]["all"]
    runs = next(iter(k.values()))["runs"]
    return dict(zip(seeds, runs))


def one(path: Path, s: int) -> dict[int, dict]:
    return runs_of(path, [s]) if path.is_file() else {}


def table() -> dict[str, dict[int, dict]]:
    t: dict[str, dict[int, dict]] = {}
    t["unpruned (s7)"] = {**runs_of(S7 / "p1/q2.json", [0, 1, 2]), **runs_of(S7 / "p2/q2-s345.json", [3, 4, 5]),
                          **runs_of(S7 / "p2/q2-s678.json", [6, 7, 8])}
    for tag in TAGS:
        rs: dict[int, dict] = {}
        for s in range(9):
            rs.update(one(HERE / f"p9/{tag}-s{s}.json", s))
        t[tag] = rs
    t["m250 (s8)"] = {s: runs_of(S8 / f"p8/m250-s{s}.json", [s])[s] for s in range(6)}
    t["m100 (s7)"] = {**runs_of(S7 / "p1/q2-pruned.json", [0, 1, 2]), **runs_of(S7 / "p2/q2-pruned-s345.json", [3, 4, 5]),
                      **runs_of(S7 / "p2/q2-pruned-s678.json", [6, 7, 8])}
    return t


def msd(v: list[float]) -> str:
    return f"{st.mean(v):.1f} ± {st.pstdev(v):.1f}"


def main() -> None:
    t = table()
    base = t["unpruned (s7)"]
    print("| variant | seed | dev F1 | test F1 | test acc | kept params | test F1 - unpruned (s7) | cuts (steps) | reasons | gate means at the cut |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in ("unpruned (s7)",) + TAGS:
        for s, r in sorted(t[name].items()):
            ev = [e for e in r.get("prune_events", []) if e["event"] == "pruned"]
            steps = f"{len(ev)} ({min(e['step'] for e in ev)}-{max(e['step'] for e in ev)})" if ev else "—"
            why = dict(Counter("epsilon" if e["reason"] == "gate below epsilon" else
                               "scheduled" if e["reason"].startswith("over the scheduled") else "budget" for e in ev))
            gm = f"{min(e['gate_mean'] for e in ev):.3f}-{max(e['gate_mean'] for e in ev):.2f}" if ev else "—"
            diff = "—" if name == "unpruned (s7)" else f"{100 * (r['f1'] - base[s]['f1']):+.1f}"
            print(f"| {name} | {s} | {100 * r['dev']['f1']:.1f} | {100 * r['f1']:.1f} | {100 * r['acc']:.1f} | "
                  f"{r['params']:,} | {diff} | {steps} | {', '.join(f'{k} {v}' for k, v in why.items()) or '—'} | {gm} |")
    print("\n| variant | seeds | dev F1 | test F1 | paired diff mean (sd; se) | losing seeds | test acc | kept params |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rs in t.items():
        for seeds in ((0, 1, 2), (3, 4, 5), (6, 7, 8), (3, 4, 5, 6, 7, 8), tuple(range(6)), tuple(range(9))):
            if not all(s in rs for s in seeds):
                continue
            dv = [100 * rs[s]["dev"]["f1"] for s in seeds]
            tv = [100 * rs[s]["f1"] for s in seeds]
            av = [100 * rs[s]["acc"] for s in seeds]
            dd = [100 * (rs[s]["f1"] - base[s]["f1"]) for s in seeds]
            sd = st.stdev(dd) if len(dd) > 1 else 0.0
            pr = [rs[s]["params"] for s in seeds]
            print(f"| {name} | {seeds[0]}-{seeds[-1]} | {msd(dv)} | {msd(tv)} | "
                  + ("—" if name == "unpruned (s7)" else f"{st.mean(dd):+.1f} ({sd:.1f}; {sd / len(dd) ** 0.5:.1f})")
                  + f" | {sum(d < 0 for d in dd)}/{len(dd)} | {st.mean(av):.1f} | {min(pr):,}-{max(pr):,} |")
    for name in TAGS:
        rs = t[name]
        cnt: Counter = Counter()
        means = defaultdict(list)
        for r in rs.values():
            for e in r.get("prune_events", []):
                if e["event"] != "pruned":
                    continue
                kind = e["module"] + (" " + e["site"] if e["module"] == "lora" else "")
                cnt[(kind, e["layer"])] += 1
                means[kind].append(e["gate_mean"])
        print(f"\n{name}: {len(rs)} runs, {sum(cnt.values())} branches, reasons "
              f"{dict(Counter(e['reason'][:26] for r in rs.values() for e in r.get('prune_events', [])))}")
        print("| branch | L0 | L1 | L2 | L3 | L4 | L5 | total | gate means at the cut (median) |\n|---|---|---|---|---|---|---|---|---|")
        for kind in ("lora attn.q", "lora attn.v", "prefix", "adapter"):
            row = [cnt[(kind, layer)] for layer in range(6)]
            m = means.get(kind, [])
            print(f"| {kind} | " + " | ".join(map(str, row)) + f" | {sum(row)} | "
                  + (f"{min(m):.3f}-{max(m):.2f} ({st.median(m):.3f})" if m else "—") + " |")


if __name__ == "__main__":
    main()
