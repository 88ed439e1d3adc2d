"""Kernel benchmarks (issue 9): the Triton LoRA group against the grouped PyTorch executor, and a
LoRA layer (base linear + LoRA) on the kernels against PEFT's LoRA layer, forward + backward.

Protocol (PERFORMANCE.md): CUDA events around each iteration, warm-up first, the median of the
timed iterations; ratios against a baseline measured in the same process. Achieved bandwidth is
stated against the bytes a fused forward + backward must move at least (as the Triton tutorials
report it): x read twice (shrink, dW) and dX written once; per branch the base output read and
written once and dY read once; the tokens × r intermediates and the weights are left out.

    PYTHONPATH=. python benchmarks/kernels.py --out group.jsonl            # the full grid
    PYTHONPATH=. python benchmarks/kernels.py --quick --out quick.jsonl    # one shape per part
    PYTHONPATH=. python benchmarks/kernels.py --graphs --out graphs.jsonl  # + every variant from a CUDA graph (GPU time)
    PYTHONPATH=. python benchmarks/kernels.py --host-ops --out ops.jsonl   # CPU: launches of one group step
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

PEAK_TBPS = {"H200": 4.8, "H100": 3.35}


def _modes(lg) -> tuple[str, ...]:
    """The expand-backward variants of this lora_group (an older checkout has fused and gemm only:
    benchmarks/kernels.py also times the kernels of an earlier commit, for a before/after)."""
    return getattr(lg, "BWD_MODES", ("fused", "gemm"))


def _row_modes(row: dict) -> list[str]:
    return [m for m in ("split", "fused", "gemm") if f"triton_{m}_ms" in row]


def _time(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of fn() (forward + backward), CUDA events per iteration."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _time_graphed(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of fn() replayed from a CUDA graph: the GPU's time alone (the eager
    numbers on the device machine's host are bound by Python and launch work)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, capture_error_mode=CAPTURE_MODE):
        fn()
    return _time(g.replay, warmup, iters)


def _host_ms(fn, n: int = 20) -> float:
    """Host milliseconds per call of fn (no synchronisation inside the loop: Python, dispatch and
    launch work; the GPU runs behind unless it is the slower side)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return host


GRAPHS = False  # --graphs: time each variant eager and replayed from a CUDA graph
# torch.cuda.graph's capture_error_mode ("global", its default, refuses any unsafe CUDA call from
# any thread during capture; "thread_local" only from the capturing thread)
CAPTURE_MODE = os.environ.get("KERNELS_CAPTURE_MODE", "global")


# ------------------------------------------------------------------------------------------
# one fusion group: k LoRA branches reading x (each into its own base output), a gate each
# ------------------------------------------------------------------------------------------
def group_case(M: int, K: int, r: int, k: int, gates: bool, dtype, dev):
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(dev, dtype)  # noqa: E731
    x = mk(M, K).requires_grad_()
    A = [mk(r, K, std=K ** -0.5).requires_grad_() for _ in range(k)]
    B = [mk(K, r, std=0.02).requires_grad_() for _ in range(k)]
    wg = [mk(1, K, std=K ** -0.5).requires_grad_() for _ in range(k)] if gates else []
    bg = [mk(1).requires_grad_() for _ in range(k)] if gates else []
    outs = [mk(M, K).requires_grad_() for _ in range(k)]  # the base outputs (their GEMM is not timed)
    dys = [mk(M, K) for _ in range(k)]
    return x, A, B, wg, bg, outs, dys


def group_reference(x, A, B, wg, bg, outs, scale):
    """What unipelt.executor.GroupExecutor runs (eager): one GEMM for every reader, the gates'
    sigmoid, the gate times the r-wide u, addmm into the base output (LoraBranch.expand_into)."""
    z = F.linear(x, torch.cat(A + wg, 0))
    k, r = len(A), A[0].shape[0]
    ys = []
    if wg:
        gl = z[:, k * r:]
        g = torch.sigmoid(gl + torch.cat(bg))
    for i in range(k):
        u = z[:, i * r:(i + 1) * r]
        u = u * g[:, i:i + 1] if wg else u * scale
        ys.append(torch.addmm(outs[i], u, B[i].t()))
    return ys


def group_triton(x, A, B, wg, bg, outs, scale):
    from unipelt_kernels import lora_group as lg

    k, r = len(A), A[0].shape[0]
    z = lg.lora_shrink(x, torch.cat(A + wg, 0), torch.cat(bg) if wg else None, k * r)
    # the members' columns as one split (as unipelt.executor.TritonExecutor hands them out)
    parts = z.split([r] * k + [1] * len(wg), -1)
    ys = []
    for i in range(k):
        gate = parts[k + i] if wg else None
        ys.append(lg.lora_expand(outs[i], parts[i], B[i], gate, 1.0 if wg else scale))
    return ys


def bench_group(M, K, r, k, gates, dtype, warmup, iters) -> dict:
    dev = "cuda"
    x, A, B, wg, bg, outs, dys = group_case(M, K, r, k, gates, dtype, dev)
    params = [x] + A + B + wg + bg + outs

    def step(impl):
        def run():
            for p in params:
                p.grad = None
            ys = impl(x, A, B, wg, bg, outs, 2.0)
            torch.autograd.backward(ys, dys)
        return run

    # correctness on the timed shapes (bf16: loose; the CPU tests hold the tight table)
    # (without autograd: outputs kept alive keep their graph's AccumulateGrad nodes, made on the
    # default stream, and the CUDA-graph capture below then fails with "operation would make the
    # legacy stream depend on a capturing blocking stream", as the H200 run of this session did)
    with torch.no_grad():
        ref_y = group_reference(x, A, B, wg, bg, outs, 2.0)
        got_y = group_triton(x, A, B, wg, bg, outs, 2.0)
        err = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got_y, ref_y))
    del ref_y, got_y
    from unipelt_kernels import lora_group as lg

    t_ref = _time(step(group_reference), warmup, iters)
    modes, graphed, host = {}, {}, {"ref_host_ms": _host_ms(step(group_reference))}
    default = lg.BWD_MODE
    for mode in _modes(lg):  # the expand backward's variants (lora_group.BWD_MODE)
        lg.BWD_MODE = mode
        modes[mode] = _time(step(group_triton), warmup, iters)
        if GRAPHS:
            graphed[f"triton_{mode}_graph_ms"] = _time_graphed(step(group_triton), warmup, iters)
    lg.BWD_MODE = default
    host["triton_host_ms"] = _host_ms(step(group_triton))
    t_tri = modes[default]
    if GRAPHS:
        graphed["ref_graph_ms"] = _time_graphed(step(group_reference), warmup, iters)
        graphed["triton_graph_ms"] = graphed[f"triton_{default}_graph_ms"]
        graphed["graph_speedup"] = graphed["ref_graph_ms"] / graphed["triton_graph_ms"]
        best = min(_modes(lg), key=lambda m: graphed[f"triton_{m}_graph_ms"])
        graphed["graph_best_mode"] = best
        graphed["graph_speedup_best"] = graphed["ref_graph_ms"] / graphed[f"triton_{best}_graph_ms"]
    es = torch.finfo(dtype).bits // 8
    bytes_min = es * (3 * M * K + k * 3 * M * K)
    return {"bench": "group", "M": M, "K": K, "r": r, "k": k, "gates": gates, "dtype": str(dtype).split(".")[-1],
            "ref_ms": t_ref, "triton_ms": t_tri, "triton_bwd": default,
            **{f"triton_{m}_ms": t for m, t in modes.items()}, **host, "speedup": t_ref / t_tri, "max_abs_err_y": err,
            "bytes_min": bytes_min, "ref_TBps": bytes_min / t_ref / 1e9, "triton_TBps": bytes_min / t_tri / 1e9,
            **graphed, **({"ref_graph_TBps": bytes_min / graphed["ref_graph_ms"] / 1e9,
                           "triton_graph_TBps": bytes_min / graphed["triton_graph_ms"] / 1e9} if graphed else {})}


# ------------------------------------------------------------------------------------------
# a LoRA layer: base linear + LoRA, against PEFT's
# ------------------------------------------------------------------------------------------
class KernelLoraLinear(torch.nn.Module):
    """base(x) + s·B·A·dropout(x) on the kernels: one shrink (dropout inside, mask from a seed),
    one expand accumulated into the base output."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.lora_A = torch.nn.Parameter(torch.randn(r, base.in_features, device=base.weight.device,
                                                     dtype=base.weight.dtype) / math.sqrt(base.in_features))
        self.lora_B = torch.nn.Parameter(torch.randn(base.out_features, r, device=base.weight.device,
                                                     dtype=base.weight.dtype) * 0.01)
        self.scale, self.p = alpha / r, dropout

    def forward(self, x):
        from unipelt_kernels import lora_group as lg

        seed = lg.new_seed(x.device) if self.training and self.p > 0 else None
        u = lg.lora_shrink(x, self.lora_A, None, None, [(self.lora_A.shape[0], self.p)], seed)
        return lg.lora_expand(self.base(x), u, self.lora_B, None, self.scale)


def bench_layer(M, K, r, dropout, dtype, warmup, iters) -> dict:
    from peft import LoraConfig, get_peft_model

    dev = "cuda"
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(K, K, bias=False)).to(dev, dtype)
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["0"]))
    peft_model.train()
    peft_layer = peft_model.base_model.model[0]
    ours = KernelLoraLinear(torch.nn.Linear(K, K, bias=False).to(dev, dtype), r, 2 * r, dropout).train()
    ours.base.weight.requires_grad_(False)
    from unipelt_plugins.lora import LoraBranch, LoraConfig as ULoraConfig

    ref_branch = LoraBranch(ULoraConfig(r=r, dropout=dropout), K, K).to(dev, dtype).train()
    ref_base = torch.nn.Linear(K, K, bias=False).to(dev, dtype).requires_grad_(False)
    x = torch.randn(M, K, device=dev, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, K, device=dev, dtype=dtype)

    def step(layer_fn, params):
        def run():
            for p in params:
                p.grad = None
            layer_fn(x).backward(dy)
        return run

    from unipelt_kernels import lora_group as lg

    t_peft = _time(step(peft_layer, [x] + [p for p in peft_layer.parameters() if p.requires_grad]), warmup, iters)
    modes, default, graphed = {}, lg.BWD_MODE, {}
    for mode in _modes(lg):
        lg.BWD_MODE = mode
        modes[mode] = _time(step(ours, [x, ours.lora_A, ours.lora_B]), warmup, iters)
        if GRAPHS:
            graphed[f"triton_{mode}_graph_ms"] = _time_graphed(step(ours, [x, ours.lora_A, ours.lora_B]), warmup, iters)
    lg.BWD_MODE = default
    t_ours = modes[default]
    if GRAPHS:
        peft_params = [x] + [p for p in peft_layer.parameters() if p.requires_grad]
        graphed["peft_graph_ms"] = _time_graphed(step(peft_layer, peft_params), warmup, iters)
        graphed["triton_graph_ms"] = graphed[f"triton_{default}_graph_ms"]
        graphed["graph_speedup_vs_peft"] = graphed["peft_graph_ms"] / graphed["triton_graph_ms"]
        best = min(_modes(lg), key=lambda m: graphed[f"triton_{m}_graph_ms"])
        graphed["graph_best_mode"] = best
        graphed["graph_speedup_vs_peft_best"] = graphed["peft_graph_ms"] / graphed[f"triton_{best}_graph_ms"]
        graphed["unipelt_reference_graph_ms"] = _time_graphed(
            step(lambda x: ref_branch(x) + ref_base(x), [x, ref_branch.lora_A, ref_branch.lora_B]), warmup, iters)
    # unipelt's eager LoRA branch (the reference executor's path: dropout x, A, B, scale)
    t_ref = _time(step(lambda x: ref_branch(x) + ref_base(x), [x, ref_branch.lora_A, ref_branch.lora_B]), warmup, iters)
    return {"bench": "layer", "M": M, "K": K, "r": r, "dropout": dropout, "dtype": str(dtype).split(".")[-1],
            "peft_ms": t_peft, "triton_ms": t_ours, "triton_bwd": default, **{f"triton_{m}_ms": t for m, t in modes.items()},
            "unipelt_reference_ms": t_ref, "speedup_vs_peft": t_peft / t_ours,
            **graphed}


def _time_launch(fn, n: int = 20) -> float:
    """GPU milliseconds per call of fn: n calls captured in one CUDA graph and replayed (launched
    eagerly, the device host's launch work bounds every candidate; RESULTS.md, Kernels)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, capture_error_mode=CAPTURE_MODE):
        for _ in range(n):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / n


def profile_and_sweep(M=8192, K=4096, r=16, k=2) -> dict:
    """Where the time goes (torch.profiler, per kernel) and the block configurations of each
    kernel timed alone; the best become lora_group.CONFIGS for the rest of the process."""
    from unipelt_kernels import lora_group as lg

    dtype, dev = torch.bfloat16, "cuda"
    x, A, B, wg, bg, outs, dys = group_case(M, K, r, k, True, dtype, dev)
    params = [x] + A + B + wg + bg + outs

    def step(impl):
        for p in params:
            p.grad = None
        torch.autograd.backward(impl(x, A, B, wg, bg, outs, 2.0), dys)

    from torch.profiler import ProfilerActivity, profile

    for impl in (group_reference, group_triton):
        for _ in range(3):
            step(impl)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step(impl)
            torch.cuda.synchronize()
        print(f"--- {impl.__name__}: 5 steps")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        t0 = time.perf_counter()
        for _ in range(20):
            step(impl)
        host = (time.perf_counter() - t0) / 20 * 1e3
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 20 * 1e3
        print(f"{impl.__name__}: host {host:.3f} ms/step (no sync), wall {wall:.3f} ms/step")
    # each launcher alone, over candidate blocks
    N = k * r + k
    w = torch.cat(A + wg, 0).contiguous()
    bias = torch.cat(bg).float()
    z = lg._launch_shrink(x.detach(), w, bias, k * r, [N], [0.0], None)
    dz = torch.randn_like(z).contiguous()
    out, u, Bw = outs[0].detach(), z[:, :r].contiguous(), B[0].detach().contiguous()
    coef = z[:, k * r].contiguous()
    dy = dys[0]
    cands = {
        "shrink": lambda: lg._launch_shrink(x.detach(), w, bias, k * r, [N], [0.0], None),
        "dx": lambda: lg._launch_shrink_bwd(dz, x.detach(), w, [N], [0.0], None),
        "expand": lambda: lg._launch_expand(out, u, Bw, coef, 1.0),
        "expand_bwd": lambda: lg._launch_expand_bwd(dy, u, Bw, coef, 1.0),
    }
    B_ = lg._Blocks
    grid = {  # a few candidates each (every one is a Triton compile of ~1-2 s)
        "shrink": [B_(32, 64, 4, 3), B_(64, 64, 4, 3), B_(64, 128, 4, 3), B_(128, 64, 8, 3), B_(32, 128, 4, 4), B_(64, 64, 8, 4)],
        "dx": [B_(64, 64, 4, 3), B_(128, 64, 8, 3), B_(64, 128, 4, 3), B_(128, 128, 8, 2)],
        "expand": [B_(64, 128, 4, 3), B_(128, 128, 8, 3), B_(64, 256, 8, 2), B_(128, 64, 4, 3)],
        "expand_bwd": [B_(64, 64, 4, 3), B_(32, 64, 4, 3), B_(128, 64, 8, 3), B_(64, 128, 8, 2)],
    }
    best = {}
    mb = M * K * 2 / 1e9
    for kind, fn in cands.items():
        results = []
        for cfg in grid[kind]:
            lg.CONFIGS[kind] = cfg
            if kind == "dx":
                lg.CONFIGS["dw"] = cfg
            try:
                results.append((_time_launch(fn), cfg))
            except Exception as e:  # a config out of resources
                print(f"  {kind} {cfg}: {type(e).__name__}")
        results.sort(key=lambda t: t[0])
        lg.CONFIGS[kind] = results[0][1]
        if kind == "dx":
            lg.CONFIGS["dw"] = results[0][1]
        best[kind] = {"ms": results[0][0], "config": vars(results[0][1]) if hasattr(results[0][1], "__dict__") else str(results[0][1])}
        print(f"{kind}: best {results[0][0]:.4f} ms {results[0][1]} (~{mb / results[0][0]:.2f} TB/s per x-sized "
              f"tensor); worst {results[-1][0]:.4f} ms", flush=True)
    return best


def host_ops(M: int = 8192, K: int = 4096, r: int = 16, k: int = 2) -> list[dict]:
    """What one group forward + backward asks of the host, on CPU with every Triton launch stubbed
    out (no GPU, no interpreter): PyTorch operators dispatched (by name) and Triton launches, for
    the reference and the kernels' path. The eager kernel path on the H200 is host-bound
    (RESULTS.md, Kernels), so these counts are what its eager time follows."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode
    from unipelt_kernels import lora_group as lg

    launches = collections.Counter()

    class _Stub:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: launches.update([self.name])

    class _Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    saved = {n: getattr(lg, n) for n in dir(lg) if n.startswith("_") and n.endswith("_kernel")}
    try:
        for n in saved:
            setattr(lg, n, _Stub(n))
        x, A, B, wg, bg, outs, dys = group_case(M, K, r, k, True, torch.bfloat16, "cpu")
        params = [x] + A + B + wg + bg + outs
        rows = []
        for name, impl in (("reference", group_reference), ("triton", group_triton)):
            def step():
                for p in params:
                    p.grad = None
                torch.autograd.backward(impl(x, A, B, wg, bg, outs, 2.0), dys)
            step()
            launches.clear()
            with _Count() as c:
                step()
            # views, detach and allocations launch nothing on a GPU; the rest is a kernel each
            free = {"view", "detach", "slice", "t", "expand", "select", "unsqueeze", "split", "split_with_sizes",
                    "empty", "empty_like", "new_empty", "new_empty_strided", "_unsafe_view", "as_strided", "alias"}
            kernels = {op: n for op, n in c.ops.items() if op not in free}
            rows.append({"bench": "host_ops", "path": name, "M": M, "K": K, "r": r, "k": k,
                         "aten_ops": sum(c.ops.values()), "aten_kernel_ops": sum(kernels.values()),
                         "triton_launches": sum(launches.values()), "ops": dict(c.ops.most_common()),
                         "launches": dict(launches)})
        return rows
    finally:
        for n, v in saved.items():
            setattr(lg, n, v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="one group shape (8192 x 4096, r 16, k 2) and the r16 layer")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--no-gates", action="store_true", help="groups without gates")
    p.add_argument("--sweep", action="store_true", help="profile one group and choose each kernel's blocks first")
    p.add_argument("--graphs", action="store_true", help="also time every variant replayed from a CUDA graph")
    p.add_argument("--widths", default="4096,2048,768", help="group widths K (comma-separated)")
    p.add_argument("--host-ops", action="store_true",
                   help="CPU: count the PyTorch operators and Triton launches of one group step (launches stubbed)")
    args = p.parse_args(argv)
    if args.host_ops:
        rows = host_ops()
        with args.out.open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
                print(f"{row['path']}: {row['aten_ops']} PyTorch operators ({row['aten_kernel_ops']} launch a kernel: "
                      f"{ {o: n for o, n in row['ops'].items()} }), {row['triton_launches']} Triton launches")
        return 0
    global GRAPHS
    GRAPHS = args.graphs
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = torch.bfloat16
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TBPS.items() if k in name), None)
    rows = [{"bench": "header", "gpu": name, "peak_TBps": peak, "torch": torch.__version__,
             "triton": __import__("triton").__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "argv": sys.argv[1:]}]
    if args.sweep:
        best = profile_and_sweep()
        rows[0]["sweep"] = {k: str(v) for k, v in best.items()}
    M = 8192
    grid = [(4096, 16, 2)] if args.quick else [(K, r, k) for K in map(int, args.widths.split(",")) for r in (8, 16, 64)
                                         for k in (1, 2, 3)]
    gates = not args.no_gates
    with args.out.open("w") as f:
        f.write(json.dumps(rows[0]) + "\n")
        for K, r, k in grid:
            row = bench_group(M, K, r, k, gates, dtype, args.warmup, args.iters)
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(f"group M={M} K={K:5d} r={r:3d} k={k} gates={gates}: ref {row['ref_ms']:.3f} ms "
                  f"({row['ref_TBps']:.2f} TB/s), triton {row['triton_ms']:.3f} ms ({row['triton_TBps']:.2f} TB/s), "
                  f"x{row['speedup']:.2f}; host ref {row['ref_host_ms']:.3f} triton {row['triton_host_ms']:.3f}"
                  + (f"; graphed ref {row['ref_graph_ms']:.3f} triton " + " / ".join(
                      f"{m} {row[f'triton_{m}_graph_ms']:.3f}" for m in _row_modes(row)) +
                     f" x{row['graph_speedup']:.2f} best {row['graph_best_mode']} x{row['graph_speedup_best']:.2f} "
                     f"({row['triton_graph_TBps']:.2f} TB/s)" if GRAPHS else
                     " [eager bwd " + " / ".join(f"{m} {row[f'triton_{m}_ms']:.3f}" for m in _row_modes(row)) + "]")
                  + f"  err {row['max_abs_err_y']:.3g}", flush=True)
        for dropout in (0.0, 0.1):
            for r in ((16,) if args.quick else (16, 64)):
                row = bench_layer(M, 4096, r, dropout, dtype, args.warmup, args.iters)
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(f"layer M={M} K=4096 r={r} dropout={dropout}: PEFT {row['peft_ms']:.3f} ms, triton "
                      f"{row['triton_ms']:.3f} ms, x{row['speedup_vs_peft']:.2f}; unipelt reference "
                      f"{row['unipelt_reference_ms']:.3f} ms" + (f"; graphed PEFT {row['peft_graph_ms']:.3f} triton " +
                      " / ".join(f"{m} {row[f'triton_{m}_graph_ms']:.3f}" for m in _row_modes(row)) +
                      f" x{row['graph_speedup_vs_peft']:.2f} best x{row['graph_speedup_vs_peft_best']:.2f}; unipelt "
                      f"reference {row['unipelt_reference_graph_ms']:.3f}" if GRAPHS else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
