"""What runs in the forward pass: the per-model context, the hosts that carry branches at a module
(a wrapped leaf, or forward hooks), the combination of several branches at one hook point, and
gate pooling.

A *branch* (LoRA, an adapter, ...) computes an additive delta from the tensor it reads: the
hook point's input (``reads = "input"``) or its output (``reads = "output"``). A *gate* maps a
tensor to values in (0, 1) that the branch folds in its own way (the LoRA gate replaces or
multiplies alpha/r; an adapter gate multiplies its delta).
"""
from __future__ import annotations

import copy
import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn


# the protocols a plugin's modules follow live in unipelt.types (re-exported here for older imports)
from unipelt.types import Branch, GateModule  # noqa: E402,F401
from unipelt.errors import ModelError  # noqa: E402


# The index tensors of a mixed batch's selection (RowSelection: row ids, segments, inverse), made
# in eager code before each call, by the slot of their ForwardContext: kept outside every
# nn.Module on purpose. torch.compile marks every tensor it reaches through a module's attributes
# (here: hook -> context -> selection) a *static* input, one that keeps its address from call to
# call; a CUDA-graph tree checks those addresses at every replay, and a new row-id tensor each
# call failed the check at every step (BERT lora-r8-qv-mixed8 under reduce-overhead, H200,
# session 8: "Re-recording ... static input data pointer changed" each step, the step
# host-bound). Read from this module-level dict they are ordinary inputs, which the graph copies
# into its own buffers like the batch. One entry per context, replaced by the next call's.
_CALL_TENSORS: dict[int, dict[str, Any]] = {}
_SLOTS = itertools.count()


# ------------------------------------------------------------------------------------------
# the per-forward context
# ------------------------------------------------------------------------------------------
@dataclass
class ForwardContext:
    """State of the current forward pass that gates and branches read.

    attention_mask: the (B, T_total) padding mask given to the model (1 = real token), or None.
    layer_inputs: the hidden states entering each block in this forward (read by layer-input gates).
    stash: inputs captured for parallel (``io``) hook points, keyed by site key.
    record: when not None, gates write their values here (``AdapterHandle.gates``).
    """

    causal: bool = False
    attention_mask: Tensor | None = None
    layer_inputs: dict[int, Tensor] = field(default_factory=dict)
    stash: dict[str, Tensor] = field(default_factory=dict)
    record: dict[tuple[str, str, int], list[Tensor]] | None = None
    # running-mean gate state: gate key -> {position the state ends at: (sum, count)}
    running: dict[int, dict[int, tuple[Tensor, Tensor]]] = field(default_factory=dict)
    active: set[str] = field(default_factory=set)
    # tokens already in the KV cache when the call began (None: no cache, or unknown). transformers'
    # generate() drops an all-ones attention mask, so the mask alone cannot tell a cached step.
    cache_length: int | None = None
    # whether this call continues or returns a KV cache (past_key_values given, or use_cache):
    # only then do running-mean gates keep their state for the next call
    continued: bool = True
    # bumped whenever what runs changes (attach, switch, merge, detach)
    version: int = 0
    # group executors (plan.FusionGroup) by "adapter/group key", and their results in this forward
    groups: dict[str, Any] = field(default_factory=dict)
    group_out: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    # the prompt-style entries of active adapters (decided at refresh, not per call)
    embed_live: list = field(default_factory=list)
    executor: str = "grouped"  # mirrored from the state at refresh: auto | grouped | reference | triton
    # executor.kernel_expand where the executor may run the Triton kernels (auto, triton), else None
    expand_kernel: Any = None
    # masked-mean pooling weights (mask / real-token count) of this forward, (B, T, 1)
    mean_weights: Tensor | None = None
    # when a list: every gate evaluation appends (adapter, gate key, detached per-output mean),
    # for the training controllers (gate pruning) to read once per optimizer step (no sync here)
    gate_log: list | None = None
    # when a list: the same, not detached (gate pruning's budget pressure adds a penalty on the
    # gates to the loss; set only on the steps that press)
    gate_terms: list | None = None
    # several adapters in one batch (``model(..., adapter_names=[...])``): the rows of each adapter
    # in this call (set by the root pre-hook, None when the call names none), and, decided at
    # refresh, what runs for a row of each attached adapter (its name -> the adapters that run)
    rows: RowSelection | None = None
    solo: dict[str, frozenset[str]] = field(default_factory=dict)
    merged_any: bool = False
    inplace: frozenset[str] = frozenset()
    inplace_why: dict[str, str] = field(default_factory=dict)  # adapter -> why it cannot serve some rows
    embed_solo: dict[str, list] = field(default_factory=dict)  # adapter -> prompt entries of its rows
    row_names: list[str] | None = None  # inside ``with unipelt.adapter_names(model, names)``
    # a mixed batch's hook point running one adapter's segment (Host._run_rows): the adapter whose
    # rows the tensors seen by branches and gates are; the batch-shaped state of the call (mask,
    # layer inputs) is read through :meth:`rows_of` then. ``seg_rows``: the row subsets of this
    # call, (full tensor, adapter, subset), so the q and v projections of a layer (one group
    # executor) see one subset object and share its x·[A|w_gate]ᵀ as they do outside mixed batches
    seg: str | None = None
    seg_rows: list = field(default_factory=list)
    seg_mean_weights: dict = field(default_factory=dict)  # adapter -> its rows' masked-mean weights
    # adapters whose LoRA A / B are packed into stacked parameters (unipelt.pack_mixed), and, decided
    # at refresh, those of them that an ordinary (unmixed) call runs: such a call with gradients is
    # refused (their own tensors are frozen views of the stacks)
    packed: frozenset[str] = frozenset()
    packed_active: tuple[str, ...] = ()

    # this context's entry in _CALL_TENSORS (a mixed batch's per-call index tensors)
    slot: int = field(default_factory=lambda: next(_SLOTS), repr=False)

    def __post_init__(self) -> None:
        weakref.finalize(self, _CALL_TENSORS.pop, self.slot, None)

    # a copy (deepcopy, pickle: a model saved whole) is another context, with a slot of its own
    # (a pickled number would also collide with the slots of a fresh process)
    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d.pop("slot", None)
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self.slot = next(_SLOTS)
        self.__post_init__()

    def clear(self) -> None:
        """Forget the tensors of the last call."""
        self.layer_inputs.clear()
        self.stash.clear()
        self.group_out.clear()
        self.seg_rows.clear()
        self.seg_mean_weights.clear()
        self.mean_weights = None

    def rows_of(self, t: Tensor, name: str) -> Tensor:
        """The rows of ``t`` (batch first) that adapter ``name`` serves in this mixed batch, made
        once per call for each tensor (index_select: differentiable, gradients go back to t)."""
        for full, n, sub in self.seg_rows:
            if full is t and n == name:
                return sub
        sub = t.index_select(0, self.rows.index(name).to(t.device))
        self.seg_rows.append((t, name, sub))
        return sub

    def enter_segment(self, name: str) -> Tensor | None:
        """Branches and gates see adapter ``name``'s rows from now on (its masked-mean weights are
        its rows' own, made once a call); returns what :meth:`leave_segment` restores."""
        saved = self.mean_weights
        self.seg, self.mean_weights = name, self.seg_mean_weights.get(name)
        return saved

    def leave_segment(self, saved: Tensor | None) -> None:
        if self.seg is not None and self.mean_weights is not None:
            self.seg_mean_weights[self.seg] = self.mean_weights
        self.seg, self.mean_weights = None, saved

    def layer_input(self, layer: int | None) -> Tensor | None:
        """The hidden states entering block ``layer`` (the segment's rows inside a segment)."""
        h = self.layer_inputs.get(layer)
        if h is None or self.seg is None:
            return h
        return self.rows_of(h, self.seg)

    def token_mask(self, batch: int, length: int, device, dtype) -> Tensor | None:
        """The padding mask for the last ``length`` positions, shaped (B, T, 1), or None."""
        m = self.attention_mask
        if m is not None and m.dim() == 2 and self.seg is not None:
            m = self.rows_of(m, self.seg)
        if m is None or m.dim() != 2 or m.shape[0] != batch or m.shape[1] < length:
            return None
        return m[:, -length:].to(device=device, dtype=dtype).unsqueeze(-1)

    def past_length(self, length: int) -> int:
        if self.cache_length is not None:
            return self.cache_length
        m = self.attention_mask
        if m is None or m.dim() != 2:
            return 0
        return max(int(m.shape[1]) - length, 0)


def pool_gate(g: Tensor, pooling: str, ctx: ForwardContext, key: int) -> Tensor:
    """Pool per-token gate values g (B, T, k) as the gate's spec says.

    ``masked_mean`` averages over real tokens only (padding changes nothing); ``mean`` is the
    reference code's average over every position, padding included; ``running_mean`` averages
    over the real tokens up to each position, continuing across cached generation steps, so a
    position never sees later tokens.
    """
    if pooling == "token":
        return g
    B, T, _ = g.shape
    mask = ctx.token_mask(B, T, g.device, g.dtype)
    if pooling == "mean":
        return g.mean(dim=1, keepdim=True)
    if pooling == "masked_mean":
        if mask is None:
            return g.mean(dim=1, keepdim=True)
        # the weights mask/count are the same for every masked-mean gate of this forward: made once
        w = ctx.mean_weights
        if w is None or w.shape[1] != T or w.dtype != g.dtype or w.shape[0] != B:
            w = mask / mask.sum(1, keepdim=True).clamp_min(1.0)
            ctx.mean_weights = w
        return (g * w).sum(1, keepdim=True)
    if pooling == "running_mean":
        if mask is None:
            mask = g.new_ones(B, T, 1)
        csum = torch.cumsum(g * mask, dim=1)
        ccount = torch.cumsum(mask, dim=1)
        past = ctx.past_length(T)
        if not ctx.continued and past == 0:
            # a call that neither continues a KV cache nor returns one (use_cache=False, or a
            # model without a cache) starts from nothing and will not be continued: no state to
            # read or keep (states keyed by length would make a compiled model recompile at
            # every new sequence length)
            return csum / ccount.clamp_min(1.0)
        # States are kept by the position they end at: a gate applied several times in one step
        # (one layer-input gate serving q and v, a shared gate) reads the same state each time.
        states = ctx.running.setdefault(key, {})
        prev = states.get(past) if past > 0 else None
        if prev is not None and prev[0].shape[0] == B:
            csum = csum + prev[0]
            ccount = ccount + prev[1]
        if not torch.is_grad_enabled() or not g.requires_grad:
            # Only inference (cached generation) needs the state; keeping it while training
            # would hold the graph alive.
            states[past + T] = (csum[:, -1:].detach(), ccount[:, -1:].detach())
            for end in [e for e in states if e not in (past, past + T)]:
                del states[end]
        return csum / ccount.clamp_min(1.0)
    raise ValueError(f"unknown gate pooling {pooling!r}")


BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class RowSelection:
    """The rows of one call that each adapter serves (``adapter_names=[...]``, one name per row,
    ``"__base__"`` for none). A hook point runs each selected adapter on its own rows only, one
    segment per adapter (:meth:`Host._run_rows`): the rows sorted by adapter, each segment's
    result written back in one gather, so gates, pooling and masks are those of a single-adapter
    call on those rows and each row's gradient reaches only its own adapter. Plain LoRA at a
    projection runs as one stacked product over the whole batch instead
    (:meth:`SiteRuntime._plan_stacked`), prefixes side by side in attention (KVProvider._rows).

    ``order`` is every attached adapter in attach order. The forward reads the selection through
    tensors and the tuple ``adapters`` (those present, in that order) only: ``row_ids`` (each
    row's position in ``order``, -1 for a base row), each present adapter's row indices
    (:meth:`index`), the base rows and ``inverse``, the permutation that puts the sorted segments
    back in row order. The index tensors' lengths are marked *unbacked* for ``torch.compile``:
    the captured forward neither specialises on a segment's size nor guards on it, so a new
    assignment of rows to the same adapters reuses the graph instead of compiling a new one
    (sizes as plain symbols would specialise at 0 and 1 and recompile).
    """

    def __init__(self, names: list[str], device, order: tuple[str, ...] | None = None,
                 slot: int | None = None):
        self.names = list(names)
        self.batch = len(names)
        present = set(names)
        self.order = tuple(order) if order is not None else tuple(dict.fromkeys(n for n in names if n != BASE))
        self.adapters = tuple(n for n in self.order if n in present)
        self.device = device
        at = {n: i for i, n in enumerate(self.order)}
        self._masks: dict[tuple, Tensor] = {}
        # the segments: each present adapter's rows in row order, then the base rows (always a
        # tensor, possibly empty: whether a batch has base rows changes no graph), and the inverse
        # of that order. Every index of the call travels to the device in one copy (each copy from
        # a Python list waits for the device's queue); the tensors are slices of it
        groups = {n: [i for i, m in enumerate(self.names) if m == n] for n in self.adapters}
        base = [i for i, m in enumerate(self.names) if m not in groups]
        perm = [i for rows in groups.values() for i in rows] + base
        inverse = [0] * len(perm)
        for j, i in enumerate(perm):
            inverse[i] = j
        ids = [at.get(n, -1) for n in self.names]
        packed = host_to_device(ids + inverse + perm, torch.long, device)
        b = self.batch
        index, start = {}, 2 * b
        for n, rows in groups.items():
            index[n] = _segment_index(packed, start, len(rows))
            start += len(rows)
        tensors = {"row_ids": packed[:b], "inverse": packed[b:2 * b], "index": index,
                   "base_rows": _segment_index(packed, start, len(base))}
        # made eagerly for a context (the root pre-hook): its tensors go to _CALL_TENSORS, where a
        # compiled forward reads them as plain inputs (see there); made inside a traced frame (the
        # prompt rewrite's) they are the graph's constants and stay here
        self.slot = slot
        self._tensors = None if slot is not None else tensors
        if slot is not None:
            _CALL_TENSORS[slot] = tensors

    def _get(self, what: str):
        # the dict lookup stays in this function, so that torch.compile's source for the tensor is
        # the module-level dict, not an attribute chain from a module
        return _CALL_TENSORS[self.slot][what] if self._tensors is None else self._tensors[what]

    @property
    def row_ids(self) -> Tensor:
        """Each row's position in ``order`` (-1: a base row)."""
        return self._get("row_ids")

    @property
    def inverse(self) -> Tensor:
        return self._get("inverse")

    @property
    def base_rows(self) -> Tensor:
        return self._get("base_rows")

    def index(self, name: str) -> Tensor:
        """The rows adapter ``name`` serves (a long tensor, ascending)."""
        return self._get("index")[name]

    def mask(self, name: str, dim: int) -> Tensor:
        """A (B, 1, ..., 1) boolean mask of ``name``'s rows, broadcastable to a ``dim``-d tensor."""
        key = (name, dim)
        m = self._masks.get(key)
        if m is None:
            m = (self.row_ids == self.order.index(name)).view(-1, *([1] * (dim - 1)))
            self._masks[key] = m
        return m

    def column_scale(self, cols: tuple[tuple[str, int, float], ...], dim: int,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, 1, .., K) in ``dtype``: for blocks ``(adapter, width, scale)`` side by side, ``scale``
        on the rows of that adapter and 0 elsewhere (made once per call for each layout of columns
        and dtype: every projection of the call multiplies by it, and a cast per projection would
        be one more kernel each in an eager bf16 forward)."""
        key = ("cols", cols, dim, dtype)
        m = self._masks.get(key)
        if m is None and dtype != torch.float32:
            m = self.column_scale(cols, dim).to(dtype)
            self._masks[key] = m
        if m is None:
            at = {n: i for i, n in enumerate(self.order)}
            owner = host_to_device([at.get(name, -2) for name, width, _ in cols for _ in range(width)],
                                   torch.long, self.device)
            scale = host_to_device([scale for _, width, scale in cols for _ in range(width)], torch.float32,
                                   self.device)
            m = torch.where(self.row_ids.unsqueeze(1) == owner, scale, scale.new_zeros(()))
            m = m.view(m.shape[0], *([1] * (dim - 2)), m.shape[1])
            self._masks[key] = m
        return m


def host_to_device(values: list, dtype: torch.dtype, device) -> Tensor:
    """``torch.tensor(values)`` on ``device`` without waiting for the device. A tensor made from a
    Python list straight on a CUDA device is a copy from pageable memory, which waits until the
    work already queued on the stream has run: a mixed batch's row ids, made each call before the
    forward, would stall the host for the previous step's whole GPU time and serialise host and
    device (under CUDA graphs nothing else in the step waits). From pinned memory with
    ``non_blocking`` the copy is queued like a kernel (PyTorch's pinned-memory cache keeps the
    block until the copy has run). Inside a traced frame the tensor is a constant of the graph."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cuda" or torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=dev)
    if torch.cuda.is_current_stream_capturing():
        # inside a CUDA-graph capture (unipelt.training.graphed: one graph per train step) a
        # host copy would be replayed from a pinned block that the host allocator frees and
        # reuses; made by kernels, the values are constants of the graph
        return device_constant(values, dtype, dev)
    return torch.tensor(values, dtype=dtype).pin_memory().to(dev, non_blocking=True)


def value_runs(values: list) -> list[tuple[Any, Any, int]]:
    """``values`` as runs ``(start, step, length)``: integers in arithmetic progressions, other
    values (floats) in runs of equal values (step 0), so that ``start + step * i`` is exact."""
    runs: list[tuple[Any, Any, int]] = []
    i, n = 0, len(values)
    while i < n:
        start = values[i]
        exact = isinstance(start, int) and not isinstance(start, bool)
        step = values[i + 1] - start if i + 1 < n and exact and isinstance(values[i + 1], int) else 0
        j = i + 1
        while j < n and values[j] == start + step * (j - i) and (step == 0 or isinstance(values[j], int)):
            j += 1
        runs.append((start, step, j - i))
        i = j
    return runs


def device_constant(values: list, dtype: torch.dtype, device) -> Tensor:
    """``torch.tensor(values, dtype, device)`` made by kernels alone (an ``arange`` or ``full``
    per run of :func:`value_runs`, one ``cat``): no copy from the host, so it can be captured in
    a CUDA graph, whose replays recompute the same values."""
    parts = [torch.arange(start, start + step * length, step, dtype=dtype, device=device)[:length] if step else
             torch.full((length,), start, dtype=dtype, device=device) for start, step, length in value_runs(values)]
    if not parts:
        return torch.empty(0, dtype=dtype, device=device)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward hands on its gradient contiguous."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def contiguous_grad(t: Tensor) -> Tensor:
    """``t`` itself in the forward; its gradient contiguous (row-major), the layout of a parameter's
    ``.grad``, so that AccumulateGrad can take it as is instead of copying it."""
    return _ContiguousGrad.apply(t)


def _segment_index(packed: Tensor, start: int, length: int) -> Tensor:
    # a copy, not a view of ``packed``: the compiled forward would guard on a view's offset, which
    # moves with the segment sizes (the copy is on the device: no host round trip)
    t = packed[start:start + length].clone()
    # the segment's length is data: under torch.compile a symbol with no guards (see RowSelection).
    # Made eagerly (the root pre-hook); a selection made inside a traced frame (the prompt rewrite's,
    # specialised on the names anyway) has constant lengths
    if not torch.compiler.is_compiling():
        torch._dynamo.decorators.mark_unbacked(t, 0)
    return t


# ------------------------------------------------------------------------------------------
# branches at one hook point, and how they combine
# ------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Entry:
    """One branch of one adapter at one hook point."""

    adapter: str
    node: str
    branch: nn.Module
    gate: nn.Module | None
    gate_key: str | None
    gate_input: Literal["layer", "site"] = "site"
    layer: int | None = None
    merged: bool = False
    # switched off by gate pruning (for good: the spec records it) or by AdapterDrop (this step's
    # or the inference choice of layers): not computed, decided at refresh like ``merged``
    pruned: bool = False
    dropped: bool = False
    # the group executors that compute this branch's input projection and this entry's gate
    # (None: computed alone, the reference path)
    group: Any = None
    gate_group: Any = None
    saved: Any = None  # what attaching replaced, for detach (a ``params`` kind's original tensors)
    # a ``params`` kind (tensors trained in place: head, biases, norms), per saved tensor: None
    # while the model's tensor holds this adapter's values, else this adapter's values, kept
    # aside while another adapter (or the base, when none that trains it is active) holds it
    held: Any = None

    @property
    def off(self) -> bool:
        """Not computed in the forward: pruned or dropped (a merged branch runs inside the weight)."""
        return self.pruned or self.dropped


def gate_value(e: Entry, src: Tensor | None, ctx: ForwardContext) -> Tensor | None:
    """The gate of ``e`` for this forward: read from its group when one computes it (once per
    layer, shared by every branch using it), else computed from the tensor the gate reads."""
    if e.gate is None:
        return None
    gx = ctx.layer_input(e.layer) if e.gate_input == "layer" else src
    if gx is None:
        raise RuntimeError(f"gate {e.gate_key}: the input of layer {e.layer} was not captured")
    grp = e.gate_group
    g = grp.gate(e.gate_key, gx, ctx) if grp is not None and grp.on else e.gate(gx, ctx)
    if ctx.record is not None:
        # a node's per-site gates (``lora@attn.q``, ``lora@attn.v``) are reported one row each;
        # a shared gate, under each node that uses it
        gate_id = e.gate_key.rsplit(".", 1)[0] if e.gate_key else e.node
        label = gate_id if gate_id.startswith(e.node + "@") else e.node
        ctx.record.setdefault((e.adapter, label, e.layer if e.layer is not None else -1), []).append(g.detach())
    if ctx.gate_log is not None or ctx.gate_terms is not None:
        # one small reduction, no host sync: the controller reads them all once per step (detached),
        # and on pressing steps the same mean, undetached, goes into the budget pressure
        mean = g.float().flatten(0, -2).mean(0)
        if ctx.gate_log is not None:
            ctx.gate_log.append((e.adapter, e.gate_key, mean.detach()))
        if ctx.gate_terms is not None:
            ctx.gate_terms.append((e.adapter, e.gate_key, mean))
    return g


def _shrunk(e: Entry, src: Tensor, ctx: ForwardContext) -> Tensor | None:
    """u = src·Wᵀ of a Shrinkable branch under the group executors (from its group, or alone:
    the same protocol, so the gate or scale multiplies the narrow u); None on the reference path."""
    if ctx.executor == "reference":
        return None
    grp = e.group
    if grp is not None and grp.on and grp.has(e):
        return grp.shrunk(e, src, ctx)
    shrink = getattr(e.branch, "shrink_params", None)
    w = shrink() if shrink is not None else None
    return None if w is None else nn.functional.linear(src, w[0].to(src.dtype))


def branch_delta(e: Entry, src: Tensor, ctx: ForwardContext, base: Tensor | None = None) -> Tensor:
    """The delta of branch ``e`` reading ``src``: from its (group's) input projection under the
    grouped executor, else the branch's own forward (the reference). ``base`` is the hook point's
    base output, given to branches that declare ``reads_base`` (DoRA)."""
    g = gate_value(e, src, ctx)
    u = _shrunk(e, src, ctx)
    if getattr(e.branch, "reads_base", False):
        if u is not None:
            return e.branch.expand(u, g, base=base)
        return e.branch(src, gate=g, base=base)
    if u is not None:
        return e.branch.expand(u, g)
    return e.branch(src, gate=g)


def accumulate(e: Entry, src: Tensor, out: Tensor, ctx: ForwardContext, base: Tensor | None = None,
               owned: bool = False) -> Tensor:
    """``out + delta`` of branch ``e``; a branch with ``expand_into`` (LoRA) accumulates into
    ``out`` inside its last matrix product (addmm: one pass less over the output). ``owned``:
    nothing else reads ``out``, so that product may write into it (``expand_into(owned=True)``)."""
    into = getattr(e.branch, "expand_into", None)
    kx = ctx.expand_kernel  # the Triton executor's expand into out (executor.kernel_expand)
    if into is not None or kx is not None:
        g = gate_value(e, src, ctx)
        u = _shrunk(e, src, ctx)
        if getattr(e.branch, "reads_base", False):  # DoRA: its own expansion, never a kernel's
            if u is not None:
                return into(out, u, g, base=base) if into is not None else out + e.branch.expand(u, g, base=base)
            return out + e.branch(src, gate=g, base=base)
        if u is None:
            return out + e.branch(src, gate=g)
        y = kx(e, out, u, g, ctx) if kx is not None else None
        if y is not None:
            return y
        if into is None:
            return out + e.branch.expand(u, g)
        return into(out, u, g, owned=True) if owned else into(out, u, g)
    return out + branch_delta(e, src, ctx, base)


class SiteRuntime:
    """The branches attached at one hook point of one layer, and their combination rule."""

    def __init__(self, site_key: str, kind: str, out_slice: tuple[int, int] | None, out_width: int | None):
        self.site_key = site_key
        self.kind = kind
        self.out_slice = out_slice
        self.out_width = out_width  # full width of the host output when sliced
        self.entries: list[Entry] = []
        self.mode: dict[str, str] = {}  # adapter -> parallel | sequential | average
        # ``renorm`` sites: the post-LN sublayer norm applied again after the branches; None on a
        # pre-LN block, where the residual is captured separately (``reads_stash``) and N = identity
        self.norm: nn.Module | None = None

    @property
    def reads_stash(self) -> bool:
        """Whether this site's ``x`` is a captured tensor (the FFN input, a pre-LN residual)."""
        return self.kind == "io" or (self.kind == "renorm" and self.norm is None)

    def refresh(self, active: set[str]) -> None:
        """Decide what runs here (called on attach, switch, merge and detach, never per call)."""
        live = [e for e in self.entries if not e.merged and not e.off and e.adapter in active]
        # AdapterFusion (plugins/fusion.py): an active fusion entry replaces the sum of the adapters
        # it fuses by its attention over their deltas
        self.fusion = []
        fusers = [e for e in live if getattr(e.branch, "fuses", None)]
        if fusers:
            fused = {n for f in fusers for n in f.branch.fuses}
            for f in fusers:
                members = [[e for e in self.entries if e.adapter == n and not e.merged and not e.off]
                           for n in f.branch.fuses]
                self.fusion.append((f, [m for m in members if m]))
            live = [e for e in live if e not in fusers and e.adapter not in fused]
        # input scalings (``reads = "scale"``) run before the base projection, not among the deltas
        self.scalers = [e for e in live if e.branch.reads == "scale"]
        self.live = [e for e in live if e.branch.reads != "scale"]
        self.live_mode = self.mode.get(self.live[0].adapter, "parallel") if self.live else "parallel"

    live: list[Entry] = []
    scalers: list[Entry] = []
    live_mode: str = "parallel"
    fusion: list = []  # [(fusion entry, [entries of each fused adapter])]
    solo: dict = {}  # adapter name -> (live, live_mode, fusion) of a row served by it
    solo_scalers: dict = {}  # adapter name -> the input scalings of a row served by it

    def plan_solo(self, solo: dict[str, frozenset[str]]) -> None:
        """What runs here for a row of each attached adapter (mixed batches), decided at refresh:
        its deltas (``solo``) and its input scalings (``solo_scalers``, IA3 at ffn.down)."""
        saved = (self.live, self.live_mode, self.fusion, self.scalers)
        plans, scalers = {}, {}
        for name, running in solo.items():
            if any(e.adapter in running for e in self.entries):
                self.refresh(set(running))
                if self.live or self.fusion:
                    plans[name] = (self.live, self.live_mode, self.fusion)
                if self.scalers:
                    scalers[name] = self.scalers
        self.live, self.live_mode, self.fusion, self.scalers = saved
        self.solo = plans
        self.solo_scalers = scalers
        self.stacked = self._plan_stacked(plans)
        self._stack_cache = None
        if self.packed is not None:
            # an adapter attached or detached since pack_mixed: the stack no longer holds exactly the
            # members of the plan, and its columns would serve the wrong rows
            self.packed_stale = self.stacked is None or [e.branch for _, e in self.stacked] != self.packed.members

    stacked: "list[tuple[str, Entry]] | None" = None
    _stack_cache: tuple | None = None
    # the stacked parameters of this projection (unipelt.pack_mixed), and whether the plan has
    # changed since they were made
    packed: "StackedParams | None" = None
    packed_stale: bool = False

    def refuse_packed(self, why: str) -> None:
        """A call with gradients that would run this projection's packed adapters outside their
        stack: their lora_A / lora_B are frozen views of it, so it would train nothing."""
        names = ", ".join(repr(n) for n in self.packed.names if n is not None)
        raise ModelError(f"{self.site_key}: adapters {names} are packed for mixed batches (unipelt.pack_mixed) and "
                         f"{why}; their own lora_A / lora_B are frozen views of the stacked parameters, so this "
                         "call would train nothing: call unipelt.unpack_mixed(model) first (then rebuild the optimizer)")

    def _plan_stacked(self, plans: dict) -> "list[tuple[str, Entry]] | None":
        """Mixed batches at a projection: when every adapter here has one plain, ungated branch of
        the form ``expand(u) = (scale·u)·W_upᵀ`` (``segment_params() -> (W_up, scale)``: LoRA), all
        of them run as one product x·[A_1|..|A_N]ᵀ, a per-row column mask (scale for the row's own
        adapter's columns, 0 elsewhere) and one product with [B_1|..|B_N]: cost independent of how
        many adapters share the batch in kernel launches. None: each adapter runs on its own
        (:meth:`apply_solo`).

        Why this form rather than a per-row gather of each row's A and B with a batched matmul, or
        tokens sorted into one segment per adapter: the stacked products add N·r/d of the base
        projection's FLOPs (3% at N·r = 64, d = 2048) as two ordinary GEMMs, with no copy of the
        activations (sorting moves all of x and of the output) and no per-row weight gather (B·r·d
        per call); as N·r approaches d a gather + bmm would be cheaper (not measured). On an H200,
        eight adapters mixed cost 1.06-1.14x one adapter per batch at inference (RESULTS.md)."""
        if self.kind != "linear" or self.out_slice is not None or len(plans) < 2:
            return None
        out = []
        for name, (live, mode, fusion) in plans.items():
            if fusion or mode != "parallel" or len(live) != 1:
                return None
            e = live[0]
            b = e.branch
            if (e.gate is not None or b.reads != "input" or not callable(getattr(b, "segment_params", None))
                    or b.segment_params() is None or self._stacked_A(b) is None):
                return None
            out.append((name, e))
        return out

    @staticmethod
    def _stacked_A(b) -> Tensor | None:
        """The branch's A in the stacked product: its shrink weight, or, for a LoRA with input
        dropout (which has no shrink weight of its own: its x differs), its ``lora_A`` -- such a
        member stacks where its dropout is inactive (eval, p = 0) or drawn per column segment
        inside the Triton shrink (:meth:`apply_stacked`)."""
        from .executor import _dropout_p  # (executor imports this module)

        sp = b.shrink_params() if callable(getattr(b, "shrink_params", None)) else None
        if sp is not None:
            return sp[0]
        return b.lora_A if _dropout_p(b) is not None else None

    def apply_stacked(self, x: Tensor, y: Tensor, rows: "RowSelection",
                      ctx: "ForwardContext | None" = None) -> Tensor | None:
        """The mixed-batch output of the stacked plan (:meth:`_plan_stacked`); None where a
        member's input dropout is active and the kernels do not run (the caller then runs the
        adapters as segments: N dropped-out copies of the whole x would cost more).

        On the Triton executor (``ctx.executor`` triton, or auto where it runs the kernels) the
        products are the fusion group's kernels: one shrink launch reads x once for every
        adapter's A, with the dropout masks drawn inside it, one column segment per distinct rate
        (what the PyTorch path cannot stack), the per-row column mask multiplies the N·r-wide z,
        and one expand adds z·[B_1|..|B_N]ᵀ into the base output in one pass."""
        from .executor import _dropout_p, kernels, stacked_kernels

        packed = self.packed
        if packed is not None and self.packed_stale:
            if torch.is_grad_enabled():
                self.refuse_packed("the adapters at this projection changed since packing")
            packed = None  # no gradients: the views hold the trained values, stacked per call as before
        members = [(name, e, (_dropout_p(e.branch) or 0.0) if e.branch.training else 0.0)
                   for name, e in self.stacked]
        dropping = any(p > 0 for _, _, p in members)
        use_kernels = ctx is not None and y.dim() >= 2 and stacked_kernels(ctx.executor, x, dropping)
        if dropping and not use_kernels:
            if packed is not None and torch.is_grad_enabled():
                self.refuse_packed("an input dropout is active, which the PyTorch executors cannot stack (the "
                                   "adapters would run as segments); use executor: triton, or dropout 0")
            return None
        if dropping and packed is None:  # (a packed stack keeps its column order: one segment per run of a rate)
            # one column segment (one mask over x) per distinct rate, not per adapter: a row is
            # read by its own adapter's columns only (the column mask zeroes the others, in
            # forward and backward), so adapters with the same p may share the draw -- each row
            # still sees dropout(x_row) with its adapter's rate -- and x is read, and masked,
            # once per rate instead of once per adapter
            rates = list(dict.fromkeys(p for _, _, p in members))
            members.sort(key=lambda m: rates.index(m[2]))
        a_parts, b_parts, cols, segs = [], [], [], []
        for name, e, p in members:
            w_up, scale = e.branch.segment_params()
            w_down = self._stacked_A(e.branch)
            a_parts.append(w_down)
            b_parts.append(w_up)
            cols.append((name, w_down.shape[0], float(scale)))
            segs.append((w_down.shape[0], p))
        if packed is not None:
            # one trainable tensor each (unipelt.pack_mixed): no concatenation, in the forward or
            # split back in the backward, and one gradient, one AccumulateGrad, one optimizer
            # tensor per projection instead of one per adapter
            a, w = packed.A, packed.B
            # a detached member's block (StackedParams.release) is read by no row: scale 0
            cols = packed.layout(cols, lambda r: (None, r, 0.0))
            segs = packed.layout(segs, lambda r: (r, 0.0))
        elif torch.is_grad_enabled() or torch.compiler.is_compiling():
            # (under torch.compile a tensor's ``_version`` is data-dependent: no cache key; the
            # captured graph concatenates the N·r-row weights per call, a copy far smaller than x)
            if torch.compiler.is_compiling():
                # each B's gradient is a column block of the stacked one, a strided view, which
                # AccumulateGrad copies outside the graph (one allocation and launch per adapter
                # and projection: 192 per BERT mixed8 step, H200 session 8); made contiguous
                # inside the captured backward instead. Eager pays the same copy either way
                b_parts = [contiguous_grad(b) for b in b_parts]
            a, w = torch.cat(a_parts, 0), torch.cat(b_parts, 1)
        else:
            # inference: the side-by-side weights are kept until a parameter changes (its version)
            key = tuple((id(t), t._version) for t in a_parts + b_parts)
            cached = self._stack_cache
            if cached is None or cached[0] != key:
                cached = (key, torch.cat(a_parts, 0), torch.cat(b_parts, 1))
                self._stack_cache = cached
            a, w = cached[1], cached[2]
        if use_kernels:
            k = kernels()
            merged: list[tuple[int, float]] = []  # adjacent members of one rate share a segment
            for width, p in segs:
                if merged and merged[-1][1] == p:
                    merged[-1] = (merged[-1][0] + width, p)
                else:
                    merged.append((width, p))
            seed = k.new_seed(x.device) if dropping else None
            z = k.lora_shrink(x, a, segments=merged, seed=seed)
            z = z * rows.column_scale(tuple(cols), z.dim(), z.dtype)
            return k.lora_expand(y, z, w)
        z = torch.nn.functional.linear(x, a.to(x.dtype))
        z = z * rows.column_scale(tuple(cols), z.dim(), z.dtype)
        w = w.to(x.dtype)
        if y.dim() >= 2 and y.is_contiguous() and not torch.compiler.is_compiling():
            flat = torch.addmm(y.reshape(-1, y.shape[-1]), z.reshape(-1, z.shape[-1]), w.t())
            return flat.view(y.shape)
        return y + torch.nn.functional.linear(z, w)

    def apply_solo(self, name: str, x: Tensor | None, y: Tensor, ctx: ForwardContext) -> Tensor | None:
        """The hook point's output with only ``name``'s plan live (None: nothing of it here)."""
        plan = self.solo.get(name)
        if plan is None:
            return None
        saved = (self.live, self.live_mode, self.fusion)
        self.live, self.live_mode, self.fusion = plan
        try:
            return self.apply(x, y, ctx)
        finally:
            self.live, self.live_mode, self.fusion = saved

    def adapter_delta(self, entries: list[Entry], mode: str, x: Tensor | None, y: Tensor,
                      ctx: ForwardContext) -> Tensor | None:
        """The delta one adapter's branches here add to y (its own combination rule)."""
        if mode == "sequential":
            cur = y
            for e in entries:
                cur = cur + branch_delta(e, x if e.branch.reads == "input" else cur, ctx)
            return cur - y
        delta = None
        for e in entries:
            d = branch_delta(e, x if e.branch.reads == "input" else y, ctx)
            delta = d if delta is None else delta + d
        if delta is not None and mode == "average" and len(entries) > 1:
            delta = delta / len(entries)
        return delta

    def delta(self, x: Tensor | None, y: Tensor, ctx: ForwardContext) -> Tensor | None:
        """The combined delta of the live branches (parallel or average), on the slice; None if none."""
        delta = None
        for e in self.live:
            d = branch_delta(e, x if e.branch.reads == "input" else y, ctx, y)
            delta = d if delta is None else delta + d
        if delta is not None and self.live_mode == "average" and len(self.live) > 1:
            delta = delta / len(self.live)
        for f, members in self.fusion:
            d = self._fused(f, members, x, y, ctx)
            if d is not None:
                delta = d if delta is None else delta + d
        return delta

    def _fused(self, f: Entry, members: list[list[Entry]], x: Tensor | None, y: Tensor,
               ctx: ForwardContext) -> Tensor | None:
        """AdapterFusion: the query is what the fused adapters read here (plugins/fusion.py)."""
        ds = [self.adapter_delta(m, self.mode.get(m[0].adapter, "parallel"), x, y, ctx) for m in members]
        ds = [d for d in ds if d is not None]
        if not ds:
            return None
        query = x if f.branch.reads == "input" else y
        return f.branch.fuse(query, torch.stack(ds, dim=-2))

    def apply(self, x: Tensor | None, y: Tensor, ctx: ForwardContext, owned: bool = False) -> Tensor:
        """The hook point's output with the live branches. ``owned``: ``y`` is a fresh base output
        that nothing else holds (:meth:`LeafWrapper.owns_output`), so a LoRA may accumulate into it
        when no branch here reads the output or the base."""
        if not self.live and not self.fusion:
            return y
        if self.kind == "renorm":
            return self._renorm(x, y, ctx)
        full = y
        if self.out_slice is not None:
            y = full[..., self.out_slice[0]:self.out_slice[1]]
        if self.fusion:
            delta = self.delta(x, y, ctx)
            if delta is None:
                return full
            if self.out_slice is None:
                return y + delta
        elif self.live_mode == "sequential":
            cur = y
            for e in self.live:
                cur = cur + branch_delta(e, x if e.branch.reads == "input" else cur, ctx, y)
            if self.out_slice is None:
                return cur
            delta = cur - y
        elif self.out_slice is None and self.live_mode == "parallel":
            out = y
            # y may be overwritten only when no branch reads it after the first accumulation
            owned = owned and all(e.branch.reads == "input" and not getattr(e.branch, "reads_base", False)
                                  for e in self.live)
            for e in self.live:  # every branch reads the hook point's input or its (original) output
                out = accumulate(e, x if e.branch.reads == "input" else y, out, ctx, y, owned=owned)
            return out
        else:
            delta = self.delta(x, y, ctx)
            if self.out_slice is None:
                return y + delta
        s0, s1 = self.out_slice
        return full + nn.functional.pad(delta, (s0, full.shape[-1] - s1))


    def _renorm(self, x: Tensor | None, y: Tensor, ctx: ForwardContext) -> Tensor:
        """Pfeiffer's placement (AdapterHub ``seq_bn``): with s = h + x the residual sum and N the
        sublayer's norm, branches read a = N(s) and the result is N(s + Delta(a)).

        Post-LN (``norm`` set; this runs in the norm's forward hook): x = s, y = a. Pre-LN
        (N = identity): x = the captured residual, y = the sublayer output h; branches read
        s = h + x and the sublayer returns h + Delta(s), to which the block adds x.
        """
        if self.norm is not None:
            s, src = x, y
            if s is None:
                raise RuntimeError(f"{self.site_key}: the norm's input (the residual sum) was not captured")
        else:
            if x is None:
                raise RuntimeError(f"{self.site_key}: the sublayer's residual input was not captured")
            s = src = y + x
        delta = self.delta(src, src, ctx)
        if delta is None:
            delta = torch.zeros_like(src)
        if self.norm is not None:
            # ``forward``, not ``__call__``: we are inside the norm's own forward hook
            return self.norm.forward(s + delta)
        return y + delta


class StackedParams(nn.Module):
    """The LoRA A and B of every adapter at one projection as ONE trainable tensor each
    (``unipelt.pack_mixed``): A = [A_1; ..; A_N] (N·r, d_in) and B = [B_1 | .. | B_N] (d_out, N·r),
    the operands of the stacked mixed-batch product (:meth:`SiteRuntime.apply_stacked`) as they are.

    Why: a mixed train step over N separate adapters pays host work per parameter tensor that grows
    with N -- the concatenation of 2N tensors and the split of the gradient back, one AccumulateGrad,
    one AdamW slot and one zero_grad per tensor (BERT mixed8: 384 LoRA tensors, AdamW's step 2.85 ms
    against 0.54 ms for one adapter's 48, session 11's CPU profile); under CUDA graphs that host work is
    what is left. Packed, eight adapters have the 48 tensors one adapter has.

    Each member's own ``lora_A`` / ``lora_B`` stays the same Parameter object (the handle's, the
    optimizer's of an earlier run) but becomes a frozen view of its rows / columns of the stack
    (:meth:`bind`): saving an adapter writes its own tensors with the trained values, a call without
    gradients that runs one adapter alone reads them, and nothing is counted twice by an optimizer.
    The views are made again after ``.to()`` (:meth:`_apply`), in a deep copy (``__deepcopy__``) and
    when unpickled (``__setstate__``).

    A member detached while packed is *released* (:meth:`release`): its tensors become its own
    again, and its block stays in the stack as a column range no row reads (scale 0 in the mixed
    product: no output, no gradient), so the stack keeps its shape and the optimizer built over
    it goes on training the others.
    """

    def __init__(self, site_key: str, members: list[tuple[str, nn.Module]]):
        super().__init__()
        self.site_key = site_key
        self.names = [n for n, _ in members]
        # plain attributes: the branches are registered under their own adapters
        self.branches = [b for _, b in members]
        self.widths = [b.lora_A.shape[0] for b in self.branches]
        # the flags unpack gives back
        self.flags = [(b.lora_A.requires_grad, b.lora_B.requires_grad) for b in self.branches]
        with torch.no_grad():
            a = torch.cat([b.lora_A.detach() for b in self.branches], 0)
            w = torch.cat([b.lora_B.detach() for b in self.branches], 1)
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(w)
        self.bind()

    def bind(self) -> None:
        """Point each member's lora_A / lora_B at its block of the stack (frozen, grad dropped)."""
        a, w = self.A.detach(), self.B.detach()
        at = 0
        for b, r in zip(self.branches, self.widths):
            if b is None:  # released: its block is unused
                at += r
                continue
            for name, view in (("lora_A", a[at:at + r]), ("lora_B", w[:, at:at + r])):
                p = getattr(b, name)
                p.data = view
                p.requires_grad_(False)
                p.grad = None
            at += r

    def unbind(self) -> list[nn.Parameter]:
        """Give each member independent (contiguous) tensors holding the stack's current values and
        its requires_grad flags back; returns the member parameters."""
        out = []
        for i, b in enumerate(self.branches):
            if b is not None:
                out += self._own(i)
        return out

    def _own(self, i: int) -> list[nn.Parameter]:
        b, flags = self.branches[i], self.flags[i]
        out = []
        for name, flag in zip(("lora_A", "lora_B"), flags):
            p = getattr(b, name)
            p.data = p.detach().clone(memory_format=torch.contiguous_format)
            p.requires_grad_(flag)
            out.append(p)
        return out

    def release(self, name: str) -> list[nn.Parameter]:
        """Member ``name`` leaves the stack (detached): its lora_A / lora_B get independent tensors
        with the stack's current values and their flags back; its block stays, read by no row.
        Returns its parameters ([] when it is no member)."""
        if name not in self.names:
            return []
        i = self.names.index(name)
        out = self._own(i)
        self.branches[i] = None
        self.names[i] = None
        return out

    @property
    def members(self) -> list:
        """The branches still in the stack (released ones left out), in column order."""
        return [b for b in self.branches if b is not None]

    def layout(self, items: list, unused) -> list:
        """Per-member ``items`` (column order, released members left out) -> one per block of the
        stack, ``unused(width)`` at a released member's block."""
        it = iter(items)
        return [next(it) if b is not None else unused(r) for b, r in zip(self.branches, self.widths)]

    def _apply(self, fn, recurse: bool = True):
        # model.to(), .half(), .cuda(): the members' views were moved on their own (copies, the
        # container visits the adapters first); make them views of the moved stack again
        out = super()._apply(fn, recurse)
        self.bind()
        return out

    def __deepcopy__(self, memo):
        # Parameter.__deepcopy__ clones each tensor, views included: the copy's members would hold
        # tensors of their own. Copy everything (the members through ``memo``, so they are the
        # copied model's), then make the views again
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        new.bind()
        return new

    def __setstate__(self, state: dict) -> None:
        # pickle (not torch.save, which keeps shared storages): each tensor comes back on its own.
        # The members are whole by now: a model's host runtimes reach this module after their
        # entries (and branches), and the container lists the adapters before it
        super().__setstate__(state)
        self.bind()


_PHASE = {"linear": 0, "io": 1, "output": 2, "renorm": 3}


class Host:
    """Everything attached at one module path: runs its site runtimes in a fixed order
    (projections first, then parallel branches, then serial transforms of the output)."""

    def __init__(self, path: str, ctx: ForwardContext):
        self.path = path
        self.ctx = ctx
        self.runtimes: dict[str, SiteRuntime] = {}

    def runtime(self, site_key: str, kind: str, out_slice=None, out_width=None) -> SiteRuntime:
        rt = self.runtimes.get(site_key)
        if rt is None:
            rt = SiteRuntime(site_key, kind, out_slice, out_width)
            self.runtimes[site_key] = rt
            self.runtimes = dict(sorted(self.runtimes.items(), key=lambda kv: _PHASE.get(kv[1].kind, 3)))
        return rt

    def run(self, x: Tensor | None, y: Tensor, owned: bool = False) -> Tensor:
        """``owned``: ``y`` is a fresh base output nothing else holds (the leaf wrapper's)."""
        ctx = self.ctx
        if ctx.rows is not None:
            return self._run_rows(x, y, ctx.rows)
        sliced = self._sliced
        if sliced is not None:
            # a fused projection (GPT-2's c_attn): the slices' deltas are concatenated (zeros where
            # no branch is live) and added once, as one stacked LoRA, instead of a zero-padded add
            # per slice
            parts, at, any_live = [], 0, False
            for rt in sliced:
                s0, s1 = rt.out_slice
                d = rt.delta(x, y[..., s0:s1], ctx) if rt.live else None
                if d is None:
                    continue
                if s0 > at:
                    parts.append(y.new_zeros(*y.shape[:-1], s0 - at))
                parts.append(d)
                at, any_live = s1, True
            if any_live:
                if at < y.shape[-1]:
                    parts.append(y.new_zeros(*y.shape[:-1], y.shape[-1] - at))
                y = y + torch.cat(parts, -1)
            rest = self._unsliced
        else:
            rest = self.runtimes.values()
        for rt in rest:
            # a runtime's result is again held by nobody else (its own new tensor, or y itself)
            if rt.reads_stash:
                y = rt.apply(ctx.stash.get(rt.site_key), y, ctx, owned=owned)
            else:
                y = rt.apply(x, y, ctx, owned=owned)
        return y

    _sliced: list[SiteRuntime] | None = None
    _unsliced: list[SiteRuntime] = []
    # the folded base-and-LoRA computation of this projection (unipelt.fold.Fold), or None
    fold: Any = None
    # live input scalings of the wrapped projection (IA3 on ffn.down), applied in order
    scalers: list[Entry] = []

    # adapter -> its input scalings at this projection, for the rows it serves in a mixed batch
    row_scalers: dict[str, list[Entry]] = {}

    def scale_input(self, x: Tensor) -> Tensor:
        """The projection's input after the live ``scale`` branches (each returns the rescaled input).
        In a mixed batch each row gets its own adapter's scalings (others none): one elementwise
        product per adapter that has any here, kept on its rows, so the base projection still runs
        once for the whole batch."""
        rows = self.ctx.rows
        if rows is not None:
            out = x
            for name in rows.adapters:
                scalers = self.row_scalers.get(name)
                if scalers:
                    xa = x
                    for e in scalers:
                        xa = e.branch(xa)
                    out = torch.where(rows.mask(name, x.dim()), xa, out)
            return out
        for e in self.scalers:
            x = e.branch(x)
        return x

    @property
    def scales_input(self) -> bool:
        """Whether some call may rescale the projection's input (decided at refresh)."""
        # len(), not bool(list): dynamo (torch 2.11) cannot trace bool() of a list
        return len(self.scalers) > 0 or len(self.row_scalers) > 0

    def _run_rows(self, x: Tensor | None, y: Tensor, rows: RowSelection) -> Tensor:
        """A mixed batch, as segments: each selected adapter runs what a call with only that
        adapter runs here, on its own rows only (x, y, the captured inputs, the mask and the layer
        inputs its gates read, all index_select-ed to those rows: ``ctx.seg``), so N adapters cost
        one adapter's branches over the batch, not N. The segments, sorted by adapter, go back to
        row order in one gather (one index_copy when one adapter has something here); rows of
        adapters with nothing here and base rows keep the base output. Gradients follow the
        indexing back to each row's own adapter only."""
        ctx = self.ctx
        runtimes = list(self.runtimes.values())
        if runtimes[0].stacked is not None:  # projections run first (_PHASE): one stacked product
            got = runtimes[0].apply_stacked(x, y, rows, ctx)
            if got is not None:  # (None: an input dropout the PyTorch path cannot stack)
                y = got
                runtimes = runtimes[1:]
        elif runtimes[0].packed is not None and torch.is_grad_enabled():
            runtimes[0].refuse_packed("the adapters at this projection no longer stack (they would run as segments)")
        touched = [n for n in rows.adapters if any(n in rt.solo for rt in runtimes)]
        if not touched:
            return y
        segments = {}
        for name in touched:
            saved = ctx.enter_segment(name)
            try:
                cur = y.index_select(0, rows.index(name).to(y.device))
                for rt in runtimes:
                    src = ctx.stash.get(rt.site_key) if rt.reads_stash else x
                    got = rt.apply_solo(name, None if src is None else ctx.rows_of(src, name), cur, ctx)
                    if got is not None:
                        cur = got
                segments[name] = cur
            finally:
                ctx.leave_segment(saved)
        if len(touched) == 1:
            name = touched[0]
            return y.index_copy(0, rows.index(name).to(y.device), segments[name])
        parts = [segments[n] if n in segments else y.index_select(0, rows.index(n).to(y.device))
                 for n in rows.adapters]
        parts.append(y.index_select(0, rows.base_rows.to(y.device)))
        return torch.cat(parts, 0).index_select(0, rows.inverse.to(y.device))

    def refresh(self) -> None:
        """Plan the fused-projection path: the parallel runtimes on slices of one output."""
        for rt in self.runtimes.values():
            rt.plan_solo(self.ctx.solo)
        self.scalers = [e for rt in self.runtimes.values() for e in rt.scalers]
        row_scalers: dict[str, list[Entry]] = {}
        for rt in self.runtimes.values():
            for name, entries in rt.solo_scalers.items():
                row_scalers.setdefault(name, []).extend(entries)
        self.row_scalers = row_scalers
        lin = [rt for rt in self.runtimes.values() if rt.kind == "linear" and rt.out_slice is not None]
        self._sliced = None
        self._unsliced = list(self.runtimes.values())
        if lin and all(rt.live_mode != "sequential" for rt in lin):
            self._sliced = sorted(lin, key=lambda rt: rt.out_slice[0])
            self._unsliced = [rt for rt in self.runtimes.values() if rt not in lin]

    @property
    def empty(self) -> bool:
        return not any(rt.entries for rt in self.runtimes.values())

    @property
    def idle(self) -> bool:
        """Whether no call, ordinary or mixed, runs anything here (every branch merged, pruned,
        dropped or inactive with no row able to select it): decided at refresh."""
        return not self.scalers and not self.row_scalers and all(
            not rt.live and not rt.fusion and not rt.solo and rt.stacked is None for rt in self.runtimes.values())


# ------------------------------------------------------------------------------------------
# the leaf wrapper
# ------------------------------------------------------------------------------------------
class LeafWrapper(nn.Module):
    """Wraps a leaf projection; the original stays reachable as ``base_layer``.

    The wrapper is invisible in checkpoints: ``state_dict`` keys are the base layer's own
    (``...query.weight``, not ``...query.base_layer.weight``), so the adapted model's base
    weights load into a fresh base model and a base checkpoint loads into the adapted model.
    """

    def __init__(self, base_layer: nn.Module, host: Host, transposed: bool = False):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "host", host)  # not a submodule: holds no parameters
        self.transposed = transposed  # Conv1D keeps weight as (in, out)
        self._merged_backup: Tensor | nn.Module | None = None
        self._register_state_dict_hook(_strip_base_layer)
        self._register_load_state_dict_pre_hook(_add_base_layer, with_module=True)

    # nn.Linear-like attributes that model code (and other libraries) read off projections
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base_layer"], name)

    def set_bypass(self, on: bool) -> None:
        """With ``on`` (the host is idle: a merged LoRA, a collapsed model) the wrapper's forward is
        the base layer's own, bound at refresh: one module call per projection as in the unadapted
        model, no host dispatch. Only for a plain base layer without hooks of its own (a quantized
        leaf's plugin overrides ``base_forward``); refresh, which follows every merge, unmerge and
        switch, binds the base layer of the moment."""
        base = self._modules["base_layer"]
        plain = (type(self).base_forward is LeafWrapper.base_forward and type(self).forward is LeafWrapper.forward
                 and not base._forward_hooks and not base._forward_pre_hooks)
        if on and plain:
            self.__dict__["forward"] = base.forward
        else:
            self.__dict__.pop("forward", None)

    @property
    def bypassed(self) -> bool:
        return "forward" in self.__dict__

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        host = self.host
        fold = host.fold  # base and LoRA as one node (unipelt.fold), planned at refresh
        if fold is not None and not args and not kwargs and self.owns_output():
            y = fold.run(self._modules["base_layer"], x, host.ctx)
            if y is not None:
                return y
        # input scalings (IA3 on ffn.down) change what the base projection reads; the branches
        # at this hook point read the original input
        xin = host.scale_input(x) if host.scales_input else x
        return host.run(x, self.base_forward(xin, *args, **kwargs), owned=self.owns_output())

    def owns_output(self) -> bool:
        """Whether the base output is a fresh tensor that nothing but the host sees, which a
        LoRA may then accumulate into in place: a plain ``nn.Linear`` (its output is not saved for
        its backward) called by this class's ``base_forward``, with no module hooks that could keep
        it (its own or global ones)."""
        base = self._modules["base_layer"]
        return (type(base) is nn.Linear and type(self).base_forward is LeafWrapper.base_forward
                and not base._forward_hooks and not base._forward_pre_hooks
                and not nn.modules.module._global_forward_hooks)

    def base_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """The frozen projection itself (a quantized leaf's plugin may compute it another way)."""
        return self.base_layer(x, *args, **kwargs)

    # -- the weight backend ------------------------------------------------------------------
    # How merge (and a kernel, an exporter) reads and writes the base weight. A plain linear holds
    # it as a float tensor; a quantized leaf (a plugin's subclass, plugins/bnb.py) sets
    # ``quantized`` and overrides ``dense_weight``/``compute_dtype``: merging then swaps in a
    # dequantized float copy of the layer (a packed 4-bit weight cannot take a delta in place),
    # and unmerge puts the original quantized module back, bit-exactly.
    quantized: bool = False

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the base layer computes in (a quantized leaf's is its compute dtype)."""
        return self.base_layer.weight.dtype

    def dense_weight(self) -> Tensor:
        """The base weight as an (out, in) float tensor: a view of the weight for a plain linear,
        a freshly dequantized tensor for a quantized one."""
        w = self.base_layer.weight
        return w.T if self.transposed else w

    def dequantized_layer(self) -> nn.Module:
        """A float ``nn.Linear`` computing what the quantized base layer computes (merge, export)."""
        w = self.dense_weight()
        bias = self.bias
        lin = DequantizedLinear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bias is not None:
                lin.bias.copy_(bias.to(w.dtype))
        return lin

    # -- merging ---------------------------------------------------------------------------
    _bias_backup: Tensor | None = None
    # bumped whenever merge or unmerge writes the base weight: a branch caching something of it
    # (DoRA's ‖W0‖²) knows it changed, also inside a compiled graph (which guards on this int).
    # Mirrored onto the base layer, which is what a branch built before the wrapping holds.
    weight_version: int = 0

    def _bump_weight_version(self) -> None:
        self.weight_version += 1
        for mod in (self.base_layer, self._merged_backup):
            if isinstance(mod, nn.Module):
                mod.__dict__["weight_version"] = self.weight_version

    def merge_delta(self, delta: Tensor, out_slice: tuple[int, int] | None, bias: Tensor | None = None) -> None:
        """Add an (out, in) delta to the base weight (and ``bias``, an (out,) delta, to the base
        bias), keeping the originals for unmerge. A quantized leaf is replaced by its dequantized
        float copy first (see above)."""
        if self.quantized and self._merged_backup is None:
            # the quantized module itself, restored as is (kept off ``_modules``: not a submodule,
            # so it adds no state-dict keys while merged)
            copy = self.dequantized_layer()  # (before _merged_backup is set: read as packed)
            object.__setattr__(self, "_merged_backup", self.base_layer)
            self._modules["base_layer"] = copy
            # a branch built before the wrapping holds the packed layer itself (DoRA, IA3 read
            # the base weight through it): it finds the float copy the base now computes with
            self._merged_backup.__dict__["_unipelt_merged"] = self.base_layer
        self._bump_weight_version()
        w = self.base_layer.weight
        if self._merged_backup is None:
            self._merged_backup = w.detach().clone()
        with torch.no_grad():
            d = delta.to(w.dtype)
            if self.transposed:
                d = d.T
                target = w if out_slice is None else w[:, out_slice[0]:out_slice[1]]
            else:
                target = w if out_slice is None else w[out_slice[0]:out_slice[1]]
            target.add_(d)
            b = getattr(self.base_layer, "bias", None)
            if bias is not None and b is not None:
                if self._bias_backup is None:
                    self._bias_backup = b.detach().clone()
                (b if out_slice is None else b[out_slice[0]:out_slice[1]]).add_(bias.to(b.dtype))

    @property
    def merged_dequantized(self) -> bool:
        """Whether a merge replaced the quantized base layer by a float copy."""
        return isinstance(self._merged_backup, nn.Module)

    def restore_weight(self) -> None:
        self._bump_weight_version()
        if isinstance(self._merged_backup, nn.Module):
            self._merged_backup.__dict__.pop("_unipelt_merged", None)
            self._modules["base_layer"] = self._merged_backup  # the quantized layer, as it was
            self._bias_backup = None  # it kept its own bias
        elif self._merged_backup is not None:
            with torch.no_grad():
                self.base_layer.weight.copy_(self._merged_backup)
        self._merged_backup = None
        if self._bias_backup is not None:
            with torch.no_grad():
                self.base_layer.bias.copy_(self._bias_backup)
            self._bias_backup = None


def merge_branches(items: list[tuple]) -> None:
    """Fold mergeable branches ``(host module, branch, out_slice[, delta])`` into their hosts (``delta``:
    a ΔW computed by the caller, a branch under a constant gate; else ``delta_weight()``): every
    ``delta_weight()`` (and ``delta_bias()``, where a branch has one: IA3 rescales the bias with
    the rows) is computed first, from the weights as the live branches saw them, then all are
    added. A branch whose delta depends on the base weight (IA3, DoRA) would otherwise see the
    deltas merged before it at the same projection, and the result would depend on node order.

    Input scalings (``reads = "scale"``: IA3 at ``ffn.down``) of one projection compose live: the
    base computes W·diag(l_1 ⊙ l_2 ⊙ ...)·x, and a branch reading the base output (IA3 on the
    output side, DoRA: ``delta_from_base``) sees that product, not W. So the scalings are folded
    in sequence (the k-th adds W_(k-1)·diag(l_k) - W_(k-1), W_(k-1) = W·diag(l_1 ⊙ .. ⊙ l_(k-1)):
    the sum is W·diag(Π l) - W) and those branches take their delta from W·diag(Π l). Branches
    reading the projection's input (LoRA, VeRA, AdaLoRA) are not scaled live, nor merged."""
    scaled: dict[int, Tensor] = {}  # host -> W·diag(Π l) of the scalings merged here
    deltas: list = [None] * len(items)
    for i, (host_module, branch, out_slice, *given) in enumerate(items):
        if getattr(branch, "reads", None) != "scale":
            continue
        cur = scaled.get(id(host_module))
        if cur is None:
            dw = branch.delta_weight()
            cur = projection_weight(host_module, out_slice)
        else:
            dw = branch.delta_weight(base=cur)
        scaled[id(host_module)] = cur + dw.to(cur.dtype)
        deltas[i] = (host_module, dw, None, out_slice)
    for i, (host_module, branch, out_slice, *given) in enumerate(items):
        if deltas[i] is not None:
            continue
        delta_bias = getattr(branch, "delta_bias", None)
        eff = scaled.get(id(host_module))
        if given and given[0] is not None:
            dw = given[0]
        elif eff is not None and getattr(branch, "delta_from_base", False):
            dw = branch.delta_weight(base=eff if out_slice is None else eff[out_slice[0]:out_slice[1]])
        else:
            dw = branch.delta_weight()
        deltas[i] = (host_module, dw, delta_bias() if delta_bias is not None else None, out_slice)
    for host_module, dw, db, out_slice in deltas:
        if db is None:
            host_module.merge_delta(dw, out_slice)
        else:
            host_module.merge_delta(dw, out_slice, bias=db)


def projection_weight(module: nn.Module, out_slice: tuple[int, int] | None = None) -> Tensor:
    """The (out, in) float weight of a projection (its slice's rows), whatever its storage: a
    wrapped leaf's weight backend (dequantizing a 4-bit or 8-bit base), GPT-2's transposed Conv1D,
    or a packed layer not wrapped yet (a branch built before the compiler wraps its leaf), which
    the leaf plugin that takes it dequantizes; a packed layer whose leaf merged a delta gives the
    float copy the base computes with since."""
    module = _merged_copy(module)
    dense = getattr(module, "dense_weight", None)
    if callable(dense):
        w = dense()
    else:
        base = getattr(module, "base_layer", module)
        w = base.weight
        if not w.is_floating_point():
            from unipelt.errors import ModelError
            from unipelt.registry import get_registry

            wrapper = get_registry().hook.unipelt_wrap_leaf(module=base, site=None)
            dense = getattr(wrapper, "dense_weight", None)
            if not callable(dense):
                raise ModelError(f"{type(base).__name__}: a quantized base weight that no leaf plugin dequantizes")
            w = dense()
        elif type(base).__name__ == "Conv1D":
            w = w.T
    return w if out_slice is None else w[out_slice[0]:out_slice[1]]


def projection_bias(module: nn.Module, out_slice: tuple[int, int] | None = None) -> Tensor | None:
    """The projection's bias (its slice's entries), or None."""
    module = _merged_copy(module)
    b = getattr(getattr(module, "base_layer", module), "bias", None)
    if b is None:
        return None
    return b if out_slice is None else b[out_slice[0]:out_slice[1]]


def _merged_copy(module: nn.Module) -> nn.Module:
    """The float copy a merge swapped in for this packed layer (LeafWrapper.merge_delta), or the
    module itself."""
    return module.__dict__.get("_unipelt_merged", module)


class DequantizedLinear(nn.Linear):
    """The float copy of a quantized layer: computes in its weight's dtype and returns its
    input's, as bitsandbytes' layers do (a 4-bit layer may compute in bf16 inside an fp32 model)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype:
            return super().forward(x)
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


def _strip_base_layer(module, state_dict, prefix, local_metadata):
    inner = prefix + "base_layer."
    for k in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + k[len(inner):]] = state_dict.pop(k)
    return state_dict


def _add_base_layer(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    inner = prefix + "base_layer."
    for k in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        rest = k[len(prefix):]
        if "." not in rest or rest.split(".")[0] not in module._modules:
            state_dict[inner + rest] = state_dict.pop(k)


def first_tensor_arg(args: tuple, kwargs: dict, index: int = 0, kwarg: str | None = None) -> Tensor | None:
    if len(args) > index and isinstance(args[index], Tensor):
        return args[index]
    if kwarg and isinstance(kwargs.get(kwarg), Tensor):
        return kwargs[kwarg]
    for name in ("hidden_states", "input", "x"):
        if isinstance(kwargs.get(name), Tensor):
            return kwargs[name]
    return None
