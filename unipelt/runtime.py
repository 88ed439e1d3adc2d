"""What runs in the forward pass: the per-model context, the hosts that carry branches at a module
(a wrapped leaf, or forward hooks), the combination of several branches at one hook point, and
gate pooling.

A *branch* (LoRA, an adapter, ...) computes an additive delta from the tensor it reads: the
hook point's input (``reads = "input"``) or its output (``reads = "output"``). A *gate* maps a
tensor to values in (0, 1) that the branch folds in its own way (the LoRA gate replaces or
multiplies alpha/r; an adapter gate multiplies its delta).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn


# the protocols a plugin's modules follow live in unipelt.types (re-exported here for older imports)
from unipelt.types import Branch, GateModule  # noqa: E402,F401


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
    executor: str = "grouped"  # mirrored from the state at refresh
    # masked-mean pooling weights (mask / real-token count) of this forward, (B, T, 1)
    mean_weights: Tensor | None = None

    def clear(self) -> None:
        """Forget the tensors of the last call."""
        self.layer_inputs.clear()
        self.stash.clear()
        self.group_out.clear()
        self.mean_weights = None

    def token_mask(self, batch: int, length: int, device, dtype) -> Tensor | None:
        """The padding mask for the last ``length`` positions, shaped (B, T, 1), or None."""
        m = self.attention_mask
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
    # the group executors that compute this branch's input projection and this entry's gate
    # (None: computed alone, the reference path)
    group: Any = None
    gate_group: Any = None
    saved: Any = None  # what attaching replaced, for detach (a ``params`` kind's original tensors)


def gate_value(e: Entry, src: Tensor | None, ctx: ForwardContext) -> Tensor | None:
    """The gate of ``e`` for this forward: read from its group when one computes it (once per
    layer, shared by every branch using it), else computed from the tensor the gate reads."""
    if e.gate is None:
        return None
    gx = ctx.layer_inputs.get(e.layer) if e.gate_input == "layer" else src
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
    return g


def _shrunk(e: Entry, src: Tensor, ctx: ForwardContext) -> Tensor | None:
    """u = src·Wᵀ of a Shrinkable branch under the grouped executor (from its group, or alone:
    the same protocol, so the gate or scale multiplies the narrow u); None on the reference path."""
    if ctx.executor != "grouped":
        return None
    grp = e.group
    if grp is not None and grp.on and grp.has(e):
        return grp.shrunk(e, src, ctx)
    shrink = getattr(e.branch, "shrink_params", None)
    w = shrink() if shrink is not None else None
    return None if w is None else nn.functional.linear(src, w[0].to(src.dtype))


def branch_delta(e: Entry, src: Tensor, ctx: ForwardContext) -> Tensor:
    """The delta of branch ``e`` reading ``src``: from its (group's) input projection under the
    grouped executor, else the branch's own forward (the reference)."""
    g = gate_value(e, src, ctx)
    u = _shrunk(e, src, ctx)
    if u is not None:
        return e.branch.expand(u, g)
    return e.branch(src, gate=g)


def accumulate(e: Entry, src: Tensor, out: Tensor, ctx: ForwardContext) -> Tensor:
    """``out + delta`` of branch ``e``; a branch with ``expand_into`` (LoRA) accumulates into
    ``out`` inside its last matrix product (addmm: one pass less over the output)."""
    into = getattr(e.branch, "expand_into", None)
    if into is not None:
        g = gate_value(e, src, ctx)
        u = _shrunk(e, src, ctx)
        if u is not None:
            return into(out, u, g)
        return out + e.branch(src, gate=g)
    return out + branch_delta(e, src, ctx)


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
        self.live = [e for e in self.entries if not e.merged and e.adapter in active]
        self.live_mode = self.mode.get(self.live[0].adapter, "parallel") if self.live else "parallel"

    live: list[Entry] = []
    live_mode: str = "parallel"

    def delta(self, x: Tensor | None, y: Tensor, ctx: ForwardContext) -> Tensor | None:
        """The combined delta of the live branches (parallel or average), on the slice; None if none."""
        delta = None
        for e in self.live:
            d = branch_delta(e, x if e.branch.reads == "input" else y, ctx)
            delta = d if delta is None else delta + d
        if delta is not None and self.live_mode == "average" and len(self.live) > 1:
            delta = delta / len(self.live)
        return delta

    def apply(self, x: Tensor | None, y: Tensor, ctx: ForwardContext) -> Tensor:
        if not self.live:
            return y
        if self.kind == "renorm":
            return self._renorm(x, y, ctx)
        full = y
        if self.out_slice is not None:
            y = full[..., self.out_slice[0]:self.out_slice[1]]
        if self.live_mode == "sequential":
            cur = y
            for e in self.live:
                cur = cur + branch_delta(e, x if e.branch.reads == "input" else cur, ctx)
            if self.out_slice is None:
                return cur
            delta = cur - y
        elif self.out_slice is None and self.live_mode == "parallel":
            out = y
            for e in self.live:  # every branch reads the hook point's input or its (original) output
                out = accumulate(e, x if e.branch.reads == "input" else y, out, ctx)
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
        if self.norm is not None:
            # ``forward``, not ``__call__``: we are inside the norm's own forward hook
            return self.norm.forward(s + delta)
        return y + delta


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

    def run(self, x: Tensor | None, y: Tensor) -> Tensor:
        ctx = self.ctx
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
            if rt.reads_stash:
                y = rt.apply(ctx.stash.get(rt.site_key), y, ctx)
            else:
                y = rt.apply(x, y, ctx)
        return y

    _sliced: list[SiteRuntime] | None = None
    _unsliced: list[SiteRuntime] = []

    def refresh(self) -> None:
        """Plan the fused-projection path: the parallel runtimes on slices of one output."""
        lin = [rt for rt in self.runtimes.values() if rt.kind == "linear" and rt.out_slice is not None]
        self._sliced = None
        self._unsliced = list(self.runtimes.values())
        if lin and all(rt.live_mode != "sequential" for rt in lin):
            self._sliced = sorted(lin, key=lambda rt: rt.out_slice[0])
            self._unsliced = [rt for rt in self.runtimes.values() if rt not in lin]

    @property
    def empty(self) -> bool:
        return not any(rt.entries for rt in self.runtimes.values())


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

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self.host.run(x, self.base_layer(x, *args, **kwargs))

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
    def merge_delta(self, delta: Tensor, out_slice: tuple[int, int] | None) -> None:
        """Add an (out, in) delta to the base weight, keeping the original for unmerge. A
        quantized leaf is replaced by its dequantized float copy first (see above)."""
        if self.quantized and self._merged_backup is None:
            # the quantized module itself, restored as is (kept off ``_modules``: not a submodule,
            # so it adds no state-dict keys while merged)
            object.__setattr__(self, "_merged_backup", self.base_layer)
            self._modules["base_layer"] = self.dequantized_layer()
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

    @property
    def merged_dequantized(self) -> bool:
        """Whether a merge replaced the quantized base layer by a float copy."""
        return isinstance(self._merged_backup, nn.Module)

    def restore_weight(self) -> None:
        if isinstance(self._merged_backup, nn.Module):
            self._modules["base_layer"] = self._merged_backup
        elif self._merged_backup is not None:
            with torch.no_grad():
                self.base_layer.weight.copy_(self._merged_backup)
        self._merged_backup = None


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
