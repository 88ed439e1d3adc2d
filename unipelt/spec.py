"""The spec: the user's declarative description of which PEFT modules go where.

Parsing and validation happen here, before anything touches a model. Every problem is one
:class:`~unipelt.errors.SpecError` naming the file, the field path (``modules.lora.r``) and what
was expected, listing the valid choices.

Format (YAML or JSON)::

    version: 1
    modules:
      lora:                       # a node name of your choice
        method: lora              # a method of the loaded plugins (`unipelt plugins`)
        sites: [attn.q, attn.v]   # hook points (or `site: attn.q`)
        layers: all               # all | 3 | [0, 1, -1] | "6:" | ["0:4", -1]
        r: 8                      # the method's own parameters
        gate: {pooling: auto}     # optional: true, a mapping, or the name of a shared gate
    gates:                        # optional shared gates, referenced by name
      g: {input: layer}
    combine:                      # optional, per hook point when several modules share it
      ffn.out: {mode: sequential, order: [a1, a2]}
    budget: {max_params: 2000000} # or {fraction: 0.01}; count: kept | training
"""
from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from unipelt.errors import SpecError
from unipelt.registry import Registry, build_config, get_registry

FORMAT_VERSION = 1
TOP_KEYS = ("version", "name", "description", "modules", "gates", "combine", "budget")
NODE_KEYS = ("method", "site", "sites", "layers", "gate", "lr_scale")
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
COMBINE_MODES = ("parallel", "sequential", "average")


# ------------------------------------------------------------------------------------------
# gates
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateSpec:
    """Options of a gate G = sigmoid(w·x + b) (UniPELT, Mao et al. 2022, section 3).

    input: ``layer`` (the block's input, the paper's choice for the LoRA and prefix gates),
        ``site`` (the tensor the branch reads: the adapter gate's input), or ``auto`` (the
        method's published default).
    pooling: ``token`` (one gate value per token), ``masked_mean`` (per-token sigmoid averaged
        over the non-padding tokens: one value per example), ``mean`` (the reference code's
        unmasked average over all positions, padding included), ``running_mean`` (a masked mean
        over the tokens so far: causal-safe), or ``auto``: masked_mean on encoders, token on
        decoders.
    lora_scale: ``replace`` (the reference: the gate replaces alpha/r) or ``multiply``.
    kv: for prefix gates, ``shared`` (one gate multiplies P_k and P_v, the reference) or
        ``separate`` (a Linear(d, 2): one gate for P_k, one for P_v), with any pooling; per token,
        each query's logits to P_k and its share of P_v are scaled by its own two gates.
    allow_noncausal: opt in to a sequence-pooled gate on a causal model (it lets later tokens
        change earlier positions; refused otherwise).
    init_bias: initial bias of the gate's linear layer (0 gives sigmoid = 0.5 on average).
    """

    input: Literal["auto", "layer", "site"] = "auto"
    pooling: Literal["auto", "token", "masked_mean", "mean", "running_mean"] = "auto"
    lora_scale: Literal["replace", "multiply"] = "replace"
    kv: Literal["shared", "separate"] = "shared"
    allow_noncausal: bool = False
    init_bias: float = 0.0
    name: str | None = None  # set for shared gates (the key under `gates:`)


GATE_FIELDS = ("input", "pooling", "lora_scale", "kv", "allow_noncausal", "init_bias")


# ------------------------------------------------------------------------------------------
# layer selection
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSel:
    """A layer selection as written in the spec; resolved against a model's layer count."""

    items: tuple[Any, ...]  # "all" | int | slice-string
    path: str

    def resolve(self, num_layers: int, *, source: str | None) -> list[int]:
        out: list[int] = []
        for i, item in enumerate(self.items):
            where = self.path if len(self.items) == 1 else f"{self.path}[{i}]"
            if item == "all":
                out.extend(range(num_layers))
            elif isinstance(item, int):
                if not -num_layers <= item < num_layers:
                    raise SpecError(
                        f"layer {item} out of range for a {num_layers}-layer model "
                        f"(valid: 0..{num_layers - 1} or -{num_layers}..-1)", source=source, path=where,
                    )
                out.append(item % num_layers)
            else:
                parts = [int(p) if p.strip() else None for p in item.split(":")]
                idx = list(range(num_layers))[slice(*parts)]
                if not idx:
                    raise SpecError(
                        f"range {item!r} selects no layer of a {num_layers}-layer model", source=source, path=where
                    )
                out.extend(idx)
        if len(set(out)) != len(out):
            raise SpecError("a layer is selected twice", source=source, path=self.path)
        return sorted(out)


_SLICE_RE = re.compile(r"^\s*-?\d*\s*:\s*-?\d*\s*(:\s*-?\d+\s*)?$")


def _parse_layers(value: Any, *, source: str | None, path: str) -> LayerSel:
    expected = "expected 'all', a layer index, a range like '0:6' or '-4:', or a list of those"
    raw = value if isinstance(value, list) else [value]
    if not raw:
        raise SpecError(f"{expected}, got an empty list", source=source, path=path)
    items: list[Any] = []
    for i, v in enumerate(raw):
        where = path if not isinstance(value, list) else f"{path}[{i}]"
        if v == "all" and not isinstance(value, list):
            items.append("all")
        elif isinstance(v, int) and not isinstance(v, bool):
            items.append(v)
        elif isinstance(v, str) and _SLICE_RE.match(v):
            items.append(v)
        else:
            raise SpecError(f"{expected}, got {v!r}", source=source, path=where)
    return LayerSel(tuple(items), path)


# ------------------------------------------------------------------------------------------
# nodes and the whole spec
# ------------------------------------------------------------------------------------------
@dataclass
class ModuleSpec:
    """One named node of ``modules:``."""

    name: str
    method: str
    sites: list[str]
    layers: LayerSel
    config: Any
    params: dict[str, Any]
    gate: GateSpec | None = None
    gate_ref: str | None = None  # name of a shared gate
    # this node's parameters learn at lr_scale x the run's learning rate (its gates keep the gate
    # rate): methods differ in how far one optimizer step moves them — a prefix MLP multiplies its
    # step by its fan-in — so one shared rate suits LoRA and the adapter or the prefix, not both
    lr_scale: float = 1.0
    # the field path of each site as written (``modules.x.site``, ``modules.x.sites[1]``), so
    # that errors found later, against a model, name the field the user wrote
    site_paths: list[str] = field(default_factory=list)


@dataclass
class CombineSpec:
    site: str
    mode: Literal["parallel", "sequential", "average"] = "parallel"
    order: list[str] = field(default_factory=list)


@dataclass
class BudgetSpec:
    max_params: int | None = None
    fraction: float | None = None
    count: Literal["kept", "training"] = "kept"


@dataclass
class Spec:
    modules: dict[str, ModuleSpec]
    gates: dict[str, GateSpec] = field(default_factory=dict)
    combine: dict[str, CombineSpec] = field(default_factory=dict)
    budget: BudgetSpec | None = None
    version: int = FORMAT_VERSION
    name: str | None = None
    description: str | None = None
    source: str | None = None
    raw: dict = field(default_factory=dict)

    def gate_for(self, node: ModuleSpec) -> GateSpec | None:
        if node.gate_ref is not None:
            return self.gates[node.gate_ref]
        return node.gate


def _expect_mapping(value: Any, *, source: str | None, path: str, what: str = "a mapping") -> dict:
    if not isinstance(value, dict):
        raise SpecError(f"expected {what}, got {type(value).__name__} {value!r}", source=source, path=path)
    for k in value:
        if not isinstance(k, str):
            raise SpecError(f"keys must be strings, got {k!r}", source=source, path=path)
    return value


def _unknown(keys, valid, *, source, path) -> None:
    for k in keys:
        if k not in valid:
            raise SpecError(
                f"unknown key {k!r}; valid keys: {', '.join(valid)}", source=source, path=f"{path}.{k}" if path else k
            )


def _parse_gate(value: Any, *, source: str | None, path: str, name: str | None = None) -> GateSpec:
    if value is True:
        value = {}
    value = _expect_mapping(value, source=source, path=path, what="true, a mapping of gate options or the name of a shared gate")
    spec = build_config(GateSpec, value, source=source, path=path)
    if name is not None:
        spec = GateSpec(**{**spec.__dict__, "name": name})
    return spec


def load_spec_data(spec: str | os.PathLike | dict) -> tuple[dict, str | None]:
    """Read a spec file (YAML or JSON) or accept a dict; returns (data, source name)."""
    if isinstance(spec, dict):
        return copy.deepcopy(spec), None  # a Spec never aliases the caller's dict
    path = Path(spec)
    source = str(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("spec file not found", source=source) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"cannot read the spec file ({e})", source=source) from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}", source=source) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"invalid YAML{where}: {problem}", source=source) from None
    if data is None:
        raise SpecError("the spec file is empty", source=source)
    return data, source


def parse_spec(spec: str | os.PathLike | dict | Spec, registry: Registry | None = None) -> Spec:
    """Parse and validate a spec (path, dict or already-parsed Spec) without any model."""
    if isinstance(spec, Spec):
        return spec
    registry = registry or get_registry()
    data, source = load_spec_data(spec)
    data = _expect_mapping(data, source=source, path="", what="a mapping at the top level")
    _unknown(data, TOP_KEYS, source=source, path="")

    version = data.get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise SpecError(f"unsupported format version {version!r}; this unipelt reads version {FORMAT_VERSION}", source=source, path="version")

    gates: dict[str, GateSpec] = {}
    for gname, gval in _expect_mapping(data.get("gates", {}) or {}, source=source, path="gates").items():
        if not NAME_RE.match(gname):
            raise SpecError("gate names are letters, digits, '_' and '-'", source=source, path=f"gates.{gname}")
        gates[gname] = _parse_gate(gval, source=source, path=f"gates.{gname}", name=gname)

    if "modules" not in data:
        raise SpecError("missing required key 'modules' (a mapping of named PEFT modules)", source=source, path="modules")
    mods = _expect_mapping(data["modules"], source=source, path="modules")
    if not mods:
        raise SpecError("'modules' is empty: name at least one module", source=source, path="modules")
    all_sites = registry.site_names()
    modules: dict[str, ModuleSpec] = {}
    for name, node in mods.items():
        p = f"modules.{name}"
        if not NAME_RE.match(name):
            raise SpecError("module names are letters, digits, '_' and '-' (starting with a letter)", source=source, path=p)
        node = _expect_mapping(node, source=source, path=p)
        if "method" not in node:
            raise SpecError(
                f"missing 'method'; available methods: {', '.join(sorted(registry.methods))}", source=source, path=f"{p}.method"
            )
        method_name = node["method"]
        if method_name not in registry.methods:
            raise SpecError(
                f"unknown method {method_name!r}; available methods: {', '.join(sorted(registry.methods))}",
                source=source, path=f"{p}.method",
            )
        method = registry.methods[method_name]
        params = {k: v for k, v in node.items() if k not in NODE_KEYS}
        from unipelt.registry import config_fields

        valid_params = sorted(config_fields(method.config))
        for k in params:
            if k not in valid_params:
                raise SpecError(
                    f"unknown key {k!r} for method {method_name!r}; valid keys: "
                    f"{', '.join(list(NODE_KEYS[:1]) + ['sites', 'layers', 'gate', 'lr_scale'] + valid_params)}",
                    source=source, path=f"{p}.{k}",
                )
        config = build_config(method.config, params, source=source, path=p)

        if "site" in node and "sites" in node:
            raise SpecError("give either 'site' or 'sites', not both", source=source, path=f"{p}.sites")
        raw_sites = node.get("sites", node.get("site"))
        site_key = "sites" if "sites" in node else "site"
        default_sites = getattr(config, "default_sites", None)
        defaulted = raw_sites is None
        if raw_sites is None:
            if default_sites:
                raw_sites = list(default_sites)
            else:
                raise SpecError(
                    f"missing 'sites'; hook points: {', '.join(all_sites)}", source=source, path=f"{p}.sites"
                )
        site_list = [raw_sites] if isinstance(raw_sites, str) else raw_sites
        if not isinstance(site_list, list) or not site_list:
            raise SpecError(f"expected a hook point or a list of them; hook points: {', '.join(all_sites)}", source=source, path=f"{p}.{site_key}")
        site_paths: list[str] = []
        for i, s in enumerate(site_list):
            where = f"{p}.{site_key}" if isinstance(raw_sites, str) else f"{p}.{site_key}[{i}]"
            site_paths.append(f"{p}.sites" if defaulted else where)  # defaulted: the field to write
            if s not in all_sites:
                raise SpecError(
                    f"unknown hook point {s!r}; hook points: {', '.join(all_sites)}", source=source, path=where
                )
        if len(set(site_list)) != len(site_list):
            raise SpecError("a hook point is listed twice", source=source, path=f"{p}.{site_key}")

        layers = _parse_layers(node.get("layers", "all"), source=source, path=f"{p}.layers")
        lr_scale = node.get("lr_scale", 1.0)
        if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not 0 < lr_scale < float("inf"):
            raise SpecError(f"expected a positive number (this module's learning rate = lr_scale x the run's), "
                            f"got {lr_scale!r}", source=source, path=f"{p}.lr_scale")

        gate = None
        gate_ref = None
        graw = node.get("gate")
        if graw not in (None, False):
            if not method.gateable:
                raise SpecError(f"method {method_name!r} cannot be gated", source=source, path=f"{p}.gate")
            if isinstance(graw, str):
                if graw not in gates:
                    shared = ", ".join(sorted(gates)) or "(no shared gates defined under 'gates:')"
                    raise SpecError(f"unknown shared gate {graw!r}; shared gates: {shared}", source=source, path=f"{p}.gate")
                gate_ref = graw
            else:
                gate = _parse_gate(graw, source=source, path=f"{p}.gate")
        modules[name] = ModuleSpec(
            name=name, method=method_name, sites=list(site_list), layers=layers, config=config,
            params=params, gate=gate, gate_ref=gate_ref,
            site_paths=site_paths, lr_scale=float(lr_scale),
        )

    combine: dict[str, CombineSpec] = {}
    for site, cval in _expect_mapping(data.get("combine", {}) or {}, source=source, path="combine").items():
        p = f"combine.{site}"
        if site not in all_sites:
            raise SpecError(f"unknown hook point {site!r}; hook points: {', '.join(all_sites)}", source=source, path=p)
        if isinstance(cval, str):
            cval = {"mode": cval}
        cval = _expect_mapping(cval, source=source, path=p)
        _unknown(cval, ("mode", "order"), source=source, path=p)
        mode = cval.get("mode", "parallel")
        if mode not in COMBINE_MODES:
            raise SpecError(f"expected one of {', '.join(COMBINE_MODES)}, got {mode!r}", source=source, path=f"{p}.mode")
        order = cval.get("order", [])
        if not isinstance(order, list) or not all(isinstance(o, str) for o in order):
            raise SpecError("expected a list of module names", source=source, path=f"{p}.order")
        at_site = [n for n, m in modules.items() if site in m.sites]
        for i, o in enumerate(order):
            if o not in at_site:
                raise SpecError(
                    f"{o!r} is not a module at {site}; modules there: {', '.join(at_site) or '(none)'}",
                    source=source, path=f"{p}.order[{i}]",
                )
        if mode == "sequential" and sorted(order) != sorted(at_site):
            raise SpecError(
                f"sequential stacking needs the order of every module at {site}: {', '.join(at_site)}",
                source=source, path=f"{p}.order",
            )
        combine[site] = CombineSpec(site=site, mode=mode, order=list(order))

    budget = None
    if data.get("budget") is not None:
        b = _expect_mapping(data["budget"], source=source, path="budget")
        _unknown(b, ("max_params", "fraction", "count"), source=source, path="budget")
        mp, fr, count = b.get("max_params"), b.get("fraction"), b.get("count", "kept")
        if (mp is None) == (fr is None):
            raise SpecError("give exactly one of 'max_params' (absolute) or 'fraction' (of the base)", source=source, path="budget")
        if mp is not None:
            if isinstance(mp, str):
                mp = _parse_count(mp, source=source)
            if not isinstance(mp, int) or isinstance(mp, bool) or mp <= 0:
                raise SpecError(f"expected a positive integer (or '1.5M', '300K'), got {b['max_params']!r}", source=source, path="budget.max_params")
        if fr is not None and (not isinstance(fr, (int, float)) or isinstance(fr, bool) or not 0 < fr <= 1):
            raise SpecError(f"expected a fraction in (0, 1], got {fr!r}", source=source, path="budget.fraction")
        if count not in ("kept", "training"):
            raise SpecError(f"expected 'kept' or 'training', got {count!r}", source=source, path="budget.count")
        budget = BudgetSpec(max_params=mp, fraction=float(fr) if fr is not None else None, count=count)

    for k in ("name", "description"):
        if k in data and not isinstance(data[k], str):
            raise SpecError("expected a string", source=source, path=k)
    return Spec(
        modules=modules, gates=gates, combine=combine, budget=budget, version=version,
        name=data.get("name"), description=data.get("description"), source=source, raw=data,
    )


def _parse_count(text: str, *, source: str | None) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbB]?)\s*", text)
    if not m:
        raise SpecError(f"expected a positive integer (or '1.5M', '300K'), got {text!r}", source=source, path="budget.max_params")
    mult = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[m.group(2).lower()]
    return int(round(float(m.group(1)) * mult))
