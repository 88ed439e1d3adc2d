"""Where a train step's GPU time goes, per operator and input shape, against the frozen floor.

For each variant of ``benchmarks/speed.py`` (its scenario, batch and model builder): torch.compile in
the default inductor mode (no CUDA graphs, so that the profiler sees every kernel by the operator
that launched it; the kernels' GPU time is what a CUDA graph replays), fused AdamW, warm-up, then
(1) the step timed by CUDA events (median) with the models interleaved round by round, and (2) one
``torch.profiler`` capture (CPU + CUDA, shapes recorded) of a few steps: GPU time per step by
operator + input shapes (``key_averages(group_by_input_shape=True)``, self device time) and by kernel
name. Written to OUT/<scenario>-kernels.json; the tables go to stdout, with each variant's extra
time over the floor split into categories (GEMM, Triton, pointwise, attention, optimizer, copies).

    PYTHONPATH=. python3 benchmarks/kernel_profile.py OUT_DIR --scenario llama --variants floor,lora-r16-all,peft-lora-r16-all
    PYTHONPATH=. python3 benchmarks/kernel_profile.py /tmp/kp --scenario llama --variants floor,lora-r16-all --tiny   # CPU, seconds
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402

CATEGORIES = (
    ("optimizer", ("multi_tensor", "adam", "fused_adamw", "_fused_adam")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
    ("gemm", ("gemm", "cutlass", "sm90", "sm80", "nvjet", "xmma", "cublas", "splitk", "splitK")),
    ("lora-triton", ("lora_", "_shrink", "_expand", "column_scale")),
    ("inductor", ("triton_",)),
    ("copy/fill", ("copy", "memcpy", "memset", "fill", "cat")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k.lower() in low for k in keys):
            return cat
    return "other"


def build(vname: str, scn, dev, dtype):
    variant = speed.VARIANTS[vname] if vname != "floor" else speed.FLOOR
    prep = speed.prepare(variant, scn, "train", dev, dtype, traceable_floor=True)
    model = prep.model
    model.train(True)
    fn = torch.compile(model, fullgraph=True)
    opt = torch.optim.AdamW(prep.params, lr=speed.LR, fused=dev.type == "cuda") if prep.params else None
    vocab = model.get_input_embeddings().num_embeddings
    batch = {**speed.make_batch(scn, "train", vocab, dev), **prep.call_kwargs}
    loose = [p for p in model.parameters() if p.requires_grad] if opt is None else []

    def step() -> None:
        loss = fn(**batch).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        for p in loose:
            p.grad = None
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--scenario", default="llama")
    p.add_argument("--variants", default="floor,lora-r16-all,lora-r16-all-triton,peft-lora-r16-all")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--steps", type=int, default=5, help="profiled steps")
    p.add_argument("--iters", type=int, default=20, help="timed steps per round")
    a = p.parse_args(argv)
    speed.ensure_plugins()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    scn = (speed.TINY if a.tiny else speed.SCENARIOS)[a.scenario]
    names = a.variants.split(",")
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch._dynamo.reset()
    steps = {}
    for name in names:
        c0 = time.perf_counter()
        steps[name] = build(name, scn, dev, dtype)
        for _ in range(4):
            steps[name]()
        if cuda:
            torch.cuda.synchronize()
        print(f"[{time.perf_counter() - t0:6.1f}s] {name}: compiled + warm in {time.perf_counter() - c0:.1f}s", flush=True)
    times = {k: [] for k in steps}
    for _ in range(3):
        for name, step in steps.items():
            for _ in range(3):
                step()
            times[name] += speed.time_steps(step, a.iters, dev)
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = med.get("floor")
    for k, m in med.items():
        print(f"{a.scenario} {k}: {m:.3f} ms" + (f"  x{m / floor:.3f}" if floor else ""), flush=True)
    result = {"scenario": a.scenario, "tiny": a.tiny, "median_ms": med, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if cuda else None, "variants": {}}
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name, step in steps.items():
        with profile(activities=acts, record_shapes=True) as prof:
            for _ in range(a.steps):
                step()
            if cuda:
                torch.cuda.synchronize()
        kern = collections.defaultdict(lambda: [0.0, 0.0])
        for e in prof.events():
            if cuda and e.device_type == torch.autograd.DeviceType.CUDA:
                kern[e.name][0] += e.device_time_total / a.steps
                kern[e.name][1] += 1 / a.steps
        ops = []
        for ev in prof.key_averages(group_by_input_shape=True):
            us = getattr(ev, "self_device_time_total", 0.0) if cuda else ev.self_cpu_time_total
            if us > 0:
                ops.append({"op": ev.key, "shapes": str(ev.input_shapes)[:200], "us": round(us / a.steps, 2),
                            "count": ev.count / a.steps})
        ops.sort(key=lambda r: -r["us"])
        cats = collections.defaultdict(float)
        for k, (us, _) in kern.items():
            cats[category(k)] += us
        total = sum(v[0] for v in kern.values())
        result["variants"][name] = {
            "gpu_us_per_step": round(total, 1), "kernels_per_step": round(sum(v[1] for v in kern.values()), 1),
            "categories_us": {k: round(v, 1) for k, v in sorted(cats.items())},
            "by_kernel": [{"name": k[:200], "us": round(v[0], 2), "count": round(v[1], 2), "category": category(k)}
                          for k, v in sorted(kern.items(), key=lambda kv: -kv[1][0])],
            "by_op_shape": ops[:120]}
        print(f"== {name}: {total:.1f} us GPU per step, {sum(v[1] for v in kern.values()):.0f} kernels; "
              + ", ".join(f"{k} {v:.0f}" for k, v in sorted(cats.items())), flush=True)
        for r in ops[:30]:
            print(f"   {r['us']:9.1f} us  x{r['count']:5.1f}  {r['op'][:40]:40s} {r['shapes'][:120]}", flush=True)
    if "floor" in result["variants"]:
        fc = result["variants"]["floor"]["categories_us"]
        for name, v in result["variants"].items():
            if name == "floor":
                continue
            diff = {k: round(v["categories_us"].get(k, 0.0) - fc.get(k, 0.0), 1)
                    for k in sorted(set(fc) | set(v["categories_us"]))}
            v["over_floor_us"] = diff
            print(f"-- {name} over the floor (us/step): " + ", ".join(f"{k} {d:+.0f}" for k, d in diff.items()), flush=True)
    (a.out / f"{a.scenario}-kernels.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
