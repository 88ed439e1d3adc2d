"""The spec checked against one model and turned into a graph of gated modules.

Nodes (networkx ``DiGraph``), each with a ``type`` attribute:
  - ``tensor``  ``T:{layer}:{name}``   a tensor of the forward pass that branches or gates read
  - ``branch``  ``B:{node}:{layer}:{site}``  one module instance of one spec node
  - ``gate``    ``G:{gate}:{layer}``   one gate instance (shared gates: one per layer)
  - ``combine`` ``C:{layer}:{site}``   the combination of the branches at one hook point
  - ``output``  ``O:{layer}:{site}``   the hook point's output after combination
Edges are data flow: tensor -> branch/gate (reads), gate -> branch (scales), branch -> combine,
tensor -> combine (the base path), combine -> output.

The graph is validated (acyclic, one combination rule per hook point, widths fit) and records,
for every tensor read by several branches and gates, that group: the unit a fused kernel can
execute in one launch (one read of the shared input, one skinny GEMM for all of them).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import networkx as nx
import torch
from torch import nn

from unipelt.arch import ModelInfo, ResolvedSite
from unipelt.errors import ModelError, SpecError
from unipelt.plan import FusionGroup, GroupMember
from unipelt.registry import MethodDef, Registry
from unipelt.spec import GateSpec, ModuleSpec, Spec

SEQUENCE_POOLINGS = ("mean", "masked_mean")


@dataclass
class BranchPlan:
    node: ModuleSpec
    method: MethodDef
    site: ResolvedSite
    gate_key: str | None = None  # key of the gate instance (GatePlan.key)
    reads_tensor: str = ""

    @property
    def key(self) -> str:
        return f"{self.node.name}.{self.site.key}"


@dataclass
class GatePlan:
    gate_id: str  # node name, or shared gate name
    layer: int | None
    spec: GateSpec
    in_features: int
    input: Literal["layer", "site"]
    reads_tensor: str
    users: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.gate_id}.{self.layer if self.layer is not None else 'global'}"


@dataclass
class CompiledGraph:
    graph: nx.DiGraph
    branches: list[BranchPlan]
    gates: dict[str, GatePlan]
    combine: dict[str, str]  # site key -> mode
    order: dict[str, list[str]]  # site key -> node order (sequential)
    fusion_groups: list[FusionGroup]
    source: str | None = None  # the spec file, for errors found when attaching (a fusion's adapters)

    def to_dot(self) -> str:
        lines = ["digraph unipelt {", "  rankdir=LR;"]
        shapes = {"tensor": "ellipse", "branch": "box", "gate": "diamond", "combine": "circle", "output": "ellipse"}
        ids = {n: f"n{i}" for i, n in enumerate(self.graph.nodes)}
        for n, d in self.graph.nodes(data=True):
            lines.append(f'  {ids[n]} [label="{d.get("label", n)}", shape={shapes.get(d["type"], "box")}];')
        for a, b, d in self.graph.edges(data=True):
            lines.append(f'  {ids[a]} -> {ids[b]} [label="{d.get("role", "")}"];')
        lines.append("}")
        return "\n".join(lines) + "\n"

    def to_mermaid(self) -> str:
        ids = {n: f"n{i}" for i, n in enumerate(self.graph.nodes)}
        lines = ["flowchart LR"]
        for n, d in self.graph.nodes(data=True):
            label = str(d.get("label", n)).replace('"', "'")
            open_, close = {"gate": ("{", "}"), "combine": ("((", "))"), "tensor": ("([", "])"), "output": ("([", "])")}.get(d["type"], ("[", "]"))
            lines.append(f'  {ids[n]}{open_}"{label}"{close}')
        for a, b, d in self.graph.edges(data=True):
            role = d.get("role", "")
            lines.append(f"  {ids[a]} -->|{role}| {ids[b]}" if role else f"  {ids[a]} --> {ids[b]}")
        return "\n".join(lines) + "\n"


def _model_named(info: ModelInfo) -> str:
    """The model as a message names it: its own type, and the catalog it matched where that differs
    (a Qwen2 model runs on the Llama catalog; 'llama' alone reads as the wrong model)."""
    if info.model_type == info.arch.name:
        return repr(info.model_type)
    return f"{info.model_type!r} (catalog {info.arch.name!r})"


def _site_path(node: ModuleSpec, i: int) -> str:
    if node.site_paths:  # as written: `site:` or `sites: [...]`
        return node.site_paths[i]
    return f"modules.{node.name}.sites[{i}]" if len(node.sites) > 1 else f"modules.{node.name}.sites"


def build_graph(spec: Spec, info: ModelInfo, registry: Registry) -> CompiledGraph:
    """Check ``spec`` against the model and build the graph; SpecError on any mismatch."""
    src = spec.source
    g = nx.DiGraph()
    branches: list[BranchPlan] = []
    gates: dict[str, GatePlan] = {}
    available = info.available_sites()

    for node in spec.modules.values():
        method = registry.methods[node.method]
        global_sites = [s for s in node.sites if s in info.arch.global_sites]
        layers = node.layers.resolve(info.num_layers, source=src)
        for i, site in enumerate(node.sites):
            if site not in available:
                raise SpecError(
                    f"hook point {site!r} is not available on architecture {info.arch.name!r}; "
                    f"available: {', '.join(available)}", source=src, path=_site_path(node, i),
                )
            target = info.arch.global_sites.get(site) or info.arch.sites[site]
            if target.kind not in method.site_kinds:
                fitting = sorted(
                    s for s in available
                    if (info.arch.global_sites.get(s) or info.arch.sites[s]).kind in method.site_kinds
                )
                raise SpecError(
                    f"method {method.name!r} cannot attach to {site!r} (a {target.kind} hook point); "
                    f"it attaches to: {', '.join(fitting) or '(none on this architecture)'}",
                    source=src, path=_site_path(node, i),
                )
            check_site = getattr(node.config, "check_site", None)
            for layer in ([None] if site in global_sites else layers):
                try:
                    rs = info.resolve(site, layer)
                except ModelError as e:
                    raise SpecError(str(e), source=src, path=_site_path(node, i)) from None
                # sizes against the model, before anything is built (see MethodDef.config)
                problem = check_site(rs, info) if check_site is not None else None
                if problem:
                    field_name, message = problem
                    raise SpecError(message, source=src, path=f"modules.{node.name}" + (f".{field_name}" if field_name else ""))
                # kv and embed branches compute from their own parameters, not from a tensor of
                # the forward pass: they get a node of their own (their gates may read attn.in)
                reads = rs.reads if rs.kind in ("linear", "io") and rs.reads else f"{site}"
                branches.append(BranchPlan(node=node, method=method, site=rs, reads_tensor=reads))

    # gates ---------------------------------------------------------------------------------
    for bp in branches:
        gspec = spec.gate_for(bp.node)
        if gspec is None:
            continue
        node = bp.node
        gpath = f"gates.{node.gate_ref}" if node.gate_ref else f"modules.{node.name}.gate"
        gate_input = gspec.input if gspec.input != "auto" else bp.method.default_gate_input
        pooling = gspec.pooling
        if pooling == "auto":
            pooling = "token" if info.causal else "masked_mean"
        if info.causal and pooling in SEQUENCE_POOLINGS and not gspec.allow_noncausal:
            raise SpecError(
                f"pooling {pooling!r} averages the gate over the whole sequence; on the causal model "
                f"{_model_named(info)} that lets later tokens change earlier positions (training sees the "
                "future, cached generation disagrees with recomputation). Use 'token', 'running_mean' or "
                "'auto' (causal-safe), or set allow_noncausal: true to opt in",
                source=src, path=f"{gpath}.pooling",
            )
        if gspec.kv == "separate":
            if bp.site.kind != "kv":
                raise SpecError(
                    f"kv: separate gives prefix keys and values their own gate values; {node.name!r} is a "
                    f"{bp.method.name} module, not at attn.kv", source=src, path=f"{gpath}.kv",
                )
        resolved = GateSpec(**{**gspec.__dict__, "input": gate_input, "pooling": pooling})
        if gate_input == "layer":
            in_f = info.hidden_size
            reads = info.arch.canonical_tensor("layer.in")
        else:
            in_f = bp.site.in_features if bp.site.kind in ("linear", "io", "kv", "embed") else bp.site.out_features
            reads = bp.site.reads if bp.site.kind in ("kv", "embed") and bp.site.reads else bp.reads_tensor
        gate_id = node.gate_ref or node.name
        if node.gate_ref is None and len(node.sites) > 1:
            # a node's own gate is one gate per site, whatever it reads: the UniPELT reference gives
            # every LoRA-wrapped projection its own gate (q and v: two per layer, even though both
            # read the layer input), and Houlsby's two adapters read different tensors. One gate
            # for several sites is a shared gate, named under `gates:` and referenced by name.
            gate_id = f"{node.name}@{bp.site.site}"
        gp = GatePlan(gate_id=gate_id, layer=bp.site.layer, spec=resolved, in_features=in_f, input=gate_input, reads_tensor=reads)
        existing = gates.get(gp.key)
        if existing is None:
            gates[gp.key] = gp
        elif existing.reads_tensor != reads or existing.in_features != in_f or existing.spec != resolved:
            raise SpecError(
                f"shared gate {gate_id!r} is read by modules whose gate inputs differ at layer {bp.site.layer} "
                f"({existing.reads_tensor} vs {reads}); a shared gate needs one input: set input: layer",
                source=src, path=gpath,
            )
        gates[gp.key].users.append(bp.key)
        bp.gate_key = gp.key

    # graph -----------------------------------------------------------------------------------
    def tnode(layer, name):
        n = f"T:{layer}:{name}"
        if n not in g:
            g.add_node(n, type="tensor", label=f"L{layer} {name}" if layer is not None else name, layer=layer)
        return n

    site_nodes: dict[str, list[BranchPlan]] = {}
    for bp in branches:
        layer = bp.site.layer
        at = f"L{layer} " if layer is not None else ""  # global hook points (embed, head) have no layer
        b = f"B:{bp.node.name}:{layer}:{bp.site.site}"
        g.add_node(b, type="branch", label=f"{bp.node.name} ({bp.method.name}) {at}{bp.site.site}", plan=bp)
        g.add_edge(tnode(layer, bp.reads_tensor), b, role="reads")
        c = f"C:{layer}:{bp.site.site}"
        if c not in g:
            g.add_node(c, type="combine", label=f"+ {at}{bp.site.site}", site=bp.site.key)
            o = f"O:{layer}:{bp.site.site}"
            g.add_node(o, type="output", label=f"{at}{bp.site.site} out", layer=layer)
            g.add_edge(c, o)
            if bp.site.kind in ("linear", "io"):
                g.add_edge(tnode(layer, bp.reads_tensor), c, role="base")
        g.add_edge(b, c)
        site_nodes.setdefault(bp.site.key, []).append(bp)
    for gp in gates.values():
        gn = f"G:{gp.gate_id}:{gp.layer}"
        g.add_node(gn, type="gate", label=f"gate {gp.gate_id} L{gp.layer} ({gp.spec.pooling})", plan=gp)
        g.add_edge(tnode(gp.layer, gp.reads_tensor), gn, role="reads")
        for user in gp.users:
            bp = next(b for b in branches if b.key == user)
            g.add_edge(gn, f"B:{bp.node.name}:{bp.site.layer}:{bp.site.site}", role="scales")

    if not nx.is_directed_acyclic_graph(g):  # pragma: no cover - construction makes cycles impossible today
        raise SpecError(f"the module graph has a cycle: {nx.find_cycle(g)}", source=src, path="modules")

    # one well-defined combination per hook point ----------------------------------------------
    combine: dict[str, str] = {}
    order: dict[str, list[str]] = {}
    for key, plans in site_nodes.items():
        site = plans[0].site.site
        cs = spec.combine.get(site)
        mode = cs.mode if cs else "parallel"
        if mode == "sequential":
            if plans[0].site.kind != "output" and len(plans) > 1:
                raise SpecError(
                    f"sequential stacking at {site!r} is not well defined: every branch there reads the "
                    "hook point's input, not the previous branch's output; use parallel or average",
                    source=src, path=f"combine.{site}.mode",
                )
            names = [p.node.name for p in plans]
            order[key] = [n for n in cs.order if n in names]
            plans.sort(key=lambda p: order[key].index(p.node.name))
        combine[key] = mode
        # widths fit: every branch at a site sees the same input and output widths
        widths = {(p.site.in_features, p.site.out_features) for p in plans}
        if len(widths) > 1:  # pragma: no cover - resolved from one module
            raise SpecError(f"branches at {key} disagree on widths {sorted(widths)}", source=src, path=f"combine.{site}")

    # fusion groups: tensors read by two or more branches / gates -----------------------------
    groups: list[FusionGroup] = []
    for n, d in g.nodes(data=True):
        if d["type"] != "tensor":
            continue
        members = []
        for m in g.successors(n):
            md = g.nodes[m]
            if md["type"] == "branch":
                bp = md["plan"]
                at = f" {bp.site.site}"
                members.append(GroupMember("branch", bp.key, f"{bp.node.name} ({bp.method.name}){at}"))
            elif md["type"] == "gate":
                gp = md["plan"]
                members.append(GroupMember("gate", gp.key, f"gate {gp.gate_id} ({gp.spec.pooling})"))
        if len(members) >= 2:
            groups.append(FusionGroup(tensor=n.split(":", 2)[2], layer=d["layer"], members=members))
    return CompiledGraph(graph=g, branches=branches, gates=gates, combine=combine, order=order, fusion_groups=groups,
                         source=src)


# ------------------------------------------------------------------------------------------
# count before allocating
# ------------------------------------------------------------------------------------------
# Without a budget nothing else stops a spec from asking for more memory than the machine has
# (an adapter width of 10,000,000 grew to 24 GB before the kernel killed it, issue 14). Sizes
# with a meaning on the model are checked field by field (MethodDef.config.check_site); the rest
# (a prefix MLP's or a prompt encoder's width) only by what they add up to: a PEFT spec that
# allocates more parameters than the base model itself is a typo, not a fine-tuning method.
# The floor keeps tiny test models (tens of thousands of parameters) usable with the shipped specs.
MAX_PARAMS_FLOOR = 50_000_000


def _available_bytes(device: torch.device | None) -> int | None:
    """Memory free for new tensors: on a CUDA device its free memory, else the host's."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):  # pragma: no cover - a device that cannot answer
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # not Linux
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return None


@dataclass
class MetaBuild:
    """The spec's modules built on the meta device: shapes without memory."""

    shared: dict[str, nn.Module] = field(default_factory=dict)
    branches: dict[str, nn.Module] = field(default_factory=dict)
    gates: dict[str, nn.Module] = field(default_factory=dict)
    complete: bool = True  # False when a builder could not run on meta (see check_resources)
    allocated: dict[str, int] = field(default_factory=dict)  # spec node -> parameters the build allocates


def meta_build(spec: Spec, graph: CompiledGraph, info: ModelInfo, registry: Registry) -> MetaBuild:
    """Run every builder of ``graph`` under ``torch.device("meta")`` and count, per spec node,
    the parameters a real build would allocate (registered parameters: BitFit's and the head's
    are the base's own and allocate nothing; a gate counts for the node of its first user)."""
    out = MetaBuild()
    with torch.device("meta"):
        for node in spec.modules.values():
            try:
                mod = registry.hook.unipelt_build_shared(
                    method=registry.methods[node.method], config=node.config, node=node, model=info)
            except Exception:  # noqa: BLE001 - the real build runs this builder again and reports
                out.complete = False
                continue
            if mod is not None:
                out.shared[node.name] = mod
        for bp in graph.branches:
            try:
                mod = registry.hook.unipelt_build_branch(
                    method=bp.method, config=bp.node.config, node=bp.node, site=bp.site, model=info,
                    shared=out.shared.get(bp.node.name))
            except Exception:  # noqa: BLE001 - as above
                mod = None
            if mod is None:
                out.complete = False
                continue
            out.branches[bp.key] = mod
        for key, gp in graph.gates.items():
            try:
                mod = registry.hook.unipelt_build_gate(spec=gp.spec, in_features=gp.in_features, model=info)
            except Exception:  # noqa: BLE001 - as above
                mod = None
            if mod is None:
                out.complete = False
                continue
            out.gates[key] = mod

    def add(node_name: str, mod: nn.Module) -> None:
        out.allocated[node_name] = out.allocated.get(node_name, 0) + sum(p.numel() for p in mod.parameters())

    for bp in graph.branches:
        if bp.key in out.branches:
            add(bp.node.name, out.branches[bp.key])
    for node_name, mod in out.shared.items():
        add(node_name, mod)
    for key, mod in out.gates.items():
        users = graph.gates[key].users
        add(users[0].split(".", 1)[0] if users else key, mod)
    return out


def check_resources(spec: Spec, graph: CompiledGraph, info: ModelInfo, registry: Registry, *,
                    base_params: int, name: str) -> MetaBuild:
    """Count what compiling ``graph`` would allocate, on the meta device, and refuse before any
    allocation: more parameters than the base model (or MAX_PARAMS_FLOOR), more bytes than the
    memory free on the model's device, or over the spec's budget (the same check and message as
    ``AdapterHandle.check_budget`` after the build).

    A builder that cannot run on meta (one whose initialisation reads data: prompt tuning from
    vocabulary embeddings) is left to the real build, whose sizes are bounded field by field
    (``check_site``); the budget is then checked after the build only, as before."""
    from unipelt.handle import AdapterHandle  # handle imports this module

    built = meta_build(spec, graph, info, registry)
    total = sum(built.allocated.values())
    if total:
        largest = max(built.allocated, key=built.allocated.get)
        node = spec.modules.get(largest)
        # the integer fields the node sets: the likeliest culprit is the largest
        sizes = {k: v for k, v in (node.params if node else {}).items() if type(v) is int}
        field_path = f"modules.{largest}" + (f".{max(sizes, key=sizes.get)}" if sizes else "")
        culprit = f"the largest is {largest!r} with {built.allocated[largest]:,}" + (
            f" ({', '.join(f'{k}: {v}' for k, v in sizes.items())})" if sizes else "")
        cap = max(base_params, MAX_PARAMS_FLOOR)
        if total > cap:
            raise SpecError(
                f"the spec's modules would allocate {total:,} parameters, more than the base model's {base_params:,} "
                f"(at most max(base, {MAX_PARAMS_FLOOR:,}) = {cap:,}); {culprit}",
                source=spec.source, path=field_path,
            )
        # the modules are built in torch's default dtype on the host, then moved to the model's device
        device = next((p.device for p in info.model.parameters()), torch.device("cpu"))
        dtype = next((p.dtype for p in info.model.parameters() if p.is_floating_point()), torch.float32)
        needs: list[tuple[torch.device | None, int]] = [(None, total * torch.get_default_dtype().itemsize)]
        if device.type not in ("cpu", "meta"):
            needs.append((device, total * dtype.itemsize))
        for dev, need in needs:
            free = _available_bytes(dev)
            if free is not None and need > free:
                where = f"on {dev}" if dev is not None else "in host memory"
                raise SpecError(
                    f"the spec's modules would allocate {total:,} parameters ({need / 2**30:.2f} GiB), more than the "
                    f"{free / 2**30:.2f} GiB free {where}; {culprit}", source=spec.source, path=field_path,
                )
    if built.complete:
        dry = AdapterHandle(name=name, model=info.model, spec=spec, info=info, graph=graph, container=nn.Module(),
                            branch_modules=built.branches, gate_modules=built.gates, registry=registry,
                            shared_modules=built.shared)
        dry.check_budget(base_params)
    return built
