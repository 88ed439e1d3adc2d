"""speed.py's measurement with the compilations in parallel: one process per model, timed in turns.

A compiled (reduce-overhead) measurement costs its compilation, 30-60 s per model cold on the GPU
machine, and speed.py compiles one model after another; with a few minutes of device time that
left most rows unmeasured (benchmarks/RESULTS.md, Kernels, session 6). Here every model of one
(scenario, mode, phase) block -- the frozen floor and each variant -- is built, compiled and warmed
up in its own process at the same time (dynamo and AOT autograd are single-threaded Python, so
they overlap on the machine's cores), and then, when all are ready, timed **one process at a time**
while the others sleep: the GPU and the host are as idle for each timing as in speed.py.

The steps of a model are exactly speed.py's (``speed.measure``: same build, fullgraph first with
its fallback, warm-up, CUDA events, median of ``--iters``); each process times ``--passes`` times
in the order floor, variants, floor (the variants' order reversed in every second pass, to spread
any drift), and every pass is written as its own speed.py JSONL run (``<out>.pass<i>.jsonl``, the
floor's turns before and after as ``floor_at`` start and end), so that

    python benchmarks/speed.py --report out.pass1.jsonl out.pass2.jsonl

gives the usual "run 1 / run 2" table. The passes share one compilation per model: their spread
is the timing's, not a recompilation's (a fresh compile of the same graph is deterministic here:
no autotuning in reduce-overhead's default). A model not ready within ``--ready-s`` is stopped
and recorded as such; the files are rewritten (atomically) after every turn.

    PYTHONPATH=. python benchmarks/speed_turns.py --scenario bert --variants lora-r16-all,lora-r16-all-triton,unipelt,unipelt-triton --out $OUT/bert.jsonl
    python benchmarks/speed_turns.py --tiny --mode compiled --backend aot_eager --scenario llama --variants lora-r8-qv --out /tmp/t.jsonl   # CPU check
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
POLL_S = 0.02


# ------------------------------------------------------------------------------------------
# the worker: one model, timed when told
# ------------------------------------------------------------------------------------------
class FileTurn:
    """``turn(i)``: a context entered around the i-th timing pass. Entering the first one says the
    model is ready (``<name>.ready``); each waits for ``<name>.go<i>`` and leaves ``<name>.done<i>``."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = folder, name

    def __call__(self, i: int):
        return _Turn(self, i)


class _Turn:
    def __init__(self, turns: FileTurn, i: int):
        self.turns, self.i = turns, i
        self.times: list[float] | None = None  # set by speed._attempt inside the turn

    def __enter__(self):
        f, n = self.turns.folder, self.turns.name
        if self.i == 0:
            # as speed.py's run: the heap (now with the compiled model) frozen, so that no automatic
            # collection walks it while a turn is timed
            gc.collect()
            gc.freeze()
            _touch(f / f"{n}.ready")
        go = f / f"{n}.go{self.i}"
        while not go.exists():
            time.sleep(POLL_S)
        return self

    def __exit__(self, *exc):
        f, n = self.turns.folder, self.turns.name
        if self.times is not None:  # this turn's times now: a later turn may never finish
            tmp = f / f"{n}.times{self.i}.tmp"
            tmp.write_text(json.dumps(self.times))
            os.replace(tmp, f / f"{n}.times{self.i}")
        _touch(f / f"{n}.done{self.i}")
        return False


def _touch(path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(time.time()))
    os.replace(tmp, path)


def worker(args: argparse.Namespace) -> int:
    import torch

    import speed

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(1)  # several processes share the CPU
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    speed.ensure_plugins()
    scn = (speed.TINY if args.tiny else speed.SCENARIOS)[args.scenario]
    variant = speed.FLOOR if args.worker == "floor" else speed.VARIANTS[args.worker]
    folder = Path(args.dir)
    settings = speed.Settings(device=device, dtype=dtype, warmup=args.warmup, iters=args.iters,
                              backend=args.backend, variant_timeout=0.0, gpu_warmup_s=0.0,
                              turn=FileTurn(folder, args.worker), passes=args.turns,
                              turn_warmup=args.turn_warmup)
    rec = speed.measure(variant, scn, args.mode, args.phase, settings)
    tmp = folder / f"{args.worker}.json.tmp"
    tmp.write_text(json.dumps(rec, allow_nan=False, default=str))
    os.replace(tmp, folder / f"{args.worker}.json")
    return 0 if rec["error"] is None else 1


# ------------------------------------------------------------------------------------------
# the coordinator
# ------------------------------------------------------------------------------------------
@dataclass
class Proc:
    name: str
    turns: int
    popen: subprocess.Popen
    log: Path
    ready_s: float | None = None
    failed: str | None = None
    rec: dict | None = None
    done: list[int] = field(default_factory=list)
    times: dict[int, list[float]] = field(default_factory=dict)  # turn -> its step times (ms)


def _read_rec(folder: Path, p: Proc) -> dict | None:
    f = folder / f"{p.name}.json"
    return json.loads(f.read_text()) if f.exists() else None


def _stop(p: Proc) -> None:
    if p.popen.poll() is None:
        p.popen.send_signal(signal.SIGTERM)
        try:
            p.popen.wait(10)
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait()


def _tail(path: Path, n: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def schedule(variants: Sequence[str], passes: int) -> list[tuple[str, int]]:
    """The turns, in order: per pass the floor, the variants (reversed every second pass), the floor."""
    order: list[tuple[str, int]] = []
    for p in range(passes):
        vs = list(variants) if p % 2 == 0 else list(reversed(variants))
        order += [("floor", 2 * p)] + [(v, p) for v in vs] + [("floor", 2 * p + 1)]
    return order


def pass_records(header: dict, procs: dict[str, Proc], variants: Sequence[str], passes: int,
                 args: argparse.Namespace) -> list[list[dict]]:
    """speed.py records per pass: the floor's turns 2p and 2p+1 as its start and end floors."""
    import speed

    out = []
    for p in range(passes):
        recs: list[dict] = [{**header, "pass": p + 1}]
        block: list[dict] = []
        names = ["floor"] + list(variants) + ["floor"]
        for k, name in enumerate(names):
            proc = procs[name]
            turn = (2 * p + (k > 0)) if name == "floor" else p
            base = proc.rec or {}
            r = {key: v for key, v in base.items() if key not in ("pass_times_ms", "pass_medians_ms")}
            if not r:
                r = speed._record(speed.SCENARIOS.get(args.scenario) if not args.tiny else speed.TINY[args.scenario],
                                  args.mode, args.phase, name)
            r.update(kind="measurement", scenario=args.scenario, mode=args.mode, phase=args.phase,
                     variant=name, turn=turn, ready_s=proc.ready_s)
            if name == "floor":
                r["floor_at"] = "start" if k == 0 else "end"
            times = proc.times.get(turn)
            if times and turn in proc.done:
                r["times_ms"] = times
                r["median_ms"] = round(statistics.median(times), 4)
                r["error"] = None
            else:
                r["times_ms"] = r["median_ms"] = None
                r["error"] = r.get("error") or proc.failed or "not timed"
            block.append(r)
        speed.apply_floor(block)
        out.append(recs + block)
    return out


def coordinate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import speed

    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    out: Path = args.out
    folder = out.with_name(out.stem + ".turns")
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        f.unlink()
    variants = list(args.variants)
    passes = args.passes
    common = ["--scenario", args.scenario, "--mode", args.mode, "--phase", args.phase,
              "--warmup", str(args.warmup), "--iters", str(args.iters), "--turn-warmup", str(args.turn_warmup),
              "--backend", args.backend, "--dtype", args.dtype, "--dir", str(folder)]
    if args.tiny:
        common.append("--tiny")
    if args.device:
        common += ["--device", args.device]
    procs: dict[str, Proc] = {}
    for name in ["floor"] + variants:
        turns = 2 * passes if name == "floor" else passes
        logf = folder.parent / f"{out.stem}.{name}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--turns", str(turns), *common]
        with open(logf, "w") as fh:
            popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(ROOT))
        procs[name] = Proc(name, turns, popen, logf)
    log(f"{len(procs)} processes compiling: {', '.join(procs)}")

    import torch

    import transformers

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except Exception:
        commit = None
    cuda = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
    header = {"kind": "header", "command": "python benchmarks/speed_turns.py " + shlex.join(argv),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), "tiny": args.tiny,
              "gpu": torch.cuda.get_device_name(0) if cuda else None, "device": "cuda" if cuda else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__, "git_commit": commit,
              "dtype": args.dtype if args.dtype != "auto" else ("bfloat16" if cuda else "float32"),
              "protocol": "speed_turns: one process per model, compiled in parallel, timed one at a time",
              "passes": passes, "warmup": args.warmup, "iters": args.iters, "turn_warmup": args.turn_warmup}

    def write() -> None:
        for p, recs in enumerate(pass_records(header, procs, variants, passes, args), 1):
            speed.write_jsonl(out.with_name(f"{out.stem}.pass{p}.jsonl"), recs)
        merged = [header] + [{**(pr.rec or {}), "variant": pr.name, "ready_s": pr.ready_s, "failed": pr.failed}
                             for pr in procs.values()]
        speed.write_jsonl(out, merged)

    # every model ready (or failed, or out of time) --------------------------------------------
    deadline = t0 + args.ready_s
    while True:
        waiting = []
        for pr in procs.values():
            if pr.ready_s is not None or pr.failed:
                continue
            if (folder / f"{pr.name}.ready").exists():
                pr.ready_s = round(time.perf_counter() - t0, 1)
                log(f"{pr.name} ready")
            elif pr.popen.poll() is not None:
                pr.rec = _read_rec(folder, pr)
                pr.failed = (pr.rec or {}).get("error") or f"exited {pr.popen.returncode}: {_tail(pr.log, 300)}"
                log(f"{pr.name} FAILED before timing: {pr.failed[:300]}")
            else:
                waiting.append(pr)
        if not waiting:
            break
        if time.perf_counter() > deadline:
            for pr in waiting:
                pr.failed = f"not compiled and warmed up within --ready-s {args.ready_s:g} s: stopped"
                _stop(pr)
                log(f"{pr.name}: {pr.failed}")
            break
        time.sleep(0.2)
    write()
    if procs["floor"].failed:
        log("the floor failed: no ratios")
    # the turns, one process at a time -----------------------------------------------------
    for name, i in schedule(variants, passes):
        pr = procs[name]
        if pr.failed:
            continue
        _touch(folder / f"{name}.go{i}")
        done = folder / f"{name}.done{i}"
        limit = time.perf_counter() + args.turn_s
        while not done.exists():
            if pr.popen.poll() is not None:
                # done may have landed just before the process ended
                if done.exists():
                    break
                pr.rec = _read_rec(folder, pr)
                pr.failed = (pr.rec or {}).get("error") or f"exited {pr.popen.returncode} in turn {i}: {_tail(pr.log, 300)}"
                break
            if time.perf_counter() > limit:
                pr.failed = f"turn {i} took over --turn-s {args.turn_s:g} s: stopped"
                _stop(pr)
                break
            time.sleep(POLL_S)
        if pr.failed:
            log(f"{name} turn {i}: FAILED {pr.failed[:300]}")
            continue
        pr.done.append(i)
        tf = folder / f"{name}.times{i}"
        if tf.exists():
            pr.times[i] = json.loads(tf.read_text())
        if i == pr.turns - 1:
            # its record is written right after its last turn (before the interpreter's exit)
            limit = time.perf_counter() + 60
            while pr.rec is None and time.perf_counter() < limit:
                pr.rec = _read_rec(folder, pr)
                if pr.rec is None:
                    time.sleep(POLL_S)
        log(f"{name} turn {i} timed")
        write()
    for pr in procs.values():
        _stop(pr)
        if pr.rec is None:
            pr.rec = _read_rec(folder, pr)
    write()
    # the table ------------------------------------------------------------------------------
    for p, recs in enumerate(pass_records(header, procs, variants, passes, args), 1):
        for r in recs[1:]:
            if r["median_ms"] is None:
                log(f"pass {p} {r['variant']}: ERROR {str(r.get('error'))[:200]}")
                continue
            ratio = f" x{r['ratio']:.3f}" if r.get("ratio") else ""
            extra = f" compile {r['compile_s']:.1f}s" if r.get("compile_s") else ""
            if r.get("fullgraph") is False:
                extra += " (fullgraph failed: fell back)"
            if r.get("graph_breaks"):
                extra += f" graph breaks {r['graph_breaks']}"
            peak = f" peak {r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else ""
            at = f" ({r['floor_at']})" if r["variant"] == "floor" else ""
            log(f"pass {p} {args.scenario} {args.mode} {r['variant']}{at} {args.phase}: {r['median_ms']:.2f} ms{ratio}{peak}{extra}")
    return 0 if not procs["floor"].failed else 1


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    import speed

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", choices=("bert", "llama"), required=True)
    p.add_argument("--variants", default="", type=lambda v: [x for x in v.split(",") if x])
    p.add_argument("--mode", choices=("compiled", "reduce-overhead", "eager"), default="reduce-overhead")
    p.add_argument("--phase", choices=speed.PHASES, default="train")
    p.add_argument("--passes", type=int, default=2, help="timing passes per model (one compilation)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps after building (the first compiles)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--turn-warmup", type=int, default=5, help="untimed steps at the start of every turn")
    p.add_argument("--ready-s", type=float, default=300.0, help="seconds for every model to compile and warm up")
    p.add_argument("--turn-s", type=float, default=60.0, help="seconds one turn may take")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--out", type=Path)
    # worker side (started by the coordinator)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--turns", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None:
        unknown = [v for v in args.variants if v not in speed.VARIANTS]
        if unknown or not args.variants:
            p.error(f"--variants: unknown {', '.join(unknown)}" if unknown else "--variants: name at least one")
        if args.out is None:
            p.error("--out is required")
        if args.passes < 1 or args.iters < 1 or args.warmup < 1:
            p.error("--passes, --iters and --warmup must be at least 1")
        if args.mode == "reduce-overhead" and args.backend != "inductor":
            p.error("--mode reduce-overhead needs --backend inductor")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args)
    return coordinate(args, argv)


if __name__ == "__main__":
    sys.exit(main())
