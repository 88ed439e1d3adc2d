"""Block sizes of the LoRA group kernels at the shapes an end-to-end step launches them with.

``kernels.py --sweep`` timed candidates launched eagerly, and every candidate was bound by the host's
launch work (RESULTS.md, Kernels, session 5). Here each candidate is timed from a CUDA graph of
launches (GPU time only), at llama's shapes in ``benchmarks/speed.py`` (4,096 tokens; a q,k,v group
of three r-16 branches and a gate,up group of two over 2,048 inputs; expands into 2,048- and
5,632-wide outputs), and its result is checked against the current blocks' before it is timed. The
launches cycle through ``--rotate`` input sets (default 6, more than the card's L2 in all): session 9
timed 20 launches on one set, whose inputs then stayed in L2, and those times did not predict the
end-to-end step (RESULTS.md, Kernels, session 10). The rotated timing is not yet run on the GPU.

    PYTHONPATH=. python3 benchmarks/kernel_sweep.py --out sweep.json              # GPU
    PYTHONPATH=. TRITON_INTERPRET=1 python3 benchmarks/kernel_sweep.py --smoke    # CPU: one candidate per kernel
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch


def _bench_kernels():
    """benchmarks/kernels.py by its path: the name ``kernels`` is also the kernels package's
    directory at the tree's root, which ``PYTHONPATH=.`` puts on the path."""
    import importlib.util
    import sys

    if "unipelt_bench_kernels" not in sys.modules:
        spec = importlib.util.spec_from_file_location("unipelt_bench_kernels", Path(__file__).with_name("kernels.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return sys.modules["unipelt_bench_kernels"]


def _timed_graph(fns, launches: int = 20) -> float:
    """Microseconds per call: ``launches`` calls captured in one CUDA graph (so the graph's own
    launch is spread over them), cycling through ``fns`` (the same launch on other input sets),
    timed by kernels.py's ``_time_graphed``."""
    return _bench_kernels()._time_graphed(lambda: [fns[i % len(fns)]() for i in range(launches)], 3, 10) * 1e3 / launches


def cases(dev, dtype, M: int):
    """(kernel kind, shape label, a function of nothing that launches it and returns its outputs)."""
    from unipelt_kernels import lora_group as lg

    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, device=dev, generator=g) * s).to(dtype)

    out = []
    for K, N in ((2048, 48), (2048, 32)):
        x, w = rnd(M, K), rnd(N, K, s=0.02)
        bias = torch.zeros(0, device=dev, dtype=torch.float32)
        z = lg._launch_shrink(x, w, bias, N, [N], [0.0], None)
        dz = rnd(M, N)
        out.append(("shrink", f"x {M}x{K}, N {N}", lambda x=x, w=w, b=bias, N=N: lg._launch_shrink(x, w, b, N, [N], [0.0], None)))
        # dx and dw come from one launcher; each kind's candidates change only its own blocks
        out.append(("dx", f"x {M}x{K}, N {N}", lambda dz=dz, x=x, w=w, z=z, N=N: lg._launch_shrink_bwd(dz, x, w, z, N, [N], [0.0], None)[0]))
        out.append(("dw", f"x {M}x{K}, N {N}", lambda dz=dz, x=x, w=w, z=z, N=N: lg._launch_shrink_bwd(dz, x, w, z, N, [N], [0.0], None)[1]))
        # the same groups with every branch behind its own input dropout (a segment and mask each;
        # one seed, so every candidate draws the same masks and is checked against the current one)
        segs, seed = [16] * (N // 16), lg.new_seed(dev)
        ps = [0.1] * len(segs)
        lab = f"x {M}x{K}, N {N}, dropout"
        out.append(("shrink_drop", lab, lambda x=x, w=w, b=bias, N=N, s=segs, ps=ps, sd=seed:
                    lg._launch_shrink(x, w, b, N, s, ps, sd)))
        out.append(("dw_drop", lab, lambda dz=dz, x=x, w=w, z=z, N=N, s=segs, ps=ps, sd=seed:
                    lg._launch_shrink_bwd(dz, x, w, z, N, s, ps, sd)[1]))
        out.append(("dx_drop", lab, lambda dz=dz, x=x, w=w, z=z, N=N, s=segs, ps=ps, sd=seed:
                    lg._launch_shrink_bwd(dz, x, w, z, N, s, ps, sd)[0]))
    for D in (2048, 5632):
        R = 16
        base, u, b = rnd(M, D), rnd(M, R), rnd(D, R, s=0.02)
        dy = rnd(M, D)
        out.append(("expand", f"out {M}x{D}, r {R}", lambda base=base, u=u, b=b: lg._launch_expand(base, u, b, None, 2.0)))
        out.append(("expand_dh", f"dy {M}x{D}, r {R}", lambda dy=dy, u=u, b=b: lg._launch_expand_bwd(dy, u, b, None, 2.0)[0]))
        out.append(("expand_db", f"dy {M}x{D}, r {R}", lambda dy=dy, u=u, b=b: lg._launch_expand_bwd(dy, u, b, None, 2.0)[1]))
    return out


CANDIDATES = {
    "shrink": [(m, k, w, s) for m, k, (w, s) in itertools.product((16, 32, 64), (64, 128, 256), ((4, 3), (4, 4), (8, 4)))],
    "dx": [(m, k, w, s) for m, k, (w, s) in itertools.product((32, 64, 128), (64, 128), ((4, 3), (8, 3)))],
    "dw": [(m, k, w, s) for m, k, (w, s) in itertools.product((32, 64, 128), (32, 64, 128), ((4, 3), (4, 4)))],
    "shrink_drop": [(m, k, w, s) for m, k, (w, s) in itertools.product((16, 32, 64), (32, 64, 128, 256), ((4, 3), (8, 3)))],
    "dx_drop": [(m, k, w, s) for m, k, (w, s) in itertools.product((32, 64, 128), (64, 128), ((4, 3), (8, 3)))],
    "dw_drop": [(m, k, w, s) for m, k, (w, s) in itertools.product((32, 64, 128), (32, 64, 128), ((4, 3), (8, 3)))],
    "expand": [(m, k, w, s) for m, k, (w, s) in itertools.product((32, 64, 128), (64, 128, 256), ((4, 3), (8, 3)))],
    "expand_dh": [(m, k, w, s) for m, k, (w, s) in itertools.product((16, 32, 64), (64, 128, 256), ((4, 3), (4, 4), (8, 4)))],
    "expand_db": [(m, k, w, s) for m, k, (w, s) in itertools.product((64, 128, 256), (32, 64, 128), ((4, 3), (4, 4)))],
}


# launches per llama train step by shape (speed.py's 8 layers: q,k,v and gate,up groups shrink on
# the kernels; q, k, v, o, down expand into 2,048 wide outputs, gate and up into 5,632)
WEIGHTS = {"N 48": 8, "N 32": 8, "x2048, r": 40, "x5632, r": 16}


def _weight(shape: str) -> int:
    return next(w for key, w in WEIGHTS.items() if key in shape)


def choose(rows: list[dict]) -> dict[str, tuple[list[int], float, float]]:
    """Per kind: the blocks timed at every shape with the least launch-weighted total, and that
    total for the current blocks (kinds whose current blocks win are left out)."""
    out = {}
    for kind in {r["kind"] for r in rows}:
        timed = [r for r in rows if r["kind"] == kind and "us" in r]
        shapes = {r["shape"] for r in timed}
        totals: dict[tuple, float] = {}
        for blocks in {tuple(r["blocks"]) for r in timed}:
            got = [r for r in timed if tuple(r["blocks"]) == blocks]
            if {r["shape"] for r in got} == shapes:
                totals[blocks] = sum(min(r["us"] for r in got if r["shape"] == s) * _weight(s) for s in shapes)
        cur = [r for r in timed if r["current"]]
        if not totals or {r["shape"] for r in cur} != shapes:
            continue
        cur_total = sum(r["us"] * _weight(r["shape"]) for r in cur)
        blocks, total = min(totals.items(), key=lambda kv: kv[1])
        if total < cur_total:
            out[kind] = (list(blocks), total, cur_total)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--kinds", default=",".join(CANDIDATES))
    p.add_argument("--current", default="", help="kinds timed with their current blocks only (a baseline in the same run)")
    p.add_argument("--rotate", type=int, default=6,
                   help="input sets the timed launches cycle through, so that their total is above the card's L2 "
                        "(50 MB on an H100/H200) and each launch reads its inputs from memory as in a train step; "
                        "1 = session 9's timing, one set, which L2 flatters (RESULTS.md, Kernels, session 10)")
    p.add_argument("--write-best", type=Path, default=None,
                   help="write each kind's blocks with the least launch-weighted time (for UNIPELT_KERNEL_CONFIGS)")
    p.add_argument("--smoke", action="store_true", help="CPU / interpreter: one candidate per kind, no timing")
    a = p.parse_args(argv)
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import speed  # noqa: E402  (its ensure_plugins makes unipelt_kernels importable from a bare tree)

    speed.ensure_plugins()
    from unipelt_kernels import lora_group as lg

    dev = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    M = a.tokens if not a.smoke else 100
    current_only = set(filter(None, a.current.split(",")))
    kinds = a.kinds.split(",") + sorted(current_only)
    rows = []
    t0 = time.perf_counter()
    default = dict(lg.CONFIGS)
    sets = [cases(dev, dtype, M) for _ in range(1 if a.smoke else max(1, a.rotate))]
    for i, (kind, label, fn) in enumerate(sets[0]):
        if kind not in kinds:
            continue
        fns = [s[i][2] for s in sets]
        ref = fn().float()
        scale = ref.abs().max().item() or 1.0
        cands = CANDIDATES[kind][:1] if a.smoke else [None] + ([] if kind in current_only else CANDIDATES[kind])
        for cand in cands:
            bl = default[kind] if cand is None else lg._Blocks(*cand)
            lg.CONFIGS[kind] = bl
            row = {"kind": kind, "shape": label, "blocks": [bl.m, bl.k, bl.warps, bl.stages], "current": cand is None}
            try:
                got = fn().float()
                row["max_err_rel"] = round(((got - ref).abs().max().item()) / scale, 5)
                if row["max_err_rel"] > 0.02:
                    row["error"] = "result differs"
                elif dev.type == "cuda":
                    row["us"] = round(_timed_graph(fns, 20 if len(fns) == 1 else 4 * len(fns)), 2)
            except Exception as exc:  # a block the kernel cannot take (e.g. a dot below 16): recorded, skipped
                row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            rows.append(row)
            lg.CONFIGS[kind] = default[kind]
        done = [r for r in rows if r["kind"] == kind and r["shape"] == label and "us" in r]
        if done:
            cur = next((r["us"] for r in done if r["current"]), None)
            best = min(done, key=lambda r: r["us"])
            print(f"[{time.perf_counter() - t0:6.1f}s] {kind:9s} {label:22s} current {cur} us, best {best['us']} us "
                  f"blocks {best['blocks']} ({len(done)} timed)", flush=True)
        else:
            print(f"[{time.perf_counter() - t0:6.1f}s] {kind:9s} {label:22s} checked {len(cands)}", flush=True)
    best = choose(rows)
    for kind, (blocks, us, cur) in best.items():
        print(f"best {kind}: {blocks} at {us:.1f} us per step-weight against {cur:.1f} us now", flush=True)
    if a.write_best:
        a.write_best.write_text(json.dumps({k: v[0] for k, v in best.items()}))
    if a.out:
        a.out.write_text(json.dumps({"gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None,
                                     "torch": torch.__version__, "tokens": M, "rotate": len(sets), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
