"""The Triton kernels of a LoRA group (unipelt_kernels.lora_group) against their PyTorch reference.

On CPU they run under ``TRITON_INTERPRET=1`` (set by conftest before the kernels are imported):
small shapes, chosen awkward (token counts not a multiple of the 64-row block, widths not powers
of two), forward and every gradient, float32 and bfloat16, with the tolerance table below.
GPU-only tests skip without CUDA.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from unipelt_kernels import lora_group as lg  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (atol, rtol), atol relative to the largest reference value of the compared tensor
TOL = {
    # the same products summed in another order (blocks of 64): rounding only
    torch.float32: (1e-5, 1e-5),
    # bf16 inputs in both, fp32 accumulation; the kernel rounds its output (and, in backward, the
    # gate-scaled dz and v) to bf16 once more than the fp32 reference, 2^-8 relative each
    torch.bfloat16: (1.5e-2, 2e-2),
}


def _close(got, ref, dtype, what):
    atol, rtol = TOL[dtype]
    ref = ref.float()
    scale = ref.detach().abs().max().clamp_min(1e-6)
    torch.testing.assert_close(got.detach().float(), ref.detach(), atol=atol * float(scale), rtol=rtol, msg=lambda m: f"{what}: {m}")


def _leaf(t, dtype):
    return t.to(DEV, dtype).requires_grad_(True)


# token count, width K, column segments (width, p), activated gate columns at the end
SHRINK_CASES = [
    (37, 50, [(1, 0.0)], 0),                      # r = 1, one branch, no gate
    (70, 96, [(5, 0.0), (7, 0.0)], 0),            # two branches in one segment
    (37, 50, [(16 + 5 + 3 + 2, 0.0)], 2),         # four branches' worth of columns and 2 gates
    (130, 33, [(64, 0.0), (1, 0.0)], 1),          # r = 64 and a gate
    (37, 50, [(4, 0.25), (6, 0.0), (3, 0.5), (3, 0.0)], 2),  # dropout segments around plain ones
]


@pytest.mark.parametrize("mode", ["split", "gemm"])  # "fused" runs the shrink backward as "split" does
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M,K,segments,n_act", SHRINK_CASES, ids=[f"s{i}" for i in range(len(SHRINK_CASES))])
def test_shrink_forward_and_gradients_match_reference(M, K, segments, n_act, dtype, mode, monkeypatch):
    monkeypatch.setattr(lg, "BWD_MODE", mode)
    g = torch.Generator().manual_seed(M + K)
    N = sum(w for w, _ in segments)
    x = _leaf(torch.randn(M, K, generator=g), dtype)
    w = _leaf(torch.randn(N, K, generator=g) * 0.2, dtype)
    b = _leaf(torch.randn(n_act, generator=g), dtype) if n_act else None
    seed = lg.new_seed(x.device) if any(p > 0 for _, p in segments) else None
    act_start = N - n_act
    z = lg.lora_shrink(x, w, b, act_start, segments, seed)
    assert z.shape == (M, N) and z.dtype == dtype
    masks = [lg.dropout_mask(seed, i, (M, K), p) if p > 0 else None for i, (_, p) in enumerate(segments)]
    # the reference in float32 from the same (rounded) inputs
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    br = b.detach().float().requires_grad_() if b is not None else None
    zr = lg.reference_shrink(xr, wr, br, act_start, segments, masks)
    _close(z, zr, dtype, "z")
    dz = torch.randn(M, N, generator=g).to(DEV)
    inputs = [x, w] + ([b] if b is not None else [])
    refs = [xr, wr] + ([br] if br is not None else [])
    got = torch.autograd.grad(z, inputs, dz.to(dtype))
    want = torch.autograd.grad(zr, refs, dz)
    for name, a, r in zip(["dx", "dw", "db"], got, want):
        assert a.dtype == dtype
        _close(a, r, dtype, name)


def test_dropout_masks_are_regenerated_not_stored():
    M, K, p = 64, 80, 0.3
    seed = torch.tensor([1234], dtype=torch.int64, device=DEV)
    m0 = lg.dropout_mask(seed, 0, (M, K), p)
    m1 = lg.dropout_mask(seed, 1, (M, K), p)
    assert torch.equal(m0, lg.dropout_mask(seed, 0, (M, K), p))  # same seed and segment: same mask
    assert not torch.equal(m0, m1)  # each dropout branch has its own mask
    keep = m0.float().mean().item()
    assert abs(keep - (1 - p)) < 0.03, keep  # 5,120 draws: 3 % is about 5 standard deviations
    # the kernel saves x, W and z only: the mask is drawn again in backward from the seed
    x = torch.randn(M, K, device=DEV, requires_grad=True)
    w = torch.randn(8, K, device=DEV, requires_grad=True)
    z = lg.lora_shrink(x, w, None, None, [(8, p)], seed)
    saved = [t for t in z.grad_fn.saved_tensors if t is not None] if hasattr(z.grad_fn, "saved_tensors") else []
    assert all(t.numel() <= max(x.numel(), w.numel(), z.numel()) and t.dtype != torch.bool for t in saved)
    # no seed: no dropout (eval mode)
    z_eval = lg.lora_shrink(x, w, None, None, [(8, p)], None)
    torch.testing.assert_close(z_eval, x @ w.t(), atol=1e-5, rtol=1e-5)


# token count, width D, rank r, gate kind
EXPAND_CASES = [(37, 45, 1, None), (70, 100, 8, "token"), (37, 45, 64, "pooled"), (130, 33, 5, "token")]


@pytest.mark.parametrize("mode", lg.BWD_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M,D,r,gate", EXPAND_CASES, ids=[f"e{i}" for i in range(len(EXPAND_CASES))])
def test_expand_forward_and_gradients_match_reference(M, D, r, gate, dtype, mode, monkeypatch):
    # every backward variant (lora_group.BWD_MODES): the benchmark chooses among them on the GPU
    monkeypatch.setattr(lg, "BWD_MODE", mode)
    g = torch.Generator().manual_seed(M * D + r)
    # (B, T, ...) shaped, as at a hook point: pooled gates broadcast over T
    B_, T = (1, M) if gate != "pooled" else (M // 37, 37)
    out = _leaf(torch.randn(B_, T, D, generator=g), dtype)
    u = _leaf(torch.randn(B_, T, r, generator=g), dtype)
    Bw = _leaf(torch.randn(D, r, generator=g) * 0.3, dtype)
    gt = None
    if gate == "token":
        gt = _leaf(torch.rand(B_, T, 1, generator=g), dtype)
    elif gate == "pooled":
        gt = _leaf(torch.rand(B_, 1, 1, generator=g), dtype)
    y = lg.lora_expand(out, u, Bw, gt, 1.7)
    leaves = [t for t in (out, u, Bw, gt) if t is not None]
    refs = [t.detach().float().requires_grad_() for t in leaves]
    ro, ru, rB = refs[:3]
    rg = refs[3] if gt is not None else None
    yr = lg.reference_expand(ro, ru, rB, rg, 1.7)
    assert y.shape == out.shape and y.dtype == dtype
    _close(y, yr, dtype, "y")
    dy = torch.randn(y.shape, generator=g).to(DEV)
    got = torch.autograd.grad(y, leaves, dy.to(dtype))
    want = torch.autograd.grad(yr, refs, dy)
    for name, a, b in zip(["dout", "du", "dB", "dgate"], got, want):
        assert a.shape == b.shape
        _close(a, b, dtype, name)


# token count, width d, bottleneck m, activation, gate, dtype
BOTTLENECK_CASES = [
    (37, 45, 3, "relu", None, torch.float32), (70, 100, 20, "gelu", "token", torch.float32),
    (37, 45, 64, "silu", "pooled", torch.float32), (37, 33, 5, "tanh", "token", torch.float32),
    (37, 45, 8, "identity", None, torch.float32), (70, 100, 20, "relu", "token", torch.bfloat16),
]


@pytest.mark.parametrize("M,D,m,act,gate,dtype", BOTTLENECK_CASES, ids=[f"b{i}" for i in range(len(BOTTLENECK_CASES))])
def test_bottleneck_up_forward_and_gradients_match_reference(M, D, m, act, gate, dtype):
    from unipelt_kernels import bottleneck as bn

    g = torch.Generator().manual_seed(M + D + m)
    B_, T = (1, M) if gate != "pooled" else (1, M)
    out = _leaf(torch.randn(B_, T, D, generator=g), dtype)
    u = _leaf(torch.randn(B_, T, m, generator=g), dtype)
    bd = _leaf(torch.randn(m, generator=g) * 0.5, dtype)
    w = _leaf(torch.randn(D, m, generator=g) * 0.3, dtype)
    bu = _leaf(torch.randn(D, generator=g) * 0.5, dtype)
    gt = None
    if gate == "token":
        gt = _leaf(torch.rand(B_, T, 1, generator=g), dtype)
    elif gate == "pooled":
        gt = _leaf(torch.rand(B_, 1, 1, generator=g), dtype)
    y = bn.bottleneck_up(out, u, bd, w, bu, gt, 1.3, act)
    leaves = [t for t in (out, u, bd, w, bu, gt) if t is not None]
    refs = [t.detach().float().requires_grad_() for t in leaves]
    yr = bn.reference_up(*refs[:5], refs[5] if gt is not None else None, 1.3, act)
    _close(y, yr, dtype, "y")
    dy = torch.randn(y.shape, generator=g).to(DEV)
    got = torch.autograd.grad(y, leaves, dy.to(dtype))
    want = torch.autograd.grad(yr, refs, dy)
    for name, a, b in zip(["dout", "du", "db_down", "dW_up", "db_up", "dgate"], got, want):
        assert a.shape == b.shape
        _close(a, b, dtype, name)


def test_shape_errors_name_the_operands():
    x = torch.randn(5, 8, device=DEV)
    with pytest.raises(ValueError, match="weight"):
        lg.lora_shrink(x, torch.randn(3, 7, device=DEV))
    with pytest.raises(ValueError, match="segments"):
        lg.lora_shrink(x, torch.randn(3, 8, device=DEV), segments=[(2, 0.0)])
    with pytest.raises(ValueError, match="u"):
        lg.lora_expand(torch.randn(5, 6, device=DEV), torch.randn(5, 2, device=DEV), torch.randn(6, 3, device=DEV))


def test_custom_ops_pass_opcheck():
    # schema, fake-tensor and autograd registration as torch.compile relies on them
    x = torch.randn(37, 20, device=DEV, requires_grad=True)
    w = torch.randn(10, 20, device=DEV, requires_grad=True)
    b = torch.randn(2, device=DEV, requires_grad=True)
    torch.library.opcheck(torch.ops.unipelt.lora_shrink.default, (x, w, b, 8, [10], [0.0], None),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out = torch.randn(37, 12, device=DEV, requires_grad=True)
    u = torch.randn(37, 4, device=DEV, requires_grad=True)
    Bw = torch.randn(12, 4, device=DEV, requires_grad=True)
    c = torch.rand(37, device=DEV, requires_grad=True)
    torch.library.opcheck(torch.ops.unipelt.lora_expand.default, (out, u, Bw, c, 2.0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_triton_op_twins_match_the_custom_ops():
    # the ops a compiled forward on CUDA calls (``triton_op``: inductor launches their kernels
    # itself) compute what the custom ops compute, forward and every gradient, dropout and gates
    # included; here eagerly (the interpreter's kernels cannot be traced: wrap_triton hands them
    # back as they are), compiled on the GPU by test_gpu_inductor_launches_the_triton_op_kernels
    g = torch.Generator().manual_seed(11)
    x = torch.randn(70, 33, generator=g).to(DEV)
    w = (torch.randn(4 + 5 + 2, 33, generator=g) * 0.3).to(DEV)
    b = torch.randn(2, generator=g).to(DEV)
    out = torch.randn(70, 19, generator=g).to(DEV)
    Bw = torch.randn(19, 4, generator=g).to(DEV)
    seed = torch.tensor([5], dtype=torch.int64, device=DEV)

    def run(shrink, expand):
        leaves = [t.clone().requires_grad_() for t in (x, w, b, out, Bw)]
        xx, ww, bb, oo, BB = leaves
        z = shrink(xx, ww, bb, 9, [4, 5, 2], [0.25, 0.0, 0.0], seed)
        y = expand(oo, z[:, :4].contiguous(), BB, z[:, 9].contiguous(), 1.5)
        (y.square().sum() + z.sum()).backward()
        return [z, y] + [t.grad for t in leaves]

    want = run(torch.ops.unipelt.lora_shrink, torch.ops.unipelt.lora_expand)
    got = run(torch.ops.unipelt.lora_shrink_t, torch.ops.unipelt.lora_expand_t)
    for name, a, ref in zip(["z", "y", "dx", "dw", "db", "dout", "dB"], got, want):
        torch.testing.assert_close(a, ref, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")
    u = torch.randn(37, 4, device=DEV, requires_grad=True)
    o = torch.randn(37, 12, device=DEV, requires_grad=True)
    B2 = torch.randn(12, 4, device=DEV, requires_grad=True)
    torch.library.opcheck(torch.ops.unipelt.lora_expand_t.default, (o, u, B2, None, 2.0),
                          test_utils=("test_schema", "test_autograd_registration"))


def test_compiled_forwards_pick_the_triton_ops_on_cuda_only(monkeypatch):
    # the choice between the twins: the triton_op ones for CUDA tensors unless UNIPELT_KERNEL_OPS
    # says custom_op; the custom ops for tensors elsewhere (the interpreter)
    from types import SimpleNamespace

    on_cuda = SimpleNamespace(device=torch.device("cuda", 0))
    assert lg._compiled_ops(on_cuda)
    assert not lg._compiled_ops(torch.empty(1))  # CPU: inductor's CPU code cannot launch a Triton kernel
    from unipelt_kernels import compiled_ops  # the rule's home, shared with the NF4 and bottleneck ops

    monkeypatch.setattr(compiled_ops, "COMPILED_OPS", "custom_op")
    assert not lg._compiled_ops(on_cuda)
    with pytest.raises(ValueError, match="UNIPELT_KERNEL_OPS='both': expected triton_op or custom_op"):
        lg._ops_choice("both")


def test_auto_twins_trace_to_pytorch_products_outside_cuda_graphs(monkeypatch):
    # executor auto's compiled forwards (replayed_only): a plain group's triton_ops trace to
    # PyTorch's products unless inductor compiles for CUDA graphs (its triton.cudagraphs config,
    # which reduce-overhead sets while AOTAutograd traces the ops' bodies); gates or dropout keep
    # the kernels (their masks and epilogues are the kernels' own)
    from torch._inductor import config

    assert lg._torch_form(True, 8, 8, [0.0], None)
    assert not lg._torch_form(False, 8, 8, [0.0], None)       # executor triton: always the kernels
    assert not lg._torch_form(True, 6, 8, [0.0], None)        # gate columns
    seed = torch.tensor([3], dtype=torch.int64)
    assert not lg._torch_form(True, 8, 8, [0.2], seed)        # an input dropout
    with config.patch({"triton.cudagraphs": True}):
        assert not lg._torch_form(True, 8, 8, [0.0], None)
    # compiled (aot_eager: no CUDA graphs) through the twins, with the kernels refused: the
    # products alone, forward and gradients equal to the reference
    torch._dynamo.reset()
    monkeypatch.setattr(lg, "_compiled_ops", lambda x: True)

    def refuse(*a, **k):
        raise AssertionError("a kernel was launched")

    for name in ("_launch_shrink", "_launch_shrink_bwd", "_launch_expand", "_launch_expand_bwd"):
        monkeypatch.setattr(lg, name, refuse)
    g = torch.Generator().manual_seed(2)
    x, w, out, Bw = (torch.randn(*sh, generator=g).requires_grad_() for sh in [(37, 20), (12, 20), (37, 9), (9, 12)])

    def f(x, w, out, Bw):
        return lg.lora_expand(out, lg.lora_shrink(x, w, replayed_only=True), Bw, None, 1.5, replayed_only=True)

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w, out, Bw)
    want = out + 1.5 * (x @ w.t()) @ Bw.t()
    _close(got, want, torch.float32, "y")
    for name, a, b in zip(["dx", "dw", "dout", "dB"], torch.autograd.grad(got.square().sum(), [x, w, out, Bw]),
                          torch.autograd.grad(want.square().sum(), [x, w, out, Bw])):
        _close(a, b, torch.float32, name)


@pytest.mark.skipif(DEV == "cuda", reason="the CPU interpreter stands in for CUDA here (the model stays on the CPU)")
def test_auto_default_mode_form_is_the_grouped_executors_graph(monkeypatch):
    # executor auto compiled without CUDA graphs: a plain LoRA model's code (inductor, CPU) has the
    # grouped executor's matrix products and fused kernels, no more (the default mode is host-bound:
    # every extra kernel a projection costs the step; an earlier 2-D form had 28 fused kernels to 19)
    import re

    import unipelt
    from torch._inductor.utils import run_and_get_code
    from unipelt import executor as ex
    from unipelt.compiler import set_executor

    from conftest import make_batch, make_llama

    monkeypatch.setattr(ex, "AUTO_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(lg, "_compiled_ops", lambda x: True)
    for name in ("_launch_shrink", "_launch_shrink_bwd", "_launch_expand", "_launch_expand_bwd"):
        monkeypatch.setattr(lg, name, lambda *a, **k: pytest.fail("a kernel was traced in the default-mode form"))
    sites = ["attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.gate", "ffn.down"]
    spec = {"modules": {"lora": {"method": "lora", "sites": sites, "r": 8, "dropout": 0.0}}}
    counts, losses = {}, {}
    for mode in ("auto", "grouped"):
        torch._dynamo.reset()
        model = make_llama(layers=1, hidden=64)
        unipelt.compile(model, spec)
        set_executor(model, mode)
        model.train()
        compiled = torch.compile(model, fullgraph=True)
        batch = make_batch()

        def run():
            loss = compiled(**batch).logits.float().square().mean()
            loss.backward()
            return loss

        loss, codes = run_and_get_code(run)
        code = "\n".join(codes)
        counts[mode] = (len(re.findall(r"extern_kernels\.\w*mm", code)),
                        len(re.findall(r"^\s+cpp_fused_\w+\(", code, re.M)))
        losses[mode] = loss.item()
    assert counts["auto"] == counts["grouped"], counts
    assert abs(losses["auto"] - losses["grouped"]) <= 1e-5 * max(1.0, abs(losses["grouped"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (inductor launches user Triton kernels on CUDA)")
def test_gpu_inductor_launches_the_triton_op_kernels(monkeypatch):
    # compiled in inductor's default mode: the triton_op twins' kernels are launched from the
    # generated code (no call of the custom op left), with the custom ops' results, bit for bit
    from torch._inductor.utils import run_and_get_code

    from unipelt_kernels import compiled_ops

    def step(ops, code=False):
        torch._dynamo.reset()
        monkeypatch.setattr(compiled_ops, "COMPILED_OPS", ops)
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in _layer_params(K=96, D=80, r=8)]
        x, base_w, A, Bw, wg, bg = leaves
        x = x.bfloat16()
        seed = torch.tensor([7], dtype=torch.int64, device="cuda")

        def f(x, base_w, A, Bw, wg, bg):
            return _layer(x, base_w.bfloat16(), A.bfloat16(), Bw.bfloat16(), wg.bfloat16(), bg.bfloat16(), seed)

        compiled = torch.compile(f, fullgraph=True)

        def run():
            y = compiled(x, base_w, A, Bw, wg, bg)
            y.float().square().sum().backward()
            return y

        y, codes = run_and_get_code(run) if code else (run(), [])
        return [y] + [t.grad for t in (A, Bw, wg, bg)], "\n".join(codes)

    want, _ = step("custom_op")
    got, code = step("triton_op", code=True)
    # (not bit for bit: with the ops' casts visible, inductor fuses a bf16 round trip of dW away)
    for name, a, b in zip(["y", "dA", "dB", "dwg", "dbg"], got, want):
        _close(a, b, torch.bfloat16, name)
    assert "_shrink_fwd_kernel" in code and "_expand_fwd_kernel" in code, code[:2000]
    assert "torch.ops.unipelt.lora_shrink" not in code and "torch.ops.unipelt.lora_expand" not in code


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (inductor's modes)")
def test_gpu_auto_runs_the_kernels_only_where_cuda_graphs_replay():
    # replayed_only (executor auto): a plain group compiled in inductor's default mode is PyTorch's
    # products, under reduce-overhead the kernels; the same results either way
    from torch._inductor.utils import run_and_get_code

    g = torch.Generator().manual_seed(4)
    x, w, out, Bw = (torch.randn(*sh, generator=g).cuda().bfloat16().requires_grad_()
                     for sh in [(300, 96), (24, 96), (300, 80), (80, 24)])

    def f(x, w, out, Bw):
        return lg.lora_expand(out, lg.lora_shrink(x, w, replayed_only=True), Bw, None, 1.5, replayed_only=True)

    results = {}
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        compiled = torch.compile(f, mode=mode, fullgraph=True)

        def run():
            leaves = [t.detach().clone().requires_grad_() for t in (x, w, out, Bw)]
            y = compiled(*leaves)
            y.float().square().sum().backward()
            return [y.detach().clone()] + [t.grad.clone() for t in leaves]

        got, codes = run_and_get_code(run)
        code = "\n".join(codes)
        assert ("_shrink_fwd_kernel" in code) == (mode == "reduce-overhead"), (mode, code[:3000])
        assert ("_expand_fwd_kernel" in code) == (mode == "reduce-overhead"), mode
        results[mode] = got
    for a, b in zip(results["default"], results["reduce-overhead"]):
        _close(a, b, torch.bfloat16, "default vs reduce-overhead")


def _layer(x, base_w, A, Bw, wg, bg, seed):
    """A gated LoRA layer on the kernels: base + g·B·A·dropout(x), g = sigmoid(x·w_g + b_g)."""
    z = lg.lora_shrink(x, torch.cat([A, wg]), bg, A.shape[0], [(A.shape[0], 0.2), (wg.shape[0], 0.0)], seed)
    return lg.lora_expand(x @ base_w.t(), z[..., :A.shape[0]], Bw, z[..., A.shape[0]:], 1.0)


def _layer_params(K=24, D=20, r=4):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(*s, generator=g).to(DEV).requires_grad_(i > 0) for i, s in
            enumerate([(2, 9, K), (D, K), (r, K), (D, r), (1, K), (1,)])]


def test_fullgraph_compile_captures_the_kernels():
    torch._dynamo.reset()
    x, base_w, A, Bw, wg, bg = _layer_params()
    seed = torch.tensor([7], dtype=torch.int64, device=DEV)
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_layer, fullgraph=True, backend=counter)
    eager = _layer(x, base_w, A, Bw, wg, bg, seed)
    got = compiled(x, base_w, A, Bw, wg, bg, seed)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    ge = torch.autograd.grad(eager.square().sum(), [A, Bw, wg, bg])
    gc = torch.autograd.grad(got.square().sum(), [A, Bw, wg, bg])
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1


def test_gradient_checkpointing_redraws_the_same_dropout():
    # the seed is drawn from torch's generator inside the checkpointed region; recomputation
    # restores the RNG state, so backward sees the forward's mask
    from torch.utils.checkpoint import checkpoint

    x, base_w, A, Bw, wg, bg = _layer_params()

    def f(x):
        return _layer(x, base_w, A, Bw, wg, bg, lg.new_seed(x.device))

    torch.manual_seed(11)
    ref = f(x)
    gref = torch.autograd.grad(ref.square().sum(), [A, Bw, wg])
    torch.manual_seed(11)
    out = checkpoint(f, x, use_reentrant=False)
    torch.testing.assert_close(out, ref)
    got = torch.autograd.grad(out.square().sum(), [A, Bw, wg])
    for a, b in zip(got, gref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the kernels run natively there)")
@pytest.mark.parametrize("mode", lg.BWD_MODES)
def test_gpu_bf16_large_group_matches_reference(mode, monkeypatch):
    # real sizes: many row blocks, the dW split over rows, dB over shares of the rows ("split") or
    # the expand's split over D ("fused"); u and the gate are columns of z read through its stride
    monkeypatch.setattr(lg, "BWD_MODE", mode)
    g = torch.Generator().manual_seed(0)
    M, K, r = 3000, 1000, 16
    x = torch.randn(M, K, generator=g).cuda().bfloat16().requires_grad_()
    w = (torch.randn(2 * r + 1, K, generator=g) * 0.05).cuda().bfloat16().requires_grad_()
    b = torch.zeros(1, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    z = lg.lora_shrink(x, w, b, 2 * r, None, None)
    xr, wr, br = (t.detach().float().requires_grad_() for t in (x, w, b))
    zr = lg.reference_shrink(xr, wr, br, 2 * r)
    _close(z, zr, torch.bfloat16, "z")
    dz = torch.randn(M, 2 * r + 1, generator=g).cuda()  # every input from the seeded generator: repeatable
    for name, a, ref in zip(["dx", "dw", "db"], torch.autograd.grad(z, [x, w, b], dz.bfloat16()),
                            torch.autograd.grad(zr, [xr, wr, br], dz)):
        _close(a, ref, torch.bfloat16, name)
    out = torch.randn(M, 1100, generator=g).cuda().bfloat16().requires_grad_()
    zc = z.detach().requires_grad_()
    Bw = (torch.randn(1100, r, generator=g) * 0.1).cuda().bfloat16().requires_grad_()
    y = lg.lora_expand(out, zc[:, :r], Bw, zc[:, 2 * r:], 2.0)
    ro, rz, rB = (t.detach().float().requires_grad_() for t in (out, zc, Bw))
    yr = lg.reference_expand(ro, rz[:, :r], rB, rz[:, 2 * r:], 2.0)
    _close(y, yr, torch.bfloat16, "y")
    dy = torch.randn(yr.shape, generator=g).cuda()
    got = torch.autograd.grad(y, [out, zc, Bw], dy.bfloat16())
    want = torch.autograd.grad(yr, [ro, rz, rB], dy)
    got = [got[0], got[1][:, :r], got[1][:, 2 * r:], got[2]]
    want = [want[0], want[1][:, :r], want[1][:, 2 * r:], want[2]]
    for name, a, ref in zip(["dout", "du", "dgate", "dB"], got, want):
        _close(a, ref, torch.bfloat16, name)


# ------------------------------------------------------------------------------------------
# the engine: selection, the compile report, dropout branches in a group
# ------------------------------------------------------------------------------------------
def test_executor_selection_spec_env_and_report(monkeypatch):
    import unipelt
    from conftest import make_bert
    from unipelt.compiler import get_state, set_executor
    from unipelt.errors import SpecError
    from unipelt.report import report_dict, report_text

    spec = {"modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4, "gate": True}}}
    # default: auto, which on CPU tensors is the grouped executor, and the report says why
    monkeypatch.delenv("UNIPELT_EXECUTOR", raising=False)
    model = make_bert()
    h = unipelt.compile(model, spec)
    assert get_state(model).executor == "auto"
    groups = report_dict(h)["fusion_groups"]
    # (auto keeps the grouped executor on CUDA too for a gated group: test_auto_rule)
    assert groups and all(g["executor"] == "grouped" for g in groups), groups
    assert ("CUDA only" if DEV == "cpu" else "group with gates") in groups[0]["reason"]
    set_executor(model, "triton")
    assert all(g["executor"] == "triton" for g in report_dict(h)["fusion_groups"])
    assert "-> triton" in report_text(h)
    set_executor(model, "reference")
    assert all(g["executor"] == "reference" for g in report_dict(h)["fusion_groups"])
    # the spec's field, then the environment variable
    h2 = unipelt.compile(make_bert(), dict(spec, executor="grouped"))
    assert get_state(h2.model).executor == "grouped"
    monkeypatch.setenv("UNIPELT_EXECUTOR", "reference")
    assert get_state(unipelt.compile(make_bert(), spec).model).executor == "reference"
    monkeypatch.setenv("UNIPELT_EXECUTOR", "fast")
    with pytest.raises(SpecError, match="UNIPELT_EXECUTOR='fast'"):
        unipelt.compile(make_bert(), spec)
    with pytest.raises(SpecError, match="executor: expected one of auto, grouped, reference, triton"):
        unipelt.compile(make_bert(), dict(spec, executor="cuda"))


def test_dropout_lora_joins_the_kernel_group():
    # grouped: a dropout LoRA computes alone; under the kernels it joins its group (the mask is
    # drawn inside the shrink), and in eval mode (no dropout) equals the reference
    import unipelt
    from conftest import make_batch, make_bert, randomize
    from unipelt.compiler import get_state, set_executor

    model = make_bert()
    h = unipelt.compile(model, {"modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4,
                                                     "dropout": 0.3, "gate": True}}})
    randomize(h)
    groups = get_state(model).ctx.groups.values()
    set_executor(model, "grouped")
    assert not any(g.on and g._live_branches for g in groups)
    set_executor(model, "triton")
    assert all(g.on and g.kernel and len(g._drop) == 2 for g in groups)
    batch = make_batch()
    model.eval()
    with torch.no_grad():
        got = model(**batch).logits
        set_executor(model, "reference")
        ref = model(**batch).logits
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    # train mode: dropout acts (outputs move) and gradients reach A, B and the gate
    set_executor(model, "triton")
    model.train()
    out = model(**batch).logits
    assert not torch.allclose(out, ref, atol=1e-4)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in h.parameters())


@pytest.mark.parametrize("checkpointing", [{"use_reentrant": False}, {"use_reentrant": True}], ids=["nonreentrant", "reentrant"])
def test_triton_executor_under_gradient_checkpointing(checkpointing):
    # a gated LoRA with dropout on the kernels: recomputing a checkpointed layer restores the RNG
    # state, so the seed (and the mask) drawn in recomputation is the forward's; gradients equal
    # those without checkpointing from the same generator state
    import unipelt
    from conftest import make_batch, make_llama, randomize
    from unipelt.compiler import set_executor

    model = make_llama().train()
    h = unipelt.compile(model, {"modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v", "ffn.up"], "r": 4,
                                                     "dropout": 0.2, "gate": True}}})
    randomize(h)
    set_executor(model, "triton")
    batch = make_batch()

    def grads(enable: bool) -> list:
        for p in h.parameters():
            p.grad = None
        if enable:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        else:
            model.gradient_checkpointing_disable()
        torch.manual_seed(5)
        model(**batch, use_cache=False).logits.square().mean().backward()
        return [p.grad.clone() for p in h.parameters()]

    plain = grads(False)
    assert all(g.abs().sum() > 0 for g in plain)
    for got, want in zip(grads(True), plain):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_triton_executor_compiles_fullgraph():
    # the engine on the kernels under torch.compile(fullgraph=True): no graph break anywhere
    # (selection, the group's shrink with the gates, the expand, the adapter's up-projection, the
    # prefix gate read from the group), eval outputs equal eager. One spec only: compiling costs
    # ~50 s on the CI machine (a dropout LoRA's seed under compile: test_fullgraph_compile_captures_the_kernels)
    spec = "specs/unipelt.yaml"
    import unipelt
    from torch._dynamo.testing import CompileCounterWithBackend

    from conftest import make_batch, make_bert, randomize
    from unipelt.compiler import set_executor

    torch._dynamo.reset()
    model = make_bert()
    h = unipelt.compile(model, spec)
    randomize(h)
    set_executor(model, "triton")
    batch = make_batch()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    model.train()
    compiled(**batch).logits.square().mean().backward()  # training step: the backward ops trace too
    assert all(p.grad is not None for p in h.parameters())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(**batch).logits, model(**batch).logits, atol=2e-5, rtol=1e-5)
    assert counter.frame_count >= 1


def test_group_step_launches_fewer_kernels_than_the_reference():
    # the eager kernel path is bound by the host (RESULTS.md, Kernels): one group forward + backward
    # (two gated branches) must ask for fewer GPU launches than the reference executor's ops —
    # PyTorch operators that launch a kernel plus Triton launches, counted with the launches stubbed
    # (benchmarks/kernels.py --host-ops); before session 5 the kernels' path asked for 53 against 33
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"
    spec = importlib.util.spec_from_file_location("kernels_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ref, tri = bench.host_ops(M=70, K=48, r=4, k=2)
    assert ref["path"] == "reference" and tri["path"] == "triton"
    assert tri["triton_launches"] == 9, tri["launches"]  # shrink, dX, dW; per branch expand, dU, dB
    assert tri["aten_kernel_ops"] + tri["triton_launches"] < ref["aten_kernel_ops"], (tri["ops"], ref["ops"])
    # no dz-, z- or output-sized copies left in PyTorch: no slice backwards, no elementwise muls
    assert not {"slice_backward", "mul", "clone", "rsub"} & set(tri["ops"]), tri["ops"]


def _tensors_in(obj, seen=None):
    """Every tensor reachable from ``obj`` through dicts, lists, tuples, sets and dataclass fields."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        items = list(obj.values()) + list(obj.keys())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif hasattr(obj, "__dataclass_fields__") and not isinstance(obj, type):
        items = [getattr(obj, f) for f in obj.__dataclass_fields__]
    else:
        return []
    return [t for it in items for t in _tensors_in(it, seen)]


def test_kernels_keep_no_device_tensors_between_calls():
    # a tensor the kernels cache across calls (the tile table was one) is allocated, on its first
    # call under torch.compile(mode="reduce-overhead"), in the CUDA-graph pool and not returned:
    # cudagraph trees then reject the step ("4 tensor(s) in the cudagraph pool not tracked as
    # outputs", the H200, RESULTS.md Kernels session 6); nothing reachable from the modules' globals
    from unipelt_kernels import bottleneck

    g = torch.Generator().manual_seed(0)
    x = _leaf(torch.randn(37, 50, generator=g), torch.float32)
    w = _leaf(torch.randn(9, 50, generator=g) * 0.1, torch.float32)
    b = _leaf(torch.randn(2, generator=g), torch.float32)
    seed = lg.new_seed(x.device)
    z = lg.lora_shrink(x, w, b, 7, [(4, 0.25), (5, 0.0)], seed)
    out = torch.randn(37, 20, generator=g).to(DEV)
    B = _leaf(torch.randn(20, 4, generator=g), torch.float32)
    lg.lora_expand(out, z[:, :4], B, z[:, 7:8], 2.0).square().sum().backward()
    for mod in (lg, bottleneck):
        found = [(name, tuple(t.shape)) for name, v in vars(mod).items() if not name.startswith("__")
                 for t in _tensors_in(v)]
        assert not found, f"{mod.__name__} keeps tensors between calls: {found}"


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs")
def test_gpu_group_step_under_reduce_overhead():
    # the engine on the kernels compiled with CUDA graphs (the mode the kernels are for), three
    # training steps: no pool error, the same loss as eager on the grouped executor
    import unipelt
    from unipelt.compiler import set_executor

    from conftest import make_batch, make_bert, randomize

    spec = {"modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.k", "attn.v"], "r": 8,
                                 "gate": True, "dropout": 0.0}}}
    torch._dynamo.reset()
    model = make_bert().to(DEV)
    h = unipelt.compile(model, spec)
    randomize(h)
    batch = {k: v.to(DEV) for k, v in make_batch().items()}
    model.train()
    set_executor(model, "grouped")
    want = model(**batch).logits.float().square().mean().item()
    set_executor(model, "triton")
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        for p in h.parameters():  # (a gradient kept across steps would live in the graph's pool)
            p.grad = None
        torch.compiler.cudagraph_mark_step_begin()
        loss = step(**batch).logits.float().square().mean()
        loss.backward()
        got = loss.item()
    assert abs(got - want) <= 1e-4 * max(1.0, abs(want)), (got, want)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in h.parameters())


def test_auto_rule():
    # where ``auto`` runs the kernels: CUDA, a compiled forward, a group without gates or input
    # dropout (where they measured faster), and only while AUTO_USES_KERNELS is on
    from unipelt.executor import auto_rule

    assert auto_rule("cuda", compiling=True, enabled=True) is None
    assert "only under torch.compile" in auto_rule("cuda", compiling=False, enabled=True)
    assert "keeps the grouped executor" in auto_rule("cuda", compiling=True, enabled=False)
    assert "group with gates" in auto_rule("cuda", compiling=True, enabled=True, gated=True)
    assert "group with an input dropout" in auto_rule("cuda", compiling=True, enabled=True, dropout=True)
    for compiling in (False, True):
        assert "CUDA only" in auto_rule("cpu", compiling=compiling, enabled=True)


@pytest.mark.skipif(DEV == "cuda", reason="the CPU interpreter stands in for CUDA here (the model stays on the CPU)")
def test_auto_keeps_gated_and_dropout_groups_grouped(monkeypatch):
    # per group: on the kernels' device (the interpreter standing in for CUDA) auto runs a plain
    # LoRA group on the kernels and keeps a gated one on the grouped executor and the dropout
    # branches computing alone (off the kernels they cannot share one x), the report saying why;
    # ``triton`` runs all three as one kernel group
    import unipelt
    from unipelt import executor as ex
    from unipelt.compiler import set_executor
    from unipelt.report import report_dict

    from conftest import make_bert

    monkeypatch.setattr(ex, "AUTO_DEVICES", ("cuda", "cpu"))
    base = {"method": "lora", "sites": ["attn.q", "attn.k", "attn.v"], "r": 4}
    for extra, want, why in (({}, "triton", "CUDA graphs replay"), ({"gate": True}, "grouped", "group with gates"),
                             ({"dropout": 0.1}, "reference", "group with an input dropout")):
        h = unipelt.compile(make_bert(), {"executor": "auto", "modules": {"lora": {**base, **extra}}})
        groups = report_dict(h)["fusion_groups"]
        assert groups and all(g["executor"] == want and why in g["reason"] for g in groups), (extra, groups)
        set_executor(h.model, "triton")
        assert all(g["executor"] == "triton" for g in report_dict(h)["fusion_groups"]), extra


@pytest.mark.skipif(DEV == "cuda", reason="the CPU interpreter stands in for CUDA here (the model stays on the CPU)")
def test_auto_runs_the_kernels_in_compiled_forwards_only(monkeypatch):
    # the rule end to end, on CPU under the interpreter (AUTO_DEVICES widened as CUDA is not here):
    # one plan, the kernels' layout; an eager forward launches no kernel and equals the grouped
    # executor; a compiled one has the custom ops in its graph and the same outputs
    import unipelt
    from unipelt import executor as ex
    from unipelt.compiler import get_state, set_executor
    from unipelt.report import report_dict

    from conftest import make_batch, make_bert, randomize

    monkeypatch.setattr(ex, "AUTO_USES_KERNELS", True)
    monkeypatch.setattr(ex, "AUTO_DEVICES", ("cuda", "cpu"))
    # unfolded: in eager forwards (a graphed step's too) the fold would run these plain LoRA
    # projections with their base as one node instead (unipelt/fold.py, tests/test_fold.py)
    monkeypatch.setenv("UNIPELT_FOLD", "0")
    spec = {"executor": "auto", "modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4}}}
    model = make_bert()
    h = unipelt.compile(model, spec)
    randomize(h)
    groups = report_dict(h)["fusion_groups"]
    assert groups and all(g["executor"] == "triton" and "CUDA graphs replay" in g["reason"] for g in groups), groups
    assert all(g.kernel for g in get_state(model).ctx.groups.values())
    batch = make_batch()
    model.eval()
    with torch.no_grad():
        with monkeypatch.context() as m:
            def refuse(*a, **k):
                raise AssertionError("an eager forward under 'auto' launched a kernel")
            m.setattr(lg, "_launch_shrink", refuse)
            m.setattr(lg, "_launch_expand", refuse)
            eager = model(**batch).logits
        set_executor(model, "grouped")
        grouped = model(**batch).logits
        set_executor(model, "auto")
    torch.testing.assert_close(eager, grouped, atol=2e-5, rtol=1e-5)
    targets: set[str] = set()

    def backend(gm, example_inputs):
        targets.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, backend=backend)(**batch).logits
    assert any("unipelt.lora_shrink" in t for t in targets), sorted(targets)
    assert any("unipelt.lora_expand" in t for t in targets), sorted(targets)
    torch.testing.assert_close(compiled, grouped, atol=2e-5, rtol=1e-5)
    # a graphed step's eager forward (executor.graphing(): GraphedTrainStep's warm-up and capture)
    # launches them too, with the same outputs
    launched = []
    real = lg._launch_shrink

    def counting(*a, **k):
        launched.append(1)
        return real(*a, **k)

    monkeypatch.setattr(lg, "_launch_shrink", counting)
    with torch.no_grad(), ex.graphing():
        graphed = model(**batch).logits
    assert launched and ex._GRAPHING == 0
    torch.testing.assert_close(graphed, grouped, atol=2e-5, rtol=1e-5)


def test_block_overrides_are_checked(tmp_path):
    # UNIPELT_KERNEL_CONFIGS (benchmarks/kernel_sweep.py --write-best): known kinds, four positive ints
    good = tmp_path / "best.json"
    good.write_text('{"expand_dh": [16, 256, 8, 4], "shrink": [32, 128, 4, 3]}')
    got = lg.load_configs(str(good))
    assert got == {"expand_dh": lg._Blocks(16, 256, 8, 4), "shrink": lg._Blocks(32, 128, 4, 3)}
    for text, field in (('{"expnd": [1, 2, 3, 4]}', "expnd"), ('{"dx": [64, 64, 4]}', "dx"),
                        ('{"dw": [64, 0, 4, 3]}', "dw"), ("[1, 2", "cannot read")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ValueError, match=field) as info:
            lg.load_configs(str(bad))
        assert str(bad) in str(info.value)


def test_blocks_shrink_to_fit_shared_memory():
    # the bf16 blocks chosen at r 16 would not launch for a 256-wide group in fp32: K (then the
    # stages) come down until the pipelined loads fit; a block that fits is returned unchanged
    bl = lg._Blocks(64, 256, 4, 3)
    assert lg._fit(bl, lambda k: (64 + 64) * k * 2) is bl              # bf16, 64-wide N: 192 KiB, fits
    got = lg._fit(bl, lambda k: (64 + 256) * k * 4)                    # fp32, 256-wide N
    assert got.stages * (64 + 256) * got.k * 4 <= lg.SMEM_BUDGET and (got.m, got.warps) == (64, 4)
    assert got.k < 256
