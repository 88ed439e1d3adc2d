"""Probe (issue 9, llama <= 1.15): would LoRA in the base GEMM's K dimension remove the expand passes?

Per llama layer of benchmarks/speed.py (4,096 tokens, 2,048 wide, r 16) two shared-input groups:
q,k,v (three 2,048 -> 2,048 projections) and gate,up (two 2,048 -> 5,632). Forward + backward
(dX and every LoRA gradient; the base frozen), GPU time from a CUDA graph, three forms:

- ``kernels``: what ``executor: triton`` runs now: one lora_shrink for the group, the base GEMM per
  projection, lora_expand adding s·z_i·B_iᵀ into its output (and its backward: dh, dB).
- ``kcat``: z from the same shrink, then per projection ONE GEMM over [x | z] with a persistent
  [W_i | s·B_i in its slot, zeros elsewhere] (the base weight lives inside it; only the B columns
  are written each step): y_i = [x | z]·W'_iᵀ; backward d[x | z] = dY_i·W'_i (the base dX and the
  LoRA dz in one GEMM), dB_i = s·dY_iᵀ·z_i. The [x | z] concatenation is a copy here (eager); in a
  model the norm before the group would have to write x into it for that copy to go.
- ``kcat-nocopy (bound)``: kcat less the copy of x into [x | z] (timed alone): the bound.
- ``base``: the base GEMMs alone (dX only): what the floor pays for these layers.

    PYTHONPATH=. python3 benchmarks/results-2026-12-02/lead9/kcat_probe.py [--tokens 4096]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


class _KCat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xz, wp, b, lo: int, s: float):
        with torch.no_grad():
            wp[:, lo:lo + b.shape[1]].copy_(b * s)
        ctx.save_for_backward(xz, wp)
        ctx.lo, ctx.r, ctx.s = lo, b.shape[1], s
        return xz @ wp.t()

    @staticmethod
    def backward(ctx, dy):
        xz, wp = ctx.saved_tensors
        dxz = dy @ wp
        db = (dy.t() @ xz[:, ctx.lo:ctx.lo + ctx.r]) * ctx.s
        return dxz, None, db, None, None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    import speed

    speed.ensure_plugins()
    from unipelt_kernels import lora_group as lg

    dev, dt = torch.device("cuda"), torch.bfloat16
    T, D, R, s = a.tokens, 2048, 16, 2.0
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, sc=1.0):
        return (torch.randn(*shape, device=dev, generator=g) * sc).to(dt)

    groups = [("qkv", [D, D, D]), ("gate,up", [5632, 5632])]
    x = rnd(T, D).requires_grad_(True)
    setup = []
    for name, outs in groups:
        k = len(outs)
        W = [rnd(o, D, sc=0.02) for o in outs]
        A = [rnd(R, D, sc=0.02).requires_grad_(True) for _ in outs]
        B = [rnd(o, R, sc=0.02).requires_grad_(True) for o in outs]
        WP = []
        for i, w in enumerate(W):
            wp = torch.zeros(w.shape[0], D + k * R, device=dev, dtype=dt)
            wp[:, :D] = w
            WP.append(wp)
        dY = [rnd(T, o) for o in outs]
        setup.append((name, W, A, B, WP, dY))

    def step(form: str):
        def run():
            total = []
            for name, W, A, B, WP, dY in setup:
                k = len(W)
                if form == "base":
                    ys = [x @ w.t() for w in W]
                elif form == "kernels":
                    z = lg.lora_shrink(x, torch.cat(A, 0))
                    ys = [lg.lora_expand(x @ w.t(), z[:, i * R:(i + 1) * R], b, scale=s) for i, (w, b) in enumerate(zip(W, B))]
                else:
                    z = lg.lora_shrink(x, torch.cat(A, 0))
                    xz = torch.cat([x, z], 1)
                    ys = [_KCat.apply(xz, wp, b, D + i * R, s) for i, (wp, b) in enumerate(zip(WP, B))]
                total += list(zip(ys, dY))
            torch.autograd.backward([y for y, _ in total], [d for _, d in total])
            x.grad = None
            for _, W, A, B, *_ in setup:
                for t in A + B:
                    t.grad = None
        return run

    res = {}
    for form in ("base", "kernels", "kcat"):
        res[form] = round(_graph_us(step(form)), 1)
        print(f"{form:8s} {res[form]:9.1f} us fwd+bwd (q,k,v + gate,up groups, one layer)", flush=True)
    # the cat's own cost: x (T x D) copied into the [x | z] buffer
    xzb = torch.empty(T, D + 48, device=dev, dtype=dt)
    res["cat_copy_x"] = round(_graph_us(lambda: xzb[:, :D].copy_(x.detach())), 1)
    print(f"copy of x into [x|z]: {res['cat_copy_x']} us each (two groups per layer)", flush=True)
    res["kcat-nocopy (bound)"] = round(res["kcat"] - 2 * res["cat_copy_x"], 1)
    # correctness of kcat against kernels (one forward + backward)
    outs = {}
    for form in ("kernels", "kcat"):
        name, W, A, B, WP, dY = setup[0]
        z = lg.lora_shrink(x, torch.cat(A, 0))
        if form == "kernels":
            ys = [lg.lora_expand(x @ w.t(), z[:, i * R:(i + 1) * R], b, scale=s) for i, (w, b) in enumerate(zip(W, B))]
        else:
            xz = torch.cat([x, z], 1)
            ys = [_KCat.apply(xz, wp, b, D + i * R, s) for i, (wp, b) in enumerate(zip(WP, B))]
        torch.autograd.backward(ys, dY)
        outs[form] = [ys[0].detach().float(), x.grad.float(), A[0].grad.float(), B[0].grad.float()]
        x.grad = None
        for t in A + B:
            t.grad = None
    res["max_rel_err"] = [round(((p - q).abs().max() / q.abs().max()).item(), 5) for p, q in zip(outs["kcat"], outs["kernels"])]
    print(json.dumps(res), flush=True)
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))


def _graph_us(fn, launches: int = 5, replays: int = 10) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(launches):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(replays):
        g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e3 / (launches * replays)


if __name__ == "__main__":
    main()
