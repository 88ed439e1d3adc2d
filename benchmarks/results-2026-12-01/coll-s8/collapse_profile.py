"""Where a compiled collapsed UniPELT's inference forward spends its GPU time against the base
forward (issue 12, helper coll, session 8).

Per model (speed.py's scenario, infer batch, bf16): torch.compile(mode="reduce-overhead",
fullgraph=True), warm-up, then (1) the forward timed as speed.py times it (CUDA events, median),
the models interleaved round by round, and (2) one torch.profiler capture (CUDA activity) of a
few replays: every GPU kernel with its total time per forward, written to OUT/<scenario>-profile.json
and printed as a table. Rows: the floor, the collapsed models with the prefix concatenated
(SPLIT_PREFIX = "never", the default) and with the softmax split ("compiled").

    PYTHONPATH=. python3 benchmarks/results-2026-12-01/coll-s8/collapse_profile.py OUT_DIR [scenario] [--tiny]
"""
from __future__ import annotations

import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import speed  # noqa: E402
import unipelt.attention as attention  # noqa: E402

ROWS = [("floor", "floor", "never"), ("closed-concat", "unipelt-collapsed-closed", "never"),
        ("closed-split", "unipelt-collapsed-closed", "compiled"), ("collapsed-concat", "unipelt-collapsed", "never"),
        ("collapsed-split", "unipelt-collapsed", "compiled")]


def main() -> None:
    out = Path(sys.argv[1])
    scn_name = sys.argv[2] if len(sys.argv) > 2 and not sys.argv[2].startswith("-") else "bert"
    tiny = "--tiny" in sys.argv
    only = [a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--rows=")]
    rows = [r for r in ROWS if not only or r[0] in only[0]]
    speed.ensure_plugins()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    scn = (speed.TINY if tiny else speed.SCENARIOS)[scn_name]
    models = {}
    t0 = time.perf_counter()
    torch._dynamo.reset()
    for label, vname, split in rows:
        # no reset between the models: each keeps its compiled graph, and each call sets the mode
        # its graph was traced under (dynamo guards on it, so a wrong value would recompile)
        attention.SPLIT_PREFIX = split
        v = speed.FLOOR if vname == "floor" else speed.VARIANTS[vname]
        prep = speed.prepare(v, scn, "infer", dev, dtype)
        model = prep.model.eval()
        batch = speed.make_batch(scn, "infer", model.get_input_embeddings().num_embeddings, dev)
        fn = torch.compile(model, mode="reduce-overhead" if cuda else None, fullgraph=True)

        def step(fn=fn, batch=batch, split=split):
            attention.SPLIT_PREFIX = split
            if cuda:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad():
                return fn(**batch)
        c0 = time.perf_counter()
        for _ in range(5):
            step()
        if cuda:
            torch.cuda.synchronize()
        print(f"[{time.perf_counter() - t0:6.1f}s] {label}: compiled + warm in {time.perf_counter() - c0:.1f}s", flush=True)
        models[label] = (step, prep)
    # (1) interleaved timing, CUDA events
    times = {k: [] for k in models}
    for _ in range(3):
        for label, (step, _) in models.items():
            for _ in range(3):
                step()
            if cuda:
                torch.cuda.synchronize()
            for _ in range(20):
                if cuda:
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record(); step(); b.record(); b.synchronize()
                    times[label].append(a.elapsed_time(b))
                else:
                    s = time.perf_counter(); step(); times[label].append((time.perf_counter() - s) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, m in med.items():
        print(f"{scn_name} {k}: {m:.3f} ms  x{m / med['floor']:.3f}" if "floor" in med else f"{k}: {m:.3f}", flush=True)
    # (2) per-kernel GPU time per forward
    result = {"scenario": scn_name, "median_ms": med, "ratio": {k: m / med["floor"] for k, m in med.items()} if "floor" in med else None,
              "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if cuda else None, "kernels": {}}
    n_rep = 5
    from torch.profiler import ProfilerActivity, profile
    for label, (step, _) in models.items():
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(n_rep):
                step()
            if cuda:
                torch.cuda.synchronize()
        per = collections.defaultdict(lambda: [0.0, 0])
        for e in prof.events():
            if cuda and e.device_type == torch.autograd.DeviceType.CUDA:
                per[e.name][0] += e.device_time_total / n_rep
                per[e.name][1] += 1
        total = sum(v[0] for v in per.values())
        ks = sorted(per.items(), key=lambda kv: -kv[1][0])
        result["kernels"][label] = {"total_us": total, "n_kernels_per_forward": sum(v[1] for v in per.values()) / n_rep,
                                    "by_kernel": [{"name": k[:160], "us": round(v[0], 2), "count": v[1] / n_rep} for k, v in ks]}
        print(f"== {label}: {total:.1f} us GPU per forward, {sum(v[1] for v in per.values()) / n_rep:.0f} kernels", flush=True)
        for k, v in ks[:25]:
            print(f"   {v[0]:8.1f} us  x{v[1] / n_rep:5.0f}  {k[:110]}", flush=True)
    (out / f"{scn_name}-profile.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
