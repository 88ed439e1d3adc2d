"""Fused Triton kernels for one LoRA fusion group (PERFORMANCE.md, "Where the speed comes from").

Shrink: z = dropout_s(x)·[A_1 | … | A_k | W_g]ᵀ for every reader of one tensor x, in one launch,
with the gates' sigmoid(z + b) in the epilogue. Columns come in *segments*: each dropout branch
is a segment of its own (its mask differs), all dropout-free columns share one; a program computes
one tile of one segment over the whole of K, so x is read once per segment tile (once in all for a
group without dropout and with at most ``MAX_BLOCK_N`` columns).

Expand: y = out + s·(g ⊙ u)·Bᵀ in one pass over the base output (read ``out``, write ``y``: the
addmm of the reference, with the gate and scale applied to the r-wide u inside the kernel).

Backward saves only tokens × r tensors (u, z), never B·A: the expand backward computes dU = s·c ⊙
(dY·B) with the gate's gradient in the same kernel's epilogue, and dB = dYᵀ·v over shares of the
token rows summed in a fixed order (no atomics; ``BWD_MODE`` keeps the one-read atomic variant for
comparison); the shrink backward produces ONE dX = Σ_seg mask_seg ⊙ (dz_seg·W_seg)/(1-p) and
dW = dzᵀ·dropout(x), regenerating each dropout mask from the seed (``tl.rand(seed + segment,
row·K + col)``), never storing it, and applies the gates' sigmoid derivative as it loads dz.

Three layers (STYLE.md 12): private ``@triton.jit`` kernels, launchers that check shapes and set
the grid, and custom ops (``torch.library.custom_op`` + ``register_autograd``) exported as plain
functions, so ``torch.compile(fullgraph=True)`` captures them as opaque nodes; on CUDA a compiled
forward calls their ``torch.library.triton_op`` twins instead, whose kernels inductor launches from
its own code (``UNIPELT_KERNEL_OPS=custom_op`` keeps the opaque ops). The pure-PyTorch
reference is :func:`reference_shrink` / :func:`reference_expand` here and ``unipelt.executor.
GroupExecutor`` in the engine.

Under ``TRITON_INTERPRET=1`` (CPU): bf16 is upcast right after ``tl.load`` (the interpreter has no
bf16 arithmetic) and fixed block sizes replace tuning (docs/ENVIRONMENT.md).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

# which ops a compiled forward calls (the triton_op twins on CUDA unless UNIPELT_KERNEL_OPS says
# custom_op): one rule for every kernel module
from unipelt_kernels.compiled_ops import compiled_ops as _compiled_ops
from unipelt_kernels.compiled_ops import ops_choice as _ops_choice  # noqa: F401 - the tests' handle

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_BLOCK_N = 256  # widest shrink tile: wider segments are split into tiles (x read once per tile)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# How the expand backward runs (and, for ``gemm``, the shrink backward's mask-free products), for
# benchmarking the alternatives on a GPU (benchmarks/kernels.py): ``split`` (default): two kernels
# without atomics, dU = s·c·(dY·B) with the gate's gradient in its epilogue (one program owns a row
# block across all of D) and dB = dYᵀ·v over shares of the rows summed in a fixed order
# (deterministic; dY read twice); ``fused``: dY read once for both, dB added across the row blocks
# by fp32 atomics (the H200 profile: 62 µs at 8,192 × 4096, r 16, about 1 TB/s); ``gemm``: the
# same products as cuBLAS matrix products where no mask is involved.
BWD_MODES = ("split", "fused", "gemm")
BWD_MODE = os.environ.get("UNIPELT_KERNEL_BWD", "split")
if BWD_MODE not in BWD_MODES:
    raise ValueError(f"UNIPELT_KERNEL_BWD={BWD_MODE!r}: expected one of {', '.join(BWD_MODES)}")


# ------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------
@triton.jit
def _keep(seed, seg, rows, cols, K, p):
    # the dropout mask of one segment, regenerated identically in forward and backward
    r = tl.rand(seed + seg, rows[:, None] * K + cols[None, :])
    return r >= p


@triton.jit
def _tile(t, NT: tl.constexpr, TC0: tl.constexpr, TNC: tl.constexpr, TSEG: tl.constexpr, TP: tl.constexpr):
    # (first column, width, segment, dropout p) of tile t (a runtime program id). The table is a
    # compile-time constant, not a device tensor: a cached device tensor first made during a
    # CUDA-graph warm-up lives in that graph's memory pool untracked, which reduce-overhead
    # rejects ("tensor(s) in the cudagraph pool not tracked as outputs")
    c0 = t * 0
    nc = t * 0
    seg = t * 0
    p = (t * 0).to(tl.float32)
    for i in tl.static_range(NT):
        hit = t == i
        c0 = tl.where(hit, TC0[i], c0)
        nc = tl.where(hit, TNC[i], nc)
        seg = tl.where(hit, TSEG[i], seg)
        p = tl.where(hit, TP[i], p)
    return c0, nc, seg, p


@triton.jit
def _through_sigmoid(dz, z_ptr, rows, cols, row_ok, col_ok, act_start, stride_zm):
    # dz·σ(1-σ) on the activated columns (z holds σ there), dz elsewhere; fp32 (BLOCK_M, BLOCK_N)
    act = (cols >= act_start) & col_ok
    s = tl.load(z_ptr + rows[:, None] * stride_zm + cols[None, :], mask=row_ok[:, None] & act[None, :], other=0.0)
    s = s.to(tl.float32)
    dzf = dz.to(tl.float32)
    return tl.where(act[None, :], dzf * s * (1.0 - s), dzf)


@triton.jit
def _shrink_fwd_kernel(
    x_ptr, w_ptr, b_ptr, z_ptr, seed_ptr,
    M, K, N, act_start, stride_xm, stride_wn, stride_zm,
    NT: tl.constexpr, TC0: tl.constexpr, TNC: tl.constexpr, TSEG: tl.constexpr, TP: tl.constexpr,
    HAS_DROP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    c0, nc, seg, p = _tile(tl.program_id(1), NT, TC0, TNC, TSEG, TP)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    cols = c0 + rn
    row_ok = rows < M
    col_ok = rn < nc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    seed = 0
    if HAS_DROP:
        seed = tl.load(seed_ptr)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_wn + kk[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if HAS_DROP:
            if p > 0.0:
                keep = _keep(seed, seg, rows, kk, K, p)
                x = tl.where(keep, x.to(tl.float32) * (1.0 / (1.0 - p)), 0.0).to(w.dtype)
        acc += tl.dot(x, w, input_precision=PRECISION)
    # epilogue: the gates' bias and sigmoid (columns from act_start on)
    act = cols >= act_start
    b = tl.load(b_ptr + (cols - act_start), mask=act & col_ok, other=0.0).to(tl.float32)
    acc = tl.where(act[None, :], tl.sigmoid(acc + b[None, :]), acc)
    tl.store(z_ptr + rows[:, None] * stride_zm + cols[None, :], acc.to(z_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _shrink_dx_kernel(
    dz_ptr, z_ptr, w_ptr, dx_ptr, seed_ptr,
    M, K, act_start, stride_dzm, stride_zm, stride_wn, stride_dxm,
    NT: tl.constexpr, TC0: tl.constexpr, TNC: tl.constexpr, TSEG: tl.constexpr, TP: tl.constexpr,
    HAS_DROP: tl.constexpr, HAS_ACT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # ONE dX for every member of the group: the segments' products summed in registers
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    k_ok = kk < K
    rn = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    seed = 0
    if HAS_DROP:
        seed = tl.load(seed_ptr)
    for t in tl.static_range(NT):  # every tile, unrolled: the table is compile-time
        c0 = TC0[t]
        nc = TNC[t]
        seg = TSEG[t]
        p = TP[t]
        cols = c0 + rn
        col_ok = rn < nc
        dz = tl.load(dz_ptr + rows[:, None] * stride_dzm + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wn + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_ACT:
            dz = _through_sigmoid(dz, z_ptr, rows, cols, row_ok, col_ok, act_start, stride_zm).to(w.dtype)
        if UPCAST:
            dz = dz.to(tl.float32)
            w = w.to(tl.float32)
        part = tl.dot(dz.to(w.dtype), w, input_precision=PRECISION)
        if HAS_DROP:
            if p > 0.0:
                keep = _keep(seed, seg, rows, kk, K, p)
                part = tl.where(keep, part * (1.0 / (1.0 - p)), 0.0)
        acc += part
    tl.store(dx_ptr + rows[:, None] * stride_dxm + kk[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def _shrink_dw_kernel(
    dz_ptr, z_ptr, x_ptr, dw_ptr, db_ptr, seed_ptr,
    M, K, rows_per_split, act_start, stride_dzm, stride_zm, stride_xm, stride_dwn,
    NT: tl.constexpr, TC0: tl.constexpr, TNC: tl.constexpr, TSEG: tl.constexpr, TP: tl.constexpr,
    HAS_DROP: tl.constexpr, HAS_ACT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # dW_tile = dz_tileᵀ · dropout(x) over a share of the rows, added into an fp32 buffer
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    c0, nc, seg, p = _tile(tl.program_id(0), NT, TC0, TNC, TSEG, TP)
    rn = tl.arange(0, BLOCK_N)
    cols = c0 + rn
    col_ok = rn < nc
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = kk < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    seed = 0
    if HAS_DROP:
        seed = tl.load(seed_ptr)
    start = split * rows_per_split
    for m0 in range(start, start + rows_per_split, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = (rows < M) & (rows < start + rows_per_split)
        dz = tl.load(dz_ptr + rows[None, :] * stride_dzm + cols[:, None], mask=col_ok[:, None] & row_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_ACT:  # _through_sigmoid on this transposed (columns, rows) tile
            act = (cols >= act_start) & col_ok
            s = tl.load(z_ptr + rows[None, :] * stride_zm + cols[:, None], mask=act[:, None] & row_ok[None, :],
                        other=0.0).to(tl.float32)
            dzf = tl.where(act[:, None], dz.to(tl.float32) * s * (1.0 - s), dz.to(tl.float32))
            dbias += tl.sum(dzf, axis=1)
            dz = dzf
        dz = dz.to(x.dtype)
        if UPCAST:
            dz = dz.to(tl.float32)
            x = x.to(tl.float32)
        if HAS_DROP:
            if p > 0.0:
                keep = _keep(seed, seg, rows, kk, K, p)
                x = tl.where(keep, x.to(tl.float32) * (1.0 / (1.0 - p)), 0.0).to(dz.dtype)
        acc += tl.dot(dz, x, input_precision=PRECISION)
    tl.atomic_add(dw_ptr + cols[:, None] * stride_dwn + kk[None, :], acc, mask=col_ok[:, None] & k_ok[None, :])
    if HAS_ACT:
        if pid_k == 0:  # one K block adds the bias gradient of its rows (split programs: atomics)
            tl.atomic_add(db_ptr + cols, dbias, mask=col_ok & (cols >= act_start))


@triton.jit
def _expand_fwd_kernel(
    out_ptr, u_ptr, b_ptr, c_ptr, y_ptr,
    M, D, R, scale, stride_om, stride_um, stride_bd, stride_ym, stride_c,
    HAS_COEF: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
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
    v = u * scale
    if HAS_COEF:
        c = tl.load(c_ptr + rows * stride_c, mask=row_ok, other=0.0).to(tl.float32)
        v = v * c[:, None]
    bt = tl.load(b_ptr + dd[None, :] * stride_bd + rr[:, None], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        bt = bt.to(tl.float32)
    else:
        v = v.to(bt.dtype)
    o_mask = row_ok[:, None] & d_ok[None, :]
    acc = tl.load(out_ptr + rows[:, None] * stride_om + dd[None, :], mask=o_mask, other=0.0).to(tl.float32)
    acc += tl.dot(v, bt, input_precision=PRECISION)
    tl.store(y_ptr + rows[:, None] * stride_ym + dd[None, :], acc.to(y_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _expand_bwd_kernel(
    dy_ptr, u_ptr, b_ptr, c_ptr, dh_ptr, db_ptr,
    M, D, R, scale, d_per_split, stride_dym, stride_um, stride_bd, stride_dhm, stride_dbd, stride_c,
    HAS_COEF: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # one read of dY for both products: dh = dY·B (this program's share of D, added into an fp32
    # buffer) and dB += vᵀ·dY with v = s·c ⊙ u (added across row blocks)
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    r_ok = rr < R
    u = tl.load(u_ptr + rows[:, None] * stride_um + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
    v = u * scale
    if HAS_COEF:
        c = tl.load(c_ptr + rows * stride_c, mask=row_ok, other=0.0).to(tl.float32)
        v = v * c[:, None]
    vt = tl.trans(v)
    dh = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    d_start = split * d_per_split
    for d0 in range(d_start, d_start + d_per_split, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = (dd < D) & (dd < d_start + d_per_split)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(b_ptr + dd[:, None] * stride_bd + rr[None, :], mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            dy = dy.to(tl.float32)
            b = b.to(tl.float32)
            vt_d = vt
        else:
            vt_d = vt.to(dy.dtype)
        dh += tl.dot(dy, b, input_precision=PRECISION)
        db = tl.dot(vt_d, dy, input_precision=PRECISION)  # (R, D-block)
        tl.atomic_add(db_ptr + dd[None, :] * stride_dbd + rr[:, None], db, mask=r_ok[:, None] & d_ok[None, :])
    tl.atomic_add(dh_ptr + rows[:, None] * stride_dhm + rr[None, :], dh, mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _expand_dh_kernel(
    dy_ptr, u_ptr, b_ptr, c_ptr, du_ptr, dc_ptr, part_ptr, db_ptr,
    M, D, R, scale, m_programs, n_shares, stride_dym, stride_um, stride_bd, stride_dum, stride_c,
    stride_ps, stride_pd, stride_dbd,
    HAS_COEF: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DS: tl.constexpr,
):
    # programs below m_programs: dh = dY·B over the whole of D for one row block (no atomics), then
    # the epilogue: du = s·c·dh in u's dtype and the gate's gradient s·Σ_r dh ⊙ u. The programs
    # after them finish dB: the fp32 row shares _expand_db_kernel (launched first) wrote, summed in
    # a fixed order and stored in B's dtype -- in this launch rather than a torch sum and a cast
    # (two more kernels per expand backward: about 5 us the pair in llama's step on an H200, session 9)
    pid = tl.program_id(0)
    if pid >= m_programs:
        dd = (pid - m_programs) * BLOCK_DS + tl.arange(0, BLOCK_DS)
        rr = tl.arange(0, BLOCK_R)
        dm = (dd < D)[:, None] & (rr < R)[None, :]
        acc = tl.zeros((BLOCK_DS, BLOCK_R), dtype=tl.float32)
        for s in range(0, n_shares):
            acc += tl.load(part_ptr + s * stride_ps + dd[:, None] * stride_pd + rr[None, :], mask=dm, other=0.0)
        tl.store(db_ptr + dd[:, None] * stride_dbd + rr[None, :], acc.to(db_ptr.dtype.element_ty), mask=dm)
    else:
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, BLOCK_R)
        row_ok = rows < M
        r_ok = rr < R
        dh = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            dy = tl.load(dy_ptr + rows[:, None] * stride_dym + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            b = tl.load(b_ptr + dd[:, None] * stride_bd + rr[None, :], mask=d_ok[:, None] & r_ok[None, :], other=0.0)
            if UPCAST:
                dy = dy.to(tl.float32)
                b = b.to(tl.float32)
            dh += tl.dot(dy, b.to(dy.dtype), input_precision=PRECISION)
        um = row_ok[:, None] & r_ok[None, :]
        du = dh * scale
        if HAS_COEF:
            c = tl.load(c_ptr + rows * stride_c, mask=row_ok, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + rows[:, None] * stride_um + rr[None, :], mask=um, other=0.0).to(tl.float32)
            tl.store(dc_ptr + rows, (tl.sum(dh * u, axis=1) * scale).to(dc_ptr.dtype.element_ty), mask=row_ok)
            du = du * c[:, None]
        tl.store(du_ptr + rows[:, None] * stride_dum + rr[None, :], du.to(du_ptr.dtype.element_ty), mask=um)


@triton.jit
def _expand_db_kernel(
    dy_ptr, u_ptr, c_ptr, db_ptr,
    M, D, R, scale, rows_per_split, stride_dym, stride_um, stride_c, stride_dbs, stride_dbd,
    HAS_COEF: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # dB (a D block) = dYᵀ·v over one share of the token rows, v = s·c ⊙ u; each share writes
    # its own slice of the output (no atomics: the shares are summed afterwards, in a fixed order)
    pid_d = tl.program_id(0)
    split = tl.program_id(1)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rr = tl.arange(0, BLOCK_R)
    d_ok = dd < D
    r_ok = rr < R
    acc = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
    start = split * rows_per_split
    for m0 in range(start, start + rows_per_split, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = (rows < M) & (rows < start + rows_per_split)
        dyt = tl.load(dy_ptr + rows[None, :] * stride_dym + dd[:, None], mask=d_ok[:, None] & row_ok[None, :], other=0.0)
        v = tl.load(u_ptr + rows[:, None] * stride_um + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        v = v.to(tl.float32) * scale
        if HAS_COEF:
            c = tl.load(c_ptr + rows * stride_c, mask=row_ok, other=0.0).to(tl.float32)
            v = v * c[:, None]
        if UPCAST:
            dyt = dyt.to(tl.float32)
        acc += tl.dot(dyt, v.to(dyt.dtype), input_precision=PRECISION)
    tl.store(db_ptr + split * stride_dbs + dd[:, None] * stride_dbd + rr[None, :], acc.to(db_ptr.dtype.element_ty),
             mask=d_ok[:, None] & r_ok[None, :])


@triton.jit
def _mask_kernel(seed_ptr, out_ptr, M, K, seg, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep(tl.load(seed_ptr), seg, rows, kk, K, p)
    tl.store(out_ptr + rows[:, None] * K + kk[None, :], keep.to(tl.int8), mask=(rows < M)[:, None] & (kk < K)[None, :])


# ------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Blocks:
    m: int
    k: int
    warps: int
    stages: int = 3


# fixed configurations per kernel (no autotune: it needs a GPU driver, and the interpreter costs
# ~1 ms per program instance, so it gets big blocks); chosen on the H200 by benchmarks/kernels.py
# --sweep (RESULTS.md)
CONFIGS: dict[str, _Blocks] = {
    # the blocks whose GPU time was profiled on the H200 (benchmarks/RESULTS.md, Kernels: 8,192 x
    # 4096, r 16, two branches and gates, bf16: shrink 34 us, dX 31 us, dW 41 us, expand 35 us,
    # expand backward 62 us). benchmarks/kernels.py --sweep's timings of other blocks were bound by
    # that host's launch work (every candidate 0.05-0.18 ms), so they chose nothing and are not used.
    # Session 9: shrink, dW and expand_dh re-chosen by benchmarks/kernel_sweep.py (every candidate
    # timed from a CUDA graph at llama's shapes, 4,096 tokens, launch-weighted; RESULTS.md, Kernels,
    # session 9): shrink 32x64 -> 64x256 (10.0 -> 8.0 us for a q,k,v group), dW 64x64 -> 64x32 with 4
    # stages, expand_dh 32x128 -> 32x256 with 4 stages (dh + dB at 5,632 wide: 35.6 -> 25.9 us)
    "shrink": _Blocks(64, 256, 4), "dx": _Blocks(64, 64, 4), "dw": _Blocks(64, 32, 4, 4),
    "expand": _Blocks(64, 128, 4), "expand_bwd": _Blocks(64, 64, 4),
    # the split expand backward (BWD_MODE "split"): dh over all of D per 32-row block (256
    # programs at 8,192 tokens), dB per 64-wide D block over a share of the rows
    "expand_dh": _Blocks(32, 256, 4, 4), "expand_db": _Blocks(128, 64, 4),
    # the shrink, dX and dW with dropout segments keep the blocks they had before session 9's re-choice
    # (which timed dropout-free launches only): with a mask drawn per element, llama lora-r16-all-d01
    # on the kernels went from 27.14 ms (session 7, these blocks) to 36.86 ms (session 12, shrink
    # 64x256, dW 64x32; reduce-overhead, RESULTS.md, Kernels, session 12)
    "shrink_drop": _Blocks(32, 64, 4), "dx_drop": _Blocks(64, 64, 4), "dw_drop": _Blocks(64, 64, 4),
}


def load_configs(path: str) -> dict[str, _Blocks]:
    """Block overrides from a JSON file ``{kind: [m, k, warps, stages]}`` (what
    ``benchmarks/kernel_sweep.py --write-best`` writes), checked against the known kinds."""
    import json

    try:
        raw = json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the kernel block overrides ({exc})") from None
    out = {}
    for kind, v in (raw.items() if isinstance(raw, dict) else [(None, raw)]):
        if kind not in CONFIGS:
            raise ValueError(f"{path}: {kind!r}: unknown kernel (expected one of {', '.join(CONFIGS)})")
        if not (isinstance(v, list) and len(v) == 4 and all(isinstance(i, int) and i > 0 for i in v)):
            raise ValueError(f"{path}: {kind}: expected [m, k, warps, stages] (positive integers), got {v!r}")
        out[kind] = _Blocks(*v)
    return out


if os.environ.get("UNIPELT_KERNEL_CONFIGS"):
    CONFIGS.update(load_configs(os.environ["UNIPELT_KERNEL_CONFIGS"]))


def _blocks(kind: str) -> _Blocks:
    if INTERPRET:
        return _Blocks(m=64, k=64, warps=4)
    return CONFIGS[kind]


# shared memory a kernel's pipelined loads may take: the H100/H200 limit is 232,448 bytes per block
# (227 KiB), and Triton asked exactly stages x (m + n) x k x 2 bytes for the bf16 shrink in the
# sweep (262,144 for 64 x 256, n 64, 4 stages: refused), so the estimate below is that sum
SMEM_BUDGET = 224 * 1024


def _fit(bl: _Blocks, stage_bytes) -> _Blocks:
    """``bl`` with its K block (then its stages) reduced until ``stages * stage_bytes(k)`` fits the
    shared memory: the blocks are chosen for bf16 and r <= 16, and a wider group (r 64, several
    branches: a 128- or 256-wide N block) or fp32 inputs would otherwise fail to launch."""
    k, stages = bl.k, bl.stages
    while stages * stage_bytes(k) > SMEM_BUDGET and (k > 32 or stages > 2):
        if k > 32:
            k //= 2
        else:
            stages -= 1
    return bl if (k, stages) == (bl.k, bl.stages) else _Blocks(bl.m, k, bl.warps, stages)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products as the reference's (TF32 off by default in torch)
    return "ieee" if dtype == torch.float32 or INTERPRET else "tf32"


@dataclass(frozen=True)
class _Tiles:
    """The shrink's tile table as compile-time kernel arguments: per tile its first column, width,
    segment and that segment's dropout p. No device tensor is kept between calls (see ``_tile``)."""
    c0: tuple[int, ...]
    nc: tuple[int, ...]
    seg: tuple[int, ...]
    p: tuple[float, ...]
    block_n: int

    @property
    def n(self) -> int:
        return len(self.c0)

    def kwargs(self) -> dict:
        return {"NT": self.n, "TC0": self.c0, "TNC": self.nc, "TSEG": self.seg, "TP": self.p}


@functools.lru_cache(maxsize=256)
def _tiles(seg_widths: tuple[int, ...], seg_p: tuple[float, ...]) -> _Tiles:
    """The tiles (col start, width, segment, p) covering the segments, each at most ``block_n`` wide."""
    block_n = min(MAX_BLOCK_N, max(16, triton.next_power_of_2(max(seg_widths))))
    rows, at = [], 0
    for s, w in enumerate(seg_widths):
        for c in range(0, w, block_n):
            rows.append((at + c, min(block_n, w - c), s, float(seg_p[s])))
        at += w
    c0, nc, seg, p = zip(*rows)
    return _Tiles(c0, nc, seg, p, block_n)


def _check_segments(name: str, n: int, seg_widths: list[int], seg_p: list[float]) -> None:
    if len(seg_widths) != len(seg_p) or sum(seg_widths) != n or any(w < 1 for w in seg_widths):
        raise ValueError(f"{name}: segments {seg_widths} (p {seg_p}) do not cover the {n} columns of the weight")
    if any(not 0.0 <= p < 1.0 for p in seg_p):
        raise ValueError(f"{name}: dropout probabilities must lie in [0, 1), got {seg_p}")


def _has_drop(seg_p: list[float], seed: Tensor | None) -> bool:
    return seed is not None and any(p > 0 for p in seg_p)


def _k(kernel, wrap):
    # a kernel as the launchers call it: directly, or through ``torch.library.wrap_triton`` inside a
    # ``triton_op`` (so that inductor sees the kernel and launches it from its own wrapper code)
    return kernel if wrap is None else wrap(kernel)


def _launch_shrink(x: Tensor, w: Tensor, bias: Tensor, act_start: int, seg_widths: list[int],
                   seg_p: list[float], seed: Tensor | None, wrap=None) -> Tensor:
    M, K = x.shape
    N = w.shape[0]
    if w.shape[1] != K:
        raise ValueError(f"lora_shrink: x is {tuple(x.shape)} but the weight is {tuple(w.shape)} (needs (N, {K}))")
    if bias.numel() != N - act_start:
        raise ValueError(f"lora_shrink: {N - act_start} activated columns but a bias of {bias.numel()}")
    _check_segments("lora_shrink", N, seg_widths, seg_p)
    tiles = _tiles(tuple(seg_widths), tuple(seg_p))
    block_n = tiles.block_n
    z = torch.empty(M, N, device=x.device, dtype=x.dtype)
    has_drop = _has_drop(seg_p, seed)
    bl0 = _blocks("shrink_drop" if has_drop else "shrink")
    bl = _fit(bl0, lambda k: (bl0.m + block_n) * k * x.element_size())
    grid = (triton.cdiv(M, bl.m), tiles.n)
    warps = bl.warps if block_n < 128 or INTERPRET else 8
    _k(_shrink_fwd_kernel, wrap)[grid](
        x, w, bias, z, seed if has_drop else z,
        M, K, N, act_start, x.stride(0), w.stride(0), z.stride(0), **tiles.kwargs(),
        HAS_DROP=has_drop, UPCAST=INTERPRET, PRECISION=_precision(x.dtype),
        BLOCK_M=bl.m, BLOCK_N=block_n, BLOCK_K=bl.k, num_warps=warps, num_stages=bl.stages,
    )
    return z


def _launch_shrink_bwd(dz: Tensor, x: Tensor, w: Tensor, z: Tensor, act_start: int, seg_widths: list[int],
                       seg_p: list[float], seed: Tensor | None, wrap=None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dX, dW in fp32, the activated columns' bias gradient in fp32 or None). The gates' sigmoid
    derivative dz·σ(1-σ) is applied inside both kernels as they load dz (z holds σ there), and the
    bias gradient (its column sums) comes out of the dW kernel: no dz-sized copy in PyTorch."""
    M, K = x.shape
    N = w.shape[0]
    tiles = _tiles(tuple(seg_widths), tuple(seg_p))
    block_n = tiles.block_n
    has_drop = _has_drop(seg_p, seed)
    has_act = act_start < N
    if BWD_MODE == "gemm" and not has_drop:
        dzf = dz.float()
        db = None
        if has_act:
            s = z[:, act_start:].float()
            dzf = torch.cat([dzf[:, :act_start], dzf[:, act_start:] * s * (1 - s)], 1)
            db = dzf[:, act_start:].sum(0)
        dzp = dzf.to(x.dtype)
        return dzp @ w, (dzp.t() @ x).float(), db
    seed_arg = seed if has_drop else dz
    prec = _precision(x.dtype)
    dx = torch.empty_like(x)
    bl = _blocks("dx_drop" if has_drop else "dx")
    _k(_shrink_dx_kernel, wrap)[(triton.cdiv(M, bl.m), triton.cdiv(K, bl.k))](
        dz, z, w, dx, seed_arg, M, K, act_start, dz.stride(0), z.stride(0), w.stride(0),
        dx.stride(0), **tiles.kwargs(),
        HAS_DROP=has_drop, HAS_ACT=has_act, UPCAST=INTERPRET, PRECISION=prec,
        BLOCK_M=bl.m, BLOCK_N=block_n, BLOCK_K=bl.k, num_warps=bl.warps, num_stages=bl.stages,
    )
    # dW and the bias gradient in one fp32 buffer (one memset): dW's N × K, then N bias slots
    buf = torch.zeros(N * K + (N if has_act else 0), device=x.device, dtype=torch.float32)
    dw = buf[:N * K].view(N, K)
    db_all = buf[N * K:] if has_act else buf
    bl0 = _blocks("dw_drop" if has_drop else "dw")
    bl = _fit(bl0, lambda k: bl0.m * (block_n + k) * x.element_size())
    k_blocks = triton.cdiv(K, bl.k)
    # enough programs to fill the card: split the token rows when tiles × K blocks are few
    splits = 1 if INTERPRET else max(1, min(triton.cdiv(M, 4 * bl.m), triton.cdiv(528, tiles.n * k_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), bl.m) * bl.m
    splits = triton.cdiv(M, rows_per_split)
    _k(_shrink_dw_kernel, wrap)[(tiles.n, k_blocks, splits)](
        dz, z, x, dw, db_all, seed_arg, M, K, rows_per_split, act_start, dz.stride(0), z.stride(0),
        x.stride(0), dw.stride(0), **tiles.kwargs(),
        HAS_DROP=has_drop, HAS_ACT=has_act, UPCAST=INTERPRET, PRECISION=prec,
        BLOCK_M=bl.m, BLOCK_N=block_n, BLOCK_K=bl.k, num_warps=bl.warps if block_n < 128 or INTERPRET else 8,
        num_stages=bl.stages,
    )
    return dx, dw, (db_all[act_start:] if has_act else None)


# D rows of dB per summing program of the split backward (``_expand_dh_kernel``'s extra programs)
DB_SUM_BLOCK = 64


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _launch_expand(out: Tensor, u: Tensor, b: Tensor, coef: Tensor | None, scale: float, wrap=None) -> Tensor:
    M, D = out.shape
    R = u.shape[1]
    if u.shape[0] != M or b.shape != (D, R):
        raise ValueError(f"lora_expand: out {tuple(out.shape)}, u {tuple(u.shape)}, B {tuple(b.shape)} "
                         f"(needs u (M, r) and B (D, r))")
    if coef is not None and coef.numel() != M:
        raise ValueError(f"lora_expand: {M} tokens but {coef.numel()} gate values")
    y = torch.empty_like(out)
    bl = _blocks("expand")
    grid = (triton.cdiv(M, bl.m), triton.cdiv(D, bl.k))
    _k(_expand_fwd_kernel, wrap)[grid](
        out, u, b, coef if coef is not None else u, y, M, D, R, float(scale),
        out.stride(0), u.stride(0), b.stride(0), y.stride(0), coef.stride(0) if coef is not None else 0,
        HAS_COEF=coef is not None, UPCAST=INTERPRET, PRECISION=_precision(out.dtype),
        BLOCK_M=bl.m, BLOCK_D=bl.k, BLOCK_R=_block_r(R), num_warps=bl.warps, num_stages=bl.stages,
    )
    return y


def _launch_expand_bwd(dy: Tensor, u: Tensor, b: Tensor, coef: Tensor | None,
                       scale: float, wrap=None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(du in u's dtype, dB in B's dtype, the gate's gradient in its dtype or None), by BWD_MODE."""
    M, D = dy.shape
    R = u.shape[1]
    has_coef = coef is not None
    c_arg, c_stride = (coef, coef.stride(0)) if has_coef else (u, 0)
    prec = _precision(dy.dtype)
    if BWD_MODE == "split":
        du = torch.empty_like(u, memory_format=torch.contiguous_format)
        dc = torch.empty(M, device=dy.device, dtype=coef.dtype) if has_coef else None
        bl = _blocks("expand_db")
        d_blocks = triton.cdiv(D, bl.k)
        # token-row shares so that the D blocks × shares fill the card; one share writes dB itself.
        # Under the interpreter two shares where the rows allow, so that the tests sum shares too
        splits = (min(2, triton.cdiv(M, bl.m)) if INTERPRET
                  else max(1, min(triton.cdiv(M, 2 * bl.m), triton.cdiv(264, d_blocks))))
        rows_per_split = triton.cdiv(triton.cdiv(M, splits), bl.m) * bl.m
        splits = triton.cdiv(M, rows_per_split)
        db = torch.empty((D, R), device=dy.device, dtype=b.dtype)
        part = torch.empty((splits, D, R), device=dy.device, dtype=torch.float32) if splits > 1 else db[None]
        _k(_expand_db_kernel, wrap)[(d_blocks, splits)](
            dy, u, c_arg, part, M, D, R, float(scale), rows_per_split,
            dy.stride(0), u.stride(0), c_stride, part.stride(0), part.stride(1),
            HAS_COEF=has_coef, UPCAST=INTERPRET, PRECISION=prec,
            BLOCK_M=bl.m, BLOCK_D=bl.k, BLOCK_R=_block_r(R), num_warps=bl.warps, num_stages=bl.stages,
        )
        bl0 = _blocks("expand_dh")
        bl = _fit(bl0, lambda k: k * (bl0.m + _block_r(R)) * dy.element_size())
        m_programs = triton.cdiv(M, bl.m)
        sum_programs = triton.cdiv(D, DB_SUM_BLOCK) if splits > 1 else 0
        _k(_expand_dh_kernel, wrap)[(m_programs + sum_programs,)](
            dy, u, b, c_arg, du, dc if has_coef else du, part, db, M, D, R, float(scale), m_programs, splits,
            dy.stride(0), u.stride(0), b.stride(0), du.stride(0), c_stride, part.stride(0), part.stride(1), db.stride(0),
            HAS_COEF=has_coef, UPCAST=INTERPRET, PRECISION=prec,
            BLOCK_M=bl.m, BLOCK_D=bl.k, BLOCK_R=_block_r(R), BLOCK_DS=DB_SUM_BLOCK,
            num_warps=bl.warps, num_stages=bl.stages,
        )
        return du, db, dc
    if BWD_MODE == "gemm":
        dh = (dy @ b).float()
        v = u.float() * scale
        if has_coef:
            v = v * coef.float()[:, None]
        db = (dy.t() @ v.to(dy.dtype)).to(b.dtype)
    else:  # "fused": one read of dY for both products, dB by fp32 atomics across row blocks
        dh = torch.zeros(M, R, device=dy.device, dtype=torch.float32)
        db = torch.zeros(D, R, device=dy.device, dtype=torch.float32)
        bl = _blocks("expand_bwd")
        m_blocks = triton.cdiv(M, bl.m)
        splits = 1 if INTERPRET else max(1, min(triton.cdiv(D, 4 * bl.k), triton.cdiv(264, m_blocks)))
        d_per_split = triton.cdiv(triton.cdiv(D, splits), bl.k) * bl.k
        splits = triton.cdiv(D, d_per_split)
        _k(_expand_bwd_kernel, wrap)[(m_blocks, splits)](
            dy, u, b, c_arg, dh, db, M, D, R, float(scale), d_per_split,
            dy.stride(0), u.stride(0), b.stride(0), dh.stride(0), db.stride(0), c_stride,
            HAS_COEF=has_coef, UPCAST=INTERPRET, PRECISION=prec,
            BLOCK_M=bl.m, BLOCK_D=bl.k, BLOCK_R=_block_r(R), num_warps=bl.warps, num_stages=bl.stages,
        )
        db = db.to(b.dtype)
    # dh = dY·B; u's gradient carries s·c, the gate's is s·Σ_r dh ⊙ u (tokens × r work only)
    du = dh * scale
    dc = None
    if has_coef:
        dc = ((dh * u.float()).sum(1) * scale).to(coef.dtype)
        du = du * coef.float()[:, None]
    return du.to(u.dtype), db, dc


# ------------------------------------------------------------------------------------------
# custom ops (opaque to torch.compile) with their autograd
# ------------------------------------------------------------------------------------------
@torch.library.custom_op("unipelt::lora_shrink", mutates_args=())
def _shrink_op(x: Tensor, w: Tensor, bias: Tensor, act_start: int, seg_widths: list[int],
               seg_p: list[float], seed: Optional[Tensor]) -> Tensor:
    return _launch_shrink(x, w, bias, act_start, seg_widths, seg_p, seed)


@_shrink_op.register_fake
def _(x, w, bias, act_start, seg_widths, seg_p, seed):
    return x.new_empty(x.shape[0], w.shape[0])


def _shrink_bwd_body(dz: Tensor, x: Tensor, w: Tensor, z: Tensor, act_start: int, seg_widths: list[int],
                     seg_p: list[float], seed: Optional[Tensor], wrap=None) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _launch_shrink_bwd(dz, x, w, z, act_start, seg_widths, seg_p, seed, wrap)
    if db is None:
        db = dz.new_zeros(0, dtype=torch.float32)
    elif w.dtype == torch.float32:
        dw = dw.clone()  # dW and db share one buffer; a custom op's outputs may not alias each other
    return dx, dw.to(w.dtype), db


def _shrink_bwd_impl(dz: Tensor, x: Tensor, w: Tensor, z: Tensor, act_start: int, seg_widths: list[int],
                     seg_p: list[float], seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return _shrink_bwd_body(dz, x, w, z, act_start, seg_widths, seg_p, seed)


_shrink_bwd_op = torch.library.custom_op("unipelt::lora_shrink_bwd", mutates_args=())(_shrink_bwd_impl)


@_shrink_bwd_op.register_fake
def _(dz, x, w, z, act_start, seg_widths, seg_p, seed):
    return torch.empty_like(x), torch.empty_like(w), x.new_empty(w.shape[0] - act_start, dtype=torch.float32)


def _shrink_setup(ctx, inputs, output):
    x, w, bias, act_start, seg_widths, seg_p, seed = inputs
    ctx.save_for_backward(x, w, output, seed if seed is not None else None)
    ctx.act_start, ctx.seg_widths, ctx.seg_p = act_start, seg_widths, seg_p
    ctx.has_seed = seed is not None
    ctx.bias_dtype = bias.dtype


def _shrink_backward(ctx, dz, bwd=_shrink_bwd_op):
    x, w, z, seed = ctx.saved_tensors
    if dz.stride(-1) != 1:
        dz = dz.contiguous()
    dx, dw, db = bwd(dz, x, w, z, ctx.act_start, ctx.seg_widths, ctx.seg_p, seed if ctx.has_seed else None)
    return dx, dw, db.to(ctx.bias_dtype), None, None, None, None


_shrink_op.register_autograd(_shrink_backward, setup_context=_shrink_setup)


class _ShrinkFn(torch.autograd.Function):
    """The same op in eager mode without the custom-op dispatch (tens of microseconds a call on
    the host, which a layer of small launches cannot hide)."""

    @staticmethod
    def forward(ctx, x, w, bias, act_start, seg_widths, seg_p, seed):
        z = _launch_shrink(x, w, bias, act_start, seg_widths, seg_p, seed)
        _shrink_setup(ctx, (x, w, bias, act_start, seg_widths, seg_p, seed), z)
        return z

    @staticmethod
    def backward(ctx, dz):
        return _shrink_backward(ctx, dz, bwd=_shrink_bwd_impl)


@torch.library.custom_op("unipelt::lora_expand", mutates_args=())
def _expand_op(out: Tensor, u: Tensor, b: Tensor, coef: Optional[Tensor], scale: float) -> Tensor:
    return _launch_expand(out, u, b, coef, scale)


@_expand_op.register_fake
def _(out, u, b, coef, scale):
    return torch.empty_like(out)


def _expand_bwd_body(dy: Tensor, u: Tensor, b: Tensor, coef: Optional[Tensor],
                     scale: float, wrap=None) -> tuple[Tensor, Tensor, Tensor]:
    du, db, dc = _launch_expand_bwd(dy, u, b, coef, scale, wrap)
    return du, db, (dc if dc is not None else dy.new_empty(0))


def _expand_bwd_impl(dy: Tensor, u: Tensor, b: Tensor, coef: Optional[Tensor],
                     scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _expand_bwd_body(dy, u, b, coef, scale)


_expand_bwd_op = torch.library.custom_op("unipelt::lora_expand_bwd", mutates_args=())(_expand_bwd_impl)


@_expand_bwd_op.register_fake
def _(dy, u, b, coef, scale):
    return (torch.empty_like(u, memory_format=torch.contiguous_format), torch.empty_like(b),
            coef.new_empty(coef.shape[0]) if coef is not None else dy.new_empty(0))


def _expand_setup(ctx, inputs, output):
    out, u, b, coef, scale = inputs
    ctx.save_for_backward(u, b, coef)
    ctx.scale = scale
    ctx.has_coef = coef is not None


def _expand_backward(ctx, dy, bwd=_expand_bwd_op):
    u, b, coef = ctx.saved_tensors
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    du, db, dc = bwd(dy, u, b, coef if ctx.has_coef else None, ctx.scale)
    return dy, du, db, (dc if ctx.has_coef else None), None


_expand_op.register_autograd(_expand_backward, setup_context=_expand_setup)


class _ExpandFn(torch.autograd.Function):
    """The eager twin of ``unipelt::lora_expand`` (see _ShrinkFn)."""

    @staticmethod
    def forward(ctx, out, u, b, coef, scale):
        y = _launch_expand(out, u, b, coef, scale)
        _expand_setup(ctx, (out, u, b, coef, scale), y)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _expand_backward(ctx, dy, bwd=_expand_bwd_impl)


# ------------------------------------------------------------------------------------------
# the same ops as ``triton_op``s, for compiled forwards on CUDA: inductor traces their bodies, sees
# the kernels (``wrap_triton``) and launches them from its generated wrapper, where a custom op is
# called through the dispatcher and Triton's Python launcher on every step (in inductor's default
# mode, without CUDA graphs, that host work is what the step waits for: RESULTS.md, Kernels)
# ------------------------------------------------------------------------------------------
def _replayed() -> bool:
    """Whether the graph being compiled will be replayed as a CUDA graph (inductor's
    ``triton.cudagraphs``: ``mode="reduce-overhead"``). Read while AOTAutograd traces a triton_op's
    body, which runs inside inductor's compile with the mode's config applied."""
    from torch._inductor import config

    return bool(config.triton.cudagraphs)


def _torch_form(replayed_only: bool, act_start: int = 0, n: int = 0, seg_p: list[float] = (),
                seed: Optional[Tensor] = None) -> bool:
    """Whether a triton_op twin traces to PyTorch's products instead of its kernels: asked to run
    the kernels only under CUDA graph replay (``replayed_only``: executor ``auto``) in a graph that
    will not be replayed (inductor's default mode, where every kernel launch is host work the step
    waits for: llama LoRA r16 train 28.9 ms on the kernels against 26.7 ms grouped, session 13),
    for a plain group (no gates, no dropout: the products below are all it computes; an expand
    passes none of the group's columns, its gate is checked by the caller)."""
    return replayed_only and act_start == n and not _has_drop(seg_p, seed) and not _replayed()


@torch.library.triton_op("unipelt::lora_shrink_t", mutates_args=())
def _shrink_top(x: Tensor, w: Tensor, bias: Tensor, act_start: int, seg_widths: list[int],
                seg_p: list[float], seed: Optional[Tensor], replayed_only: bool = False) -> Tensor:
    if _torch_form(replayed_only, act_start, w.shape[0], seg_p, seed):
        return x @ w.t()
    return _launch_shrink(x, w, bias, act_start, seg_widths, seg_p, seed, torch.library.wrap_triton)


@torch.library.triton_op("unipelt::lora_shrink_bwd_t", mutates_args=())
def _shrink_bwd_top(dz: Tensor, x: Tensor, w: Tensor, z: Tensor, act_start: int, seg_widths: list[int],
                    seg_p: list[float], seed: Optional[Tensor], replayed_only: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    if _torch_form(replayed_only, act_start, w.shape[0], seg_p, seed):
        return dz @ w, dz.t() @ x, dz.new_zeros(0, dtype=torch.float32)
    return _shrink_bwd_body(dz, x, w, z, act_start, seg_widths, seg_p, seed, torch.library.wrap_triton)


def _shrink_top_setup(ctx, inputs, output):
    _shrink_setup(ctx, inputs[:-1], output)
    ctx.replayed_only = inputs[-1]


def _shrink_top_backward(ctx, dz):
    bwd = functools.partial(_shrink_bwd_top, replayed_only=ctx.replayed_only)
    return (*_shrink_backward(ctx, dz, bwd=bwd), None)


_shrink_top.register_autograd(_shrink_top_backward, setup_context=_shrink_top_setup)


# The kernels take out and u as 2-D (tokens, n) tensors (flattened by lora_expand, as measured in
# session 13's call 2); ``lead`` is their leading dimensions, for the PyTorch form, which computes
# on the N-D views so that it is the grouped executor's compiled graph exactly (a 2-D sum becomes an
# addmm with the scale moved onto u: one more kernel a projection, 28 fused kernels against 19 on a
# 1-layer llama)
@torch.library.triton_op("unipelt::lora_expand_t", mutates_args=())
def _expand_top(out: Tensor, u: Tensor, b: Tensor, coef: Optional[Tensor], scale: float, replayed_only: bool = False,
                lead: Optional[list[int]] = None) -> Tensor:
    if coef is None and _torch_form(replayed_only):
        # as the grouped executor writes it compiled: the scale on the product, which inductor
        # fuses with the addition into whatever pointwise op reads the sum
        lead = list(lead) if lead else [out.shape[0]]
        y = out.view(*lead, out.shape[-1]) + torch.nn.functional.linear(u.view(*lead, u.shape[-1]), b) * scale
        return y.view(out.shape)
    return _launch_expand(out, u, b, coef, scale, torch.library.wrap_triton)


@torch.library.triton_op("unipelt::lora_expand_bwd_t", mutates_args=())
def _expand_bwd_top(dy: Tensor, u: Tensor, b: Tensor, coef: Optional[Tensor],
                    scale: float, replayed_only: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    if coef is None and _torch_form(replayed_only):
        g = dy * scale  # (fused into the pointwise kernel that produced dY, as autograd's own backward is)
        return g @ b, g.t() @ u, dy.new_empty(0)
    return _expand_bwd_body(dy, u, b, coef, scale, torch.library.wrap_triton)


def _expand_top_setup(ctx, inputs, output):
    _expand_setup(ctx, inputs[:5], output)
    ctx.replayed_only = inputs[5]


def _expand_top_backward(ctx, dy):
    bwd = functools.partial(_expand_bwd_top, replayed_only=ctx.replayed_only)
    return (*_expand_backward(ctx, dy, bwd=bwd), None, None)


_expand_top.register_autograd(_expand_top_backward, setup_context=_expand_top_setup)

# ------------------------------------------------------------------------------------------
# the plain functions
# ------------------------------------------------------------------------------------------
def lora_shrink(x: Tensor, weight: Tensor, bias: Tensor | None = None, act_start: int | None = None,
                segments: list[tuple[int, float]] | None = None, seed: Tensor | None = None,
                replayed_only: bool = False) -> Tensor:
    """z = dropout(x)·weightᵀ for a group, (..., K) -> (..., N), with sigmoid(z + bias) on the
    columns from ``act_start`` on (the gates; ``bias`` has N - act_start values).

    ``segments``: (width, dropout p) per contiguous column range (default: one segment, p 0);
    dropout applies only when ``seed`` (an int64 tensor of one element on x's device) is given.
    ``replayed_only``: compiled on CUDA, a plain group (no gates, no dropout) runs on the kernels
    only in a graph that CUDA graphs replay, and as PyTorch's product in inductor's default mode.
    """
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"lora_shrink: x is {tuple(x.shape)} but the weight is {tuple(weight.shape)} (needs (N, {K}))")
    N = weight.shape[0]
    act_start = N if act_start is None else act_start
    if bias is None:
        if act_start != N:
            raise ValueError("lora_shrink: activated columns need a bias")
        bias = x.new_zeros(0, dtype=torch.float32)
    segments = segments or [(N, 0.0)]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    # eager: the autograd Function (no custom-op dispatch); compiled: the triton_op twins on CUDA
    # (inductor launches their kernels), the opaque custom ops elsewhere
    args = (x2, weight.to(x.dtype).contiguous(), bias.contiguous(), act_start,
            [int(w) for w, _ in segments], [float(p) for _, p in segments], seed)
    if not torch.compiler.is_compiling():
        z = _ShrinkFn.apply(*args)
    elif _compiled_ops(x2):
        z = _shrink_top(*args, replayed_only)
    else:
        z = _shrink_op(*args)
    return z.view(*x.shape[:-1], N)


def lora_expand(out: Tensor, u: Tensor, b: Tensor, gate: Tensor | None = None, scale: float = 1.0,
                replayed_only: bool = False) -> Tensor:
    """out + scale·(gate ⊙ u)·bᵀ in one pass: out (..., D), u (..., r), b (D, r), gate None or
    broadcastable to (..., 1) (per token or pooled). ``replayed_only``: as for :func:`lora_shrink`
    (an ungated expand)."""
    D, R = b.shape
    if out.shape[-1] != D or u.shape[-1] != R or u.shape[:-1] != out.shape[:-1]:
        raise ValueError(f"lora_expand: out {tuple(out.shape)}, u {tuple(u.shape)}, B {tuple(b.shape)} "
                         f"(needs out (..., D), u (..., r), B (D, r))")
    out2 = out.reshape(-1, D)
    if out2.stride(-1) != 1:
        out2 = out2.contiguous()
    u2 = u.reshape(-1, R)
    if u2.stride(-1) != 1:
        u2 = u2.contiguous()
    # the gate's coefficients: a view where it can be (a gate column of z, read through its stride)
    coef = None if gate is None else gate.expand(*u.shape[:-1], 1).reshape(-1)
    # eager: the autograd Function (no custom-op dispatch); compiled: the triton_op twins on CUDA
    # (inductor launches their kernels), the opaque custom ops elsewhere
    args = (out2, u2, b.to(out.dtype).contiguous(), coef, float(scale))
    if not torch.compiler.is_compiling():
        y = _ExpandFn.apply(*args)
    elif _compiled_ops(out2):
        y = _expand_top(*args, replayed_only, list(out.shape[:-1]))
    else:
        y = _expand_op(*args)
    return y.view(out.shape)


def dropout_mask(seed: Tensor, segment: int, shape: tuple[int, int], p: float) -> Tensor:
    """The keep-mask (bool, tokens × K) that the kernels draw for ``segment`` with ``seed``: for
    tests, which give the reference the same mask."""
    M, K = shape
    out = torch.empty(M, K, dtype=torch.int8, device=seed.device)
    _mask_kernel[(triton.cdiv(M, 64), triton.cdiv(K, 64))](seed, out, M, K, segment, float(p), BLOCK_M=64, BLOCK_K=64)
    return out.bool()


def new_seed(device: torch.device) -> Tensor:
    """A fresh dropout seed on ``device`` (drawn from torch's generator, so torch.manual_seed
    makes runs repeatable)."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


def fits(x: Tensor) -> str | None:
    """Why the kernels cannot run on ``x``, or None when they can."""
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} is not one of float32, bfloat16, float16"
    if x.device.type != "cuda" and not INTERPRET:
        return f"tensor on {x.device.type}, and Triton runs on CUDA (or on CPU under TRITON_INTERPRET=1)"
    return None


# ------------------------------------------------------------------------------------------
# the reference (pure PyTorch), for tests and benchmarks
# ------------------------------------------------------------------------------------------
def reference_shrink(x: Tensor, weight: Tensor, bias: Tensor | None = None, act_start: int | None = None,
                     segments: list[tuple[int, float]] | None = None, masks: list[Tensor | None] | None = None) -> Tensor:
    """What :func:`lora_shrink` computes, given the dropout keep-masks (tokens × K) per segment."""
    N = weight.shape[0]
    act_start = N if act_start is None else act_start
    segments = segments or [(N, 0.0)]
    x2 = x.reshape(-1, x.shape[-1])
    parts, at = [], 0
    for i, (w, p) in enumerate(segments):
        xi = x2
        m = masks[i] if masks is not None else None
        if m is not None and p > 0:
            xi = x2 * m.to(x2.dtype) / (1 - p)
        parts.append(xi @ weight[at:at + w].to(x.dtype).t())
        at += w
    z = torch.cat(parts, -1)
    if act_start < N:
        z = torch.cat([z[:, :act_start], torch.sigmoid(z[:, act_start:] + bias.to(z.dtype))], -1)
    return z.view(*x.shape[:-1], N)


def reference_expand(out: Tensor, u: Tensor, b: Tensor, gate: Tensor | None = None, scale: float = 1.0) -> Tensor:
    v = u * scale if gate is None else u * (gate * scale)
    return out + v @ b.to(out.dtype).t()
