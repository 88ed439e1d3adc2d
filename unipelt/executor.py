"""Group executors: one :class:`unipelt.plan.FusionGroup` run as one unit.

Every branch and gate of a layer that reads one tensor x — LoRA on q and v, their gates, the
prefix gate; an adapter and its gate — starts with a matrix product of x. The grouped executor
does all of them in one skinny product z = x·[A_q | A_v | w_g1 | w_g2 | ...]ᵀ per forward
(and so one accumulated dX in backward), evaluates each gate once, and hands every member its
columns of z. The per-branch path (each branch's own ``forward``) stays the reference; the
Triton kernels will be another executor behind the same two calls (``shrunk`` and ``gate``).

A member joins when its module offers the group protocol (:class:`unipelt.types.Shrinkable`,
:class:`unipelt.types.GroupGate`) and its ``shrink_params()`` is not None (LoRA with dropout > 0
reads a dropped-out x of its own, so it computes alone).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from unipelt.plan import FusionGroup
from unipelt.runtime import Entry, ForwardContext, pool_gate

EXECUTORS = ("grouped", "reference")


class GroupExecutor:
    """Runs the members of one fusion group of one adapter."""

    def __init__(self, adapter: str, group: FusionGroup, branches: list[Entry], gates: dict[str, torch.nn.Module]):
        self.adapter = adapter
        self.group = group
        self.key = f"{adapter}/{group.key}"
        self.branches = branches  # entries whose branch computes from this tensor
        self.gate_modules = gates  # gate key -> gate module reading this tensor
        self.on = False
        # columns of z per member: keyed by the entry itself (ids do not survive a copy) or gate key
        self._cols: dict[object, tuple[int, int]] = {}
        self._live_branches: list[Entry] = []
        self._live_gates: list[str] = []

    # -- planning (attach, switch, merge, detach) -------------------------------------------
    def refresh(self, active: set[str], executor: str, needed: set[tuple[str, str]] | None = None) -> None:
        """``needed``: the (adapter, gate key) pairs some computed branch reads (None: all gates);
        a gate whose branches are all pruned or dropped is no longer computed."""
        self._live_branches = [
            e for e in self.branches
            if not e.merged and not e.off and callable(getattr(e.branch, "shrink_params", None))
            and e.branch.shrink_params() is not None
        ]
        self._live_gates = [k for k, g in self.gate_modules.items() if callable(getattr(g, "logit_params", None))
                            and (needed is None or (self.adapter, k) in needed)]
        self.on = (
            executor == "grouped" and self.adapter in active
            and len(self._live_branches) + len(self._live_gates) >= 2
        )
        self._cols = {}
        # gates that are exactly sigmoid-then-pool with one pooling (not the stateful running mean)
        # are activated and pooled together: one add, one sigmoid, one pooling for all of them
        poolings = {getattr(self.gate_modules[k], "joint_pooling", None) for k in self._live_gates}
        self._joint = poolings.pop() if len(poolings) == 1 and len(self._live_gates) > 1 else None
        if self._joint == "running_mean":
            self._joint = None
        at = 0
        for e in self._live_branches:
            n = e.branch.shrink_params()[0].shape[0]
            self._cols[e] = (at, at + n)
            at += n
        self._gate_start = at
        for k in self._live_gates:
            n = self.gate_modules[k].logit_params()[0].shape[0]
            self._cols[k] = (at, at + n)
            at += n
        self._gate_end = at

    def has(self, e: Entry) -> bool:
        return e in self._cols

    # -- running (once per forward) -----------------------------------------------------------
    def _z(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        cached = ctx.group_out.get(self.key)
        if cached is not None and cached[0] is x:
            return cached[1]
        weights = [e.branch.shrink_params()[0] for e in self._live_branches]
        weights += [self.gate_modules[k].logit_params()[0] for k in self._live_gates]
        z = F.linear(x, torch.cat(weights, 0).to(x.dtype))
        ctx.group_out[self.key] = (x, z)
        return z

    def shrunk(self, e: Entry, x: Tensor, ctx: ForwardContext) -> Tensor:
        """The branch's input projection of x (its columns of z)."""
        a, b = self._cols[e]
        return self._z(x, ctx)[..., a:b]

    def gate(self, gate_key: str, x: Tensor, ctx: ForwardContext) -> Tensor:
        """The gate's pooled values, from its logit columns of z."""
        cols = self._cols.get(gate_key)
        module = self.gate_modules[gate_key]
        if cols is None:
            return module(x, ctx)
        a, b = cols
        if self._joint is None:
            return module.activate(self._z(x, ctx)[..., a:b], ctx)
        g0 = self._gate_start
        return self._pooled(x, ctx)[..., a - g0:b - g0]

    def _pooled(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        key = self.key + "/gates"
        cached = ctx.group_out.get(key)
        if cached is not None and cached[0] is x:
            return cached[1]
        logits = self._z(x, ctx)[..., self._gate_start:self._gate_end]
        bias = torch.cat([self.gate_modules[k].logit_params()[1] for k in self._live_gates]).to(logits.dtype)
        g = torch.sigmoid(logits + bias)
        if g.dim() == 2:
            g = g.unsqueeze(1)
        pooled = pool_gate(g, self._joint, ctx, key=id(self))
        ctx.group_out[key] = (x, pooled)
        return pooled
