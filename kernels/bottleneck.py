"""Fused Triton kernel for a bottleneck adapter's up-projection (Houlsby / parallel placements).

Delta = s·g·(f(x·W_downᵀ + b_down)·W_upᵀ + b_up) added to the base output ``out`` (serial: out is
the tensor the adapter read, the residual; parallel: the FFN's output). Two passes over the
d-wide tensors, the fewest the shapes allow (the m-wide bottleneck sits between two reductions
over d): the down-projection is the group's shrink (``lora_group.lora_shrink``, one read of x
shared with the gate's logits), and this kernel does the rest in one pass over ``out``: the bias
and activation in its prologue, the up-projection, its bias, the scale and the gate, and the
residual addition.

Backward reads dY once (``_up_bwd_kernel``): dh = dY·W_up (reduced over d in registers), and,
accumulated across row blocks with fp32 atomics, dW_up = (s·g ⊙ f)ᵀ·dY and db_up = Σ s·g·dY, plus
the gate's share through b_up (Σ_d dY·b_up per token); the activation's derivative and the
down-projection's gradients are tokens × m work in PyTorch. Only u = x·W_downᵀ (tokens × m) is
saved, never the activation.

Pfeiffer's placement (``renorm``, with its LayerNorm) and a learned scale stay on the reference
(unipelt.executor.kernel_expand says which branches the kernel takes).

Both kernels are custom ops (``unipelt::bottleneck_up`` with its autograd, ``bottleneck_up_bwd``),
and ``triton_op`` twins (``bottleneck_up_t``, ``bottleneck_up_bwd_t``: the same launchers through
``wrap_triton``, the same autograd rule), which a compiled forward on CUDA calls by the rule of
``unipelt_kernels.compiled_ops`` (``UNIPELT_KERNEL_OPS=custom_op`` keeps the custom ops): inductor
launches their kernels from its own generated code.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from unipelt_kernels.compiled_ops import compiled_ops
from unipelt_kernels.lora_group import INTERPRET, _k, _precision

# activation name -> the kernel's code (AdapterConfig.activation; nn.GELU's default is the erf form)
ACTIVATIONS = {"identity": 0, "relu": 1, "gelu": 2, "silu": 3, "swish": 3, "tanh": 4}


@triton.jit
def _act(h, ACT: tl.constexpr):
    if ACT == 1:
        h = tl.maximum(h, 0.0)
    elif ACT == 2:
        h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACT == 3:
        h = h * tl.sigmoid(h)
    elif ACT == 4:
        h = 2.0 * tl.sigmoid(2.0 * h) - 1.0
    return h


@triton.jit
def _up_fwd_kernel(
    out_ptr, u_ptr, bd_ptr, w_ptr, bu_ptr, c_ptr, y_ptr,
    M, D, R, scale, stride_om, stride_um, stride_wd, stride_ym,
    ACT: tl.constexpr, HAS_COEF: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rr = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    d_ok = dd < D
    r_ok = rr < R
    u = tl.load(u_ptr + rows[:, None] * stride_um + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
    bd = tl.load(bd_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)
    v = _act(u + bd[None, :], ACT)
    v = tl.where(r_ok[None, :], v, 0.0)
    wt = tl.load(w_ptr + dd[None, :] * stride_wd + rr[:, None], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        wt = wt.to(tl.float32)
    else:
        v = v.to(wt.dtype)
    h = tl.dot(v, wt, input_precision=PRECISION)
    bu = tl.load(bu_ptr + dd, mask=d_ok, other=0.0).to(tl.float32)
    h = (h + bu[None, :]) * scale
    if HAS_COEF:
        c = tl.load(c_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        h = h * c[:, None]
    o_mask = row_ok[:, None] & d_ok[None, :]
    acc = tl.load(out_ptr + rows[:, None] * stride_om + dd[None, :], mask=o_mask, other=0.0).to(tl.float32) + h
    tl.store(y_ptr + rows[:, None] * stride_ym + dd[None, :], acc.to(y_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _up_bwd_kernel(
    dy_ptr, u_ptr, bd_ptr, w_ptr, bu_ptr, c_ptr, dh_ptr, dw_ptr, dbu_ptr, dcb_ptr,
    M, D, R, scale, d_per_split, stride_dym, stride_um, stride_wd, stride_dhm, stride_dwd,
    ACT: tl.constexpr, HAS_COEF: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    r_ok = rr < R
    u = tl.load(u_ptr + rows[:, None] * stride_um + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
    bd = tl.load(bd_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)
    v = tl.where(r_ok[None, :], _act(u + bd[None, :], ACT), 0.0)
    cs = tl.zeros((BLOCK_M,), dtype=tl.float32) + scale
    if HAS_COEF:
        cs = cs * tl.load(c_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    cs = tl.where(row_ok, cs, 0.0)
    vt = tl.trans(v * cs[:, None])
    dh = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    dcb = tl.zeros((BLOCK_M,), dtype=tl.float32)
    d_start = split * d_per_split
    for d0 in range(d_start, d_start + d_per_split, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = (dd < D) & (dd < d_start + d_per_split)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + dd[:, None] * stride_wd + rr[None, :], mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        bu = tl.load(bu_ptr + dd, mask=d_ok, other=0.0).to(tl.float32)
        dyf = dy.to(tl.float32)
        if UPCAST:
            dy = dyf
            w = w.to(tl.float32)
            vt_d = vt
        else:
            vt_d = vt.to(dy.dtype)
        dh += tl.dot(dy, w, input_precision=PRECISION)
        dcb += tl.sum(dyf * bu[None, :], axis=1)
        dw = tl.dot(vt_d, dy, input_precision=PRECISION)  # (R, D-block)
        tl.atomic_add(dw_ptr + dd[None, :] * stride_dwd + rr[:, None], dw, mask=r_ok[:, None] & d_ok[None, :])
        tl.atomic_add(dbu_ptr + dd, tl.sum(dyf * cs[:, None], axis=0), mask=d_ok)
    tl.atomic_add(dh_ptr + rows[:, None] * stride_dhm + rr[None, :], dh, mask=row_ok[:, None] & r_ok[None, :])
    tl.atomic_add(dcb_ptr + rows, dcb, mask=row_ok)


def _block_r(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def _check(out: Tensor, u: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, coef: Tensor | None) -> None:
    M, D = out.shape
    R = u.shape[1]
    if u.shape[0] != M or w_up.shape != (D, R) or b_down.shape != (R,) or b_up.shape != (D,):
        raise ValueError(f"bottleneck_up: out {tuple(out.shape)}, u {tuple(u.shape)}, W_up {tuple(w_up.shape)}, "
                         f"b_down {tuple(b_down.shape)}, b_up {tuple(b_up.shape)} (needs u (M, m), W_up (d, m), "
                         f"b_down (m,), b_up (d,))")
    if coef is not None and coef.numel() != M:
        raise ValueError(f"bottleneck_up: {M} tokens but {coef.numel()} gate values")


def _launch_fwd(out, u, b_down, w_up, b_up, coef, scale, act, wrap=None):
    _check(out, u, b_down, w_up, b_up, coef)
    M, D = out.shape
    R = u.shape[1]
    y = torch.empty_like(out)
    bm, bd = (64, 64) if INTERPRET else (64, 128)
    br = _block_r(R)
    _k(_up_fwd_kernel, wrap)[(triton.cdiv(M, bm), triton.cdiv(D, bd))](
        out, u, b_down, w_up, b_up, coef if coef is not None else u, y, M, D, R, float(scale),
        out.stride(0), u.stride(0), w_up.stride(0), y.stride(0),
        ACT=act, HAS_COEF=coef is not None, UPCAST=INTERPRET, PRECISION=_precision(out.dtype),
        BLOCK_M=bm, BLOCK_D=bd, BLOCK_R=br, num_warps=4 if br <= 64 or INTERPRET else 8,
    )
    return y


def _launch_bwd(dy, u, b_down, w_up, b_up, coef, scale, act, wrap=None):
    M, D = dy.shape
    R = u.shape[1]
    f32 = dict(device=dy.device, dtype=torch.float32)
    dh, dw, dbu, dcb = torch.zeros(M, R, **f32), torch.zeros(D, R, **f32), torch.zeros(D, **f32), torch.zeros(M, **f32)
    bm, bd = 64, 64
    m_blocks = triton.cdiv(M, bm)
    # (torch.sym_min / sym_max: plain min / max for ints; a symbolic token count, traced in a twin,
    # stays symbolic instead of being guarded on)
    splits = 1 if INTERPRET else torch.sym_max(1, torch.sym_min(triton.cdiv(D, 4 * bd), triton.cdiv(264, m_blocks)))
    d_per_split = triton.cdiv(triton.cdiv(D, splits), bd) * bd
    splits = triton.cdiv(D, d_per_split)
    br = _block_r(R)
    _k(_up_bwd_kernel, wrap)[(m_blocks, splits)](
        dy, u, b_down, w_up, b_up, coef if coef is not None else u, dh, dw, dbu, dcb,
        M, D, R, float(scale), d_per_split, dy.stride(0), u.stride(0), w_up.stride(0), dh.stride(0), dw.stride(0),
        ACT=act, HAS_COEF=coef is not None, UPCAST=INTERPRET, PRECISION=_precision(dy.dtype),
        BLOCK_M=bm, BLOCK_D=bd, BLOCK_R=br, num_warps=4 if br <= 64 or INTERPRET else 8,
    )
    return dh, dw, dbu, dcb


def _act_torch(h: Tensor, act: int) -> Tensor:
    if act == 1:
        return torch.relu(h)
    if act == 2:
        return torch.nn.functional.gelu(h)
    if act == 3:
        return torch.nn.functional.silu(h)
    if act == 4:
        return torch.tanh(h)
    return h


def _act_grad(h: Tensor, act: int) -> Tensor:
    """f'(h), elementwise (tokens × m)."""
    if act == 1:
        return (h > 0).to(h.dtype)
    if act == 2:
        cdf = 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
        return cdf + h * torch.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
    if act == 3:
        s = torch.sigmoid(h)
        return s * (1 + h * (1 - s))
    if act == 4:
        return 1 - torch.tanh(h) ** 2
    return torch.ones_like(h)


@torch.library.custom_op("unipelt::bottleneck_up", mutates_args=())
def _up_op(out: Tensor, u: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, coef: Optional[Tensor],
           scale: float, act: int) -> Tensor:
    return _launch_fwd(out, u, b_down, w_up, b_up, coef, scale, act)


@_up_op.register_fake
def _(out, u, b_down, w_up, b_up, coef, scale, act):
    return torch.empty_like(out)


@torch.library.custom_op("unipelt::bottleneck_up_bwd", mutates_args=())
def _up_bwd_op(dy: Tensor, u: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, coef: Optional[Tensor],
               scale: float, act: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _launch_bwd(dy, u, b_down, w_up, b_up, coef, scale, act)


@_up_bwd_op.register_fake
def _(dy, u, b_down, w_up, b_up, coef, scale, act):
    f = dict(dtype=torch.float32)
    return (u.new_empty(u.shape, **f), w_up.new_empty(w_up.shape, **f), b_up.new_empty(b_up.shape, **f),
            dy.new_empty(dy.shape[0], **f))


def _setup(ctx, inputs, output):
    out, u, b_down, w_up, b_up, coef, scale, act = inputs
    ctx.save_for_backward(u, b_down, w_up, b_up, coef)
    ctx.scale, ctx.act, ctx.has_coef = scale, act, coef is not None


def _backward(ctx, dy, bwd=_up_bwd_op):
    u, b_down, w_up, b_up, coef = ctx.saved_tensors
    coef = coef if ctx.has_coef else None
    dh, dw, dbu, dcb = bwd(dy.contiguous(), u, b_down, w_up, b_up, coef, ctx.scale, ctx.act)
    pre = u.float() + b_down.float()
    cs = ctx.scale * (coef.float()[:, None] if coef is not None else 1.0)
    dpre = dh * cs * _act_grad(pre, ctx.act)
    dcoef = None
    if coef is not None:
        # the gate multiplies f·W_upᵀ + b_up: Σ_d dY ⊙ (that) = Σ_m dh ⊙ f + Σ_d dY ⊙ b_up
        dcoef = (ctx.scale * ((dh * _act_torch(pre, ctx.act)).sum(1) + dcb)).to(coef.dtype)
    return (dy, dpre.to(u.dtype), dpre.sum(0).to(b_down.dtype), dw.to(w_up.dtype), dbu.to(b_up.dtype), dcoef,
            None, None)


_up_op.register_autograd(_backward, setup_context=_setup)


# the same two ops as ``triton_op``s, for compiled forwards on CUDA (unipelt_kernels.compiled_ops):
# inductor traces their bodies, sees the kernels (``wrap_triton``) and launches them from its own
# generated code instead of calling an opaque op through the dispatcher and Triton's Python launcher
@torch.library.triton_op("unipelt::bottleneck_up_t", mutates_args=())
def _up_top(out: Tensor, u: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, coef: Optional[Tensor],
            scale: float, act: int) -> Tensor:
    return _launch_fwd(out, u, b_down, w_up, b_up, coef, scale, act, torch.library.wrap_triton)


@torch.library.triton_op("unipelt::bottleneck_up_bwd_t", mutates_args=())
def _up_bwd_top(dy: Tensor, u: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, coef: Optional[Tensor],
                scale: float, act: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _launch_bwd(dy, u, b_down, w_up, b_up, coef, scale, act, torch.library.wrap_triton)


def _top_backward(ctx, dy):
    return _backward(ctx, dy, bwd=_up_bwd_top)


_up_top.register_autograd(_top_backward, setup_context=_setup)


def bottleneck_up(out: Tensor, u: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, gate: Tensor | None = None,
                  scale: float = 1.0, activation: str = "relu") -> Tensor:
    """out + scale·g·(f(u + b_down)·W_upᵀ + b_up) in one pass: out (..., d), u = x·W_downᵀ
    (..., m), W_up (d, m), gate None or broadcastable to (..., 1)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"bottleneck_up: activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    D, R = w_up.shape
    if out.shape[-1] != D or u.shape[-1] != R or u.shape[:-1] != out.shape[:-1]:
        raise ValueError(f"bottleneck_up: out {tuple(out.shape)}, u {tuple(u.shape)}, W_up {tuple(w_up.shape)} "
                         f"(needs out (..., d), u (..., m), W_up (d, m))")
    out2 = out.reshape(-1, D)
    if out2.stride(-1) != 1:
        out2 = out2.contiguous()
    u2 = u.reshape(-1, R)
    if u2.stride(-1) != 1:
        u2 = u2.contiguous()
    coef = gate.expand(*u.shape[:-1], 1).reshape(-1).contiguous() if gate is not None else None
    dt = out.dtype
    # eager and compiled off CUDA: the custom op; compiled on CUDA: its triton_op twin (inductor
    # launches the kernels)
    op = _up_top if torch.compiler.is_compiling() and compiled_ops(out2) else _up_op
    y = op(out2, u2, b_down.to(dt).contiguous(), w_up.to(dt).contiguous(), b_up.to(dt).contiguous(), coef,
           float(scale), ACTIVATIONS[activation])
    return y.view(out.shape)


def reference_up(out, u, b_down, w_up, b_up, gate=None, scale=1.0, activation="relu"):
    h = _act_torch(u + b_down, ACTIVATIONS[activation]) @ w_up.t() + b_up
    h = h * scale
    return out + (h if gate is None else h * gate)
