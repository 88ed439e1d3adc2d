"""Does adding the LoRA dX into a base dX in one node remove work in the compiled backward?

A llama-like attention input: x (T x d) feeds the base q, k, v projections and one LoRA group
shrink z = x [A_q | A_k | A_v]^T. Two forms of the same function:
  "now":  autograd sums dX = dq Wq + dk Wk + dv Wv + dz A (four products, adds)
  "node": a custom autograd.Function for (base q, shrink) whose backward returns
          dX_q = addmm(dq Wq, dz, A) (the LoRA term accumulated into q's base dX by the GEMM)
Counts the aten ops of the AOT backward graph and, under inductor (CPU), the extern GEMM calls
and the generated kernels of the backward.
"""
import collections, re, sys
import torch
import torch.nn.functional as F
from torch._dynamo.backends.common import aot_autograd

torch.manual_seed(0)
T, d, r = 64, 32, 4
W = [torch.randn(d, d) for _ in range(3)]
A = torch.randn(3 * r, d, requires_grad=True)
B = [torch.randn(d, r, requires_grad=True) for _ in range(3)]


class BaseAndShrink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, a):
        ctx.save_for_backward(x, w, a)
        return F.linear(x, w), F.linear(x, a)

    @staticmethod
    def backward(ctx, dy, dz):
        x, w, a = ctx.saved_tensors
        dx = torch.addmm(dy @ w, dz, a)  # the LoRA dX accumulated by the GEMM, not by autograd
        return dx, None, dz.t() @ x


def now(x):
    z = F.linear(x, A)
    ys = [F.linear(x, W[i]) + F.linear(z[:, i * r:(i + 1) * r], B[i]) for i in range(3)]
    return sum(torch.tanh(y).sum() for y in ys)


def node(x):
    yq, z = BaseAndShrink.apply(x, W[0], A)
    ys = [yq] + [F.linear(x, W[i]) for i in (1, 2)]
    ys = [ys[i] + F.linear(z[:, i * r:(i + 1) * r], B[i]) for i in range(3)]
    return sum(torch.tanh(y).sum() for y in ys)


def aot_counts(fn):
    got = {}
    def comp(tag):
        def f(gm, ex):
            got[tag] = collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return gm.forward
        return f
    x = torch.randn(T, d, requires_grad=True)
    torch._dynamo.reset()
    torch.compile(fn, backend=aot_autograd(fw_compiler=comp("fw"), bw_compiler=comp("bw")), fullgraph=True)(x).backward()
    return got["bw"]


def inductor_bw_code(fn):
    import torch._inductor.codecache as cc
    codes = []
    orig = cc.PyCodeCache.load_by_key_path
    def spy(key, path, *a, **k):
        codes.append(open(path).read())
        return orig(key, path, *a, **k)
    cc.PyCodeCache.load_by_key_path = spy
    try:
        torch._dynamo.reset()
        x = torch.randn(T, d, requires_grad=True)
        out = torch.compile(fn, fullgraph=True)(x)
        out.backward()
    finally:
        cc.PyCodeCache.load_by_key_path = orig
    return codes, x.grad


for name, fn in (("now", now), ("node", node)):
    bw = aot_counts(fn)
    mm = {k: v for k, v in bw.items() if any(s in k for s in ("mm", "add", "addmm"))}
    print(f"{name}: AOT backward {sum(bw.values())} aten ops; GEMM/add ops {mm}")
# the same gradient both ways
x = torch.randn(T, d, requires_grad=True)
now(x).backward(); g1 = x.grad.clone(); x.grad = None
node(x).backward(); print("same dX:", torch.allclose(g1, x.grad, atol=1e-5))
if "--inductor" in sys.argv:
    for name, fn in (("now", now), ("node", node)):
        codes, _ = inductor_bw_code(fn)
        bwc = codes[-1]
        ext = re.findall(r"extern_kernels\.(\w+)\(", bwc)
        kern = set(re.findall(r"(cpp_fused_\w+)\.run\(|(cpp_fused_\w+)\(", bwc))
        calls = len(re.findall(r"^\s+cpp_fused_\w+\(", bwc, re.M))
        print(f"{name}: inductor backward: extern {collections.Counter(ext)}, generated-kernel calls {calls}")
