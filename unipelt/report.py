"""The compile report: architecture, hook points matched, modules, parameters, budget, fusion groups."""
from __future__ import annotations

import re
from collections import defaultdict

from unipelt.handle import AdapterHandle
from unipelt.state import get_state


def _layers_text(layers: list[int]) -> str:
    if not layers:
        return "-"
    runs, start, prev = [], layers[0], layers[0]
    for l in layers[1:] + [None]:
        if l is not None and l == prev + 1:
            prev = l
            continue
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
        if l is not None:
            start = prev = l
    return ",".join(runs)


def report_dict(handle: AdapterHandle, base_params: int | None = None) -> dict:
    info, graph, spec = handle.info, handle.graph, handle.spec
    summary = handle.summary(base_params)
    sites: dict[str, dict] = {}
    for bp in graph.branches:
        pattern = re.sub(r"\.(\d+)\.", ".{i}.", bp.site.path, count=1) if bp.site.layer is not None else bp.site.path
        d = sites.setdefault(bp.site.site, {"module": pattern, "kind": bp.site.kind, "layers": set(), "modules": set(),
                                            "in": bp.site.in_features, "out": bp.site.out_features,
                                            "slice": list(bp.site.out_slice) if bp.site.out_slice else None})
        if bp.site.layer is not None:
            d["layers"].add(bp.site.layer)
        d["modules"].add(bp.node.name)
    for d in sites.values():
        d["layers"] = sorted(d["layers"])
        d["modules"] = sorted(d["modules"])
    modules = []
    for node in spec.modules.values():
        gate = spec.gate_for(node)
        gate_plans = [gp for gp in graph.gates.values() if any(u.startswith(node.name + ".") for u in gp.users)]
        modules.append({
            "name": node.name, "method": node.method, "sites": node.sites,
            "layers": sorted({bp.site.layer for bp in graph.branches if bp.node.name == node.name and bp.site.layer is not None}),
            "params": node.params,
            "gate": None if gate is None else {
                "shared": node.gate_ref, "input": gate_plans[0].input if gate_plans else gate.input,
                "pooling": gate_plans[0].spec.pooling if gate_plans else gate.pooling,
                "lora_scale": gate.lora_scale,
            },
        })
    budget = None
    if spec.budget is not None:
        b = spec.budget
        limit = b.max_params if b.max_params is not None else int(b.fraction * summary.base_params)
        used = handle._budget_used(summary)  # as check_budget
        budget = {"limit": limit, "used": used, "count": b.count, "ok": used <= limit}
        if used > limit and handle._prunes_to_budget():
            # compile accepted it: training prunes toward the budget (`to_budget`); say so, with
            # what pruning cannot remove, instead of a bare EXCEEDED on a spec that compiled
            budget["to_budget"] = True
            budget["unprunable"] = handle._unprunable(summary, b.count)
    # the training-time rules a spec sets (pruning, AdapterDrop), so a compile shows what training will do
    prune = {}
    for node in spec.modules.values():
        rule = spec.prune_for(node.name) if spec.gate_for(node) is not None else None
        prune[node.name] = None if rule is None else {
            "epsilon": rule.epsilon, "patience": rule.patience, "min_step": rule.min_step,
            "to_budget": rule.to_budget}
    drop = None
    if spec.drop is not None:
        d = spec.drop
        layers = None if d.layers is None else d.layers.resolve(info.num_layers, source=None)
        drop = {"layers": layers, "lowest": d.lowest, "rank_steps": d.rank_steps, "random": d.random,
                "modules": list(d.modules)}
    return {
        "architecture": {
            "name": info.arch.name, "model_type": info.model_type, "model_class": type(handle.model).__name__,
            "layers": info.num_layers, "hidden_size": info.hidden_size, "causal": info.causal,
        },
        "sites": sites,
        "modules": modules,
        "combine": {k: v for k, v in graph.combine.items() if v != "parallel"},
        "parameters": summary.to_dict(),
        "budget": budget,
        "prune": prune,
        "drop": drop,
        "executor": getattr(get_state(handle.model), "executor", None),
        "fusion_groups": [dict(fg.to_dict(), **_executor_of(handle, fg)) for fg in graph.fusion_groups],
    }


def _executor_of(handle: AdapterHandle, fg) -> dict:
    """The executor running this group (triton, grouped or reference) and why (plan data, as
    refreshed: attach, switch, merge and set_executor decide it, not a forward)."""
    state = get_state(handle.model)
    ex = state.ctx.groups.get(f"{handle.name}/{fg.key}") if state is not None else None
    describe = getattr(ex, "describe", None)
    if describe is None:
        return {"executor": "reference" if ex is None or not ex.on else "grouped", "reason": "", "folded": False}
    name, why = describe()
    # folded: the members' base projections and LoRAs run as one autograd node (unipelt.fold)
    return {"executor": name, "reason": why, "folded": bool(getattr(ex, "folded", False))}


def report_text(handle: AdapterHandle, base_params: int | None = None) -> str:
    r = report_dict(handle, base_params)
    a = r["architecture"]
    out = [
        f"architecture  {a['name']} ({a['model_type']}, {a['model_class']}): {a['layers']} layers, "
        f"hidden {a['hidden_size']}, {'causal decoder' if a['causal'] else 'encoder'}",
        "",
        "hook points matched",
    ]
    w = max(len(s) for s in r["sites"]) if r["sites"] else 4
    for site, d in sorted(r["sites"].items()):
        sl = f" [{d['slice'][0]}:{d['slice'][1]}]" if d["slice"] else ""
        out.append(f"  {site:<{w}}  {d['kind']:<6}  {d['module']}{sl}  {d['in']}->{d['out']}  "
                   f"layers {_layers_text(d['layers']) if d['layers'] else 'global'}  ({', '.join(d['modules'])})")
    out += ["", "modules"]
    for m in r["modules"]:
        params = ", ".join(f"{k}={v}" for k, v in m["params"].items()) or "defaults"
        gate = "no gate"
        if m["gate"]:
            g = m["gate"]
            gate = (f"gate {'shared ' + repr(g['shared']) + ' ' if g['shared'] else ''}"
                    f"(input {g['input']}, pooling {g['pooling']}" + (f", lora_scale {g['lora_scale']}" if m["method"] == "lora" else "") + ")")
        out.append(f"  {m['name']}: {m['method']} at {', '.join(m['sites'])}, layers {_layers_text(m['layers']) or 'global'}; {params}; {gate}")
    if r["combine"]:
        out.append("  combination: " + ", ".join(f"{k} {v}" for k, v in r["combine"].items()))
    out += ["", str(handle.summary(r["parameters"]["base_params"]))]
    out.append("")
    if r["budget"] is None:
        out.append("budget        none set")
    else:
        b = r["budget"]
        if b.get("to_budget"):
            out.append(f"budget        {b['used']:,} / {b['limit']:,} ({b['count']}): over now; training prunes the "
                       f"lowest gates toward it (to_budget; {b['unprunable']:,} cannot be pruned)")
        else:
            out.append(f"budget        {b['used']:,} / {b['limit']:,} ({b['count']}): {'OK' if b['ok'] else 'EXCEEDED'}")
    rules: dict[str, list[str]] = defaultdict(list)
    for name, rule in r["prune"].items():
        if rule is not None:
            rules[(f"gate mean < {rule['epsilon']:g} for {rule['patience']} steps from step {rule['min_step']}"
                   + ("; toward the budget, lowest gates first" if rule["to_budget"] else ""))].append(name)
    if not rules:
        out.append("pruning       none (no gated module has a prune: rule)")
    for text, names in rules.items():
        out.append(f"pruning       {', '.join(names)}: {text}")
    d = r["drop"]
    if d is not None:
        what = ", ".join(d["modules"]) or "every module"
        if d["lowest"] is not None:
            when = f"the {d['lowest']} lowest layers by gradient norm over the first {d['rank_steps']} steps"
        elif d["layers"] is not None:
            when = f"layers {_layers_text(d['layers'])}"
        else:
            when = "no fixed layers"
        rnd = {True: "; in training, the first n layers of each step (n random)", False: ""}.get(
            d["random"], f"; in training, each layer with probability {d['random']}")
        out.append(f"adapterdrop   {what}: {when}{rnd}")
    out += ["", f"fusion groups (branches and gates reading one tensor: one launch each; executor {r['executor']})"]
    if not r["fusion_groups"]:
        out.append("  none (no tensor is read by more than one branch)")
    # groups of the same shape on several layers print as one line
    by_shape: dict[tuple, list] = defaultdict(list)
    for g in r["fusion_groups"]:
        by_shape[(g["tensor"], tuple(x["label"] for x in g["readers"]), g["executor"], g["reason"],
                  g.get("folded", False))].append(g["layer"])
    for (tensor, readers, ex, why, folded), layers in by_shape.items():
        nums = sorted(l for l in layers if l is not None)
        where = f"layers {_layers_text(nums)}" if nums else "global"
        out.append(f"  {tensor} ({where}): " + " | ".join(readers) + f"  -> {ex}" + (f" ({why})" if why else "")
                   + (" [folded with the base projections: one autograd node in eager forwards]" if folded else ""))
    return "\n".join(out)
