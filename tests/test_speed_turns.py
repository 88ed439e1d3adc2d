"""benchmarks/speed_turns.py on CPU: the turn hook in speed.py's measurement (timed passes only inside
the turns, in order), the schedule (floor first and last in every pass), and the per-pass records
speed.py's report reads (ratios against that pass's two floor turns, failures kept as errors).
The subprocess coordinator itself was run by hand (tiny, eager and compiled) and on the GPU."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, file: str):
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


speed = _load("speed", "speed.py")
turns = _load("speed_turns", "speed_turns.py")


def test_timed_passes_run_inside_the_turns(monkeypatch):
    import torch

    events: list[str] = []
    real = speed.time_steps

    def timed(step, n, device):
        events.append(f"timed {n}")
        return real(step, n, device)

    class Turn:
        def __init__(self, i):
            self.i = i

        def __enter__(self):
            events.append(f"enter {self.i}")

        def __exit__(self, *exc):
            events.append(f"exit {self.i}")
            return False

    monkeypatch.setattr(speed, "time_steps", timed)
    speed.ensure_plugins()
    s = speed.Settings(device=torch.device("cpu"), dtype=torch.float32, warmup=1, iters=2, backend="inductor",
                       variant_timeout=0.0, gpu_warmup_s=0.0, turn=Turn, passes=3, turn_warmup=1)
    rec = speed.measure(speed.VARIANTS["lora-r8-qv"], speed.TINY["llama"], "eager", "train", s)
    assert rec["error"] is None, rec
    assert events == [x for i in range(3) for x in (f"enter {i}", "timed 2", f"exit {i}")]
    assert len(rec["pass_times_ms"]) == 3 and all(len(t) == 2 for t in rec["pass_times_ms"])
    assert rec["times_ms"] == rec["pass_times_ms"][0]
    assert rec["median_ms"] == rec["pass_medians_ms"][0]


def test_without_turns_the_measurement_is_unchanged():
    import torch

    speed.ensure_plugins()
    s = speed.Settings(device=torch.device("cpu"), dtype=torch.float32, warmup=1, iters=2, backend="inductor",
                       variant_timeout=0.0, gpu_warmup_s=0.0)
    rec = speed.measure(speed.VARIANTS["lora-r8-qv"], speed.TINY["llama"], "eager", "train", s)
    assert rec["error"] is None and len(rec["times_ms"]) == 2 and "pass_times_ms" not in rec


def test_schedule_puts_the_floor_around_every_pass():
    order = turns.schedule(["a", "b", "c"], 2)
    assert order == [("floor", 0), ("a", 0), ("b", 0), ("c", 0), ("floor", 1),
                     ("floor", 2), ("c", 1), ("b", 1), ("a", 1), ("floor", 3)]


class _Done:
    def poll(self):
        return 0


def _proc(name, times, rec, failed=None):
    """A finished worker: its record (None: it wrote none) and the times of the turns it completed."""
    return turns.Proc(name, 0, _Done(), Path("/dev/null"), ready_s=1.0, failed=failed, rec=rec,
                      done=sorted(times), times=times)


def test_pass_records_ratio_to_their_own_floors_and_keep_failures():
    args = argparse.Namespace(scenario="llama", mode="reduce-overhead", phase="train", tiny=True)
    base = {"kind": "measurement", "error": None, "peak_gib": 1.0, "compile_s": 3.0}
    floor = _proc("floor", {0: [10.0, 10.0], 1: [12.0, 12.0], 2: [20.0, 20.0], 3: [20.0, 22.0]}, base)
    a = _proc("a", {0: [22.0, 22.0], 1: [30.0, 32.0]}, base)
    b = _proc("b", {}, {"kind": "measurement", "error": "RuntimeError: boom"}, failed="RuntimeError: boom")
    # c was stopped in its second turn, before it wrote its record: the first turn's times stay
    c = _proc("c", {0: [11.0, 11.0]}, None, failed="turn 1 took over --turn-s 60 s: stopped")
    procs = {"floor": floor, "a": a, "b": b, "c": c}
    p1, p2 = turns.pass_records({"kind": "header"}, procs, ["a", "b", "c"], 2, args)
    assert p1[0] == {"kind": "header", "pass": 1} and p2[0]["pass"] == 2
    r1 = {r["variant"] + r.get("floor_at", ""): r for r in p1[1:]}
    r2 = {r["variant"] + r.get("floor_at", ""): r for r in p2[1:]}
    assert r1["floorstart"]["median_ms"] == 10.0 and r1["floorend"]["median_ms"] == 12.0
    assert r2["floorstart"]["median_ms"] == 20.0 and r2["floorend"]["median_ms"] == 21.0
    assert r1["a"]["ratio"] == pytest.approx(22.0 / 11.0) and r2["a"]["ratio"] == pytest.approx(31.0 / 20.5, rel=1e-4)  # speed.apply_floor rounds to 4 places
    assert r1["b"]["median_ms"] is None and r1["b"]["ratio"] is None and "boom" in r1["b"]["error"]
    assert r1["c"]["median_ms"] == 11.0 and r1["c"]["ratio"] == pytest.approx(1.0) and r1["c"]["error"] is None
    assert r1["a"]["compile_s"] == 3.0 and r1["a"]["peak_gib"] == 1.0  # the rest of the record is the worker's
    assert r2["c"]["median_ms"] is None and "turn 1" in r2["c"]["error"]
    # speed.py's report reads the pass files as two runs
    assert all(r["kind"] == "measurement" and r["scenario"] == "llama" for r in p1[1:] + p2[1:])
