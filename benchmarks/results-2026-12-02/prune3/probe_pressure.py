"""CPU probe before the GPU call (issue 12, session 9): does budget pressure of a given lambda move
the pressed gates within a few dozen steps of the q2 configuration? Runs benchmarks/quality.py's
pruned variant (MiniLM, K=all, lr 3e-3, prefix x0.1, adapter x0.3) with its controller's on_step
wrapped to print, every EVERY steps, the window means of the gates pressed at that step and of the
others. The cut itself is held back (--prune-min-step near the end).

    python benchmarks/results-2026-12-02/prune3/probe_pressure.py --steps 40 --prune-min-step 39 \
        --prune-opts '{"pressure": 1.0}'   # then the quality.py arguments it passes on
"""
from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
EVERY = int(os.environ.get("EVERY", "10"))

import quality  # noqa: E402

quality._ensure_prune_plugin()
import unipelt_plugins.prune as plugin  # noqa: E402

_on_step = plugin.GatePruning.on_step


def on_step(self, step, loss):
    pressed = dict(self.pressed)
    _on_step(self, step, loss)
    if step % EVERY == 0:
        means = {k: sum(w) / len(w) for k, w in self.window.items() if w}
        p = sorted(means[k] for k in pressed if k in means)
        o = sorted(v for k, v in means.items() if k not in pressed)
        fmt = lambda xs: f"{min(xs):.3f}..{max(xs):.3f} (median {statistics.median(xs):.3f})" if xs else "-"
        print(f"step {step}: pressed {len(p)}: {fmt(p)}; others {len(o)}: {fmt(o)}", flush=True)


plugin.GatePruning.on_step = on_step
sys.argv = [sys.argv[0], "--task", "cls", "--ks", "all", "--lrs", "3e-3", "--lr-scale", "prefix=0.1,adapter=0.3",
            "--seeds", "1", "--methods", "UniPELT (APL) pruned to half", "--out", "/tmp/probe-pressure.json"] + sys.argv[1:]
quality.main()
