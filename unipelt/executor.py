"""Group executors: one :class:`unipelt.plan.FusionGroup` run as one unit.

Every branch and gate of a layer that reads one tensor x — LoRA on q and v, their gates, the
prefix gate; an adapter and its gate — starts with a matrix product of x. The grouped executor
does all of them in one skinny product z = x·[A_q | A_v | w_g1 | w_g2 | ...]ᵀ per forward
(and so one accumulated dX in backward), evaluates each gate once, and hands every member its
columns of z. The per-branch path (each branch's own ``forward``) stays the reference; the
Triton kernels (:class:`TritonExecutor`, ``unipelt_kernels.lora_group``) are another executor
behind the same two calls (``shrunk`` and ``gate``) plus the expand into the base output
(:func:`kernel_expand`, called by ``runtime.accumulate``).

Selection (``executor`` in the spec, else the ``UNIPELT_EXECUTOR`` variable, else ``auto``):
``reference`` | ``grouped`` | ``triton`` (the kernels: CUDA, or CPU under ``TRITON_INTERPRET=1``;
float32/bfloat16/float16) | ``auto`` = the kernels on CUDA in a compiled forward where they fit,
for plain LoRA groups (no gate, no input dropout: where they measured faster end to end, see
:data:`AUTO_USES_KERNELS`), else the grouped PyTorch executor. Decided when the plan is
refreshed, from the group's weights; the compile report gives each group's executor and the reason
(:meth:`TritonExecutor.describe`).

A member joins when its module offers the group protocol (:class:`unipelt.types.Shrinkable`,
:class:`unipelt.types.GroupGate`) and its ``shrink_params()`` is not None (LoRA with dropout > 0
reads a dropped-out x of its own, so it computes alone).
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from unipelt.errors import ModelError
from unipelt.plan import FusionGroup
from unipelt.runtime import Entry, ForwardContext, pool_gate
from unipelt.spec import EXECUTOR_CHOICES

EXECUTORS = EXECUTOR_CHOICES  # auto | grouped | reference | triton
ENV_VAR = "UNIPELT_EXECUTOR"


class GroupExecutor:
    """Runs the members of one fusion group of one adapter."""

    # set at refresh by unipelt.fold.plan: the members run with their base projections as one
    # autograd node (the fold computes z itself), for the compile report
    folded: bool = False

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
            executor != "reference" and self.adapter in active
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
        # z is cut once into the branches' columns and the gates' block (see _split)
        self._branch_pos = {e: i for i, e in enumerate(self._live_branches)}
        self._split_widths = [self._cols[e][1] - self._cols[e][0] for e in self._live_branches]
        if self._gate_end > self._gate_start:
            self._split_widths.append(self._gate_end - self._gate_start)

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
        # one split for every member: autograd joins their gradients in one cat, where a slice
        # per member costs a zero fill, a strided copy into a z-sized gradient and an add each
        # (BERT's q/k/v group: 8 launches per layer against 1)
        ctx.group_out[self.key + "/split"] = (x, z.split(self._split_widths, -1))
        return z

    def _split(self, x: Tensor, ctx: ForwardContext) -> tuple[Tensor, ...]:
        """z cut into each live branch's columns, then (if any) the gates' block."""
        self._z(x, ctx)
        return ctx.group_out[self.key + "/split"][1]

    def _gate_block(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        """The gates' columns of z (``_gate_start`` to ``_gate_end``)."""
        return self._split(x, ctx)[-1]

    def shrunk(self, e: Entry, x: Tensor, ctx: ForwardContext) -> Tensor:
        """The branch's input projection of x (its columns of z)."""
        return self._split(x, ctx)[self._branch_pos[e]]

    def gate(self, gate_key: str, x: Tensor, ctx: ForwardContext) -> Tensor:
        """The gate's pooled values, from its logit columns of z."""
        cols = self._cols.get(gate_key)
        module = self.gate_modules[gate_key]
        if cols is None:
            return module(x, ctx)
        a, b = cols
        g0 = self._gate_start
        if self._joint is None:
            return module.activate(self._gate_block(x, ctx)[..., a - g0:b - g0], ctx)
        return self._pooled(x, ctx)[..., a - g0:b - g0]

    def _pooled(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        key = self.key + "/gates"
        cached = ctx.group_out.get(key)
        if cached is not None and cached[0] is x:
            return cached[1]
        logits = self._gate_block(x, ctx)
        bias = torch.cat([self.gate_modules[k].logit_params()[1] for k in self._live_gates]).to(logits.dtype)
        g = torch.sigmoid(logits + bias)
        if g.dim() == 2:
            g = g.unsqueeze(1)
        pooled = pool_gate(g, self._joint, ctx, key=id(self))
        ctx.group_out[key] = (x, pooled)
        return pooled


# ------------------------------------------------------------------------------------------
# the Triton executor
# ------------------------------------------------------------------------------------------
_KERNELS: object = None  # the unipelt_kernels.lora_group module, or the reason it is missing


def kernels():
    """``unipelt_kernels.lora_group`` (imported on first use: triton is an optional extra), or a
    string saying why it cannot be imported."""
    global _KERNELS
    if _KERNELS is None:
        try:
            from unipelt_kernels import lora_group
            _KERNELS = lora_group
        except Exception as e:  # ImportError, or triton failing to find a driver
            _KERNELS = f"the Triton kernels cannot be imported ({type(e).__name__}: {e})"
    return _KERNELS


# Whether ``auto`` picks the kernels, and where. The rule (:func:`auto_rule`): on CUDA, in a forward
# that torch.compile traces or a CUDA graph replays (:func:`graphing`), when dtype and shapes fit
# (and, compiled, only where inductor compiles for CUDA graphs: :func:`replayed_only`),
# for the groups that measured faster on the kernels: plain LoRA (no gate, no input dropout), shrink
# and expand. In eager mode the grouped executor's PyTorch ops (every Triton launch costs the host
# more than a PyTorch op: llama LoRA r16 all-linear train 2.49x the floor against 1.72x grouped,
# session 5). Measured on the H200 under
# reduce-overhead, two timing passes, ratio to the floor (benchmarks/RESULTS.md, Kernels, session 12):
# plain LoRA r16 on all linears, llama train 1.21 / 1.16 on the kernels against 1.26 / 1.22 grouped,
# llama infer 1.12 / 1.13 against 1.15 / 1.14, BERT graph-step train 1.52 against 1.64 (session 11);
# the groups where the kernels fuse more lost: gates (UniPELT llama train 1.68 / 1.63 against 1.66 /
# 1.61, infer 1.36 / 1.36 against 1.30 / 1.29; BERT 2.47 / 3.04 against 2.28 / 2.84) and in-kernel
# dropout (llama LoRA r16 d0.1 1.45 / 1.44 with the dropout blocks of call 2, against 1.37 / 1.33),
# so those stay grouped under auto. With the rule, auto measured llama 1.18 / 1.17 and BERT
# graph-step 1.52 / 1.51 against 1.25 / 1.23 and 1.64 grouped (session 12, call 2).
AUTO_USES_KERNELS = True
# the device types ``auto`` runs the kernels on (the CPU interpreter is for tests, which widen this)
AUTO_DEVICES: tuple[str, ...] = ("cuda",)


def auto_rule(device_type: str, compiling: bool, enabled: bool | None = None, gated: bool = False,
              dropout: bool = False) -> str | None:
    """None when ``auto`` runs the kernels for a tensor on ``device_type`` in a forward that is
    (``compiling``) or is not traced by torch.compile, for a group (or expand) with a live gate
    (``gated``) or an input dropout (``dropout``) or neither, else why not."""
    enabled = AUTO_USES_KERNELS if enabled is None else enabled
    if device_type not in AUTO_DEVICES:
        return f"executor 'auto' runs the kernels on CUDA only (tensors on {device_type})"
    if not enabled:
        return ("executor 'auto' keeps the grouped executor (executor.AUTO_USES_KERNELS is off); "
                "choose 'triton' to run the kernels")
    if gated or dropout:
        what = "gates" if gated else "an input dropout"
        return (f"executor 'auto' keeps the grouped executor for a group with {what}: compiled with CUDA graphs "
                "the kernels measured slower there (benchmarks/RESULTS.md, Kernels, session 12); choose 'triton' "
                "to run them")
    if not compiling:
        return ("executor 'auto' runs the kernels only under torch.compile or in a graphed step: in eager mode "
                "their launches cost the host more than the grouped executor's PyTorch ops (benchmarks/RESULTS.md, "
                "Kernels)")
    return None


_GRAPHING = 0  # depth of graphing() contexts


@contextlib.contextmanager
def graphing():
    """Marks the steps of a CUDA graph that will be replayed (its warm-up and its capture:
    ``training.graphed.GraphedTrainStep`` enters it), where ``auto`` runs the kernels as under
    torch.compile: a replayed launch costs the host nothing. The warm-up must be inside too, so
    that the kernels are compiled and loaded before the capture, not during it."""
    global _GRAPHING
    _GRAPHING += 1
    try:
        yield
    finally:
        _GRAPHING -= 1


def _graphed() -> bool:
    """Whether this forward's launches are recorded for replay: traced by torch.compile, or a step
    of a replayed CUDA graph (:func:`graphing`)."""
    return torch.compiler.is_compiling() or _GRAPHING > 0


def replayed_only(mode: str) -> bool:
    """Whether a compiled forward's kernel launches for executor ``mode`` are to stay kernels only
    where CUDA graphs replay them (``lora_group``'s triton_ops decide it while inductor compiles,
    by its mode): ``auto``, outside a :func:`graphing` step (which is replayed by construction).
    In inductor's default mode every Triton launch is host work the step waits for: llama LoRA r16
    all-linear train measured 28.9 ms on the kernels (53.4 ms as custom ops) against 26.7 ms on
    PyTorch's products, where under reduce-overhead the kernels take 21.5 against 22.7 ms
    (benchmarks/RESULTS.md, Kernels, session 13)."""
    return mode == "auto" and _GRAPHING == 0


def kernel_reason(mode: str, x: Tensor, planning: bool = False, gated: bool = False,
                  dropout: bool = False) -> str | None:
    """None when ``mode`` runs the kernels on ``x``, else why not. ``auto`` follows
    :func:`auto_rule`: decided per call, so one plan serves an eager and a compiled forward;
    ``planning`` (the plan's refresh, in eager code) asks whether some forward could run them
    (the compiled one). ``triton`` requested on a tensor the kernels cannot take is an error,
    not a silent fallback."""
    if mode not in ("auto", "triton"):
        return f"executor {mode!r}"
    if mode == "auto":
        why = auto_rule(x.device.type, planning or _graphed(), gated=gated, dropout=dropout)
        if why is not None:
            return why
    k = kernels()
    why = k if isinstance(k, str) else k.fits(x)
    if why is not None and mode == "triton":
        raise ModelError(f"executor 'triton' was chosen but cannot run: {why}; choose 'auto' or 'grouped'")
    return why


def stacked_kernels(mode: str, x: Tensor, dropping: bool) -> bool:
    """Whether a mixed batch's stacked LoRA product (``SiteRuntime.apply_stacked``) runs on the
    kernels. ``triton``: where they fit (else the error of :func:`kernel_reason`). ``auto``, whatever
    ``AUTO_USES_KERNELS`` says: only for a stack with an active input dropout in a compiled forward
    on CUDA, where only the kernels stack it (one mask draw per rate, inside the shrink) and the
    PyTorch path runs those adapters as segments instead, measured at 12-17x one adapter's llama
    train step against 1.05x on the kernels (H200, reduce-overhead: benchmarks/RESULTS.md,
    "Session 8 (lead)"); a dropout-free stack keeps the PyTorch products (never measured on the
    kernels)."""
    if mode not in ("auto", "triton"):
        return False
    if mode == "triton":
        return kernel_reason(mode, x) is None
    if not dropping:  # (measured: no dropout-free mixed stack on the kernels under auto yet)
        return False
    if auto_rule(x.device.type, _graphed(), enabled=True) is not None:
        return False
    k = kernels()
    return not isinstance(k, str) and k.fits(x) is None


def auto_loads_kernels() -> bool:
    """Whether ``auto`` may run the kernels on this machine (then they are imported when the
    executor is chosen, in eager code, not first inside a torch.compile trace)."""
    # (on CUDA ``auto`` may run them for a mixed batch's stack with dropout: stacked_kernels)
    return any(d != "cuda" or torch.cuda.is_available() for d in AUTO_DEVICES)


def _dropout_p(branch: nn.Module) -> float | None:
    """The input-dropout rate of a LoRA-style branch (``dropout`` an nn.Dropout before ``lora_A``),
    which the kernels apply inside the shrink; None for a branch without one."""
    # only a branch that declares its delta is exactly B·A·dropout(x) (``kernel_lora``): AdaLoRA
    # (A ⊙ E), DoRA (a norm of W0 + sBA) and VeRA also hold a dropout and an A, and mean more
    if not getattr(branch, "kernel_lora", False):
        return None
    d = getattr(branch, "dropout", None)
    if isinstance(d, nn.Dropout) and isinstance(getattr(branch, "lora_A", None), nn.Parameter):
        return float(d.p)
    return None


class TritonExecutor(GroupExecutor):
    """A group run by the fused kernels: one launch for x·[A_1 | … | A_k | W_g]ᵀ with the gates'
    sigmoid in its epilogue and LoRA's input dropout inside (so a dropout branch joins the group,
    as it cannot on the grouped executor). Whether the kernels run is decided at refresh from
    the group's weights (``kernel_reason``); where they do not, this is exactly the grouped
    :class:`GroupExecutor`. A call whose x no longer fits (the model moved after compiling)
    computes the same columns in PyTorch (:meth:`_z_torch`)."""

    mode: str = "grouped"
    kernel: bool = False
    reason: str = "not refreshed"
    _why: str | None = None  # why the kernels do not run here (kernel_reason at refresh), or None

    def refresh(self, active: set[str], executor: str, needed: set[tuple[str, str]] | None = None) -> None:
        self.mode = executor
        super().refresh(active, executor, needed)
        weights = [e.branch.lora_A for e in self.branches if _dropout_p(e.branch) is not None]
        weights += [w for w in self._weights_grouped()]
        self.kernel, self.reason, self._why = False, "no live readers", None
        if weights:
            why = kernel_reason(executor, weights[0], planning=True, gated=bool(self._live_gates),
                                dropout=any(p for e in self.branches if not e.merged and not e.off
                                            and (p := _dropout_p(e.branch))))
            self.kernel, self.reason, self._why = why is None, (why or self._fit_reason(executor)), why
        self._drop = []
        self._act_start = self._gate_end
        if not self.kernel:
            return
        # dropout branches join (their masks are drawn in the kernel); gates that are exactly
        # sigmoid-then-pool are activated in the epilogue, so they go last
        self._drop = [e for e in self.branches if not e.merged and not e.off and e not in self._cols
                      and _dropout_p(e.branch) is not None]
        live = self._drop + self._live_branches
        self._live_gates.sort(key=lambda k: getattr(self.gate_modules[k], "joint_pooling", None) is not None)
        self.on = self.adapter in active and len(live) + len(self._live_gates) >= 2
        self._cols, at = {}, 0
        for e in live:
            n = e.branch.lora_A.shape[0] if e in self._drop else e.branch.shrink_params()[0].shape[0]
            self._cols[e] = (at, at + n)
            at += n
        self._gate_start = at
        self._act_start = None
        for k in self._live_gates:
            if self._act_start is None and getattr(self.gate_modules[k], "joint_pooling", None) is not None:
                self._act_start = at
            n = self.gate_modules[k].logit_params()[0].shape[0]
            self._cols[k] = (at, at + n)
            at += n
        self._gate_end = at
        if self._act_start is None:
            self._act_start = at
        # the pieces z is split into: each branch's and each own-activation gate's columns, then the
        # activated gates' columns as one piece when they are pooled jointly, else one per gate
        keys: list[object] = list(live) + [k for k in self._live_gates if self._cols[k][0] < self._act_start]
        acts = [k for k in self._live_gates if self._cols[k][0] >= self._act_start]
        keys += (["act"] if self._joint is not None and acts else acts)
        self._part_keys = keys
        self._part_widths = [self._cols[k][1] - self._cols[k][0] if k != "act" else self._gate_end - self._act_start
                             for k in keys]

    @staticmethod
    def _fit_reason(executor: str) -> str:
        if executor == "auto":
            return ("executor 'auto': the kernels where CUDA graphs replay the forward (torch.compile's "
                    "reduce-overhead mode, a graphed step), the same columns by PyTorch ops in eager mode and in "
                    "inductor's default mode (benchmarks/RESULTS.md, Kernels)")
        return f"executor {executor!r}: the kernels fit"

    def _weights_grouped(self) -> list[Tensor]:
        return ([e.branch.shrink_params()[0] for e in self._live_branches]
                + [self.gate_modules[k].logit_params()[0] for k in self._live_gates])

    def _weights(self) -> list[Tensor]:
        return [e.branch.lora_A for e in self._drop] + self._weights_grouped()

    def _z(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        if not self.kernel:
            return super()._z(x, ctx)
        cached = ctx.group_out.get(self.key)
        if cached is not None and cached[0] is x:
            return cached[1]
        if kernel_reason(self.mode, x) is not None:
            z = self._z_torch(x)
        else:
            k = kernels()
            segments = [(e.branch.lora_A.shape[0], _dropout_p(e.branch) if e.branch.training else 0.0) for e in self._drop]
            seed = k.new_seed(x.device) if any(p > 0 for _, p in segments) else None
            rest = self._gate_end - sum(w for w, _ in segments)
            if rest:
                segments.append((rest, 0.0))
            z = k.lora_shrink(x, torch.cat(self._weights(), 0), self._act_bias(), self._act_start, segments, seed,
                              replayed_only=replayed_only(self.mode))
        ctx.group_out[self.key] = (x, z)
        # every member's columns as one split of z: autograd then joins their gradients in one
        # backward node (one cat) instead of a zero-filled z-sized tensor, a copy and an add per
        # member's slice (about 3 launches each on the host-bound eager path)
        ctx.group_out[self.key + "/parts"] = (x, dict(zip(self._part_keys, z.split(self._part_widths, -1))))
        return z

    def _part(self, key: object, x: Tensor, ctx: ForwardContext) -> Tensor:
        """A member's columns of z (``key``: its entry, gate key, or "act" for the activated gates)."""
        self._z(x, ctx)
        return ctx.group_out[self.key + "/parts"][1][key]

    def shrunk(self, e: Entry, x: Tensor, ctx: ForwardContext) -> Tensor:
        if not self.kernel:
            return super().shrunk(e, x, ctx)
        return self._part(e, x, ctx)

    def _act_bias(self) -> Tensor | None:
        act = [self.gate_modules[k].logit_params()[1] for k in self._live_gates if self._cols[k][0] >= self._act_start]
        return torch.cat(act) if act else None

    def _z_torch(self, x: Tensor) -> Tensor:
        """The kernel's columns in PyTorch: the dropout members' from their own dropped-out x, the
        activated gates' through their sigmoid."""
        parts = [F.linear(e.branch.dropout(x), e.branch.lora_A.to(x.dtype)) for e in self._drop]
        rest = self._weights_grouped()
        if rest:
            parts.append(F.linear(x, torch.cat(rest, 0).to(x.dtype)))
        z = torch.cat(parts, -1) if len(parts) > 1 else parts[0]
        bias = self._act_bias()
        if bias is not None:
            z = torch.cat([z[..., :self._act_start], torch.sigmoid(z[..., self._act_start:] + bias.to(z.dtype))], -1)
        return z

    def gate(self, gate_key: str, x: Tensor, ctx: ForwardContext) -> Tensor:
        if not self.kernel:
            return super().gate(gate_key, x, ctx)
        cols = self._cols.get(gate_key)
        module = self.gate_modules[gate_key]
        if cols is None:
            return module(x, ctx)
        a, b = cols
        if a < self._act_start:  # a gate of its own kind: raw logits, its own activation
            return module.activate(self._part(gate_key, x, ctx), ctx)
        if self._joint is None:
            g = self._part(gate_key, x, ctx)
            if g.dim() == 2:
                g = g.unsqueeze(1)
            return pool_gate(g, module.joint_pooling, ctx, key=id(module))
        g0 = self._act_start
        return self._pooled(x, ctx)[..., a - g0:b - g0]

    def _pooled(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        if not self.kernel:
            return super()._pooled(x, ctx)
        key = self.key + "/gates"
        cached = ctx.group_out.get(key)
        if cached is not None and cached[0] is x:
            return cached[1]
        g = self._part("act", x, ctx)  # already sigmoid(logits + b)
        if g.dim() == 2:
            g = g.unsqueeze(1)
        pooled = pool_gate(g, self._joint, ctx, key=id(self))
        ctx.group_out[key] = (x, pooled)
        return pooled

    def describe(self) -> tuple[str, str]:
        """(executor, reason) of this group as refreshed: for the compile report."""
        if not self.on:
            if self.branches and all(e.off for e in self.branches):
                # (its gates go with them: a gate no computed branch reads is not computed)
                return "reference", "not computed: every branch here is pruned or dropped (AdapterDrop)"
            # (a dropout branch reads its own dropped-out x: off the kernels it computes alone)
            alone = "computed alone (fewer than two live readers, or the reference executor)"
            return "reference", alone + (f"; {self._why}" if self._why else "")
        if self.kernel:
            return "triton", self.reason
        return "grouped", self.reason


def kernel_expand(e: Entry, out: Tensor, u: Tensor, g: Tensor | None, ctx: ForwardContext) -> Tensor | None:
    """``out + expand(u, g)`` by an expand kernel (one pass over the base output, the gate and
    scale applied inside): LoRA's (``lora_group.lora_expand``) and a bottleneck adapter's
    (``bottleneck.bottleneck_up``); None where the kernels do not run (the caller's PyTorch path)."""
    b = e.branch
    B = getattr(b, "lora_B", None)
    lora = isinstance(B, nn.Parameter) and getattr(b, "kernel_lora", False)
    # auto: a plain LoRA's expand (ungated) only; a gated one, and a bottleneck adapter's up-projection,
    # stay in PyTorch (auto_rule)
    if out.dim() < 2 or kernel_reason(ctx.executor, out, gated=g is not None or not lora) is not None:
        return None
    if lora:
        if g is None:
            coef, scale = None, b.scale
        elif b.gate_scale == "replace":
            coef, scale = g, 1.0
        else:
            coef, scale = g, b.scale
        return kernels().lora_expand(out, u, B, coef, scale, replayed_only=replayed_only(ctx.executor))
    act = _bottleneck_activation(b)
    if act is not None:
        from unipelt_kernels.bottleneck import bottleneck_up

        return bottleneck_up(out, u, b.down.bias, b.up.weight, b.up.bias, g, b.scale, act)
    return None


def _bottleneck_activation(b: nn.Module) -> str | None:
    """The activation name of a bottleneck adapter branch the kernel takes (fixed scale, biased
    down and up projections, a known activation), else None (the reference path)."""
    up, down, act = getattr(b, "up", None), getattr(b, "down", None), getattr(b, "act", None)
    if not isinstance(up, nn.Linear) or not isinstance(down, nn.Linear) or up.bias is None or down.bias is None:
        return None
    if not isinstance(getattr(b, "scale", None), (int, float)):  # a learned scale: its gradient stays in PyTorch
        return None
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else None
    return {nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Identity: "identity"}.get(type(act))


def resolve_executor(spec_executor: str | None) -> str:
    """The executor a compile uses: the spec's field, else ``UNIPELT_EXECUTOR``, else ``auto``."""
    if spec_executor is not None:
        return spec_executor
    env = os.environ.get(ENV_VAR)
    if env is None or env == "":
        return "auto"
    if env not in EXECUTORS:
        raise ValueError(f"{ENV_VAR}={env!r}: expected one of {', '.join(EXECUTORS)}")
    return env
