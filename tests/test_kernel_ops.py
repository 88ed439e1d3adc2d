"""The NF4 and bottleneck kernels' ``torch.library.triton_op`` twins (issue 9), as the LoRA group's.

A compiled forward on CUDA calls ``unipelt_kernels::nf4_linear_t`` / ``nf4_dequantize_t`` and
``unipelt::bottleneck_up_t`` / ``bottleneck_up_bwd_t`` instead of the opaque custom ops, so that
inductor launches their kernels from its own generated code (``unipelt_kernels.compiled_ops``:
``UNIPELT_KERNEL_OPS=custom_op`` keeps the custom ops; off CUDA the custom ops are used). On CPU
the kernels run under ``TRITON_INTERPRET=1``: the twins equal the custom ops bit for bit, forward
and backward; their bodies trace (make_fx, symbolic shapes, functionalized as AOTAutograd does) to
the wrapped kernels and PyTorch ops only; the choice follows the device and the variable; a
compiled forward through the ops has no graph break. GPU tests skip without CUDA.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from unipelt_kernels import bottleneck as bn  # noqa: E402
from unipelt_kernels import compiled_ops  # noqa: E402
from unipelt_kernels import lora_group as lg  # noqa: E402
from unipelt_kernels import nf4  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _nf4_inputs(out_f: int, in_f: int, blocksize: int, nested: bool, seed: int = 0, device: str = DEV):
    """A 4-bit weight's op arguments (packed, absmax, code, code2, absmax2, offset, blocksize,
    blocksize2, nested, out_f, in_f), drawn directly in bitsandbytes' layout: two 4-bit indices
    a byte (the first high), one absmax a block, a 16-entry code book; with double quantization
    the absmax values are 8-bit indices into a 256-entry code, times a second-level absmax per
    ``blocksize2`` blocks, plus an offset. (The ops read the layout, not how it was quantized.)"""
    g = torch.Generator().manual_seed(seed)
    n = out_f * in_f
    n_blocks = -(-n // blocksize)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), generator=g, dtype=torch.uint8)
    code = torch.sort(torch.rand(16, generator=g) * 2 - 1).values
    if nested:
        bs2 = 16
        absmax = torch.randint(0, 256, (n_blocks,), generator=g, dtype=torch.uint8)
        code2 = torch.sort(torch.rand(256, generator=g) * 2 - 1).values
        absmax2 = torch.rand(-(-n_blocks // bs2), generator=g) + 0.5
        offset = torch.tensor(0.75)
    else:
        bs2 = 2
        absmax = torch.rand(n_blocks, generator=g) + 0.1
        code2 = absmax2 = offset = code
    tensors = [t.to(device) for t in (packed, absmax, code, code2, absmax2, offset)]
    return (*tensors, blocksize, bs2, nested, out_f, in_f)


def _quant_state(out_f: int, in_f: int, blocksize: int, nested: bool, seed: int = 0):
    """(packed, state) as nf4_linear takes them: the attributes of a bitsandbytes ``QuantState``
    that it reads, over :func:`_nf4_inputs`' tensors (no bitsandbytes needed, on a GPU either)."""
    from types import SimpleNamespace

    packed, absmax, code, code2, absmax2, offset, bs, bs2, nested, out_f, in_f = _nf4_inputs(
        out_f, in_f, blocksize, nested, seed)
    state2 = SimpleNamespace(code=code2, absmax=absmax2, blocksize=bs2) if nested else None
    return packed, SimpleNamespace(quant_type="nf4", blocksize=bs, shape=torch.Size([out_f, in_f]), dtype=torch.float32,
                                   absmax=absmax, code=code, nested=nested, state2=state2, offset=offset)


def _equal(got, want, what, atomics=False):
    """Bit for bit; on a GPU, outputs summed by fp32 atomics (the bottleneck backward's dW_up, db_up,
    dh) come in another order on every run: rounding only there."""
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None or b is None:
            assert a is None and b is None, (what, i)
            continue
        tol = (1e-5, 1e-5) if a.dtype == torch.float32 else (1.5e-2, 2e-2)
        atol, rtol = tol if atomics and a.is_cuda else (0, 0)
        atol = atol * float(b.detach().float().abs().max().clamp_min(1e-6))
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what}[{i}]: {m}")


# ------------------------------------------------------------------------------------------
# the twins equal the custom ops (eager, the interpreter on CPU)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nested,bias,dtype", [(False, False, torch.float32), (True, True, torch.float32),
                                               (True, True, torch.bfloat16)], ids=["plain", "nested-bias", "bf16"])
def test_nf4_triton_op_twins_match_the_custom_ops(nested, bias, dtype):
    # forward, the input's and the bias's gradients (the backward dequantizes again through the
    # twin of nf4_dequantize), bit for bit; an awkward weight (47 x 99 in blocks of 64: blocks
    # straddle rows, the last one partial, an odd count: the last byte's low nibble unused)
    state = _nf4_inputs(47, 99, 64, nested)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 5, 99, generator=g).to(DEV, dtype)
    b0 = (torch.randn(47, generator=g) * 0.1).to(DEV, dtype) if bias else None
    dy = torch.randn(3, 5, 47, generator=g).to(DEV, dtype)

    def run(op):
        x = x0.clone().requires_grad_()
        b = b0.clone().requires_grad_() if bias else None
        y = op(x, *state, b)
        leaves = [x] + ([b] if bias else [])
        return [y, *torch.autograd.grad(y, leaves, dy)]

    want = run(torch.ops.unipelt_kernels.nf4_linear)
    got = run(torch.ops.unipelt_kernels.nf4_linear_t)
    _equal(got, want, "nf4_linear")
    deq = (*state[:9], [47, 99], dtype)
    _equal([torch.ops.unipelt_kernels.nf4_dequantize_t(*deq)], [torch.ops.unipelt_kernels.nf4_dequantize(*deq)],
           "nf4_dequantize")
    # and both are the formula (the PyTorch reference), up to the interpreter's bf16 rounding
    ref = nf4._reference(*deq)
    if dtype == torch.float32:
        assert torch.equal(torch.ops.unipelt_kernels.nf4_dequantize_t(*deq), ref)
    x = x0.clone().requires_grad_()
    torch.library.opcheck(torch.ops.unipelt_kernels.nf4_linear_t.default, (x, *state, b0),
                          test_utils=("test_schema", "test_autograd_registration"))


BOTTLENECK_TWIN_CASES = [  # tokens, d, m, activation, gate, dtype
    (37, 45, 3, "relu", None, torch.float32), (70, 100, 20, "gelu", "token", torch.float32),
    (37, 33, 5, "tanh", "pooled", torch.float32), (70, 100, 20, "silu", "token", torch.bfloat16),
]


@pytest.mark.parametrize("M,D,m,act,gate,dtype", BOTTLENECK_TWIN_CASES,
                         ids=[f"t{i}" for i in range(len(BOTTLENECK_TWIN_CASES))])
def test_bottleneck_triton_op_twins_match_the_custom_ops(M, D, m, act, gate, dtype):
    # the 2-D ops as bottleneck_up calls them (the gate expanded to one value a token): forward and
    # every gradient, and the backward ops' four outputs, bit for bit
    g = torch.Generator().manual_seed(M + D + m)
    vals = [torch.randn(1, M, D, generator=g), torch.randn(1, M, m, generator=g), torch.randn(m, generator=g) * 0.5,
            torch.randn(D, m, generator=g) * 0.3, torch.randn(D, generator=g) * 0.5]
    if gate == "token":
        vals.append(torch.rand(1, M, 1, generator=g))
    elif gate == "pooled":
        vals.append(torch.rand(1, 1, 1, generator=g))
    vals = [v.to(DEV, dtype) for v in vals]
    dy = torch.randn(M, D, generator=g).to(DEV, dtype)
    code = bn.ACTIVATIONS[act]

    def run(op):
        leaves = [v.clone().requires_grad_() for v in vals]
        out, u, bd, w, bu = (t.reshape(-1, t.shape[-1]) if t.dim() == 3 else t for t in leaves[:5])
        coef = leaves[5].expand(1, M, 1).reshape(-1).contiguous() if gate else None
        y = op(out, u, bd, w, bu, coef, 1.3, code)
        return [y, *torch.autograd.grad(y, leaves, dy)]

    want = run(torch.ops.unipelt.bottleneck_up)
    got = run(torch.ops.unipelt.bottleneck_up_t)
    _equal(got, want, "bottleneck_up", atomics=True)
    args = [v.reshape(-1, v.shape[-1]) if v.dim() == 3 else v for v in vals[:5]]
    coef = vals[5].expand(1, M, 1).reshape(-1).contiguous() if gate else None
    bwd = (dy, args[1], args[2], args[3], args[4], coef, 1.3, code)
    _equal(torch.ops.unipelt.bottleneck_up_bwd_t(*bwd), torch.ops.unipelt.bottleneck_up_bwd(*bwd),
           "bottleneck_up_bwd", atomics=True)
    leaves = [a.clone().requires_grad_() for a in args] + ([coef.clone().requires_grad_()] if gate else [None])
    torch.library.opcheck(torch.ops.unipelt.bottleneck_up_t.default, (*leaves, 1.3, code),
                          test_utils=("test_schema", "test_autograd_registration"))


# ------------------------------------------------------------------------------------------
# what inductor would see: the twins' bodies traced (symbolic token count, functionalized as
# AOTAutograd does before inductor) are the wrapped kernels and PyTorch ops, no opaque op
# ------------------------------------------------------------------------------------------
def _jit_kernels(monkeypatch, mod, names):
    # under the interpreter @triton.jit gives InterpretedFunctions, which wrap_triton hands back
    # untraced; the same kernels as JITFunctions trace (they are never launched here)
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for name in names:
        k = getattr(mod, name)
        if isinstance(k, InterpretedFunction):
            monkeypatch.setattr(mod, name, JITFunction(k.fn))


def _traced(fn, *args):
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(dispatch_functionalize(fn), tracing_mode="symbolic")(*args)
    kernels, others = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if "triton_kernel_wrapper" in str(node.target):
            k = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            while hasattr(k, "fn"):  # an autotuner's JITFunction, a JITFunction's Python function
                k = k.fn
            kernels.append(k.__name__)
        else:
            others.append(str(node.target))
    return gm, kernels, others


def test_triton_op_bodies_trace_to_their_kernels_and_torch_ops(monkeypatch):
    _jit_kernels(monkeypatch, bn, ["_act", "_up_fwd_kernel", "_up_bwd_kernel"])
    _jit_kernels(monkeypatch, nf4, ["_nf4_kernel"])
    g = torch.Generator().manual_seed(0)
    M, D, m = 70, 40, 8
    out, u, bd, w, bu, c = (torch.randn(*s, generator=g).to(DEV) for s in [(M, D), (M, m), (m,), (D, m), (D,), (M,)])

    def bottleneck(out, u, bd, w, bu, c):
        y = torch.ops.unipelt.bottleneck_up_t(out, u, bd, w, bu, c, 1.5, 1)
        return y, *torch.ops.unipelt.bottleneck_up_bwd_t(y, u, bd, w, bu, c, 1.5, 1)

    gm, kernels, others = _traced(bottleneck, out, u, bd, w, bu, c)
    assert kernels == ["_up_fwd_kernel", "_up_bwd_kernel"], (kernels, gm.code)
    assert not [o for o in others if "unipelt" in o], gm.code
    assert any("sym_size" in o for o in others), gm.code  # the token count stays symbolic: no recompiles per length
    state = _nf4_inputs(48, 100, 64, True)
    x = torch.randn(6, 100, generator=g).to(DEV)

    def linear(x, *tensors):
        return torch.ops.unipelt_kernels.nf4_linear_t(x, *tensors, *state[6:], None)

    gm, kernels, others = _traced(linear, x, *state[:6])
    assert kernels == ["_nf4_kernel"], (kernels, gm.code)
    assert not [o for o in others if "unipelt" in o], gm.code
    assert any("mm" in o for o in others), gm.code  # the GEMM as PyTorch's, inductor's extern call


@pytest.mark.skipif(DEV == "cuda", reason="on a GPU the test above traces the CUDA path itself")
def test_nf4_twin_traces_the_autotuned_kernel_for_cuda_tensors(monkeypatch):
    # the path a CUDA tensor takes (the autotuned kernel, its grid a function of each config's tile),
    # traced on fake CUDA tensors of symbolic sizes: one kernel node with a grid per config, then the
    # GEMM (the eager launcher's tuned-key set was once asked about the symbolic sizes: no hash)
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from triton.runtime.jit import JITFunction

    monkeypatch.setattr(nf4, "_interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # (no CUDA in this build)
    tuned = triton.autotune(configs=nf4._configs(), key=["n_bytes", "HALF", "NESTED"])(JITFunction(nf4._nf4_kernel.fn))
    monkeypatch.setattr(nf4, "_nf4_tuned", tuned)
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

    state = _nf4_inputs(48, 100, 64, True)
    mode = FakeTensorMode(shape_env=ShapeEnv())
    args = []
    for t in [torch.empty(6, 100)] + list(state[:6]):  # every size symbolic, as a dynamic-shape trace has them
        f = mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * t.dim()))
        f.fake_device = torch.device("cuda", 0)  # (a CUDA tensor without CUDA: fake tensors only)
        args.append(f)

    def linear(x, *tensors):
        return torch.ops.unipelt_kernels.nf4_linear_t(x, *tensors, *state[6:], None)

    gm, kernels, others = _traced(linear, *args)
    assert kernels == ["_nf4_kernel"], gm.code
    (node,) = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert len(node.kwargs["grid"]) == len(nf4._configs())
    assert "aten.mm.default" in others and not [o for o in others if "unipelt" in o], gm.code
    assert not [k for k in nf4._TUNED if k[-1].type == "cuda"]  # a trace marks no key tuned (inductor tunes its copy)


@pytest.mark.skipif(DEV == "cuda", reason="the model stays on the CPU (on a GPU: the QLoRA speed rows of call.sh)")
def test_qlora_model_traces_through_the_nf4_twin(monkeypatch):
    # a QLoRA model (bitsandbytes' Params4bit weights, unipelt_plugins.bnb's Triton dequantization)
    # compiled whole with the twin chosen: AOTAutograd's forward graph (what inductor would get)
    # has one wrapped NF4 kernel per 4-bit linear, the GEMMs, and no opaque op
    pytest.importorskip("bitsandbytes")
    from torch._dynamo.backends.common import aot_autograd

    import unipelt
    from conftest import make_batch, make_llama
    from unipelt_plugins.bnb import quantize_model, set_dequant_backend

    _jit_kernels(monkeypatch, nf4, ["_nf4_kernel"])
    monkeypatch.setattr(nf4, "compiled_ops", lambda t: True)
    set_dequant_backend("triton")
    try:
        model = quantize_model(make_llama(hidden=64), "nf4", double_quant=True).train()
        unipelt.compile(model, {"modules": {"lora": {"method": "lora", "r": 4, "sites": ["attn.q", "ffn.down"]}}})
        n_4bit = sum(type(m).__name__ == "Linear4bitLeaf" for m in model.modules())
        graphs = []

        class Captured(Exception):
            pass

        def capture(gm, inputs):  # the graph only: these kernels are not launched on a CPU
            graphs.append(gm)
            raise Captured

        torch._dynamo.reset()
        with pytest.raises(Exception, match="Captured"):
            torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=capture))(**make_batch())
    finally:
        set_dequant_backend("bnb")
        torch._dynamo.reset()
    (gm,) = graphs
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if "unipelt" in t], gm.code
    # the dequantizations whose weight the forward reads (its GEMM). (Without a GPU driver torch
    # cannot analyse which arguments a kernel writes and assumes all: the backward's dequantizations
    # then "mutate" the packed weights and move into this graph too, their weights unread here)
    hops = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    read = [n for n in hops if any(u.args[1:] == ("out_ptr",) and u.users for u in n.users)]
    assert n_4bit > 0 and len(read) == n_4bit, (n_4bit, len(hops), gm.code[:3000])
    for n in read:
        (w,) = [u for u in n.users if u.args[1:] == ("out_ptr",)]
        assert any("mm" in str(c.target) or "t.default" in str(c.target) for c in w.users), gm.code


@pytest.mark.skipif(DEV == "cuda", reason="on a GPU the kernels are traced by the GPU tests")
def test_bottleneck_twins_keep_the_token_count_symbolic_on_cuda(monkeypatch):
    # the CUDA launch parameters (blocks, the backward's D splits) traced on fake CUDA tensors with a
    # symbolic token count: the only guards are that the operands agree on it, none on its value
    # (a min/max of it once guarded a range: a recompile past ~17k tokens)
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    _jit_kernels(monkeypatch, bn, ["_act", "_up_fwd_kernel", "_up_bwd_kernel"])
    monkeypatch.setattr(bn, "INTERPRET", False)
    mode = FakeTensorMode(shape_env=ShapeEnv())
    M, D, m = 70, 40, 8
    args = []
    for shape, dynamic in [((M, D), (1, 0)), ((M, m), (1, 0)), ((m,), (0,)), ((D, m), (0, 0)), ((D,), (0,)), ((M,), (1,))]:
        ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC if d else DimDynamic.STATIC for d in dynamic])
        f = mode.from_tensor(torch.empty(shape), symbolic_context=ctx)
        f.fake_device = torch.device("cuda", 0)
        args.append(f)

    def fn(out, u, bd, w, bu, c):
        y = torch.ops.unipelt.bottleneck_up_t(out, u, bd, w, bu, c, 1.5, 1)
        return y, *torch.ops.unipelt.bottleneck_up_bwd_t(y, u, bd, w, bu, c, 1.5, 1)

    gm, kernels, others = _traced(fn, *args)
    assert kernels == ["_up_fwd_kernel", "_up_bwd_kernel"], gm.code
    guards = [str(g.expr) for g in mode.shape_env.guards]
    assert all(g.startswith("Eq(") for g in guards), guards


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_twins_fake_outputs_match_the_custom_ops(device, monkeypatch):
    # what tracing sees of an op's result (a twin's fake is its own body, the custom ops' a
    # registered function): the same shapes, dtypes, strides and devices, on fake CPU and CUDA tensors
    from torch._subclasses.fake_tensor import FakeTensorMode

    _jit_kernels(monkeypatch, bn, ["_act", "_up_fwd_kernel", "_up_bwd_kernel"])
    _jit_kernels(monkeypatch, nf4, ["_nf4_kernel"])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    mode = FakeTensorMode()

    def fake(t):
        f = mode.from_tensor(t)
        f.fake_device = torch.device(device, 0) if device == "cuda" else torch.device("cpu")
        return f

    def meta(ts):
        ts = ts if isinstance(ts, (tuple, list)) else [ts]
        return [(tuple(t.shape), t.dtype, t.stride(), t.device) for t in ts]

    state = _nf4_inputs(47, 99, 64, True, device="cpu")
    tensors = [fake(t) for t in state[:6]]
    g = torch.Generator().manual_seed(0)
    x, b = fake(torch.randn(3, 5, 99, generator=g).bfloat16()), fake(torch.randn(47, generator=g).bfloat16())
    M, D, m = 37, 45, 3
    out, u, bd, w, bu, c = (fake(torch.randn(*sh, generator=g)) for sh in [(M, D), (M, m), (m,), (D, m), (D,), (M,)])
    with mode:
        for name, args in [("nf4_linear", (x, *tensors, *state[6:], b)),
                           ("nf4_dequantize", (*tensors, *state[6:9], [47, 99], torch.bfloat16))]:
            op = getattr(torch.ops.unipelt_kernels, name)
            assert meta(getattr(torch.ops.unipelt_kernels, name + "_t")(*args)) == meta(op(*args)), name
        for name, args in [("bottleneck_up", (out, u, bd, w, bu, c, 1.5, 2)),
                           ("bottleneck_up", (out, u, bd, w, bu, None, 1.5, 2)),
                           ("bottleneck_up_bwd", (out, u, bd, w, bu, c, 1.5, 2))]:
            op = getattr(torch.ops.unipelt, name)
            assert meta(getattr(torch.ops.unipelt, name + "_t")(*args)) == meta(op(*args)), name


# ------------------------------------------------------------------------------------------
# which ops a compiled forward calls
# ------------------------------------------------------------------------------------------
def test_one_choice_rule_for_every_kernel_module(monkeypatch):
    from types import SimpleNamespace

    assert nf4.compiled_ops is bn.compiled_ops is lg._compiled_ops is compiled_ops.compiled_ops
    on_cuda = SimpleNamespace(device=torch.device("cuda", 0))
    assert compiled_ops.compiled_ops(on_cuda)
    assert not compiled_ops.compiled_ops(torch.empty(1))  # CPU: inductor's CPU code cannot launch Triton kernels
    monkeypatch.setattr(compiled_ops, "COMPILED_OPS", "custom_op")
    assert not compiled_ops.compiled_ops(on_cuda)


@pytest.mark.parametrize("value,expect", [(None, "triton_op"), ("custom_op", "custom_op"), ("both", None)])
def test_the_variable_is_read_at_import_and_checked(value, expect):
    env = {k: v for k, v in os.environ.items() if k != "UNIPELT_KERNEL_OPS"}
    if value is not None:
        env["UNIPELT_KERNEL_OPS"] = value
    p = subprocess.run([sys.executable, "-c", "import unipelt_kernels.compiled_ops as c; print(c.COMPILED_OPS)"],
                       env=env, capture_output=True, text=True, timeout=120)
    if expect is not None:
        assert p.returncode == 0 and p.stdout.strip() == expect, p.stderr
    else:
        assert p.returncode != 0
        assert f"UNIPELT_KERNEL_OPS={value!r}: expected triton_op or custom_op" in p.stderr, p.stderr


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """The unipelt ops dispatched inside the block (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if "unipelt" in name:
            self.seen.append(name.split(".")[-1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("says", [True, False], ids=["triton_op", "custom_op"])
def test_compiled_forwards_call_the_twins_by_the_rule(says, monkeypatch):
    # nf4_linear and bottleneck_up ask the shared rule about their tensor while compiling and call
    # the twins exactly when it says so; eager calls never do
    asked = []

    def rule(t):
        asked.append(t.device.type)
        return says

    monkeypatch.setattr(nf4, "compiled_ops", rule)
    monkeypatch.setattr(bn, "compiled_ops", rule)
    g = torch.Generator().manual_seed(3)
    q, qs = _quant_state(32, 64, 64, True)
    x = torch.randn(2, 3, 64, generator=g).to(DEV).requires_grad_()
    u, bd, w, bu = (torch.randn(*s, generator=g).to(DEV).requires_grad_() for s in [(2, 3, 4), (4,), (32, 4), (32,)])

    def step():
        mode = _Ops()
        with mode:
            h = nf4.nf4_linear(x, q, qs)
            y = bn.bottleneck_up(h, u, bd, w, bu, None, 1.0, "relu")
            y.square().sum().backward()
        return mode.seen

    # (what an op's body calls is not dispatched through the mode: the forward's dequantization)
    assert step() == ["nf4_linear", "bottleneck_up", "bottleneck_up_bwd", "nf4_dequantize"]
    assert asked == []  # eager: the custom ops, the rule not asked
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    seen = step()
    t = "_t" if says else ""
    assert seen == [f"nf4_linear{t}", f"bottleneck_up{t}", f"bottleneck_up_bwd{t}", f"nf4_dequantize{t}"], seen
    assert asked == [DEV, DEV]


def test_compiled_forward_through_the_ops_has_no_graph_break():
    # a 4-bit linear and an adapter's up-projection after it, compiled whole (aot_eager; on the CPU
    # the custom ops, by the rule): one frame, the eager outputs and gradients
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 64, generator=g).to(DEV)
    params = [torch.randn(*s, generator=g).mul(0.3).to(DEV).requires_grad_() for s in
              [(40,), (6, 40), (6,), (40, 6), (40,), (40,)]]

    q, qs = _quant_state(40, 64, 64, True)

    def f(x, bias, wd, bd, wu, bu, wg):
        h = nf4.nf4_linear(x, q, qs, bias)
        gate = torch.sigmoid(h @ wg)[..., None]
        return bn.bottleneck_up(h, h @ wd.t(), bd, wu, bu, gate, 0.5, "gelu")

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    want = f(x, *params)
    got = compiled(x, *params)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(got.square().sum(), params), torch.autograd.grad(want.square().sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1


def test_houlsby_model_on_the_kernels_compiles_whole():
    # the engine's path to the bottleneck kernel (serial Houlsby adapters at attn.out and ffn.out,
    # executor triton: the down-projection as the group's shrink, bottleneck_up for the rest) under
    # torch.compile(fullgraph=True): no graph break, the kernel ops run, eager's loss and gradients
    import unipelt
    from torch._dynamo.testing import CompileCounterWithBackend

    from conftest import make_batch, make_llama, randomize
    from unipelt.compiler import set_executor

    torch._dynamo.reset()
    model = make_llama(layers=1, hidden=64).to(DEV).train()
    h = unipelt.compile(model, "specs/houlsby.yaml")
    randomize(h, std=0.1)
    set_executor(model, "triton")
    batch = {k: v.to(DEV) for k, v in make_batch().items()}
    params = list(h.parameters())

    def step(fn):
        loss = fn(**batch).logits.float().square().mean()
        return [loss, *torch.autograd.grad(loss, params)]

    want = step(model)
    aot_eager = CompileCounterWithBackend("aot_eager")
    targets = []

    def backend(gm, example_inputs):  # dynamo's graph: the ops it calls
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return aot_eager(gm, example_inputs)

    got = step(torch.compile(model, fullgraph=True, backend=backend))
    assert aot_eager.frame_count == 1
    op = "unipelt.bottleneck_up_t" if DEV == "cuda" else "unipelt.bottleneck_up"  # (CPU: the custom op, by the rule)
    assert sum(t.startswith(op + ".") for t in targets) == 2, targets  # both placements
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# GPU: inductor's generated code launches the twins' kernels
# ------------------------------------------------------------------------------------------
def _bf16_close(got, ref, what):
    # bf16 inputs, fp32 accumulation, dW_up summed by fp32 atomics in either order (test_kernels' table)
    ref = ref.float()
    scale = ref.detach().abs().max().clamp_min(1e-6)
    torch.testing.assert_close(got.detach().float(), ref.detach(), atol=1.5e-2 * float(scale), rtol=2e-2,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (inductor launches user Triton kernels on CUDA)")
def test_gpu_inductor_launches_the_nf4_and_bottleneck_triton_op_kernels(monkeypatch):
    # a 4-bit linear and a gated adapter's up-projection after it, compiled in inductor's default
    # mode, forward and backward: with the triton_ops the generated code launches the NF4 kernel and
    # both bottleneck kernels itself (no call of an opaque op left); with UNIPELT_KERNEL_OPS=custom_op
    # it calls the custom ops; the same results
    from torch._inductor.utils import run_and_get_code

    q, qs = _quant_state(256, 192, 64, True)
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(2, 37, 192, generator=g).cuda().bfloat16()
    params0 = [torch.randn(*sh, generator=g).mul(0.3).cuda() for sh in [(256,), (16, 256), (16,), (256, 16), (256,), (256,)]]

    def f(x, bias, wd, bd, wu, bu, wg):
        h = nf4.nf4_linear(x, q, qs, bias.bfloat16())
        gate = torch.sigmoid(h @ wg.bfloat16())[..., None]
        return bn.bottleneck_up(h, h @ wd.bfloat16().t(), bd, wu, bu, gate, 0.5, "gelu")

    def step(ops):
        torch._dynamo.reset()
        monkeypatch.setattr(compiled_ops, "COMPILED_OPS", ops)
        x = x0.clone().requires_grad_()
        params = [p.clone().requires_grad_() for p in params0]
        compiled = torch.compile(f, fullgraph=True)

        def run():
            y = compiled(x, *params)
            y.float().square().sum().backward()
            return y

        y, codes = run_and_get_code(run)
        return [y, x.grad] + [p.grad for p in params], "\n".join(codes)

    # torch reads from each kernel's code which arguments it writes; were that to fail, it would take
    # every argument as written (the packed weights among them: copies, and the backward's
    # dequantization moved into the forward, its float weight kept: QLoRA's memory promise broken)
    import logging

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    records = Records()
    logs = [logging.getLogger(n) for n in ("torch._dynamo", "torch._higher_order_ops.triton_kernel_wrap")]
    for log in logs:  # (torch 2.13 logs it as torch._dynamo)
        log.addHandler(records)
    try:
        want, code_c = step("custom_op")
        got, code_t = step("triton_op")
    finally:
        for log in logs:
            log.removeHandler(records)
    assert not [m for m in records.messages if "every input is mutated" in m], records.messages
    assert "torch.ops.unipelt_kernels.nf4_linear" in code_c and "torch.ops.unipelt.bottleneck_up" in code_c, code_c[:3000]
    for kernel in ("_nf4_kernel", "_up_fwd_kernel", "_up_bwd_kernel"):
        assert kernel in code_t, (kernel, code_t[:3000])
    assert "torch.ops.unipelt_kernels.nf4" not in code_t and "torch.ops.unipelt.bottleneck" not in code_t
    for name, a, b in zip(["y", "dx", "dbias", "dWd", "dbd", "dWu", "dbu", "dwg"], got, want):
        _bf16_close(a, b, name)
