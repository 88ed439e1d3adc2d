"""Issue 12 on the GPU without compilation: the inference forward of the collapse and mixed-batch
variants of benchmarks/speed.py replayed as a captured CUDA graph (GPU time, no host overhead) and
timed eagerly, in interleaved rounds so that a drift of the machine touches every variant alike.

    PYTHONPATH=. python benchmarks/lifecycle_graphs.py --out $OUT/graphs.jsonl            # H200: ~1 min
    python benchmarks/lifecycle_graphs.py --tiny --device cpu --out /tmp/g.jsonl         # CPU check (eager only)

Why not ``speed.py --modes reduce-overhead``: it compiles every model for both phases (20-40 s each),
more than the device budget of one call for this many variants. A captured graph of the eager
forward is what reduce-overhead replays, minus inductor's fusions. Variants whose forward cannot be
captured (a mixed batch builds its row ids from Python per call: a host-to-device copy) are timed
eagerly only; the record says why (``graph_error``).

Each record: scenario, variant, round, ``eager_ms`` (median of ``--iters`` calls, CUDA events),
``graph_ms`` (median of ``--iters`` replays), and their ratios to the floor (the frozen base
model's forward) of the same round.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402

VARIANTS = ("floor", "unipelt", "unipelt-collapsed", "unipelt-collapsed-closed", "lora-r8-qv", "lora-r8-qv-mixed8")


def _timed(fn, n: int, device: torch.device) -> float:
    """Median milliseconds of ``n`` calls (CUDA events on a GPU, else perf_counter)."""
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _graph(model, batch, device):
    """A captured CUDA graph of one inference forward (static inputs: the batch's own tensors)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            model(**batch)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(**batch)
    return graph


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="llama,bert")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    speed.ensure_plugins()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    scenarios = speed.TINY if args.tiny else speed.SCENARIOS
    records = []
    header = {"kind": "header", "torch": torch.__version__, "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "command": " ".join(["python", *sys.argv]), "dtype": str(dtype)}
    for scn_name in args.scenarios.split(","):
        scn = scenarios[scn_name]
        built = {}
        for name in args.variants.split(","):
            variant = speed.FLOOR if name == "floor" else speed.VARIANTS[name]
            torch._dynamo.reset()
            prep = speed.prepare(variant, scn, "infer", device, dtype)
            model = prep.model.eval()
            vocab = model.get_input_embeddings().num_embeddings
            batch = {k: v for k, v in speed.make_batch(scn, "infer", vocab, device).items() if k != "labels"}
            batch.update(prep.call_kwargs)
            graph, error = None, None
            if device.type == "cuda":
                try:
                    with torch.no_grad():
                        graph = _graph(model, batch, device)
                except Exception as e:  # recorded: that variant is timed eagerly only
                    error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    torch.cuda.synchronize(device)
            built[name] = (model, batch, graph, error)
        for rnd in range(1, args.rounds + 1):
            rows = {}
            for name, (model, batch, graph, error) in built.items():
                with torch.no_grad():
                    for _ in range(3):
                        model(**batch)
                    eager = _timed(lambda: model(**batch), args.iters, device)
                    replay = _timed(graph.replay, args.iters, device) if graph is not None else None
                rows[name] = {"kind": "measurement", "scenario": scn_name, "variant": name, "round": rnd,
                              "eager_ms": round(eager, 4), "graph_ms": None if replay is None else round(replay, 4),
                              **({"graph_error": error} if error else {})}
            floor = rows.get("floor")
            for r in rows.values():
                if floor is not None:
                    r["eager_ratio"] = round(r["eager_ms"] / floor["eager_ms"], 4)
                    if r["graph_ms"] is not None and floor["graph_ms"]:
                        r["graph_ratio"] = round(r["graph_ms"] / floor["graph_ms"], 4)
                print(json.dumps(r), flush=True)
                records.append(r)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(x) + "\n" for x in [header, *records]))
            os.replace(tmp, args.out)
        del built
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
