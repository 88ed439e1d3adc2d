"""Tables of the session-8 pruning runs (RESULTS.md "Session 8 (helper prune2): pruning later").
Reads p8/ (this session's call) and ../prune-s7/p1, p2 (session 7's unpruned q2 seeds 0-5 and its
min_step-100 pruned runs). Run from this folder: python summarize8.py
"""
from __future__ import annotations

import json
import statistics as st
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
S7 = HERE.parent / "prune-s7"


def runs_of(path: Path, seeds: list[int]) -> dict[int, dict]:
    k = json.loads(path.read_text())["k"]["all"]
    runs = next(iter(k.values()))["runs"]
    return dict(zip(seeds, runs))


def table() -> dict[str, dict[int, dict]]:
    t: dict[str, dict[int, dict]] = {}
    t["unpruned (s7)"] = {**runs_of(S7 / "p1/q2.json", [0, 1, 2]), **runs_of(S7 / "p2/q2-s345.json", [3, 4, 5])}
    t["pruned m100 (s7)"] = {**runs_of(S7 / "p1/q2-pruned.json", [0, 1, 2]),
                             **runs_of(S7 / "p2/q2-pruned-s345.json", [3, 4, 5])}
    t["unpruned re-run (s8)"] = {s: runs_of(HERE / f"p8/u-s{s}.json", [s])[s] for s in (0, 1, 2)}
    for ms, seeds in (("10", (0, 1, 2)), ("250", range(6)), ("400", range(6))):
        t[f"pruned m{ms}"] = {s: runs_of(HERE / f"p8/m{ms}-s{s}.json", [s])[s] for s in seeds}
    return t


def msd(v: list[float]) -> str:
    return f"{st.mean(v):.1f} ± {st.pstdev(v):.1f}"


def main() -> None:
    t = table()
    base = t["unpruned (s7)"]
    print("| variant | seed | dev F1 | test F1 | test acc | kept params | test F1 - unpruned (s7) | cut at steps | gate means at the cut |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rs in t.items():
        for s, r in sorted(rs.items()):
            ev = [e for e in r.get("prune_events", []) if e["event"] == "pruned"]
            steps = f"{min(e['step'] for e in ev)}-{max(e['step'] for e in ev)}" if ev else "—"
            gm = f"{min(e['gate_mean'] for e in ev):.2f}-{max(e['gate_mean'] for e in ev):.2f}" if ev else "—"
            diff = f"{100 * (r['f1'] - base[s]['f1']):+.1f}" if "unpruned (s7)" != name else "—"
            print(f"| {name} | {s} | {100 * r['dev']['f1']:.1f} | {100 * r['f1']:.1f} | {100 * r['acc']:.1f} | "
                  f"{r['params']:,} | {diff} | {steps} | {gm} |")
    print("\n| variant | seeds | dev F1 | test F1 | paired diff mean (sd; se) | losing seeds | kept params |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in t.items():
        for seeds in ((0, 1, 2), (3, 4, 5), (0, 1, 2, 3, 4, 5)):
            if not all(s in rs for s in seeds):
                continue
            dv = [100 * rs[s]["dev"]["f1"] for s in seeds]
            tv = [100 * rs[s]["f1"] for s in seeds]
            dd = [100 * (rs[s]["f1"] - base[s]["f1"]) for s in seeds]
            sd = st.stdev(dd) if len(dd) > 1 else 0.0
            pr = [rs[s]["params"] for s in seeds]
            print(f"| {name} | {','.join(map(str, seeds))} | {msd(dv)} | {msd(tv)} | "
                  + ("—" if name == "unpruned (s7)" else f"{st.mean(dd):+.1f} ({sd:.1f}; {sd / len(dd) ** 0.5:.1f})")
                  + f" | {sum(d < 0 for d in dd)}/{len(dd)} | {min(pr):,}-{max(pr):,} |")
    # what was pruned, by kind and layer, per schedule
    for name in ("pruned m100 (s7)", "pruned m10", "pruned m250", "pruned m400"):
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
        n = len(rs)
        print(f"\n{name}: {n} runs, {sum(cnt.values())} branches, reasons "
              f"{dict(Counter(e['reason'] for r in rs.values() for e in r.get('prune_events', [])))}")
        print("| branch | L0 | L1 | L2 | L3 | L4 | L5 | total | gate means at the cut (median) |\n|---|---|---|---|---|---|---|---|---|")
        for kind in ("lora attn.q", "lora attn.v", "prefix", "adapter"):
            row = [cnt[(kind, layer)] for layer in range(6)]
            m = means.get(kind, [])
            print(f"| {kind} | " + " | ".join(map(str, row)) + f" | {sum(row)} | "
                  + (f"{min(m):.2f}-{max(m):.2f} ({st.median(m):.2f})" if m else "—") + " |")
    # contrib.py: gate mean vs damage
    print("\n| seed | step | base probe loss / dev F1 | spearman(gate mean, damage) | gate set: n, kept, probe loss, dev F1 | "
          "ablation set: n, kept, probe loss, dev F1 | shared |")
    print("|---|---|---|---|---|---|---|")
    for s in (0, 1, 2):
        c = json.loads((HERE / f"p8/contrib-s{s}.json").read_text())
        for step, a in c["at"].items():
            g, ab = a["sets"]["gate"], a["sets"]["ablation"]
            print(f"| {s} | {step} | {a['base']['probe_loss']:.3f} / {100 * a['base']['dev_f1']:.1f} | "
                  f"{a['spearman_gate_vs_damage']:.2f} | {len(g['pruned'])}, {g['kept']:,}, {g['probe_loss']:.3f}, "
                  f"{100 * g['dev_f1']:.1f} | {len(ab['pruned'])}, {ab['kept']:,}, {ab['probe_loss']:.3f}, "
                  f"{100 * ab['dev_f1']:.1f} | {a['shared_of_gate_set']} |")


if __name__ == "__main__":
    main()
