"""Tables of the session-7 pruning check from the raw files here (p1/, p2/: the device call's two tarballs, unpacked)."""
from __future__ import annotations

import glob
import json
import statistics as st
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent


def entry(path: str) -> tuple[dict, dict]:
    res = json.loads(Path(path).read_text())
    (e,) = [v for k in res["k"].values() for v in k.values()]
    return res, e


def runs(pattern: str) -> list[dict]:
    out = []
    for f in sorted(glob.glob(str(HERE / pattern))):
        res, e = entry(f)
        out += e["runs"]
    return out


def ms(vals: list[float]) -> str:
    return f"{100 * st.mean(vals):.1f} ± {100 * st.pstdev(vals):.1f}"


# the sweep (phase 1): every configuration, unpruned and pruned, seeds 0, 1, 2
print("| config | variant | dev F1 per seed | dev F1 mean | test acc % | test F1 per seed | test F1 % | kept params |")
print("|---|---|---|---|---|---|---|---|")
def seq(vals, fmt="{:.1f}", scale=100) -> str:
    return ", ".join(fmt.format(scale * v) for v in vals)


for tag in ("q1", "q2", "q3", "q4"):
    for var in ("", "-pruned"):
        rs = runs(f"p1/{tag}{var}.json")
        dev = [r["dev"]["f1"] for r in rs]
        print(f"| {tag} | {'pruned to half' if var else 'unpruned'} | {seq(dev)} | {100 * st.mean(dev):.1f} | "
              f"{ms([r['acc'] for r in rs])} | {seq([r['f1'] for r in rs])} | {ms([r['f1'] for r in rs])} | "
              f"{seq([r['params'] for r in rs], '{:,}', 1)} |")

# the chosen configuration over seeds 0-8, paired by seed
un = runs("p1/q2.json") + runs("p2/q2-s345.json") + runs("p2/q2-s678.json")
pr = runs("p1/q2-pruned.json") + runs("p2/q2-pruned-s345.json") + runs("p2/q2-pruned-s678.json")
print("\n| seed | unpruned dev / test F1 | pruned dev / test F1 | test F1 pruned - unpruned | kept params (pruned) |")
print("|---|---|---|---|---|")
for s, (u, p) in enumerate(zip(un, pr)):
    print(f"| {s} | {100 * u['dev']['f1']:.1f} / {100 * u['f1']:.1f} | {100 * p['dev']['f1']:.1f} / {100 * p['f1']:.1f} | "
          f"{100 * (p['f1'] - u['f1']):+.1f} | {p['params']:,} |")
for name, sl in (("seeds 0-2 (the check)", slice(0, 3)), ("seeds 3-8", slice(3, 9)), ("seeds 0-8", slice(0, 9))):
    d = [p["f1"] - u["f1"] for u, p in zip(un[sl], pr[sl])]
    se = st.stdev(d) / len(d) ** 0.5
    print(f"{name}: unpruned test F1 {ms([u['f1'] for u in un[sl]])}, pruned {ms([p['f1'] for p in pr[sl]])}, "
          f"paired difference {100 * st.mean(d):+.2f} (sd {100 * st.stdev(d):.2f}, se {100 * se:.2f}); "
          f"acc {ms([u['acc'] for u in un[sl]])} vs {ms([p['acc'] for p in pr[sl]])}; "
          f"dev F1 {ms([u['dev']['f1'] for u in un[sl]])} vs {ms([p['dev']['f1'] for p in pr[sl]])}")

# what was pruned in the chosen configuration (9 runs)
ev = [x for r in pr for x in r["prune_events"] if x["event"] == "pruned"]
print(f"\npruned events {len(ev)} over {len(pr)} runs; per run {[sum(x['event'] == 'pruned' for x in r['prune_events']) for r in pr]}; "
      f"reasons {dict(Counter(x['reason'] for x in ev))}; steps {min(x['step'] for x in ev)}-{max(x['step'] for x in ev)}; "
      f"gate mean at pruning {min(x['gate_mean'] for x in ev):.3f}-{max(x['gate_mean'] for x in ev):.3f} "
      f"(median {st.median(x['gate_mean'] for x in ev):.3f}); other events {[x for r in pr for x in r['prune_events'] if x['event'] != 'pruned']}")
by = Counter((x["module"], x["site"], x["layer"]) for x in ev)
for mod, site in sorted({(m, s) for m, s, _ in by}):
    print(f"  {mod} {site}: " + ", ".join(f"L{layer} {by[(mod, site, layer)]}" for layer in range(6)))
print("kinds per run:", [dict(Counter(x["module"] for x in r["prune_events"] if x["event"] == "pruned")) for r in pr])
