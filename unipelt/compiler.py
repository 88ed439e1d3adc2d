"""``compile``: spec -> validated graph -> modules built off the model -> budget -> attached.

Nothing touches the model until the spec has been validated against it, every module has been
built and the budget holds; a failure before that point leaves the model exactly as it was.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from unipelt.arch import resolve_model
from unipelt.errors import ModelError, PluginError, SpecError
from unipelt.executor import EXECUTORS, TritonExecutor, auto_loads_kernels, kernel_expand, kernels, resolve_executor
from unipelt.graph import CompiledGraph, build_graph, check_resources
from unipelt.pruning import ConstantGate, apply_spec as apply_switches, check_spec as check_switches
from unipelt.registry import Registry, get_registry
from unipelt.runtime import Entry
from unipelt.spec import Spec, parse_spec
from unipelt.state import (CONTAINER, AdapterSet, ModelState, adapter_dtype, base_param_count, ensure_state,  # noqa: F401
                           get_state, require_state)
from unipelt.types import BRANCH_READS


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
    # the spec's executor, else UNIPELT_EXECUTOR, else auto; a later adapter without the field
    # keeps the model's choice (resolved before anything touches the model)
    executor = None
    if spec.executor is not None or state is None:
        try:
            executor = resolve_executor(spec.executor)
        except ValueError as e:
            raise SpecError(str(e)) from None
    if state is not None and name in state.handles:
        raise ModelError(f"an adapter named {name!r} is already attached; detach it or choose another name")
    graph: CompiledGraph = build_graph(spec, info, registry)
    check_switches(spec, graph)  # `pruned:` and `collapsed:` name this model's branches and gates
    # count on the meta device first: the budget and the memory are checked before any allocation
    check_resources(spec, graph, info, registry, base_params=base_param_count(model), name=name)
    _check_triton_runs(spec, executor if executor is not None else state.executor, model)

    # build every module off the model ----------------------------------------------------
    container = AdapterSet(name)
    branch_modules: dict[str, nn.Module] = {}
    # the activations' dtype (a 4-bit base's packed weights are uint8, its compute dtype may differ)
    dtype = adapter_dtype(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
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
        if getattr(mod, "reads", None) not in BRANCH_READS:
            raise PluginError(f"plugin {bp.method.plugin!r}: branch for {bp.method.name!r} has no valid 'reads' attribute")
        branch_modules[bp.key] = mod
        container.branches[AdapterSet.slot(bp.key)] = mod
    gate_modules: dict[str, nn.Module] = {}
    for key, gp in graph.gates.items():
        if key in spec.collapsed:  # replaced by its constant value (unipelt.collapse)
            gm = ConstantGate(gp.spec, spec.collapsed[key])
            gate_modules[key] = gm
            container.gates[AdapterSet.slot(key)] = gm
            continue
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
    state = ensure_state(model, info)
    # what a failed attach puts back: a later adapter's executor or activation must not stay
    previous = (state.executor, state.ctx.expand_kernel, set(state.ctx.active))
    if executor is not None:
        _use_executor(state, executor)
    try:
        if CONTAINER not in model._modules:
            model.add_module(CONTAINER, nn.ModuleDict())
        model._modules[CONTAINER][name] = container
        # new modules start in training mode: follow the model's, so that an adapter attached
        # (or loaded, or imported) onto a model in eval mode does not run its dropout there
        container.train(model.training)
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
            attached = registry.hook.unipelt_attach_branch(
                model=model, state=state, site=bp.site, entry=entry, graph=graph, registry=registry
            )
            if not attached:
                raise PluginError(f"no plugin attaches a {bp.site.kind!r} hook point ({bp.key}, method {bp.method.name!r})")
        _build_groups(state, handle, graph)
        for p in container.parameters():
            p.requires_grad_(True)
        apply_switches(handle)  # the spec's pruned branches and inference AdapterDrop layers: off
        state.handles[name] = handle
        handle._attached = True
        # inside the try: the first refresh plans the executors, and a failure there must detach too
        state.set_active({name} if activate else state.ctx.active | {name})
    except Exception:
        state.executor, state.ctx.expand_kernel, state.ctx.active = previous
        handle._attached = True
        state.handles[name] = handle
        handle.detach()
        raise
    return handle


def triton_cannot_run(model: nn.Module) -> str | None:
    """Why the Triton kernels cannot run on ``model``'s device and dtype, or None when they can."""
    k = kernels()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return k if isinstance(k, str) else k.fits(torch.empty(0, device=device, dtype=adapter_dtype(model)))


def _check_triton_runs(spec: Spec, executor: str, model: nn.Module) -> None:
    """``triton`` chosen where the kernels cannot run (no CUDA and no ``TRITON_INTERPRET=1``, a
    dtype they do not take, triton missing) is one ModelError before the model is touched, naming
    where the choice came from; ``auto`` falls back by itself."""
    if executor != "triton":
        return
    from unipelt.executor import ENV_VAR

    why = triton_cannot_run(model)
    if why is None:
        return
    if spec.executor == "triton":
        where = f"{spec.source}: executor" if spec.source else "executor"
    elif os.environ.get(ENV_VAR) == "triton":
        where = f"{ENV_VAR}=triton"
    else:
        where = "the model's executor (set by an earlier adapter or set_executor)"
    raise ModelError(f"{where}: 'triton' cannot run on this model: {why}; choose 'auto' or 'grouped'")


def _build_groups(state: ModelState, handle, graph: CompiledGraph) -> None:
    """One executor per fusion group of this adapter (plan.FusionGroup -> executor.GroupExecutor)."""
    entries = handle.entries
    for fg in graph.fusion_groups:
        members = []
        for key in fg.branch_keys:
            e = entries[key]
            # a sequential stack's later branches read the previous branch's output, not this tensor
            if graph.combine.get(next(b.site.key for b in graph.branches if b.key == key)) == "sequential":
                continue
            if e.branch.reads in ("input", "output"):
                members.append(e)
        gates = {k: handle.gate_modules[k] for k in fg.gate_keys}
        # the Triton executor is the grouped one wherever the kernels do not run
        ex = TritonExecutor(handle.name, fg, members, gates)
        state.ctx.groups[ex.key] = ex
        for e in members:
            e.group = ex
        for e in entries.values():
            if e.gate_key in gates:
                e.gate_group = ex


def set_executor(model: nn.Module, executor: str) -> None:
    """Choose how branch groups run: ``auto`` (the default: ``executor.auto_rule`` — the Triton
    kernels on CUDA in a compiled forward where they fit, for groups without gates or input
    dropout, else ``grouped``), ``grouped`` (one PyTorch
    executor per fusion group), ``triton`` (the kernels, an error where they cannot run) or
    ``reference`` (every branch and gate on its own; the executors are checked against it)."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}")
    state = require_state(model)
    _use_executor(state, executor)
    state.refresh()


def _use_executor(state: ModelState, executor: str) -> None:
    state.executor = executor
    state.ctx.expand_kernel = kernel_expand if executor in ("auto", "triton") else None
    if executor == "triton" or (executor == "auto" and auto_loads_kernels()):
        kernels()  # imported now, in eager code: not first inside a torch.compile trace


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make the named adapter(s) active; the others stay attached but do not run.

    An adapter merged into the base weights that becomes inactive is unmerged first (as PEFT
    does): its delta would otherwise keep changing the outputs from inside the weights.
    """
    state = require_state(model)
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if n not in state.handles:
            raise ModelError(f"no adapter named {n!r}; attached: {', '.join(state.handles)}")
    for n, h in state.handles.items():
        if n not in names and any(e.merged for e in h.entries.values()):
            h.unmerge()
    state.set_active(set(names))
