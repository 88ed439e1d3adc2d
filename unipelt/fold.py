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
folds (it is what the fold is checked against). It is off unless ``UNIPELT_FOLD`` asks for it
(:data:`DEFAULT`).

Eager and under a captured CUDA graph (the graph-step mode) the node is an autograd.Function.
A torch.compile'd forward does not fold unless ``UNIPELT_FOLD=compiled``: measured on llama under
reduce-overhead, the fold was no faster with the grouped executor and slower with the Triton
kernels (:data:`MODES`); there the same code runs as two custom ops (``unipelt::folded_linears``
and its backward), opaque to the graph like the Triton kernels: traced, inductor would split
every accumulating GEMM back into a GEMM and an add (its post-grad pass unfuses an addmm whose
users are pointwise) and functionalize the in-place products into copies.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import Tensor, nn

ENV_VAR = "UNIPELT_FOLD"
# ``UNIPELT_FOLD``: ``eager`` (eager forwards and captured CUDA graphs), ``compiled``
# (torch.compile'd forwards too) or ``0`` (never: the default, :data:`DEFAULT`). Why compiled forwards do not fold by default
# (H200, bf16, train, ratio to the floor; benchmarks/RESULTS.md, Kernels, "Session 12 (helper
# bert12)"): llama LoRA r16 all linears under reduce-overhead folded 1.23 / 1.23 with the grouped
# executor against 1.22-1.26 unfolded in other calls (not shown faster), and 1.24 / 1.22 with
# executor triton, where the Triton kernels unfolded measured 1.16-1.21 (slower). Eager, under the graph-step mode's captured graph: BERT 1.50 / 1.50
# with either executor, against 1.64-1.65 grouped and 1.51-1.52 with the kernels, unfolded; so
# in eager forwards the fold runs instead of the kernels, also where ``auto`` would run them in a
# graphed step (executor.graphing()).
MODES = ("eager", "compiled", "0")
# Off unless asked for (session 12, lead): where it was measured it gained nothing on what runs by
# default -- in a graphed step ``auto`` now runs plain LoRA groups on the Triton kernels (BERT
# graph-step 1.51-1.52, the fold 1.50, two calls apart), compiled forwards do not fold, and
# ``unipelt train`` on a GPU runs under bf16 autocast, where nothing folds. Its one measured gain is
# the grouped executor in a graphed step (1.64 -> 1.50); plain eager forwards were not measured.
DEFAULT = "0"


def mode() -> str:
    """The fold mode from ``UNIPELT_FOLD`` (read when the plan is made, at refresh)."""
    m = os.environ.get(ENV_VAR, DEFAULT) or DEFAULT
    if m not in MODES:
        raise ValueError(f"{ENV_VAR}={m!r}: expected one of {', '.join(MODES)}")
    return m


def _forward(x2: Tensor, a: Tensor, ws, bs, bups, scales, widths) -> tuple[list[Tensor], Tensor]:
    """(y_1 … y_k, u): y_i = x2·W_iᵀ + b_i + s_i·u_i·B_iᵀ with u = x2·aᵀ, u_i its columns of member i."""
    u = x2.mm(a.t())
    ys = []
    for w, b, bu, s, ui in zip(ws, bs, bups, scales, u.split(list(widths), 1)):
        if b is not None:
            h = torch.addmm(b, ui, bu.t(), alpha=s)  # b + s·u·Bᵀ: the bias in the epilogue
            h.addmm_(x2, w.t())
        else:
            h = ui.mm(bu.t())
            h.addmm_(x2, w.t(), beta=s)  # s·(u·Bᵀ) + x·Wᵀ
        ys.append(h)
    return ys, u


def _backward(dys, x2: Tensor, a: Tensor, u: Tensor, ws, bups, scales, widths, need_dx: bool, need_da: bool,
              need_db) -> tuple[Tensor | None, Tensor | None, list[Tensor | None]]:
    """(dX, dA, [dB_i]): dz = [s_i·dY_i·B_i], dA = dzᵀ·x2, dB_i = s_i·dY_iᵀ·u_i and ONE dX = dz·a
    + Σ_i dY_i·W_i, the base GEMMs accumulating into the narrow product's buffer (beta = 1). A
    member whose dY is None contributes zero columns."""
    M, R = u.shape
    # dz's columns written by each member's product (cuBLAS takes the strided slice as its output: no cat)
    dz = u.new_empty(M, R)
    dbs: list[Tensor | None] = []
    at = 0
    for dy, bu, s, r, need in zip(dys, bups, scales, widths, need_db):
        cols = dz[:, at:at + r]
        ui = u[:, at:at + r]
        at += r
        if dy is None:
            cols.zero_()
            dbs.append(None)
            continue
        cols.addmm_(dy, bu, beta=0, alpha=s)
        # beta 0: the input (B itself) is only a shape, and no copy of it is made
        dbs.append(torch.addmm(bu, dy.t(), ui, beta=0, alpha=s) if need else None)
    da = dz.t().mm(x2) if need_da else None
    dx = None
    if need_dx:
        dx = dz.mm(a)
        for dy, w in zip(dys, ws):
            if dy is not None:
                dx.addmm_(dy, w)  # dX += dY·W: one buffer for every member
    return dx, da, dbs


class _FoldedLinears(torch.autograd.Function):
    """k frozen linears reading one x, each with a LoRA: y_i = x·W_iᵀ + b_i + s_i·(x·A_iᵀ)·B_iᵀ
    (eager and under a captured CUDA graph; compiled: ``unipelt::folded_linears``).

    Inputs: x2 (M, K), the stacked A (R, K) = [A_1; …; A_k], ``scales`` and ``widths`` (r_i) as
    constants, then k weights W_i (N_i, K), k biases (None or (N_i,)), k B_i (N_i, r_i). Saves x2
    and u = x2·Aᵀ (M × R), never B·A."""

    @staticmethod
    def forward(ctx, x2: Tensor, a: Tensor, scales: tuple[float, ...], widths: tuple[int, ...], *rest: Tensor):
        k = len(scales)
        ws, bs, bups = rest[:k], rest[k:2 * k], rest[2 * k:]
        ys, u = _forward(x2, a, ws, bs, bups, scales, widths)
        ctx.save_for_backward(x2, a, u, *ws, *bups)
        ctx.scales, ctx.widths = scales, widths
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys: Tensor):
        x2, a, u, *params = ctx.saved_tensors
        k = len(ctx.scales)
        needs = ctx.needs_input_grad
        dx, da, dbs = _backward(dys, x2, a, u, params[:k], params[k:], ctx.scales, ctx.widths,
                                needs[0], needs[1], needs[4 + 2 * k:])
        return (dx, da, None, None, *([None] * (2 * k)), *dbs)


# -- the same as custom ops, for torch.compile: opaque nodes, so that inductor neither splits the
# accumulating GEMMs into a GEMM and an add (its post-grad pass unfuses an addmm whose users are
# pointwise) nor turns the in-place products into copies
@torch.library.custom_op("unipelt::folded_linears", mutates_args=())
def _fold_op(x2: Tensor, a: Tensor, ws: list[Tensor], bs: list[Tensor], bups: list[Tensor],
             scales: list[float], widths: list[int]) -> list[Tensor]:
    # (a bias of no elements: none; a list of optional tensors has no gradient structure to return)
    ys, u = _forward(x2, a, ws, [b if b.numel() else None for b in bs], bups, scales, widths)
    return ys + [u]  # u last: saved for the backward


@_fold_op.register_fake
def _(x2, a, ws, bs, bups, scales, widths):
    return [x2.new_empty(x2.shape[0], w.shape[0]) for w in ws] + [x2.new_empty(x2.shape[0], a.shape[0])]


@torch.library.custom_op("unipelt::folded_linears_bwd", mutates_args=())
def _fold_bwd_op(dys: list[Optional[Tensor]], x2: Tensor, a: Tensor, u: Tensor, ws: list[Tensor],
                 bups: list[Tensor], scales: list[float], widths: list[int], need_dx: bool) -> list[Tensor]:
    dx, da, dbs = _backward(dys, x2, a, u, ws, bups, scales, widths, need_dx, True, [True] * len(ws))
    dbs = [torch.zeros_like(b) if d is None else d for d, b in zip(dbs, bups)]
    return [dx if dx is not None else x2.new_empty(0), da, *dbs]


@_fold_bwd_op.register_fake
def _(dys, x2, a, u, ws, bups, scales, widths, need_dx):
    return ([torch.empty_like(x2) if need_dx else x2.new_empty(0), torch.empty_like(a)]
            + [torch.empty_like(b) for b in bups])


def _fold_setup(ctx, inputs, output):
    x2, a, ws, bs, bups, scales, widths = inputs
    ctx.save_for_backward(x2, a, output[-1], *ws, *bups)
    ctx.scales, ctx.widths = scales, widths


def _fold_backward(ctx, grads):
    x2, a, u, *params = ctx.saved_tensors
    k = len(ctx.scales)
    need_dx = bool(ctx.needs_input_grad[0])
    dx, da, *dbs = _fold_bwd_op(list(grads[:k]), x2, a, u, params[:k], params[k:], ctx.scales, ctx.widths, need_dx)
    return (dx if need_dx else None), da, [None] * k, [None] * k, dbs, None, None


_fold_op.register_autograd(_fold_backward, setup_context=_fold_setup)


def folded_linears(x2: Tensor, a: Tensor, ws: list[Tensor], bs: list[Tensor | None], bups: list[Tensor],
                   scales: list[float], widths: list[int]) -> list[Tensor]:
    """[x2·W_iᵀ + b_i + s_i·(x2·A_iᵀ)·B_iᵀ] for the stacked a = [A_1; …; A_k]: the custom op when
    compiling, the autograd.Function (no custom-op dispatch on the host) otherwise."""
    if torch.compiler.is_compiling():
        bs = [x2.new_empty(0) if b is None else b for b in bs]
        return _fold_op(x2, a, ws, bs, bups, scales, widths)[:-1]
    return list(_FoldedLinears.apply(x2, a, tuple(scales), tuple(widths), *ws, *bs, *bups))


def _member_params(e) -> tuple[Tensor, Tensor, float]:
    a = e.branch.shrink_params()[0]
    bu, s = e.branch.segment_params()
    return a, bu, float(s)


class Fold:
    """The folded computation of one projection, or of a group of them (shared by its members'
    hosts). ``members``: (entry, base nn.Linear) in z's column order."""

    def __init__(self, key: str, members: list[tuple[Any, nn.Linear]], compiled: bool = False):
        self.key = key
        self.members = members
        self.compiled = compiled  # whether a torch.compile'd forward folds too (UNIPELT_FOLD=compiled)

    def _index(self, base: nn.Linear) -> int:
        # by identity, not id(): ids do not survive a copy of the model (deepcopy, pickle)
        return next(i for i, (_, lin) in enumerate(self.members) if lin is base)

    def run(self, base: nn.Linear, x: Tensor, ctx) -> Tensor | None:
        """The output of projection ``base`` (one of the members) for input x, LoRA included;
        None where this call cannot fold (then the caller runs the ordinary path)."""
        if ctx.rows is not None or x.dim() < 2 or torch.is_autocast_enabled(x.device.type):
            return None
        if torch.compiler.is_compiling() and not self.compiled:
            return None
        cached = ctx.group_out.get(self.key) if len(self.members) > 1 else None
        if cached is not None and cached[0] is x:
            return cached[1][self._index(base)]
        a_parts, bups, scales, widths, ws, bs = [], [], [], [], [], []
        for e, lin in self.members:
            a, bu, s = _member_params(e)
            if not (x.dtype == lin.weight.dtype == a.dtype == bu.dtype) or (
                    lin.bias is not None and lin.bias.dtype != x.dtype):
                return None
            a_parts.append(a)
            bups.append(bu)
            scales.append(s)
            widths.append(a.shape[0])
            ws.append(lin.weight)
            bs.append(lin.bias)
        a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, 0)
        x2 = x.reshape(-1, x.shape[-1])
        ys = folded_linears(x2, a, ws, bs, bups, scales, widths)
        lead = x.shape[:-1]
        outs = [y.view(*lead, y.shape[-1]) for y in ys]
        if len(outs) > 1:
            ctx.group_out[self.key] = (x, outs)
        return outs[self._index(base)]


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
    for grp in state.ctx.groups.values():
        grp.folded = False  # (the compile report reads it)
    how = mode()
    if state.executor == "reference" or how == "0":
        return
    compiled = how == "compiled"
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
            host.fold = Fold(f"fold/{id(e)}", [(e, base)], compiled)
            continue
        if host.fold is not None:
            continue  # planned with its group
        live = list(grp._cols)  # entries and gate keys with columns of z, in column order
        if any(id(m) not in foldable for m in live):
            continue  # a gate or an unfoldable branch reads the same z: the group's own path
        fold = Fold(f"fold/{grp.key}", [(m, foldable[id(m)][2]) for m in live], compiled)
        grp.folded = True
        for m in live:
            foldable[id(m)][1].fold = fold
