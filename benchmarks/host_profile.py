"""Where a compiled train step's host time goes (issue 9 / 12: BERT is host-bound under CUDA graphs).

For each variant of ``benchmarks/speed.py`` (its builders, imported from this file's folder: run
the copy inside the tree you want to measure, an older tree included), one model is built,
compiled (``--mode``, default reduce-overhead) and warmed up, then:

- **phases**: ``--steps`` train steps timed on the host with ``perf_counter`` at each phase's end
  (forward call returned, ``loss.backward()`` returned, ``opt.step()``, ``zero_grad``) and once
  more after a device sync; no sync inside a step, so each phase's number is the host time it
  takes to *issue* its work, and ``sync_wait_ms`` is how long the device still ran after the host
  was done (near 0: host-bound). CUDA events around the step give the device-side step time, as
  speed.py's ``time_steps`` measures it.
- **torch.profiler** (CPU + CUDA activities) over ``--steps`` steps: the ``key_averages`` table by
  self CPU time, the GPU's busy time (union of its kernel/memcpy intervals) against the wall time of
  the profiled window, and the number of compiled regions / CUDA-graph replays per step.
- **cProfile** over ``--steps`` steps: the Python functions with the most own time (what the
  host runs around the graphs: hooks, CUDA-graph trees' bookkeeping, the optimizer).
- dynamo/inductor counters (cudagraph skips, recompilations) and the cudagraph trees' log if
  ``TORCH_LOGS=perf_hints,cudagraphs`` is set in the environment.

Several processes may compile at once and still time one at a time: ``--lock FILE`` holds an
exclusive ``flock`` on FILE from the warm-up until the variant's measurements are done, and
``--barrier DIR --parties N`` makes each wait until every process has compiled its i-th variant
(or finished), so that no compilation runs beside a timing.

    PYTHONPATH=. python benchmarks/host_profile.py --scenario bert --variants lora-r16-all,peft-lora-r16-all --out $OUT/prof
    PYTHONPATH=. python benchmarks/host_profile.py --scenario bert --variants lora-r8-qv,lora-r8-qv-mixed8 --adamw fused --out $OUT/prof
    python benchmarks/host_profile.py --tiny --device cpu --backend aot_eager --mode compiled --variants lora-r16-all --out /tmp/prof   # CPU check

Writes ``OUT/<tag><variant>.txt`` (tables) and appends one JSON line per variant to
``OUT/<tag>summary.jsonl``.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import fcntl
import gc
import io
import json
import os
import pstats
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import speed  # noqa: E402  (this tree's speed.py: the builders of the variants measured)


@contextlib.contextmanager
def _locked(path: str | None) -> Iterator[None]:
    if not path:
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _busy_union(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals (µs)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def build(name: str, scn: Any, mode: str, backend: str, adamw: str, device: torch.device,
          dtype: torch.dtype) -> tuple[Callable[[], Any], Callable[[], None], Callable[[], None], Any]:
    """The step's three parts (forward -> loss, backward, optimizer) for one speed.py variant."""
    variant = speed.VARIANTS[name]
    prep = speed.prepare(variant, scn, "train", device, dtype, traceable_floor=mode != "eager")
    model = prep.model
    model.train(True)
    fn: Callable[..., Any] = model
    if mode != "eager":
        kwargs: dict[str, Any] = {"fullgraph": True, "backend": backend}
        if mode == "reduce-overhead":
            kwargs["mode"] = "reduce-overhead"
        fn = torch.compile(model, **kwargs)
    opt_kwargs = speed.adamw_kwargs(adamw)
    opt = torch.optim.AdamW(prep.params, lr=speed.LR, **opt_kwargs)
    vocab = model.get_input_embeddings().num_embeddings
    batch = {**speed.make_batch(scn, "train", vocab, device), **getattr(prep, "call_kwargs", {})}
    mark = mode == "reduce-overhead"

    def forward() -> Any:
        if mark:
            torch.compiler.cudagraph_mark_step_begin()
        return fn(**batch).loss

    def optimizer() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    return forward, (lambda loss: loss.backward()), optimizer, prep


def _barrier(a: argparse.Namespace, index: int, done: bool = False) -> None:
    """With ``--barrier DIR --parties N``: wait (at most ``--barrier-s``) until every party has
    compiled its ``index``-th variant or finished, so that no compilation runs beside a timing."""
    if not a.barrier:
        return
    d = Path(a.barrier)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{a.tag or 'main'}.{'done' if done else index}").touch()
    if done:
        return
    deadline = time.monotonic() + a.barrier_s
    while time.monotonic() < deadline:
        reached: dict[str, float] = {}
        for f in d.iterdir():
            party, _, what = f.name.rpartition(".")
            level = float("inf") if what == "done" else float(what)
            reached[party] = max(reached.get(party, -1.0), level)
        if sum(1 for v in reached.values() if v >= index) >= a.parties:
            return
        time.sleep(0.2)


def profile_variant(name: str, scn: Any, a: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                    out: Path, index: int = 0) -> dict:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    rec: dict[str, Any] = {"variant": name, "scenario": scn.name, "mode": a.mode, "adamw": a.adamw,
                           "tree": str(HERE.parent), "tag": a.tag}
    forward, backward, optimizer, prep = build(name, scn, a.mode, a.backend, a.adamw, device, dtype)
    rec["trainable_tensors"] = sum(len(g["params"]) if isinstance(g, dict) else 1 for g in prep.params)
    rec["param_groups"] = len(prep.params) if prep.params and isinstance(prep.params[0], dict) else 1

    def step() -> None:
        backward(forward())
        optimizer()

    t0 = time.perf_counter()
    step()
    _sync(device)
    rec["first_step_s"] = round(time.perf_counter() - t0, 2)
    for _ in range(2):  # the CUDA-graph recording happens on the second/third call
        step()
    _sync(device)
    report: list[str] = []
    _barrier(a, index)
    with _locked(a.lock):
        gc.collect()
        gc.freeze()  # as speed.py's run does: no collection of the long-lived heap inside a step
        for _ in range(a.warmup):
            step()
        _sync(device)
        # 1. phases on the host, no sync inside a step
        ph: dict[str, list[float]] = {k: [] for k in ("forward", "backward", "optimizer", "sync_wait", "step_host")}
        for _ in range(a.steps):
            _sync(device)
            t = [time.perf_counter()]
            loss = forward(); t.append(time.perf_counter())
            backward(loss); t.append(time.perf_counter())
            optimizer(); t.append(time.perf_counter())
            _sync(device); t.append(time.perf_counter())
            for k, (x, y) in zip(("forward", "backward", "optimizer", "sync_wait"), zip(t, t[1:])):
                ph[k].append((y - x) * 1e3)
            ph["step_host"].append((t[3] - t[0]) * 1e3)
        rec["host_ms"] = {k: round(statistics.median(v), 4) for k, v in ph.items()}
        # 2. the step as speed.py times it (CUDA events, back to back)
        rec["event_ms"] = [round(x, 4) for x in speed.time_steps(step, a.steps * 2, device)]
        rec["event_median_ms"] = round(statistics.median(rec["event_ms"]), 4)
        # 3. torch.profiler
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        _sync(device)
        with profile(activities=acts) as prof:
            w0 = time.perf_counter()
            for _ in range(a.steps):
                step()
            _sync(device)
            wall_us = (time.perf_counter() - w0) * 1e6
        events = prof.events()
        gpu = [(e.time_range.start, e.time_range.end) for e in events
               if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA")]
        rec["profiled_wall_ms_per_step"] = round(wall_us / a.steps / 1e3, 4)
        rec["gpu_busy_ms_per_step"] = round(_busy_union(gpu) / a.steps / 1e3, 4) if gpu else None
        names: dict[str, int] = {}
        for e in events:
            if e.name.startswith(("cuda", "cuLaunch")) or any(s in e.name for s in ("CompiledFunction", "Torch-Compiled Region", "cudaGraphLaunch",
                                          "CUDAGraph", "AccumulateGrad", "Optimizer.step", "cudaMemcpy",
                                          "cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::copy_")):
                names[e.name] = names.get(e.name, 0) + 1
        rec["per_step_counts"] = {k: round(v / a.steps, 2) for k, v in sorted(names.items())}
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=90)
        report += [f"== {a.tag}{name}: torch.profiler, {a.steps} steps, sorted by self CPU time", table]
        if a.trace:
            prof.export_chrome_trace(str(out / f"{a.tag}{name}.trace.json"))
        # 4. cProfile: Python's own time around the graphs
        pr = cProfile.Profile()
        _sync(device)
        pr.enable()
        for _ in range(a.steps):
            step()
        pr.disable()
        _sync(device)
        s = io.StringIO()
        ps = pstats.Stats(pr, stream=s)
        ps.sort_stats("tottime").print_stats(a.rows)
        report += [f"== {a.tag}{name}: cProfile, {a.steps} steps, by own time", s.getvalue()]
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(a.rows)
        report += [f"== {a.tag}{name}: cProfile, by cumulative time", s.getvalue()]
        gc.unfreeze()
    c = torch._dynamo.utils.counters
    rec["counters"] = {k: {str(kk): vv for kk, vv in v.items()} for k, v in c.items()
                       if k in ("inductor", "stats", "graph_break", "recompiles")}
    (out / f"{a.tag}{name}.txt").write_text("\n".join(report), encoding="utf-8")
    del forward, backward, optimizer, prep
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="bert")
    p.add_argument("--variants", default="lora-r16-all")
    p.add_argument("--mode", choices=("eager", "compiled", "reduce-overhead"), default="reduce-overhead")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--adamw", choices=("default", "foreach", "fused"), default="default")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rows", type=int, default=40, help="rows of each table")
    p.add_argument("--tiny", action="store_true", help="speed.py's tiny configs (CPU check)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--trace", action="store_true", help="also write the chrome trace (large)")
    p.add_argument("--lock", default=None, help="flock this file while timing (parallel compiles)")
    p.add_argument("--barrier", default=None, help="a folder the parallel processes meet in (see _barrier)")
    p.add_argument("--parties", type=int, default=1)
    p.add_argument("--barrier-s", type=float, default=120.0)
    p.add_argument("--tag", default="", help="file-name prefix (e.g. old- for another tree)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    print("plugins:", speed.ensure_plugins(), flush=True)
    scn = (speed.TINY if a.tiny else speed.SCENARIOS)[a.scenario]
    for index, name in enumerate(a.variants.split(",")):
        try:
            rec = profile_variant(name, scn, a, device, dtype, out, index)
        except Exception as exc:  # one variant's failure must not lose the others'
            if a.barrier:  # nor keep the other parties waiting at its barrier
                (Path(a.barrier) / f"{a.tag or 'main'}.{index}").touch()
            rec = {"variant": name, "tag": a.tag, "error": f"{type(exc).__name__}: {exc}"[:500],
                   "traceback": traceback.format_exc(limit=-6)[-3000:]}
        with open(out / f"{a.tag}summary.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps({k: v for k, v in rec.items() if k not in ("event_ms", "counters", "traceback")}), flush=True)
    _barrier(a, 0, done=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
