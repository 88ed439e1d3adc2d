"""``compile``: spec -> validated graph -> modules built off the model -> budget -> attached.

Nothing touches the model until the spec has been validated against it, every module has been
built and the budget holds; a failure before that point leaves the model exactly as it was.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from unipelt.arch import ModelInfo, ResolvedSite, resolve_model
from unipelt.errors import ModelError, PluginError, SpecError
from unipelt.graph import CompiledGraph, build_graph
from unipelt.registry import Registry, get_registry
from unipelt.runtime import (Entry, ForwardContext, Host, LeafWrapper, cache_length_from_call, first_tensor_arg,
                             mask_from_call)
from unipelt.spec import Spec, parse_spec

CONTAINER = "unipelt"  # attribute under which adapter parameters live in the model


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
    attention_installed: bool = False


def get_state(model: nn.Module) -> ModelState | None:
    return model.__dict__.get("_unipelt_state")


def _set_parent(model: nn.Module, path: str, new: nn.Module) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)
    return parent, attr


def _ensure_state(model: nn.Module, info: ModelInfo) -> ModelState:
    state = get_state(model)
    if state is not None:
        return state
    state = ModelState(info=info, ctx=ForwardContext(causal=info.causal))
    model.__dict__["_unipelt_state"] = state
    ctx = state.ctx
    forward = model.forward

    def root_pre(module, args, kwargs):
        ctx.attention_mask = mask_from_call(forward, args, kwargs)
        ctx.cache_length = cache_length_from_call(forward, args, kwargs)
        ctx.layer_inputs.clear()
        ctx.stash.clear()

    def root_post(module, args, kwargs, out):
        # Drop references to activations; gradient-checkpointing recomputation refills them
        # through the layer pre-hooks, which run again inside the recomputed block.
        ctx.layer_inputs.clear()
        ctx.stash.clear()

    state.global_hooks.append(model.register_forward_pre_hook(root_pre, with_kwargs=True))
    state.global_hooks.append(model.register_forward_hook(root_post, with_kwargs=True))
    for i, layer in enumerate(info.layers):
        if info.arch.input_norm:
            def norm_post(module, args, out, i=i):
                ctx.layer_inputs[i] = out if isinstance(out, torch.Tensor) else out[0]
            norm = layer.get_submodule(info.arch.input_norm)
            state.global_hooks.append(norm.register_forward_hook(norm_post))
            continue

        def layer_pre(module, args, kwargs, i=i):
            h = first_tensor_arg(args, kwargs)
            if h is not None:
                ctx.layer_inputs[i] = h
        first = layer.get_submodule(info.arch.layer_input) if info.arch.layer_input else layer
        state.global_hooks.append(first.register_forward_pre_hook(layer_pre, with_kwargs=True))
    # the base is frozen; remember the flags so detach restores them exactly
    for p in model.parameters():
        state.requires_grad[id(p)] = (p, p.requires_grad)
        p.requires_grad_(False)
    return state


def _host_for(model: nn.Module, state: ModelState, path: str, site: ResolvedSite, registry: Registry) -> Host:
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
        parent, attr = _set_parent(model, path, wrapper)
        state.wrappers[path] = (parent, attr, module)
    elif site.kind == "linear":
        raise ModelError(f"{path}: no plugin can wrap a {type(module).__name__} for hook point {site.site!r}")
    else:
        def post(mod, args, kwargs, out, host=host):
            x = first_tensor_arg(args, kwargs)
            if isinstance(out, tuple):
                return (host.run(x, out[0]),) + tuple(out[1:])
            return host.run(x, out)
        state.hooks.setdefault(path, []).append(module.register_forward_hook(post, with_kwargs=True))
    state.hosts[path] = host
    return host


def _stash_hook(model: nn.Module, state: ModelState, site: ResolvedSite) -> None:
    """Capture the input of a parallel (io) hook point, or a pre-LN renorm site's residual."""
    key = f"stash:{site.key}"
    if key in state.hooks:
        return
    module = model.get_submodule(site.input_path)
    ctx = state.ctx

    def pre(mod, args, kwargs, k=site.key):
        x = first_tensor_arg(args, kwargs, site.input_arg, site.input_kwarg)
        if x is not None:
            ctx.stash[k] = x

    state.hooks[key] = [module.register_forward_pre_hook(pre, with_kwargs=True)]


def _count(module: nn.Module, kept: bool) -> int:
    fn = getattr(module, "num_params", None)
    if fn is not None:
        return int(fn(kept=kept))
    return sum(p.numel() for p in module.parameters())


def base_param_count(model: nn.Module) -> int:
    return sum(
        p.numel() for n, p in model.named_parameters()
        if not (n.startswith(CONTAINER + ".") or f".{CONTAINER}." in n)
    )


def compile(
    model: nn.Module,
    spec: str | os.PathLike | dict | Spec,
    name: str = "default",
    *,
    registry: Registry | None = None,
    activate: bool = True,
):
    """Adapt ``model`` in place according to ``spec`` and return its :class:`AdapterHandle`.

    ``spec`` is a path to a YAML/JSON file, a dict, or a parsed :class:`Spec`. Several adapters
    with different names may live on one model; ``activate`` makes the new one the active one.
    """
    from unipelt.handle import AdapterHandle  # handle imports this module

    registry = registry or get_registry()
    # the handle owns its spec: drop_reparameterization() rewrites it, and must not rewrite the
    # caller's dict or Spec (a second compile from it would silently lose the prefix MLP)
    spec = copy.deepcopy(parse_spec(spec, registry))
    state = get_state(model)
    info = state.info if state is not None else resolve_model(model, registry.architectures)
    if state is not None and name in state.handles:
        raise ModelError(f"an adapter named {name!r} is already attached; detach it or choose another name")
    graph: CompiledGraph = build_graph(spec, info, registry)

    # build every module off the model ----------------------------------------------------
    container = AdapterSet(name)
    branch_modules: dict[str, nn.Module] = {}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if not dtype.is_floating_point or dtype in (torch.uint8, torch.int8):
        dtype = torch.float32
    shared_modules: dict[str, nn.Module] = {}
    for node in spec.modules.values():
        shared = registry.hook.unipelt_build_shared(
            method=registry.methods[node.method], config=node.config, node=node, model=info
        )
        if shared is not None:
            shared_modules[node.name] = shared
            container.shared[node.name] = shared
    for bp in graph.branches:
        try:
            mod = registry.hook.unipelt_build_branch(
                method=bp.method, config=bp.node.config, node=bp.node, site=bp.site, model=info,
                shared=shared_modules.get(bp.node.name),
            )
        except SpecError as e:
            if e.source is not None:
                raise
            # a builder knows the field, not the file or the node: name all three (STYLE.md, 15)
            field_path = f"modules.{bp.node.name}" + (f".{e.path}" if e.path else "")
            message = str(e).removeprefix(f"{e.path}: ") if e.path else str(e)
            raise SpecError(message, source=spec.source, path=field_path) from None
        if mod is None:
            raise PluginError(f"no plugin built method {bp.method.name!r} (declared by {bp.method.plugin!r}) for {bp.key}")
        if getattr(mod, "reads", None) not in ("input", "output", "kv", "embed", "params"):
            raise PluginError(f"plugin {bp.method.plugin!r}: branch for {bp.method.name!r} has no valid 'reads' attribute")
        branch_modules[bp.key] = mod
        container.branches[AdapterSet.slot(bp.key)] = mod
    gate_modules: dict[str, nn.Module] = {}
    for key, gp in graph.gates.items():
        gm = registry.hook.unipelt_build_gate(spec=gp.spec, in_features=gp.in_features, model=info)
        if gm is None:
            raise PluginError(f"no plugin builds gates (needed by {key})")
        gate_modules[key] = gm
        container.gates[AdapterSet.slot(key)] = gm
    # adapter modules follow the base's device; gates and branches compute in the base dtype
    container.to(device=device, dtype=dtype if dtype.is_floating_point else torch.float32)

    handle = AdapterHandle(
        name=name, model=model, spec=spec, info=info, graph=graph, container=container,
        branch_modules=branch_modules, gate_modules=gate_modules, registry=registry,
        shared_modules=shared_modules,
    )
    handle.check_budget(base_param_count(model))

    # attach -----------------------------------------------------------------------------
    state = _ensure_state(model, info)
    try:
        if CONTAINER not in model._modules:
            model.add_module(CONTAINER, nn.ModuleDict())
        model._modules[CONTAINER][name] = container
        for bp in graph.branches:
            mod = branch_modules[bp.key]
            gkey = bp.gate_key
            gp = graph.gates.get(gkey) if gkey else None
            entry = Entry(
                adapter=name, node=bp.node.name, branch=mod, gate=gate_modules.get(gkey) if gkey else None,
                gate_key=gkey, gate_input=gp.input if gp else "site", layer=bp.site.layer,
            )
            handle.entries[bp.key] = entry
            if gp is not None and hasattr(mod, "configure_gate"):
                mod.configure_gate(gp.spec)
            attach = getattr(mod, "attach", None)
            if attach is not None:  # kv, embed and params branches attach themselves
                attach(model=model, state=state, site=bp.site, entry=entry)
                continue
            host = _host_for(model, state, bp.site.path, bp.site, registry)
            width = None
            if bp.site.out_slice is not None:
                width = bp.site.out_features * bp.site.part[1]
            rt = host.runtime(bp.site.key, bp.site.kind, bp.site.out_slice, width)
            rt.mode[name] = graph.combine.get(bp.site.key, "parallel")
            if bp.site.kind == "renorm" and not bp.site.input_path:
                rt.norm = bp.site.module  # post-LN: the hooked module is the sublayer's norm
            rt.entries.append(entry)
            order = graph.order.get(bp.site.key)
            if order:
                # sequential stacking runs in the spec's `combine.<site>.order`, not in the order
                # the nodes happen to be written under `modules:`
                mine = sorted((e for e in rt.entries if e.adapter == name), key=lambda e: order.index(e.node))
                rt.entries = [e for e in rt.entries if e.adapter != name] + mine
            if bp.site.kind == "io" or (bp.site.kind == "renorm" and bp.site.input_path):
                _stash_hook(model, state, bp.site)  # the FFN input / a pre-LN sublayer's residual
        for p in container.parameters():
            p.requires_grad_(True)
    except Exception:
        handle._attached = True
        state.handles[name] = handle
        handle.detach()
        raise
    state.handles[name] = handle
    handle._attached = True
    if activate:
        state.ctx.active = {name}
    else:
        state.ctx.active.add(name)
    return handle


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make the named adapter(s) active; the others stay attached but do not run."""
    state = get_state(model)
    if state is None:
        raise ModelError("this model carries no unipelt adapter")
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if n not in state.handles:
            raise ModelError(f"no adapter named {n!r}; attached: {', '.join(state.handles)}")
    state.ctx.active = set(names)


def ensure_attention(model: nn.Module, state: ModelState) -> None:
    """Route attention through unipelt's attention function (prefix injection), once."""
    if not state.attention_installed:
        from unipelt import attention

        attention.install(model)
        state.attention_installed = True


# ------------------------------------------------------------------------------------------
# key/value injection (prefix tuning, P-tuning v2): one provider per attention module
# ------------------------------------------------------------------------------------------
def attach_kv(model: nn.Module, state: ModelState, site: ResolvedSite, entry: Entry) -> None:
    """Register ``entry`` (a branch with ``kv_prefix(ctx, entry, batch)``) at an attention module.

    Every kv branch of every adapter at this module is served by one provider that transformers'
    attention function calls after RoPE and the cache update (see :mod:`unipelt.attention`).
    """
    from unipelt import attention

    ensure_attention(model, state)
    entries = state.kv.setdefault(site.path, [])
    entries.append(entry)
    if len(entries) > 1:
        return
    ctx = state.ctx
    key = site.key

    def provider(module, query, key_states, value_states):
        out = []
        for e in entries:
            if e.adapter not in ctx.active:
                continue
            p = e.branch.kv_prefix(ctx=ctx, entry=e, batch=query.shape[0], site_key=key, dtype=key_states.dtype)
            if p is not None:
                out.append(p)
        return out or None

    attention.set_kv_provider(site.module, provider)

    # the gate may read the attention module's own input (its ``site`` input)
    def pre(mod, args, kwargs):
        x = first_tensor_arg(args, kwargs)
        if x is not None:
            ctx.stash[key] = x

    state.hooks[f"kv:{site.path}"] = [site.module.register_forward_pre_hook(pre, with_kwargs=True)]


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
