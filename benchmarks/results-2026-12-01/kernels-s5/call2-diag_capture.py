"""Which part of the kernel path breaks CUDA-graph capture (kern helper diagnostic)."""
import sys, traceback, torch
sys.path.insert(0, "benchmarks")
import kernels as K
from unipelt_kernels import lora_group as lg
case, cmode = sys.argv[1], sys.argv[2]
dev, dt = "cuda", torch.bfloat16
M, D, r = 1024, 512, 16
def leaf(*s): return torch.randn(*s, device=dev, dtype=dt).requires_grad_()
x, w, bg = leaf(M, D), leaf(2 * r + 1, D), leaf(1)
out, B = leaf(M, D), leaf(D, r)
dyz = torch.randn(M, 2 * r + 1, device=dev, dtype=dt); dy = torch.randn(M, D, device=dev, dtype=dt)
def f_shrink_fwd():
    with torch.no_grad(): lg.lora_shrink(x, w, bg, 2 * r)
def f_expand_fwd():
    with torch.no_grad(): lg.lora_expand(out, x[:, :r], B, None, 2.0)
def f_shrink_bwd():
    z = lg.lora_shrink(x, w, bg, 2 * r); z.backward(dyz)
def f_expand_bwd():
    u = x[:, :r]; lg.lora_expand(out, u, B, None, 2.0).backward(dy)
def f_group(impl):
    xg, A, Bs, wg, bgs, outs, dys = K.group_case(M, D, r, 2, True, dt, dev)
    ps = [xg] + A + Bs + wg + bgs + outs
    def run():
        for p in ps: p.grad = None
        torch.autograd.backward(impl(xg, A, Bs, wg, bgs, outs, 2.0), dys)
    return run
fns = {"shrink_fwd": f_shrink_fwd, "expand_fwd": f_expand_fwd, "shrink_bwd": f_shrink_bwd, "expand_bwd": f_expand_bwd,
       "group_ref": f_group(K.group_reference), "group_triton": f_group(K.group_triton)}
fn = fns[case]
try:
    fn(); torch.cuda.synchronize()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, capture_error_mode=cmode):
        fn()
    g.replay(); torch.cuda.synchronize()
    print(f"CASE {case} {cmode}: OK")
except Exception:
    print(f"CASE {case} {cmode}: FAIL\n" + "".join(traceback.format_exc().splitlines(True)[-14:]))
