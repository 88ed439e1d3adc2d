"""Session 10 (helper bert10): session 9's gstep/graph_profile.py with the kernels' full names
(the profiler table truncates them) and the AdamW choice of speed.py's graph-step rows (fused
capturable unless ``--adamw foreach``). Builds a variant with benchmarks/speed.py's ``prepare``,
captures it with GraphedTrainStep (compile as given), and profiles ``--steps`` replays with
torch.profiler (CUPTI reports the kernels a CUDA graph runs): per kernel name, launches and GPU
time per step, sorted by time; the optimizer's kernels (``multi_tensor`` / ``fused_adam`` names)
apart. Also the step's wall time by CUDA events over the same replays.

    PYTHONPATH=. python3 benchmarks/results-2026-12-02/bert10/graph_profile.py --variant lora-r16-all-triton --out $OUT/prof.txt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="lora-r16-all")
    p.add_argument("--compile", default=None, choices=[None, "default"])
    p.add_argument("--adamw", default="fused", choices=["foreach", "fused"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    import speed
    from unipelt.training.graphed import GraphedTrainStep

    speed.ensure_plugins()
    scn, dev = speed.SCENARIOS["bert"], torch.device("cuda")
    variant = speed.FLOOR if a.variant == "floor" else speed.VARIANTS[a.variant]
    prep = speed.prepare(variant, scn, "train", dev, torch.bfloat16, traceable_floor=a.compile is not None)
    prep.model.train()
    opt = (torch.optim.AdamW(prep.params, lr=speed.LR, capturable=True, **{a.adamw: True})
           if prep.params else None)
    batch = speed.make_batch(scn, "train", prep.model.get_input_embeddings().num_embeddings, dev)
    step = GraphedTrainStep(prep.model, opt, batch, call_kwargs=prep.call_kwargs, compile=a.compile)
    for _ in range(8):
        step(batch)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            step(batch)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events) / a.steps / 1e3
    optim = sum(e.self_device_time_total for e in events
                if "multi_tensor" in e.key or "fused_adam" in e.key or "foreach" in e.key) / a.steps / 1e3
    kernels = sum(e.count for e in events) / a.steps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(a.steps):
        step(batch)
    end.record()
    torch.cuda.synchronize()
    wall = start.elapsed_time(end) / a.steps
    lines = [f"{a.variant} compile={a.compile} adamw={a.adamw} capturable: GPU time per step {total:.3f} ms in "
             f"{kernels:.0f} kernels; optimizer kernels {optim:.3f} ms; wall per replay {wall:.3f} ms", "",
             f"{'us/step':>9} {'n/step':>7} {'us/launch':>9}  kernel (full name)"]
    for e in sorted(events, key=lambda e: -e.self_device_time_total):
        us = e.self_device_time_total / a.steps
        lines.append(f"{us:9.1f} {e.count / a.steps:7.1f} {e.self_device_time_total / max(e.count, 1):9.2f}  {e.key}")
    a.out.write_text("\n".join(lines))
    print(lines[0])


if __name__ == "__main__":
    main()
