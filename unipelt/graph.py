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

from dataclasses import dataclass, field
from typing import Literal

import networkx as nx

from unipelt.arch import ModelInfo, ResolvedSite
from unipelt.errors import ModelError, SpecError
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
    fusion_groups: list[tuple[str, list[str]]]

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
            for layer in ([None] if site in global_sites else layers):
                try:
                    rs = info.resolve(site, layer)
                except ModelError as e:
                    raise SpecError(str(e), source=src, path=_site_path(node, i)) from None
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
                f"{info.arch.name!r} that lets later tokens change earlier positions (training sees the "
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
    groups: list[tuple[str, list[str]]] = []
    for n, d in g.nodes(data=True):
        if d["type"] != "tensor":
            continue
        readers = [
            m for m in g.successors(n)
            if g.nodes[m]["type"] in ("branch", "gate")
        ]
        if len(readers) >= 2:
            groups.append((d["label"], [g.nodes[m]["label"] for m in readers]))
    return CompiledGraph(graph=g, branches=branches, gates=gates, combine=combine, order=order, fusion_groups=groups)
