"""Where a compiled collapsed UniPELT's inference forward loses time against the base forward, and
why the session-8 profile's per-forward time exceeds its GPU kernel time (issue 12, helper coll10,
session 10). Extends ``results-2026-12-01/coll-s8/collapse_profile.py`` (same models, same compile).

Per model (speed.py's scenario, infer batch, bf16, ``torch.compile(mode="reduce-overhead",
fullgraph=True)``), the models interleaved round by round:

* ``synced_ms``: CUDA events around one step, then a host sync before the next (the session-8
  profile's timing: the event interval includes the host's work before the graph is launched,
  because the GPU is idle while the host prepares the call);
* ``pipelined_ms``: CUDA events around each of 20 steps queued back to back, no sync in between
  (speed.py's ``time_steps``: the host runs ahead, the interval is the GPU's);
* ``host_us``: host time of one ``step()`` call while queued (the Python call: dynamo's guards,
  cudagraph trees' bookkeeping and the graph launch), median;
* from one torch.profiler capture of 5 replays, separated by a sync and a 5-ms sleep: per replay
  the GPU span (first kernel start to last kernel end), the kernels' busy time (union of their
  intervals) and the idle time inside the span (gaps between kernels inside the graph), and every
  kernel's total time per forward.

    PYTHONPATH=. python3 benchmarks/results-2026-12-02/coll10/collapse_profile2.py OUT_DIR llama|bert [--rows=floor,closed,collapsed] [--tiny]

Writes OUT/<scenario>-profile2.json and prints a summary.
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

# (label, variant). The device run of 2026-12-02 had a fourth llama row, closed-flash: an opt-in
# flash path for causal layers (unipelt.attention.PREFIX_CAUSAL, since removed) that the compiled
# model never reached (transformers passes a dense causal mask under torch.compile); its outputs
# and kernels were closed's (llama-profile2.json keeps it)
ROWS = [("floor", "floor"), ("closed", "unipelt-collapsed-closed"), ("collapsed", "unipelt-collapsed")]


def _replays(kernels: list[tuple[float, float]], split_gap_us: float = 1000.0) -> list[list[tuple[float, float]]]:
    """Kernel intervals (start, end) in us, cut into replays at idle gaps over ``split_gap_us``."""
    kernels = sorted(kernels)
    out: list[list[tuple[float, float]]] = []
    last_end = None
    for s, e in kernels:
        if last_end is None or s - last_end > split_gap_us:
            out.append([])
        out[-1].append((s, e))
        last_end = e if last_end is None else max(last_end, e)
    return out


def _span_busy(rep: list[tuple[float, float]]) -> tuple[float, float]:
    span = max(e for _, e in rep) - rep[0][0]
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in rep:  # union of the intervals
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return span, busy


def main() -> None:
    out = Path(sys.argv[1])
    scn_name = sys.argv[2] if len(sys.argv) > 2 and not sys.argv[2].startswith("-") else "bert"
    tiny = "--tiny" in sys.argv
    only = [a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--rows=")]
    rows = [r for r in ROWS if not only or r[0] in only[0]]
    speed.ensure_plugins()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    scn = (speed.TINY if tiny else speed.SCENARIOS)[scn_name]
    models = {}
    t0 = time.perf_counter()
    torch._dynamo.reset()
    outputs = {}
    for label, vname in rows:
        v = speed.FLOOR if vname == "floor" else speed.VARIANTS[vname]
        prep = speed.prepare(v, scn, "infer", dev, torch.bfloat16)
        model = prep.model.eval()
        batch = speed.make_batch(scn, "infer", model.get_input_embeddings().num_embeddings, dev)
        fn = torch.compile(model, mode="reduce-overhead" if cuda else None, fullgraph=True)

        def step(fn=fn, batch=batch):
            if cuda:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad():
                return fn(**batch)
        c0 = time.perf_counter()
        try:
            for _ in range(5):
                o = step()
        except Exception as exc:  # a row whose path does not compile here: reported, the others go on
            print(f"[{time.perf_counter() - t0:6.1f}s] {label}: FAILED {type(exc).__name__}: {str(exc)[:600]}", flush=True)
            continue
        outputs[label] = o.logits.float().clone()
        if cuda:
            torch.cuda.synchronize()
        print(f"[{time.perf_counter() - t0:6.1f}s] {label}: compiled + warm in {time.perf_counter() - c0:.1f}s", flush=True)
        models[label] = step
    diffs = {}
    for label in outputs:
        if label.startswith("closed-") and "closed" in outputs:
            d = (outputs[label] - outputs["closed"]).abs().max().item()
            diffs[label] = {"max_abs_diff_vs_closed": d, "closed_max_abs": outputs["closed"].abs().max().item()}
            print(f"{label} vs closed: max |logit diff| {d:.3g} (logits up to {diffs[label]['closed_max_abs']:.3g})", flush=True)
    res = {k: {"synced": [], "pipelined": [], "host": []} for k in models}
    for _ in range(3):
        for label, step in models.items():
            r = res[label]
            for _ in range(3):
                step()
            if cuda:
                torch.cuda.synchronize()
            for _ in range(20):  # synced (the session-8 profile's timing)
                if cuda:
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record(); step(); b.record(); b.synchronize()
                    r["synced"].append(a.elapsed_time(b))
                else:
                    s = time.perf_counter(); step(); r["synced"].append((time.perf_counter() - s) * 1e3)
            if cuda:  # pipelined (speed.py's time_steps), the host call timed on the way
                ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(20)]
                torch.cuda.synchronize()
                for a, b in ev:
                    a.record()
                    h = time.perf_counter(); step(); r["host"].append((time.perf_counter() - h) * 1e6)
                    b.record()
                torch.cuda.synchronize()
                r["pipelined"] += [a.elapsed_time(b) for a, b in ev]
    med = {k: {m: statistics.median(v) if v else None for m, v in r.items()} for k, r in res.items()}
    result = {"scenario": scn_name, "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if cuda else None,
              "median": med, "output_diffs": diffs, "rows": {}}
    for k, m in med.items():
        f = med.get("floor", m)
        print(f"{scn_name} {k}: synced {m['synced']:.3f} ms (x{m['synced'] / f['synced']:.3f})"
              + (f", pipelined {m['pipelined']:.3f} ms (x{m['pipelined'] / f['pipelined']:.3f}), host call "
                 f"{m['host']:.0f} us" if cuda else ""), flush=True)
    if not cuda:
        (out / f"{scn_name}-profile2.json").write_text(json.dumps(result, indent=1))
        return
    from torch.profiler import ProfilerActivity, profile
    n_rep = 5
    for label, step in models.items():
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(n_rep):
                step()
                torch.cuda.synchronize()
                time.sleep(0.005)
        per = collections.defaultdict(lambda: [0.0, 0])
        ivals = []
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                per[e.name][0] += e.device_time_total / n_rep
                per[e.name][1] += 1
                ivals.append((e.time_range.start, e.time_range.end))
        reps = _replays(ivals)
        sb = [_span_busy(r) for r in reps]
        spans = [s for s, _ in sb]
        busys = [b for _, b in sb]
        total = sum(v[0] for v in per.values())
        ks = sorted(per.items(), key=lambda kv: -kv[1][0])
        row = {"kernel_us_per_forward": total, "n_kernels_per_forward": sum(v[1] for v in per.values()) / n_rep,
               "replays_found": len(reps), "span_us": spans, "busy_us": busys,
               "idle_in_span_us": [s - b for s, b in sb],
               "by_kernel": [{"name": k[:160], "us": round(v[0], 2), "count": v[1] / n_rep} for k, v in ks]}
        result["rows"][label] = row
        ms = statistics.median(spans) if spans else float("nan")
        mb = statistics.median(busys) if busys else float("nan")
        print(f"== {label}: {total:.1f} us kernels per forward, {row['n_kernels_per_forward']:.0f} kernels; "
              f"{len(reps)} replays: GPU span {ms:.1f} us, busy {mb:.1f} us, idle inside the graph {ms - mb:.1f} us "
              f"({(ms - mb) / max(row['n_kernels_per_forward'], 1):.2f} us per kernel)", flush=True)
        for k, v in ks[:30]:
            print(f"   {v[0]:8.1f} us  x{v[1] / n_rep:5.0f}  {k[:110]}", flush=True)
        (out / f"{scn_name}-profile2.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
