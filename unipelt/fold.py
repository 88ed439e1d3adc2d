"""Base projection and LoRA as one autograd node (issue 9): the LoRA part of dX folded into the
base layer's dX.

A frozen ``nn.Linear`` with one plain LoRA branch computes, unfolded, two input gradients --
the base's dY·W and the LoRA's (s·dY·B)·A -- which autograd then adds: one more pass over a
tokens × d_in tensor per projection, and one more kernel (BERT-base LoRA r16 on all linears: 44
of the 117 add kernels of a graph-step train step, about 0.3 ms of 7.5, H200 session 11). Folded,
the backward computes the narrow LoRA product first, t = dz·A, and the base product accumulates
into it, ``t.addmm_(dY, W)`` (cuBLAS with beta = 1: the read of t is in the GEMM's epilogue),
so there is one dX buffer and no add. The forward does the same the other way round: h = b +
s·u·Bᵀ (the bias in the narrow product's epilogue, the scale as its alpha), then
``h.addmm_(x, Wᵀ)``.

A fusion group of such projections (q, k, v reading one x; llama's gate and up) folds as one
node: one shrink u = x·[A_1 | … | A_k]ᵀ, every member's output, and in backward ONE dX =
dz·[A_1; …; A_k] + Σ_i dY_i·W_i, accumulated by the base GEMMs in turn -- the adds between
the members' base gradients, which the unadapted model pays too, go as well.

What folds (decided at refresh, :func:`plan`): a plain ``nn.Linear`` leaf (no hooks, not
quantized) whose weight and bias are frozen, whose host runs exactly one live branch and nothing
else (no input scaling, no output-side branch), that branch reading the input with no gate, and
offering the group protocol with ``expand(u) = (s·u)·Bᵀ`` (``shrink_params() -> (A, None)``,
``segment_params() -> (B, s)``, ``kernel_lora``: a plain LoRA without dropout; PiSSA/OLoRA,
DoRA, gated and dropout branches keep their path). A group folds only when every live reader of
its tensor does (no gate columns in its z). Per call (:func:`run`): not in a mixed batch, not
under autocast, x, W, A and B of one dtype; else the ordinary path. The reference executor never
folds (it is what the fold is checked against), and ``UNIPELT_FOLD=0`` turns the fold off.

Under torch.compile the autograd.Function is traced whole (forward and backward, no graph
break); eager and under a captured CUDA graph (the graph-step mode) it runs as written.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

ENV_VAR = "UNIPELT_FOLD"


def enabled() -> bool:
    """Whether folds are planned (``UNIPELT_FOLD=0`` turns them off: for comparisons)."""
    return os.environ.get(ENV_VAR, "1") != "0"


class _FoldedLinears(torch.autograd.Function):
    """k frozen linears reading one x, each with a LoRA: y_i = x·W_iᵀ + b_i + s_i·(x·A_iᵀ)·B_iᵀ.

    Inputs: x2 (M, K), then k weights W_i (N_i, K), k biases (None or (N_i,)), the stacked
    A (R, K) = [A_1; …; A_k], k B_i (N_i, r_i); ``scales`` and ``widths`` (r_i) as constants.
    Saves x2 and u = x2·Aᵀ (M × R), never B·A."""

    @staticmethod
    def forward(ctx, x2: Tensor, a: Tensor, scales: tuple[float, ...], widths: tuple[int, ...], *rest: Tensor):
        k = len(scales)
        ws, bs, bups = rest[:k], rest[k:2 * k], rest[2 * k:]
        u = x2.mm(a.t())
        us = u.split(list(widths), 1)
        ys = []
        for w, b, bu, s, ui in zip(ws, bs, bups, scales, us):
            if b is not None:
                h = torch.addmm(b, ui, bu.t(), alpha=s)  # b + s·u·Bᵀ: the bias in the epilogue
                h.addmm_(x2, w.t())
            else:
                h = ui.mm(bu.t())
                h.addmm_(x2, w.t(), beta=s)  # s·(u·Bᵀ) + x·Wᵀ
            ys.append(h)
        ctx.save_for_backward(x2, a, u, *ws, *bups)
        ctx.scales, ctx.widths = scales, widths
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys: Tensor):
        x2, a, u, *params = ctx.saved_tensors
        scales, widths = ctx.scales, ctx.widths
        k = len(scales)
        ws, bups = params[:k], params[k:]
        needs = ctx.needs_input_grad
        M, R = u.shape
        # dz = [s_1·dY_1·B_1 | … | s_k·dY_k·B_k], each product written into its columns (cuBLAS
        # takes the strided slice as its output: no cat)
        dz = u.new_empty(M, R)
        dbs = []
        at = 0
        for dy, bu, s, r, i in zip(dys, bups, scales, widths, range(k)):
            cols = dz[:, at:at + r]
            ui = u[:, at:at + r]
            at += r
            if dy is None:
                cols.zero_()
                dbs.append(None)
                continue
            cols.addmm_(dy, bu, beta=0, alpha=s)
            # dB = s·dYᵀ·u (beta 0: the input, B itself, is only a shape)
            dbs.append(torch.addmm(bu, dy.t(), ui, beta=0, alpha=s) if needs[4 + 2 * k + i] else None)
        da = dz.t().mm(x2) if needs[1] else None
        dx = None
        if needs[0]:
            dx = dz.mm(a)
            for dy, w in zip(dys, ws):
                if dy is not None:
                    dx.addmm_(dy, w)  # dX += dY·W: one buffer for every member
        return (dx, da, None, None, *([None] * (2 * k)), *dbs)


def _member_params(e) -> tuple[Tensor, Tensor, float]:
    a = e.branch.shrink_params()[0]
    bu, s = e.branch.segment_params()
    return a, bu, float(s)


class Fold:
    """The folded computation of one projection, or of a group of them (shared by its members'
    hosts). ``members``: (entry, base nn.Linear) in z's column order."""

    def __init__(self, key: str, members: list[tuple[Any, nn.Linear]]):
        self.key = key
        self.members = members
        self._index = {id(lin): i for i, (_, lin) in enumerate(members)}

    def run(self, base: nn.Linear, x: Tensor, ctx) -> Tensor | None:
        """The output of projection ``base`` (one of the members) for input x, LoRA included;
        None where this call cannot fold (then the caller runs the ordinary path)."""
        if ctx.rows is not None or x.dim() < 2 or torch.is_autocast_enabled(x.device.type):
            return None
        cached = ctx.group_out.get(self.key) if len(self.members) > 1 else None
        if cached is not None and cached[0] is x:
            return cached[1][self._index[id(base)]]
        a_parts, bups, scales, widths, ws, bs = [], [], [], [], [], []
        for e, lin in self.members:
            a, bu, s = _member_params(e)
            if not (x.dtype == lin.weight.dtype == a.dtype == bu.dtype):
                return None
            a_parts.append(a)
            bups.append(bu)
            scales.append(s)
            widths.append(a.shape[0])
            ws.append(lin.weight)
            bs.append(lin.bias)
        a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, 0)
        x2 = x.reshape(-1, x.shape[-1])
        ys = _FoldedLinears.apply(x2, a, tuple(scales), tuple(widths), *ws, *bs, *bups)
        lead = x.shape[:-1]
        outs = [y.view(*lead, y.shape[-1]) for y in ys]
        if len(outs) > 1:
            ctx.group_out[self.key] = (x, outs)
        return outs[self._index[id(base)]]


def _foldable_entry(host, wrapper) -> Any | None:
    """The one live entry of ``host`` when host and wrapper fold, else None."""
    from unipelt.runtime import LeafWrapper

    if type(wrapper) is not LeafWrapper or wrapper.bypassed or not wrapper.owns_output():
        return None
    base = wrapper.base_layer
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    if host.scales_input or host._sliced is not None:
        return None
    live = []
    for rt in host.runtimes.values():
        if rt.fusion:
            return None
        if rt.live:
            if rt.kind != "linear" or rt.out_slice is not None:
                return None
            live.extend(rt.live)
    if len(live) != 1:
        return None
    e = live[0]
    b = e.branch
    if e.gate is not None or b.reads != "input" or getattr(b, "reads_base", False) or not getattr(b, "kernel_lora", False):
        return None
    sp = b.shrink_params() if callable(getattr(b, "shrink_params", None)) else None
    seg = b.segment_params() if callable(getattr(b, "segment_params", None)) else None
    if sp is None or sp[1] is not None or seg is None:
        return None
    a, bu = sp[0], seg[0]
    if a.shape != (bu.shape[1], base.in_features) or bu.shape[0] != base.out_features:
        return None
    return e


def plan(state) -> None:
    """Decide at refresh which projections fold (``host.fold``); called after the groups refresh."""
    for host in state.hosts.values():
        host.fold = None
    if state.executor == "reference" or not enabled():
        return
    foldable: dict[int, tuple[Any, Any, nn.Linear]] = {}  # id(entry) -> (entry, host, base)
    for path, (parent, attr, _) in state.wrappers.items():
        host = state.hosts.get(path)
        wrapper = getattr(parent, attr, None)
        if host is None or wrapper is None:
            continue
        e = _foldable_entry(host, wrapper)
        if e is not None:
            foldable[id(e)] = (e, host, wrapper.base_layer)
    for e, host, base in foldable.values():
        grp = e.group
        if grp is None or not grp.on or not grp.has(e):
            host.fold = Fold(f"fold/{id(e)}", [(e, base)])
            continue
        if host.fold is not None:
            continue  # planned with its group
        live = list(grp._cols)  # entries and gate keys with columns of z, in column order
        if any(id(m) not in foldable for m in live):
            continue  # a gate or an unfoldable branch reads the same z: the group's own path
        fold = Fold(f"fold/{grp.key}", [(m, foldable[id(m)][2]) for m in live])
        for m in live:
            foldable[id(m)][1].fold = fold
