"""The adapted model's state, owned in one place (STYLE.md, 17).

Everything ``compile`` does to a model — the forward hooks, the leaf wrappers, the frozen flags,
the adapter container, the attention routing — is installed and removed here; the compiler and
the handle call these functions and read :class:`ModelState`, neither reaches into the other.

Every hook is an instance of a module-level class (no closures), so an adapted model can be
deep-copied (reference models, EMA), pickled and ``torch.save``-d: the copy is an independent
adapted model, its hooks pointing at its own state.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from unipelt.arch import ModelInfo, ResolvedSite
from unipelt.errors import ModelError
from unipelt.fold import plan as plan_folds
from unipelt.inputs import CallBinder
from unipelt.runtime import BASE, Entry, ForwardContext, Host, RowSelection, StackedParams, first_tensor_arg

CONTAINER = "unipelt"  # attribute under which adapter parameters live in the model
STATE_ATTR = "_unipelt_state"
PACKED = "__packed__"  # the container's slot of the stacked parameters (pack_mixed)


class AdapterSet(nn.Module):
    """Owns one named adapter's modules, so they move with ``model.to()`` and reach optimizers."""

    def __init__(self, name: str):
        super().__init__()
        self.adapter_name = name
        self.branches = nn.ModuleDict()
        self.gates = nn.ModuleDict()
        self.shared = nn.ModuleDict()

    @staticmethod
    def slot(key: str) -> str:
        return key.replace(".", "__")


@dataclass
class ModelState:
    """What unipelt keeps on an adapted model (as ``model._unipelt_state``)."""

    info: ModelInfo
    ctx: ForwardContext
    hosts: dict[str, Host] = field(default_factory=dict)
    wrappers: dict[str, tuple[nn.Module, str, nn.Module]] = field(default_factory=dict)  # path -> (parent, attr, original)
    hooks: dict[str, list[RemovableHandle]] = field(default_factory=dict)  # path -> handles
    global_hooks: list[RemovableHandle] = field(default_factory=list)
    requires_grad: dict[int, tuple[nn.Parameter, bool]] = field(default_factory=dict)
    handles: dict[str, Any] = field(default_factory=dict)  # adapter name -> AdapterHandle
    kv: dict[str, list[Entry]] = field(default_factory=dict)  # attention path -> kv entries
    embed: list[Entry] = field(default_factory=list)  # prompt-style entries (one call rewrite)
    attention_installed: bool = False
    executor: str = "grouped"  # "grouped" (plan.FusionGroup executors) or "reference" (per branch)

    # -- copies ----------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        # parameters are keyed by id(): ids do not survive a copy; rebuild them afterwards
        d["requires_grad"] = list(self.requires_grad.values())
        return d

    def __setstate__(self, d: dict) -> None:
        d = dict(d)
        flags = d.pop("requires_grad")
        self.__dict__.update(d)
        self.requires_grad = {id(p): (p, flag) for p, flag in flags}
        if self.attention_installed:
            # a fresh process has not registered unipelt's attention functions yet
            # (the model itself may not be restored yet: register every base unipelt wraps)
            from unipelt import attention

            attention.register_all()

    # -- activity --------------------------------------------------------------------------
    def set_active(self, names: set[str]) -> None:
        self.ctx.active = set(names)
        self.refresh()

    def refresh(self) -> None:
        """Recompute what runs: called whenever adapters are attached, switched, merged or
        removed, so that no forward filters entries or decides on executors per call."""
        ctx = self.ctx
        ctx.version += 1
        ctx.executor = self.executor
        active = self.running(ctx.active)
        self.sync_inplace(active)
        # mixed batches: what a row served by each attached adapter runs
        ctx.solo = {n: frozenset(self.running({n})) for n in self.handles}
        ctx.merged_any = any(e.merged for h in self.handles.values() for e in h.entries.values())
        # adapters that train base tensors in place (BitFit, LN tuning): every row sees those. (An
        # input scaling, IA3 at ffn.down, is applied per row: Host.scale_input.) Why, per adapter,
        # naming the module and its method, for the refusal of a mixed batch.
        ctx.inplace_why = {}
        for n, h in self.handles.items():
            for e in h.entries.values():
                if callable(getattr(e.branch, "external_parameters", None)):
                    method = h.spec.modules[e.node].method if e.node in h.spec.modules else "?"
                    ctx.inplace_why.setdefault(n, f"its module {e.node!r} (method {method}) trains base tensors in place")
        ctx.inplace = frozenset(ctx.inplace_why)
        ctx.packed_active = tuple(sorted(ctx.packed & active))
        ctx.embed_solo = {n: [e for e in self.embed if e.adapter in r and not e.off] for n, r in ctx.solo.items()}
        for host in self.hosts.values():
            for rt in host.runtimes.values():
                rt.refresh(active)
            host.refresh()
        # a wrapped leaf whose host runs nothing forwards straight to its base layer
        for path, (parent, attr, _) in self.wrappers.items():
            wrapper = getattr(parent, attr, None)
            if callable(getattr(wrapper, "set_bypass", None)) and path in self.hosts:
                wrapper.set_bypass(self.hosts[path].idle)
        for p in list(self.kv):
            provider = _provider_of(self.info, p)
            if provider is not None:
                provider.refresh(active)
        live = [e for e in self.embed if e.adapter in active and not e.off]
        ctx.embed_live = live
        # a gate no computed branch reads (its branches pruned or dropped) leaves its group too
        needed = {(h.name, e.gate_key) for h in self.handles.values() for e in h.entries.values()
                  if e.gate_key is not None and not e.off}
        for group in ctx.groups.values():
            group.refresh(active, self.executor, needed)
        # projections whose base and LoRA run as one node (after the groups: a group folds whole)
        plan_folds(self)

    def sync_inplace(self, active: set[str]) -> None:
        """Put into every tensor trained in place by several attached adapters (or by one) the
        values of the adapter that runs now: the directly active one first (an AdapterFusion's
        own head before its members'), then one pulled in by a fusion; the base values when no
        running adapter trains it. Swaps only when the holder changes."""
        slots: dict[int, tuple[Tensor, list]] = {}
        for n, e, i, p in _inplace_entries(self):
            slots.setdefault(id(p), (p, []))[1].append((n, e, i))
        with torch.no_grad():
            for p, users in slots.values():
                holder = next((u for u in users if u[1].held[u[2]] is None), None)
                cands = [u for u in users if u[0] in self.ctx.active] or [u for u in users if u[0] in active]
                if holder is not None and any(c[1] is holder[1] for c in cands):
                    continue
                want = cands[0] if cands else None
                if want is None and holder is None:
                    continue  # the base values are in already
                if holder is not None:
                    holder[1].held[holder[2]] = p.detach().clone()
                if want is None:
                    p.copy_(users[0][1].saved[users[0][2]][1])
                else:
                    p.copy_(want[1].held[want[2]])
                    want[1].held[want[2]] = None

    def running(self, names: set[str]) -> set[str]:
        """The adapters that run when ``names`` are active: an active AdapterFusion
        (plugins/fusion.py) runs the adapters it fuses as well (fused where it fuses them,
        as they are elsewhere)."""
        out = set(names)
        for n in names:
            h = self.handles.get(n)
            if h is None:
                continue
            for e in h.entries.values():
                out.update(getattr(e.branch, "fuses", None) or ())
        return out


def real_numel(p: torch.Tensor) -> int:
    """The parameters a tensor stands for: a packed 4-bit weight (bitsandbytes' ``Params4bit``,
    two values per byte, its ``quant_state.shape`` the unpacked shape) counts its unpacked size,
    not its storage."""
    qs = getattr(p, "quant_state", None)
    shape = getattr(qs, "shape", None)
    if shape is not None:
        n = 1
        for d in shape:
            n *= int(d)
        return n
    return p.numel()


def _is_adapter(name: str) -> bool:
    return name.startswith(CONTAINER + ".") or f".{CONTAINER}." in name


def base_param_count(model: nn.Module) -> int:
    """Parameters of the base model: everything but the adapter container's, packed quantized
    weights counted as the values they hold."""
    return sum(real_numel(p) for n, p in model.named_parameters() if not _is_adapter(n))


def memory_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by the base (parameters, buffers and quantization statistics) and by the
    adapters' parameters, for the reports."""
    base = adapter = 0
    seen: set[int] = set()
    # the packed adapters' own lora_A / lora_B are views of their stacks (pack_mixed): counted once
    stacks = getattr(model._modules.get(CONTAINER), "_modules", {}).get(PACKED)
    stacked = {id(p) for p in stacks.parameters()} if stacks is not None else set()
    stack_ptrs = {p.untyped_storage().data_ptr() for p in stacks.parameters()} if stacks is not None else set()
    for n, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        b = p.numel() * p.element_size()
        if _is_adapter(n):
            if stack_ptrs and id(p) not in stacked and p.untyped_storage().data_ptr() in stack_ptrs:
                continue
            adapter += b
            continue
        qs = getattr(p, "quant_state", None)
        for t in _quant_tensors(qs):
            b += t.numel() * t.element_size()
        base += b
    for n, buf in model.named_buffers():
        if not _is_adapter(n):
            base += buf.numel() * buf.element_size()
    return {"base": base, "adapter": adapter}


def _quant_tensors(qs) -> list[torch.Tensor]:
    """The tensors of a 4-bit quantization state (absmax, the nested state's, the code)."""
    if qs is None:
        return []
    out = [t for t in (getattr(qs, "absmax", None), getattr(qs, "code", None)) if isinstance(t, torch.Tensor)]
    nested = getattr(qs, "state2", None)
    if nested is not None and nested is not qs:
        out += _quant_tensors(nested)
    return out


def adapter_dtype(model: nn.Module) -> torch.dtype:
    """The dtype adapter modules compute in: the dtype of the activations they read. That is
    the input embeddings' dtype (a quantized layer returns its input's dtype, whatever it
    computes in); without float embeddings, a quantized layer's compute dtype; else the first
    float parameter's; float32 when the model has none."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if get is not None else None
    except (NotImplementedError, AttributeError):
        emb = None
    w = getattr(emb, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w.dtype
    for m in model.modules():
        cd = getattr(m, "compute_dtype", None)
        if isinstance(cd, torch.dtype) and cd.is_floating_point:
            return cd
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def module_param_count(module: nn.Module, kept: bool) -> int:
    """A branch's or shared module's parameters, kept after training (``kept``) or used in it:
    its ``num_params(kept)`` where it declares one (unipelt.types.Branch), else all of them."""
    fn = getattr(module, "num_params", None)
    if fn is not None:
        return int(fn(kept=kept))
    return sum(p.numel() for p in module.parameters())


def get_state(model: nn.Module) -> ModelState | None:
    return model.__dict__.get(STATE_ATTR)


def require_state(model: nn.Module) -> ModelState:
    state = get_state(model)
    if state is None:
        raise ModelError("this model carries no unipelt adapter")
    return state


def set_parent(model: nn.Module, path: str, new: nn.Module) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)
    return parent, attr


# ------------------------------------------------------------------------------------------
# the hooks (classes, not closures: picklable and deep-copyable)
# ------------------------------------------------------------------------------------------
class RootPreHook:
    """Start of a model call: read the mask and cache length, forget the last call's tensors."""

    def __init__(self, ctx: ForwardContext, binder: CallBinder, config_use_cache: bool):
        self.ctx, self.binder = ctx, binder
        self.config_use_cache = config_use_cache

    def __call__(self, module, args, kwargs):
        # Two ways torch.compile meets this hook. Compiling the model itself, it calls the
        # hooks outside its graph, each as a frame of its own: that frame is skipped (below the
        # class), so here is_compiling() is False and the whole call runs eagerly. Compiling an
        # enclosing module (a wrapper adding a loss term, a training-step module), it traces the
        # hook inline: the common call is attribute work it can trace, so the enclosing
        # fullgraph capture keeps one graph; only a mixed batch goes to the eager path (one graph
        # break there, and it stays correct).
        if torch.compiler.is_compiling() and "adapter_names" not in kwargs and self.ctx.row_names is None:
            if self.ctx.packed_active and torch.is_grad_enabled():
                _refuse_packed(self.ctx)
            self.ctx.rows = None
            self._read(args, kwargs)
            return None
        return self._call_eager(module, args, kwargs)

    # Run eagerly under torch.compile (a compiled model's root hooks are frames of their own, so
    # this breaks no graph): compiled, this frame would be specialised on the adapter_names strings
    # and recompiled for every new assignment of rows; eager, it only hands the forward a tensor of
    # row ids (RowSelection.row_ids), which the captured forward takes as an input.
    @torch.compiler.disable
    def _call_eager(self, module, args, kwargs):
        # PEFT's keyword for mixed batches: consumed here, never passed to the model
        names = kwargs.pop("adapter_names", None) if "adapter_names" in kwargs else None
        ctx = self.ctx
        if names is not None or ctx.row_names is not None:
            ctx.rows = select_rows(ctx, self.binder, args, kwargs, names, ctx.row_names)
            self._read(args, kwargs)
            return args, kwargs
        if ctx.packed_active and torch.is_grad_enabled():
            _refuse_packed(ctx)
        ctx.rows = None
        self._read(args, kwargs)
        return None

    def _read(self, args, kwargs):
        unknown = self.binder.unknown(kwargs)
        if unknown:
            # transformers drops keywords its **kwargs does not declare: a typo or a keyword of
            # another library (PEFT's adapter_names=) would change nothing without a word
            raise ModelError(
                f"{self.binder.name}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                "the model would ignore them silently"
            )
        ctx = self.ctx
        ctx.attention_mask = self.binder.get(args, kwargs, "attention_mask")
        past = self.binder.get(args, kwargs, "past_key_values")
        ctx.cache_length = cache_length(past)
        use_cache = self.binder.get(args, kwargs, "use_cache")
        ctx.continued = past is not None or bool(self.config_use_cache if use_cache is None else use_cache)
        ctx.clear()


def _refuse_packed(ctx: ForwardContext) -> None:
    names = ", ".join(repr(n) for n in ctx.packed_active)
    raise ModelError(f"adapter(s) {names} are packed for mixed batches (unipelt.pack_mixed): their own lora_A / "
                     "lora_B are frozen views of the stacked parameters, so a call with gradients that runs them "
                     "outside a mixed batch (no adapter_names) would train nothing; pass adapter_names=, run it "
                     "under torch.no_grad(), or call unipelt.unpack_mixed(model) first")


# The hook's own frame (torch.compile of the model calls hooks outside its graph) runs eagerly,
# without the recursive disable that would break an enclosing graph that inlines the hook: the
# frame-only skip torch._dynamo.skip uses, minus its _torchdynamo_disable mark (which inlining
# honours as a graph break).
_skip_frame = getattr(getattr(torch._dynamo, "eval_frame", None), "skip_code", None)
if _skip_frame is not None:
    _skip_frame(RootPreHook.__call__.__code__)


def select_rows(ctx: ForwardContext, binder: CallBinder, args, kwargs, names, scoped) -> RowSelection:
    """The :class:`RowSelection` of a call: ``adapter_names`` given to it (one per row), or those of
    an enclosing ``unipelt.adapter_names`` block (repeated per row when generate() expanded the
    batch for beams or several return sequences, as it does: each row ``k`` times in a row)."""
    ref = binder.get(args, kwargs, "input_ids")
    if ref is None:
        ref = binder.get(args, kwargs, "inputs_embeds")
    if names is None:
        names = scoped
        if ref is not None and len(names) and ref.shape[0] != len(names) and ref.shape[0] % len(names) == 0:
            k = ref.shape[0] // len(names)
            names = [n for n in names for _ in range(k)]
    return make_selection(ctx, names, ref.shape[0] if ref is not None else None,
                          ref.device if ref is not None else None)


def make_selection(ctx: ForwardContext, names, batch: int | None, device) -> RowSelection:
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ModelError("adapter_names: expected a list with one adapter name per row (\"__base__\" for none)")
    if batch is not None and len(names) != batch:
        raise ModelError(f"adapter_names: {len(names)} names for a batch of {batch} rows; give one per row")
    for i, n in enumerate(names):
        if n != BASE and n not in ctx.solo:
            attached = ", ".join(ctx.solo) or "(none)"
            raise ModelError(f"adapter_names[{i}]: no adapter named {n!r}; attached: {attached} (or {BASE!r})")
    for i, n in enumerate(names):
        if n != BASE and ctx.solo[n] & ctx.inplace:
            culprit = n if n in ctx.inplace else sorted(ctx.solo[n] & ctx.inplace)[0]
            via = "" if culprit == n else f" (it runs adapter {culprit!r}, which it fuses)"
            raise ModelError(f"adapter_names[{i}]: adapter {n!r}{via}: {ctx.inplace_why[culprit]} (the tensors "
                             "of the base model that every row of the batch reads); it cannot serve some rows only")
    if ctx.merged_any:
        raise ModelError("adapter_names: an adapter is merged into the base weights, which every row would see; "
                         "unmerge it first (handle.unmerge())")
    # eager (the root pre-hook): the index tensors go to the context's slot (runtime._CALL_TENSORS)
    slot = None if torch.compiler.is_compiling() else ctx.slot
    return RowSelection(list(names), device, tuple(ctx.solo), slot=slot)


class RootPostHook:
    """End of a model call: drop references to activations. Gradient-checkpointing recomputation
    refills them through the layer pre-hooks, which run again inside the recomputed block."""

    def __init__(self, ctx: ForwardContext):
        self.ctx = ctx

    def __call__(self, module, args, kwargs, out):
        self.ctx.clear()


# Compiling the model itself, torch.compile runs this hook as a frame of its own after the graph,
# and compiled it: one more cache lookup (its guards over the context) per call for a few dict
# clears (the H200 profile of BERT LoRA under reduce-overhead, session 8: 2 compiled regions per
# step against PEFT's 1). The frame is skipped as the pre-hook's is; an enclosing compiled module
# still traces it inline (skip_code leaves inlining alone).
if _skip_frame is not None:
    _skip_frame(RootPostHook.__call__.__code__)


class NormPostHook:
    """Pre-LN blocks: the gates' layer input is the input norm's output."""

    def __init__(self, ctx: ForwardContext, layer: int):
        self.ctx, self.layer = ctx, layer

    def __call__(self, module, args, out):
        self.ctx.layer_inputs[self.layer] = out if isinstance(out, torch.Tensor) else out[0]


class LayerPreHook:
    """Post-LN blocks: the gates' layer input is the block input, captured at its first submodule."""

    def __init__(self, ctx: ForwardContext, layer: int):
        self.ctx, self.layer = ctx, layer

    def __call__(self, module, args, kwargs):
        h = first_tensor_arg(args, kwargs)
        if h is not None:
            self.ctx.layer_inputs[self.layer] = h


class OutputHook:
    """Serial and parallel hook points on a module's output: the host transforms it."""

    def __init__(self, host: Host):
        self.host = host

    def __call__(self, mod, args, kwargs, out):
        x = first_tensor_arg(args, kwargs)
        if isinstance(out, tuple):
            return (self.host.run(x, out[0]),) + tuple(out[1:])
        return self.host.run(x, out)


class StashHook:
    """Capture a module's input for the branches (or gates) that read it elsewhere."""

    def __init__(self, ctx: ForwardContext, key: str, arg: int = 0, kwarg: str | None = None):
        self.ctx, self.key, self.arg, self.kwarg = ctx, key, arg, kwarg

    def __call__(self, mod, args, kwargs):
        x = first_tensor_arg(args, kwargs, self.arg, self.kwarg)
        if x is not None:
            self.ctx.stash[self.key] = x


class adapter_names:  # noqa: N801 - used as a context manager, like torch.no_grad
    """``with unipelt.adapter_names(model, ["a", "b", "__base__"]):`` every call of ``model`` inside
    serves row i with adapter ``names[i]``, as ``model(..., adapter_names=names)`` does for one
    call. For ``generate()``, which refuses keywords the model's forward does not declare; rows it
    repeats (beams, several return sequences) keep their adapter."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.state = require_state(model)
        make_selection(self.state.ctx, names, None, None)  # checked now, not at the first call
        self.names = list(names)

    def __enter__(self):
        ctx = self.state.ctx
        self.outer, ctx.row_names = ctx.row_names, self.names
        return self

    def __exit__(self, *exc):
        ctx = self.state.ctx
        ctx.row_names = self.outer
        ctx.rows = None
        return False


def pack_mixed(model: nn.Module) -> list[nn.Parameter]:
    """Make the stacked LoRA A and B of each projection where mixed batches stack (every attached
    adapter has one plain ungated LoRA there: :meth:`SiteRuntime._plan_stacked`) ONE trainable
    Parameter each (:class:`unipelt.runtime.StackedParams`), and return them for the optimizer
    (A, B per projection). Eight BERT LoRA q,v adapters: 48 tensors instead of 384, the per-tensor
    host work of a mixed train step (concatenation, gradient split, AccumulateGrad, AdamW,
    zero_grad) that of one adapter.

    The adapters' own lora_A / lora_B become frozen views of the stack: an optimizer over the
    adapters' parameters sees nothing to train (give it the returned ones, with the adapters'
    other trainable tensors), each adapter still saves (``handle.save``) its own trained values,
    and a call without gradients that runs one adapter alone reads them. A call with gradients
    that would run a packed adapter outside the stack (no ``adapter_names``; a dropout the PyTorch
    executors run as segments; an adapter attached since) raises :class:`ModelError`.
    :func:`unpack_mixed` gives each adapter independent trainable tensors again. Projections where
    some adapter's LoRA is frozen (fused by an AdapterFusion) stay as they are, and fusing a packed
    adapter is refused (plugins/fusion.py); a LoRA+ ``lr_ratio`` is refused (one returned tensor
    holds every adapter's B: their rates could not differ). Detaching a packed adapter releases it
    (:func:`release_packed`): its own tensors again, the others stay packed."""
    state = require_state(model)
    container = model._modules.get(CONTAINER)
    if container is None:  # (require_state: an adapted model has one)
        raise ModelError("pack_mixed: the model has no adapter container")
    if PACKED in container:
        raise ModelError("pack_mixed: the model is packed already (unipelt.unpack_mixed(model) first)")
    if PACKED in state.handles:
        raise ModelError(f"pack_mixed: an adapter is named {PACKED!r}, the slot of the packed parameters")
    stacks = nn.ModuleDict()
    runtimes = []
    for host in state.hosts.values():
        for rt in host.runtimes.values():
            if rt.stacked is None:
                continue
            branches = [e.branch for _, e in rt.stacked]
            if not all(b.lora_A.requires_grad and b.lora_B.requires_grad for b in branches):
                continue
            for (name, _), b in zip(rt.stacked, branches):
                if getattr(b, "lr_ratio", None):
                    raise ModelError(f"pack_mixed: adapter {name!r} sets lr_ratio (LoRA+) at {rt.site_key}: its "
                                     "B would share one tensor, and one learning rate, with the other adapters' Bs")
            runtimes.append(rt)
    if not runtimes:
        raise ModelError("pack_mixed: no projection where the attached adapters stack (at least two adapters, "
                         "each with one plain, ungated, trainable LoRA there)")
    names: set[str] = set()
    for i, rt in enumerate(runtimes):
        sp = StackedParams(rt.site_key, [(n, e.branch) for n, e in rt.stacked])
        stacks[f"s{i}"] = sp
        rt.packed, rt.packed_stale = sp, False
        names.update(sp.names)
    container[PACKED] = stacks
    state.ctx.packed = frozenset(names)
    state.refresh()
    return [p for sp in stacks.values() for p in (sp.A, sp.B)]


def unpack_mixed(model: nn.Module) -> list[nn.Parameter]:
    """Undo :func:`pack_mixed`: every packed adapter's lora_A / lora_B get independent tensors with
    the stack's current (trained) values and their requires_grad flags back; returns those
    parameters (the same objects the adapters' handles list: an optimizer built before packing
    can go on, one built over the stacks must be rebuilt). A model that is not packed: []."""
    state = require_state(model)
    container = model._modules.get(CONTAINER)
    if container is None or PACKED not in container:
        return []
    stacks = container[PACKED]
    del container[PACKED]
    out = [p for sp in stacks.values() for p in sp.unbind()]
    for host in state.hosts.values():
        for rt in host.runtimes.values():
            rt.packed, rt.packed_stale = None, False
    state.ctx.packed = frozenset()
    state.refresh()
    return out


def release_packed(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Adapter ``name`` is being detached: give its packed lora_A / lora_B their own tensors (the
    trained values, their flags back) and take it out of the packed set; the stacks keep its
    blocks, read by no row, so the other packed adapters train on with the optimizer over the
    stacks. Returns its parameters ([] when it is not packed)."""
    state = require_state(model)
    container = model._modules.get(CONTAINER)
    if container is None or PACKED not in container or name not in state.ctx.packed:
        return []
    out = [p for sp in container[PACKED].values() for p in sp.release(name)]
    state.ctx.packed = frozenset(state.ctx.packed - {name})
    return out


def cache_length(past) -> int | None:
    """How many tokens ``past_key_values`` already hold, or None without a cache."""
    if past is None:
        return None
    try:
        return int(past.get_seq_length())
    except (AttributeError, TypeError):  # a legacy tuple cache: (layers) of (key, value), keys (B, H, T, D)
        try:
            return int(past[0][0].shape[-2])
        except (IndexError, TypeError, AttributeError):
            return None


# ------------------------------------------------------------------------------------------
# installing and removing
# ------------------------------------------------------------------------------------------
def ensure_state(model: nn.Module, info: ModelInfo) -> ModelState:
    """The model's state, created (global hooks installed, base frozen) on first use."""
    state = get_state(model)
    if state is not None:
        return state
    state = ModelState(info=info, ctx=ForwardContext(causal=info.causal))
    model.__dict__[STATE_ATTR] = state
    ctx = state.ctx
    binder = CallBinder(model.forward)
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    use_cache = bool(getattr(text_config, "use_cache", False)) and info.causal
    state.global_hooks.append(model.register_forward_pre_hook(RootPreHook(ctx, binder, use_cache), with_kwargs=True))
    state.global_hooks.append(model.register_forward_hook(RootPostHook(ctx), with_kwargs=True))
    # save_pretrained writes the base checkpoint without the adapter container (issue 14)
    from unipelt.io import install_clean_save

    state.global_hooks.append(install_clean_save(model))
    for i, layer in enumerate(info.layers):
        if info.arch.input_norm:
            norm = layer.get_submodule(info.arch.input_norm)
            state.global_hooks.append(norm.register_forward_hook(NormPostHook(ctx, i)))
            continue
        first = layer.get_submodule(info.arch.layer_input) if info.arch.layer_input else layer
        state.global_hooks.append(first.register_forward_pre_hook(LayerPreHook(ctx, i), with_kwargs=True))
    # the base is frozen; remember the flags so detach restores them exactly
    for p in model.parameters():
        state.requires_grad[id(p)] = (p, p.requires_grad)
        p.requires_grad_(False)
    return state


def _inplace_entries(state: ModelState):
    """(adapter, entry, index, tensor) for every base tensor an attached entry trains in place."""
    for n, h in state.handles.items():
        for e in h.entries.values():
            if e.held is not None and e.saved is not None:
                for i, (p, _) in enumerate(e.saved):
                    yield n, e, i, p


def inplace_users(state: ModelState, p: Tensor) -> list[tuple[str, Any, int]]:
    """(adapter, entry, index) of every attached entry that trains the base tensor ``p`` in place."""
    return [(n, e, i) for n, e, i, q in _inplace_entries(state) if q is p]


def host_for(model: nn.Module, state: ModelState, site: ResolvedSite, registry) -> Host:
    """The host of the module at ``site.path``: a leaf wrapper for projections, an output hook
    for sublayer outputs; created the first time a site needs it."""
    path = site.path
    host = state.hosts.get(path)
    if host is not None:
        return host
    host = Host(path, state.ctx)
    module = model.get_submodule(path)
    wrapper = None
    if site.kind in ("linear", "output", "io"):
        wrapper = registry.hook.unipelt_wrap_leaf(module=module, site=site)
    if wrapper is not None:
        object.__setattr__(wrapper, "host", host)
        parent, attr = set_parent(model, path, wrapper)
        state.wrappers[path] = (parent, attr, module)
    elif site.kind == "linear":
        raise ModelError(f"{path}: no plugin can wrap a {type(module).__name__} for hook point {site.site!r}")
    else:
        state.hooks.setdefault(path, []).append(module.register_forward_hook(OutputHook(host), with_kwargs=True))
    state.hosts[path] = host
    return host


def stash_input(model: nn.Module, state: ModelState, site: ResolvedSite) -> None:
    """Capture the input of a parallel (io) hook point for its branches."""
    key = f"stash:{site.key}"
    if key in state.hooks:
        return
    module = model.get_submodule(site.input_path)
    hook = StashHook(state.ctx, site.key, site.input_arg, site.input_kwarg)
    state.hooks[key] = [module.register_forward_pre_hook(hook, with_kwargs=True)]


def ensure_attention(model: nn.Module, state: ModelState) -> None:
    """Route attention through unipelt's attention function (prefix injection), once."""
    if not state.attention_installed:
        from unipelt import attention

        attention.install(model)
        state.attention_installed = True


# ------------------------------------------------------------------------------------------
# key/value injection (prefix tuning, P-tuning v2): one provider per attention module
# ------------------------------------------------------------------------------------------
class KVProvider:
    """Supplies the prefixes of every kv branch of every adapter at one attention module;
    transformers' attention function calls it after RoPE and the cache update
    (see :mod:`unipelt.attention`)."""

    def __init__(self, ctx: ForwardContext, site_key: str, entries: list[Entry]):
        self.ctx, self.site_key, self.entries = ctx, site_key, entries
        self.live: list[Entry] = []

    def refresh(self, active: set[str]) -> None:
        self.live = [e for e in self.entries if e.adapter in active and not e.off]

    def __call__(self, module, query, key_states, value_states):
        rows = self.ctx.rows
        if rows is not None:
            return self._rows(rows, query, key_states)
        out = []
        for e in self.live:
            p = e.branch.kv_prefix(ctx=self.ctx, entry=e, batch=query.shape[0], site_key=self.site_key,
                                   dtype=key_states.dtype)
            if p is not None:
                out.append(p)
        return out or None

    def _rows(self, rows: RowSelection, query, key_states):
        """A mixed batch: every selected adapter's prefixes side by side, each visible to its own
        rows only (``KVPrefix.visible``). Adapters with different prefix lengths need no padding:
        a row attends to its adapter's L columns exactly as alone; the others' are masked out.
        A gated prefix's gate is computed on its adapter's rows only (a segment, as at the other hook
        points: its statistics are those rows'), then laid out over the batch (zero on the rows
        that cannot see it)."""
        out = []
        batch = query.shape[0]
        ctx = self.ctx
        for name in rows.adapters:
            running = ctx.solo.get(name, ())
            for e in self.entries:
                if e.adapter not in running or e.off:
                    continue  # a pruned or dropped prefix is left out here too, as in a call alone
                saved = ctx.enter_segment(name) if e.gate is not None else None
                try:
                    p = e.branch.kv_prefix(ctx=ctx, entry=e, batch=batch, site_key=self.site_key,
                                           dtype=key_states.dtype)
                finally:
                    if e.gate is not None:
                        ctx.leave_segment(saved)
                if p is None:
                    continue
                if e.gate is not None:
                    p = _spread_rows(p, rows.index(name).to(query.device), batch)
                vis = rows.mask(name, 2).to(query.device).expand(batch, p.key.shape[2])
                out.append(dataclasses.replace(p, visible=vis))
        return out or None


def _spread_rows(p, index, batch: int):
    """A gated prefix computed for one segment's rows laid out over the whole batch (zeros on the
    other rows, which do not see it). Decided by its form, not by sizes (a segment's size is a
    symbol under torch.compile): gated per example, P_k and P_v carry the segment's rows; gated per
    query, the gates do and P_k, P_v are shared."""
    def spread(t):
        return None if t is None else t.new_zeros(batch, *t.shape[1:]).index_copy(0, index, t)
    if p.query_gate is None:
        return dataclasses.replace(p, key=spread(p.key), value=spread(p.value))
    return dataclasses.replace(p, query_gate=spread(p.query_gate), value_gate=spread(p.value_gate))


def _provider_of(info: ModelInfo, path: str) -> KVProvider | None:
    from unipelt import attention

    p = attention.get_kv_provider(info.model.get_submodule(path))
    return p if isinstance(p, KVProvider) else None


def attach_kv(model: nn.Module, state: ModelState, site: ResolvedSite, entry: Entry) -> None:
    """Register ``entry`` (a branch with ``kv_prefix(ctx, entry, batch, ...)``) at an attention module."""
    from unipelt import attention

    ensure_attention(model, state)
    entries = state.kv.setdefault(site.path, [])
    entries.append(entry)
    if len(entries) > 1:
        return
    attention.set_kv_provider(site.module, KVProvider(state.ctx, site.key, entries))
    # the gate may read the attention module's own input (its ``site`` input)
    state.hooks[f"kv:{site.path}"] = [
        site.module.register_forward_pre_hook(StashHook(state.ctx, site.key), with_kwargs=True)
    ]


def detach_kv(model: nn.Module, state: ModelState, site: ResolvedSite, entry: Entry) -> None:
    from unipelt import attention

    entries = state.kv.get(site.path, [])
    if entry in entries:
        entries.remove(entry)
    if not entries:
        attention.clear_kv_provider(site.module)
        for h in state.hooks.pop(f"kv:{site.path}", []):
            h.remove()
        state.kv.pop(site.path, None)


# ------------------------------------------------------------------------------------------
# prompt-style entries (virtual tokens at the input): one call rewrite in the core
# ------------------------------------------------------------------------------------------
def attach_embed(model: nn.Module, state: ModelState, entry: Entry) -> None:
    """Register a branch with ``prompt()`` and ``length``/``after``: its virtual tokens are inserted
    into every model call by :class:`unipelt.inputs.PromptRewrite` (mask, positions, cache
    positions, token types and labels extended consistently)."""
    from unipelt.inputs import PromptRewrite

    state.embed.append(entry)
    if len(state.embed) > 1:
        return
    rewrite = PromptRewrite(model, state.ctx, state.info.causal)
    handles = [model.register_forward_pre_hook(rewrite, with_kwargs=True, prepend=True)]
    if rewrite.score is not None:
        handles.append(rewrite.score.register_forward_hook(rewrite.pooled_last))
    state.hooks["embed:root"] = handles


def detach_embed(model: nn.Module, state: ModelState, entry: Entry) -> None:
    if entry in state.embed:
        state.embed.remove(entry)
    if not state.embed:
        for h in state.hooks.pop("embed:root", []):
            h.remove()


def restore_model(model: nn.Module, state: ModelState) -> None:
    """Undo everything compile did to the model: wrappers, hooks, frozen flags, container."""
    for path, (parent, attr, original) in state.wrappers.items():
        wrapper = getattr(parent, attr)
        if hasattr(wrapper, "restore_weight"):
            wrapper.restore_weight()
        setattr(parent, attr, original)
    for handles in state.hooks.values():
        for h in handles:
            h.remove()
    for h in state.global_hooks:
        h.remove()
    for p, flag in state.requires_grad.values():
        p.requires_grad_(flag)
    if state.attention_installed:
        from unipelt import attention

        attention.uninstall(model)
    if CONTAINER in model._modules:
        del model._modules[CONTAINER]
    del model.__dict__[STATE_ATTR]
