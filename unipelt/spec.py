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
      # or AdapterFusion over adapters already attached by name (plugins/fusion.py):
      # ffn.out: {mode: fusion, adapters: [a, b, c]}   (then `modules` may be empty)
    budget: {max_params: 2000000} # or {fraction: 0.01}; count: kept | training
    executor: auto                # optional: auto | grouped | reference | triton (unipelt.executor)
    prune: {epsilon: 0.01, patience: 10, min_step: 0, to_budget: false}  # gate pruning (training);
                                  # also per module (`modules.x.prune`); with to_budget, opt-in:
                                  # end_step (gradual), pressure/pressure_on, rewarm_steps/rewarm_peak
    drop: {layers: [0, 1], random: false}  # AdapterDrop (or {lowest: 2}); see DropSpec
    pruned: [lora.3.attn.q]       # written by training/collapse: branches left out (node.site key)
    collapsed: {adapter.5: [0.98]}  # written by collapse: gates replaced by their constant value
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from unipelt.errors import SpecError, excerpt
from unipelt.registry import Registry, build_config, get_registry

FORMAT_VERSION = 1
TOP_KEYS = ("version", "name", "description", "modules", "gates", "combine", "budget", "executor", "prune", "drop",
            "pruned", "collapsed")
# how branch groups run (unipelt.executor.EXECUTORS; kept here so the spec module imports no torch)
EXECUTOR_CHOICES = ("auto", "grouped", "reference", "triton")
NODE_KEYS = ("method", "site", "sites", "layers", "gate", "lr_scale", "prune")
# names become parameter keys, file keys and report rows: short, and safe in all three
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}")
COMBINE_MODES = ("parallel", "sequential", "average", "fusion")
# a fusion entry's keys besides mode/adapters/layers go to the fusion method's config (plugins/fusion.py)
FUSION_KEYS = ("mode", "adapters", "layers")


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
                idx = list(range(num_layers)[slice(*_slice_parts(item))])
                if not idx:
                    raise SpecError(
                        f"range {excerpt(item)} selects no layer of a {num_layers}-layer model", source=source, path=where
                    )
                out.extend(idx)
        if len(set(out)) != len(out):
            raise SpecError("a layer is selected twice", source=source, path=self.path)
        return sorted(out)


# start:stop or start:stop:step, Python's slice syntax on the layer list; at most 18 digits a number
_SLICE_RE = re.compile(r"\s*(-?\d{1,18})?\s*:\s*(-?\d{1,18})?\s*(?::\s*(-?\d{1,18})?\s*)?")


def _slice_parts(text: str) -> tuple[int | None, int | None, int | None]:
    m = _SLICE_RE.fullmatch(text)
    assert m is not None, text  # parsed by _parse_layers
    start, stop, step = (int(g) if g is not None else None for g in m.groups())
    return start, stop, step


def _selects_nothing_anywhere(start: int | None, stop: int | None, step: int | None) -> bool:
    """Whether ``range(n)[start:stop:step]`` is empty for every layer count n >= 1.

    The length of the selection is piecewise linear in n, with breaks only where n crosses
    |start| or |stop| (where Python's slice clamping changes): checking n = 1, 2, each break and
    its neighbours, and one n past all of them (the last piece may grow without bound) covers
    every piece at its ends."""
    ends = [abs(v) for v in (start, stop) if v is not None]
    counts = {1, 2, 2 * sum(ends) + 8}
    for a in ends:
        counts.update(n for n in (a - 1, a, a + 1, a + 2) if n >= 1)
    return all(len(range(n)[start:stop:step]) == 0 for n in counts)


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
        elif isinstance(v, str) and _SLICE_RE.fullmatch(v):
            start, stop, step = _slice_parts(v)
            if step == 0:
                raise SpecError(f"range {excerpt(v)} has step 0; a step is a non-zero integer", source=source, path=where)
            if _selects_nothing_anywhere(start, stop, step):
                raise SpecError(f"range {excerpt(v)} selects no layer of any model", source=source, path=where)
            items.append(v)
        else:
            raise SpecError(f"{expected}, got {excerpt(v)}", source=source, path=where)
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
    prune: PruneSpec | Literal[False] | None = None  # False: never pruned


@dataclass
class CombineSpec:
    site: str
    mode: Literal["parallel", "sequential", "average", "fusion"] = "parallel"
    order: list[str] = field(default_factory=list)
    # mode fusion: the attached adapters fused here, the layers, and the fusion method's config
    adapters: list[str] = field(default_factory=list)
    layers: Any = None  # LayerSel
    config: Any = None


@dataclass
class BudgetSpec:
    max_params: int | None = None
    fraction: float | None = None
    count: Literal["kept", "training"] = "kept"


@dataclass
class PruneSpec:
    """Gate-driven pruning during training (``plugins/prune.py``): a gated branch whose gate mean
    stays below ``epsilon`` for ``patience`` consecutive optimizer steps, from step ``min_step`` on,
    is switched off (no longer computed, its parameters frozen and left out of the saved adapter).
    ``to_budget``: while the active parameters exceed ``budget:``, also prune the branch with the
    lowest gate mean (over the last ``patience`` steps), at most ``per_step`` per step; compile then
    checks only that the parts pruning cannot remove fit the budget.

    Opt-in, with ``to_budget`` (each off by default; ``plugins/prune.py`` has the formulas):

    - ``end_step``: gradual pruning. The budget is approached over ``[min_step, end_step]`` on the
      cubic schedule of Zhu & Gupta (2017), target(t) = B + (A - B)(1 - (t - min_step) /
      (end_step - min_step))^3 (A: the active parameters at min_step, B: the budget), lowest gate
      first whenever the active count is over target(t); without it the whole cut is made at once.
    - ``pressure``: budget pressure. While over the budget, lambda * sum_g w_g * mean(g) is added to
      the training loss, over the gates ``pressure_on`` names: ``cut``, the gates the budget would
      remove now (lowest window means first, as the cut takes them), or ``all`` the prunable ones;
      w_g: the parameters pruning gate g removes, over those of the gates pressed (sum 1); from
      step ``pressure_from`` on (0: as soon as the gates have a window to rank them by).
    - ``rewarm_steps``: after the step the budget is met, the learning rate is multiplied by
      min(1, (t - c) / rewarm_steps) * max(1, rewarm_peak / s_c), s_c the schedule's factor at the
      cut: a warm-up from 0, then, for a linear decay, the decay restarted from ``rewarm_peak``
      times the initial rate (``unipelt train`` and ``benchmarks/quality.py`` apply it).
    """

    epsilon: float = field(default=0.01, metadata={"min": 0.0, "max": 1.0})
    patience: int = field(default=10, metadata={"min": 1})
    min_step: int = field(default=0, metadata={"min": 0})
    to_budget: bool = False
    per_step: int = field(default=1, metadata={"min": 1})
    end_step: int | None = field(default=None, metadata={"min": 1})
    pressure: float = field(default=0.0, metadata={"min": 0.0})
    pressure_on: Literal["cut", "all"] = "cut"
    pressure_from: int = field(default=0, metadata={"min": 0})
    rewarm_steps: int = field(default=0, metadata={"min": 0})
    rewarm_peak: float = field(default=1.0, metadata={"min": 0.0})

    def validate(self) -> tuple[str, str] | None:
        """(field, message) of the first inconsistent option, else None (``build_config``)."""
        if self.end_step is not None and self.end_step <= self.min_step:
            return "end_step", f"expected a step after min_step ({self.min_step}), got {self.end_step}"
        for name, on in (("end_step", self.end_step is not None), ("pressure", self.pressure > 0),
                         ("rewarm_steps", self.rewarm_steps > 0)):
            if on and not self.to_budget:
                return name, "acts on pruning toward the budget: set to_budget: true (and a budget)"
        return None


@dataclass
class DropSpec:
    """AdapterDrop (Rücklé et al., 2021): the branches of ``modules`` (default: every module) at
    the chosen layers are not computed.

    layers: the layers dropped at inference (and in training unless ``random``); none with
      ``random`` alone.
    lowest: instead of ``layers``: the ``lowest`` layers by the gradient-norm ranking
      g_l = ||dL/dTheta_l|| that training accumulates over its first ``rank_steps`` steps; then
      fixed (the spec's ``drop.layers`` records the choice, so the saved adapter loads with it).
    random: training only. ``true``: each step drops the first n layers (n uniform in 0..L-1, the
      paper's robust training: the last layer always trains); a number p in (0, 1]: each layer
      independently with probability p (the last layer is kept when every layer was drawn).
      Under torch.compile every distinct choice is one more graph: ``true`` gives L of them.
    """

    layers: LayerSel | None = None
    lowest: int | None = None
    rank_steps: int = 10
    random: bool | float = False
    modules: list[str] = field(default_factory=list)


@dataclass
class Spec:
    modules: dict[str, ModuleSpec]
    gates: dict[str, GateSpec] = field(default_factory=dict)
    combine: dict[str, CombineSpec] = field(default_factory=dict)
    budget: BudgetSpec | None = None
    executor: str | None = None  # None: the UNIPELT_EXECUTOR variable, else auto
    prune: PruneSpec | None = None
    drop: DropSpec | None = None
    # branch keys (``node.site-key``) pruned by training or collapse; gate key -> constant values
    pruned: list[str] = field(default_factory=list)
    collapsed: dict[str, list[float]] = field(default_factory=dict)
    version: int = FORMAT_VERSION
    name: str | None = None
    description: str | None = None
    source: str | None = None
    raw: dict = field(default_factory=dict)

    def gate_for(self, node: ModuleSpec) -> GateSpec | None:
        if node.gate_ref is not None:
            return self.gates[node.gate_ref]
        return node.gate

    def prune_for(self, node: str) -> PruneSpec | None:
        """The pruning rule of module ``node``: its own ``prune:``, else the spec's."""
        m = self.modules.get(node)
        if m is not None and m.prune is False:
            return None  # `modules.x.prune: false`: this module is never pruned
        return m.prune if m is not None and m.prune is not None else self.prune


def _seg(key: Any) -> str:
    """A key as a field-path segment: the empty key is written ``""``, so that a path is never empty."""
    return str(key) if key != "" else '""'


def _expect_mapping(value: Any, *, source: str | None, path: str, what: str = "a mapping") -> dict:
    if not isinstance(value, dict):
        raise SpecError(f"expected {what}, got {type(value).__name__} {excerpt(value)}", source=source, path=path)
    for k in value:
        if not isinstance(k, str):
            raise SpecError(f"keys must be strings, got {excerpt(k)}", source=source, path=path)
    return value


def _unknown(keys, valid, *, source, path) -> None:
    for k in keys:
        if k not in valid:
            raise SpecError(
                f"unknown key {excerpt(k)}; valid keys: {', '.join(valid)}", source=source, path=f"{path}.{_seg(k)}" if path else _seg(k)
            )


def _parse_gate(value: Any, *, source: str | None, path: str, name: str | None = None) -> GateSpec:
    if value is True:
        value = {}
    value = _expect_mapping(value, source=source, path=path, what="true, a mapping of gate options or the name of a shared gate")
    spec = build_config(GateSpec, value, source=source, path=path)
    if name is not None:
        spec = GateSpec(**{**spec.__dict__, "name": name})
    return spec


# ------------------------------------------------------------------------------------------
# reading a spec file: YAML 1.2 core schema or strict JSON, with bounds on what a document costs
# ------------------------------------------------------------------------------------------
# What a spec document may cost before anything else looks at it. A spec is a few dozen values
# (the largest shipped one, unipelt.yaml: 33, nested 4 deep); these bounds are generous for
# hand-written files and stop hostile ones early: a 395-byte YAML alias bomb once expanded to
# 2 GB of error message.
MAX_SPEC_BYTES = 1 << 20  # the file
MAX_DEPTH = 32  # levels of nesting below the top
MAX_VALUES = 100_000  # values in the document with every YAML alias expanded
MAX_TEXT = 1_000_000  # characters of strings in the document, aliases expanded
MAX_INT = 2**63 - 1  # numbers beyond int64 are no size, rank or count any model has
MAX_INT_DIGITS = 4000  # below Python's 4,300-digit limit on reading integers


class _Refused(yaml.MarkedYAMLError):
    """A document the loader will not read, with the field path where it stopped."""

    def __init__(self, problem: str, mark, field_path: str | None):
        super().__init__(problem=problem, problem_mark=mark)
        self.field_path = field_path


def _join(parts: list[str]) -> str:
    out = ""
    for p in parts:
        out += p if p.startswith("[") or not out else f".{p}"
    return out


class _CoreResolver(yaml.resolver.BaseResolver):
    """YAML 1.2's core schema, not PyYAML's YAML 1.1 one.

    YAML 1.1 reads ``2:4`` as the base-60 number 124 (which turned the layer range
    ``layers: 2:4`` into layer 124), ``010`` as 8, ``yes``/``no``/``on``/``off`` as booleans and
    ``1e-3`` as a string. The core schema (the YAML spec since 2009) has none of these: plain
    scalars are null, ``true``/``false``, decimal/``0o``/``0x`` integers, floats with an optional
    exponent, ``.inf``/``.nan``, or strings. Nothing else is guessed."""


_CORE = [
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    ("tag:yaml.org,2002:float",
     r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
     list("-+0123456789.")),
    ("tag:yaml.org,2002:merge", r"^(?:<<)$", ["<"]),  # YAML 1.1's merge key: `<<: *defaults`
]
for _tag, _regexp, _first in _CORE:
    _CoreResolver.add_implicit_resolver(_tag, re.compile(_regexp), _first)


class SpecLoader(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, yaml.composer.Composer,
                 yaml.constructor.SafeConstructor, _CoreResolver):
    """PyYAML's safe loader with the core schema, reading only JSON-like values, and refusing
    duplicate keys, recursive aliases, nesting deeper than MAX_DEPTH and documents that expand
    (through aliases) beyond MAX_VALUES values or MAX_TEXT characters.

    The bounds are checked while the document is composed, before any Python object is built:
    each node's expanded size is the sum of its children's, computed once per node, so an alias
    bomb is refused at the first level that exceeds them, in time proportional to the file."""

    def __init__(self, stream):
        # as yaml.SafeLoader does: PyYAML's mixins do not chain their __init__
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        _CoreResolver.__init__(self)
        self._path: list[str] = []
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values, characters), expanded
        self._paths: dict[int, str] = {}  # id(node) -> the field path where it was first written

    def compose_node(self, parent, index):
        if parent is None:
            seg = None
        elif isinstance(parent, yaml.SequenceNode):
            seg = f"[{index}]"
        elif isinstance(index, yaml.ScalarNode):
            seg = _seg(str(index.value))
        else:
            seg = "<key>" if index is None else "<complex key>"
        if seg is not None:
            self._path.append(seg)
        try:
            event = self.peek_event()
            if len(self._path) > MAX_DEPTH:
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels", event.start_mark, _join(self._path))
            if isinstance(event, yaml.AliasEvent):
                target = self.anchors.get(event.anchor)
                if target is not None and id(target) not in self._sizes:
                    raise _Refused(f"alias *{event.anchor} refers to a value that contains it (a recursive alias)",
                                   event.start_mark, _join(self._path))
                return super().compose_node(parent, index)  # an undefined alias is PyYAML's error
            node = super().compose_node(parent, index)
            self._measure(node)
            if isinstance(node, yaml.MappingNode):
                self._unique_keys(node)
            return node
        finally:
            if seg is not None:
                self._path.pop()

    def _measure(self, node) -> None:
        path = _join(self._path)
        self._paths[id(node)] = path
        if isinstance(node, yaml.ScalarNode):
            self._sizes[id(node)] = (1, len(node.value))
            return
        children = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
        values, chars = 1, 0
        for c in children:
            v, t = self._sizes[id(c)]
            values, chars = values + v, chars + t
        if values > MAX_VALUES or chars > MAX_TEXT:
            what = f"{MAX_VALUES:,} values" if values > MAX_VALUES else f"{MAX_TEXT:,} characters"
            raise _Refused(f"this value holds more than {what} with its aliases expanded (a YAML alias bomb?); "
                           "a spec is a few dozen values", node.start_mark, path or None)
        self._sizes[id(node)] = (values, chars)

    def _unique_keys(self, node) -> None:
        # the YAML spec requires unique keys; PyYAML keeps the last one without a word, which let
        # two modules of the same name silently become one
        seen: dict[tuple[str, str], Any] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue
            first = seen.setdefault((key.tag, key.value), key)
            if first is not key:
                path = _join(self._path + [str(key.value)])
                raise _Refused(f"duplicate key {excerpt(key.value)} (first at line {first.start_mark.line + 1}): "
                               "each key may appear once in a mapping", key.start_mark, path)

    # -- scalars: the core schema's values and nothing else ---------------------------------
    def construct_core_int(self, node):
        text = self.construct_scalar(node)
        digits = text.lstrip("+-")
        if len(digits) > MAX_INT_DIGITS:
            raise _Refused(f"an integer of {len(digits):,} digits", node.start_mark, self._paths.get(id(node)))
        try:
            if digits.startswith(("0o", "0x")):
                value = int(digits[2:], 8 if digits[1] == "o" else 16)
            else:
                value = int(digits, 10)
        except ValueError:
            raise _Refused(f"{excerpt(text)} is not an integer", node.start_mark, self._paths.get(id(node))) from None
        return -value if text.startswith("-") else value

    def construct_core_float(self, node):
        text = self.construct_scalar(node)
        special = {".inf": math.inf, ".nan": math.nan}.get(text.lstrip("+-").lower())
        if special is not None:
            return -special if text.startswith("-") else special
        try:
            return float(text)
        except ValueError:
            raise _Refused(f"{excerpt(text)} is not a number", node.start_mark, self._paths.get(id(node))) from None

    def construct_core_bool(self, node):
        text = self.construct_scalar(node)
        if text not in ("true", "True", "TRUE", "false", "False", "FALSE"):
            raise _Refused(f"{excerpt(text)} is not true or false", node.start_mark, self._paths.get(id(node)))
        return text[0] in "tT"


# only the values a spec can hold: no timestamps, binary, sets or Python objects
SpecLoader.yaml_constructors = {
    "tag:yaml.org,2002:null": yaml.constructor.SafeConstructor.construct_yaml_null,
    "tag:yaml.org,2002:bool": SpecLoader.construct_core_bool,
    "tag:yaml.org,2002:int": SpecLoader.construct_core_int,
    "tag:yaml.org,2002:float": SpecLoader.construct_core_float,
    "tag:yaml.org,2002:str": yaml.constructor.SafeConstructor.construct_yaml_str,
    "tag:yaml.org,2002:seq": yaml.constructor.SafeConstructor.construct_yaml_seq,
    "tag:yaml.org,2002:map": yaml.constructor.SafeConstructor.construct_yaml_map,
    None: yaml.constructor.SafeConstructor.construct_undefined,
}


class _JSONRefused(ValueError):
    def __init__(self, problem: str, text: str, pos: int | None):
        self.problem = problem
        self.lineno = text.count("\n", 0, pos) + 1 if pos is not None else None
        self.colno = pos - text.rfind("\n", 0, pos) if pos is not None else None
        super().__init__(problem)


class _StrictJSON(json.JSONDecoder):
    """The standard decoder, but refusing duplicate keys (naming the key and its line), integers
    too long to read, and nesting deeper than MAX_DEPTH, and never recursing past it.

    Python's scanner written in Python is used because its object and array parsers are
    attributes that can be wrapped (the C scanner calls its own); a spec is small."""

    def __init__(self):
        super().__init__(parse_int=self._int)
        self.depth = 0
        self.parse_object = self._object
        self.parse_array = self._array
        self.scan_once = json.scanner.py_make_scanner(self)

    def _int(self, text: str) -> int:
        if len(text.lstrip("-")) > MAX_INT_DIGITS:
            raise _JSONRefused(f"an integer of {len(text.lstrip('-')):,} digits", "", None)
        return int(text)

    def _enter(self, s: str, pos: int) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _JSONRefused(f"nested deeper than {MAX_DEPTH} levels", s, pos - 1)

    def _array(self, s_and_end, scan_once, *args):
        self._enter(*s_and_end)
        try:
            return json.decoder.JSONArray(s_and_end, scan_once, *args)
        finally:
            self.depth -= 1

    def _object(self, s_and_end, strict, scan_once, object_hook, object_pairs_hook, memo=None, *args):
        self._enter(*s_and_end)
        try:
            pairs, end = json.decoder.JSONObject(s_and_end, strict, scan_once, None, list, memo, *args)
        finally:
            self.depth -= 1
        out: dict = {}
        for k, v in pairs:
            if k in out:
                self._duplicate(s_and_end[0], s_and_end[1], k, strict, scan_once)
            out[k] = v
        return out, end

    def _duplicate(self, s: str, pos: int, key: str, strict: bool, scan_once) -> None:
        """Find where ``key`` was written twice in the object that starts at ``pos`` (after its
        ``{``): walk its members again with the scanner's own primitives (on this error path only)."""
        ws = json.decoder.WHITESPACE.match
        seen: list[int] = []
        while True:
            pos = ws(s, pos).end()
            if s[pos] == "}":
                break
            start = pos
            k, pos = json.decoder.scanstring(s, pos + 1, strict)
            if k == key:
                seen.append(start)
                if len(seen) == 2:
                    break
            pos = ws(s, pos).end() + 1  # the ':'
            _, pos = scan_once(s, ws(s, pos).end())  # parsed once already: no error here
            pos = ws(s, pos).end()
            if s[pos] == ",":
                pos += 1
        first = s.count("\n", 0, seen[0]) + 1
        raise _JSONRefused(f"duplicate key {excerpt(key)} (first at line {first}): each key may appear once in "
                           "an object", s, seen[-1])


def loads_json(text: str) -> Any:
    """Strict JSON for specs (and any reader that wants the same rules): see :class:`_StrictJSON`.
    Raises ``json.JSONDecodeError`` for syntax errors and ``ValueError`` for refused documents."""
    return _StrictJSON().decode(text)


def _read_text(path: Path, source: str) -> str:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)  # bounded even for /dev/zero or a FIFO
    except FileNotFoundError:
        raise SpecError("spec file not found", source=source) from None
    except OSError as e:
        raise SpecError(f"cannot read the spec file ({e.strerror or e})", source=source) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"the spec file is larger than {MAX_SPEC_BYTES:,} bytes; a spec is a few hundred",
                        source=source)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"cannot read the spec file (not UTF-8: byte {e.start} is {raw[e.start]:#04x})",
                        source=source) from None


def _check_document(data: Any, *, source: str | None) -> None:
    """Bounds and values every spec must respect, whatever it came from (YAML, JSON, a dict, a
    saved adapter's ``unipelt.json``): nesting, size with shared parts counted each time, no
    value containing itself, finite numbers, integers within int64. Iterative, so that depth
    itself cannot raise RecursionError."""
    values = chars = 0
    stack: list[tuple[Any, str, int, bool]] = [(data, "", 0, False)]
    open_ids: set[int] = set()  # containers on the current path: a value inside itself is a cycle
    while stack:
        value, path, depth, leaving = stack.pop()
        if leaving:
            open_ids.discard(id(value))
            continue
        if depth > MAX_DEPTH:
            raise SpecError(f"nested deeper than {MAX_DEPTH} levels", source=source, path=path or None)
        values += 1
        if values > MAX_VALUES:
            raise SpecError(f"the spec holds more than {MAX_VALUES:,} values (a spec is a few dozen)",
                            source=source, path=path or None)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, str):
            chars += len(value)
            if chars > MAX_TEXT:
                raise SpecError(f"the spec holds more than {MAX_TEXT:,} characters of text", source=source,
                                path=path or None)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise SpecError(f"expected a finite number, got {excerpt(value)}", source=source, path=path or None)
        elif isinstance(value, int):
            if not -MAX_INT - 1 <= value <= MAX_INT:
                raise SpecError(f"the number {excerpt(value)} is out of range (a spec's numbers fit in 64 bits)",
                                source=source, path=path or None)
        elif isinstance(value, (dict, list, tuple)):
            if id(value) in open_ids:
                raise SpecError("this value contains itself", source=source, path=path or None)
            open_ids.add(id(value))
            stack.append((value, path, depth, True))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                if isinstance(value, dict):
                    sub = f"{path}.{_seg(k)}" if path else _seg(k)
                else:
                    sub = f"{path}[{k}]"
                stack.append((v, sub, depth + 1, False))


def load_spec_data(spec: str | os.PathLike | dict) -> tuple[dict, str | None]:
    """Read a spec file (YAML or JSON) or accept a dict; returns (data, source name).

    YAML is read with the core schema (:class:`SpecLoader`), JSON strictly (:func:`loads_json`);
    both, and dicts, are then held to :func:`_check_document`'s bounds."""
    if isinstance(spec, dict):
        _check_document(spec, source=None)  # before deepcopy, which would recurse into any depth
        return copy.deepcopy(spec), None  # a Spec never aliases the caller's dict
    path = Path(spec)
    source = str(spec)
    text = _read_text(path, source)
    try:
        if path.suffix.lower() == ".json":
            data = loads_json(text)
        else:
            data = yaml.load(text, Loader=SpecLoader)  # noqa: S506 - SpecLoader is a safe loader
    except json.JSONDecodeError as e:
        raise SpecError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}", source=source) from None
    except _JSONRefused as e:
        where = f" at line {e.lineno}, column {e.colno}" if e.lineno is not None else ""
        raise SpecError(f"refused JSON{where}: {e.problem}", source=source) from None
    except _Refused as e:
        mark = e.problem_mark
        raise SpecError(f"{e.problem} (line {mark.line + 1}, column {mark.column + 1})", source=source,
                        path=e.field_path) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"invalid YAML{where}: {problem[:300]}", source=source) from None
    if data is None:
        raise SpecError("the spec file is empty", source=source)
    _check_document(data, source=source)
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
    # `1.0` and `true` compare equal to 1 in Python; neither is the integer the format names
    if type(version) is not int or version != FORMAT_VERSION:
        raise SpecError(f"unsupported format version {excerpt(version)}; this unipelt reads version {FORMAT_VERSION}", source=source, path="version")

    gates: dict[str, GateSpec] = {}
    for gname, gval in _expect_mapping(data.get("gates", {}) or {}, source=source, path="gates").items():
        if not NAME_RE.fullmatch(gname):
            raise SpecError("gate names are letters, digits, '_' and '-', at most 64", source=source,
                            path=f"gates.{_seg(gname)}")
        gates[gname] = _parse_gate(gval, source=source, path=f"gates.{gname}", name=gname)

    if "modules" not in data:
        raise SpecError("missing required key 'modules' (a mapping of named PEFT modules)", source=source, path="modules")
    mods = _expect_mapping(data["modules"], source=source, path="modules")
    fuses = any(isinstance(c, dict) and c.get("mode") == "fusion"
                for c in (data.get("combine") or {}).values()) if isinstance(data.get("combine"), dict) else False
    if not mods and not fuses:
        raise SpecError("'modules' is empty: name at least one module", source=source, path="modules")
    all_sites = registry.site_names()
    modules: dict[str, ModuleSpec] = {}
    for name, node in mods.items():
        p = f"modules.{_seg(name)}"
        if not NAME_RE.fullmatch(name):
            raise SpecError("module names are letters, digits, '_' and '-' (starting with a letter), at most 64",
                            source=source, path=p)
        node = _expect_mapping(node, source=source, path=p)
        if "method" not in node:
            raise SpecError(
                f"missing 'method'; available methods: {', '.join(sorted(registry.methods))}", source=source, path=f"{p}.method"
            )
        method_name = node["method"]
        if not isinstance(method_name, str) or method_name not in registry.methods:
            raise SpecError(
                f"unknown method {excerpt(method_name)}; available methods: {', '.join(sorted(registry.methods))}",
                source=source, path=f"{p}.method",
            )
        if method_name == "fusion":
            raise SpecError("AdapterFusion is declared under combine: `combine: {ffn.out: {mode: fusion, "
                            "adapters: [a, b]}}`, not as a module", source=source, path=f"{p}.method")
        method = registry.methods[method_name]
        params = {k: v for k, v in node.items() if k not in NODE_KEYS}
        from unipelt.registry import config_fields

        valid_params = sorted(config_fields(method.config))
        for k in params:
            if k not in valid_params:
                raise SpecError(
                    f"unknown key {excerpt(k)} for method {excerpt(method_name)}; valid keys: "
                    f"{', '.join(list(NODE_KEYS[:1]) + ['sites', 'layers', 'gate', 'lr_scale', 'prune'] + valid_params)}",
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
                    f"unknown hook point {excerpt(s)}; hook points: {', '.join(all_sites)}", source=source, path=where
                )
        if len(set(site_list)) != len(site_list):
            raise SpecError("a hook point is listed twice", source=source, path=f"{p}.{site_key}")

        layers = _parse_layers(node.get("layers", "all"), source=source, path=f"{p}.layers")
        lr_scale = node.get("lr_scale", 1.0)
        if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not 0 < lr_scale < float("inf"):
            raise SpecError(f"expected a positive number (this module's learning rate = lr_scale x the run's), "
                            f"got {excerpt(lr_scale)}", source=source, path=f"{p}.lr_scale")

        gate = None
        gate_ref = None
        graw = node.get("gate")
        if graw is not None and graw is not False:  # `gate: 0` is not `gate: false`
            if not method.gateable:
                raise SpecError(f"method {excerpt(method_name)} cannot be gated", source=source, path=f"{p}.gate")
            if isinstance(graw, str):
                if graw not in gates:
                    shared = ", ".join(sorted(gates)) or "(no shared gates defined under 'gates:')"
                    raise SpecError(f"unknown shared gate {excerpt(graw)}; shared gates: {shared}", source=source, path=f"{p}.gate")
                gate_ref = graw
            else:
                gate = _parse_gate(graw, source=source, path=f"{p}.gate")
        # `prune: false` on a module exempts it from the spec's rule (a gated KV prefix, say)
        node_prune = (False if node.get("prune") is False else
                      _parse_prune(node["prune"], source=source, path=f"{p}.prune") if node.get("prune") is not None else None)
        modules[name] = ModuleSpec(
            name=name, method=method_name, sites=list(site_list), layers=layers, config=config,
            params=params, gate=gate, gate_ref=gate_ref,
            site_paths=site_paths, lr_scale=float(lr_scale), prune=node_prune,
        )

    combine: dict[str, CombineSpec] = {}
    for site, cval in _expect_mapping(data.get("combine", {}) or {}, source=source, path="combine").items():
        p = f"combine.{site}"
        if site not in all_sites:
            raise SpecError(f"unknown hook point {excerpt(site)}; hook points: {', '.join(all_sites)}", source=source, path=p)
        if isinstance(cval, str):
            cval = {"mode": cval}
        cval = _expect_mapping(cval, source=source, path=p)
        mode = cval.get("mode", "parallel")
        if mode not in COMBINE_MODES:
            raise SpecError(f"expected one of {', '.join(COMBINE_MODES)}, got {excerpt(mode)}", source=source, path=f"{p}.mode")
        if mode == "fusion":
            combine[site] = _parse_fusion(site, cval, modules, registry, source=source, path=p)
            continue
        _unknown(cval, ("mode", "order"), source=source, path=p)
        order = cval.get("order", [])
        if not isinstance(order, list) or not all(isinstance(o, str) for o in order):
            raise SpecError("expected a list of module names", source=source, path=f"{p}.order")
        if len(set(order)) != len(order):
            raise SpecError("a module is listed twice", source=source, path=f"{p}.order")
        at_site = [n for n, m in modules.items() if site in m.sites]
        for i, o in enumerate(order):
            if o not in at_site:
                raise SpecError(
                    f"{excerpt(o)} is not a module at {site}; modules there: {', '.join(at_site) or '(none)'}",
                    source=source, path=f"{p}.order[{i}]",
                )
        if mode == "sequential" and sorted(order) != sorted(at_site):
            raise SpecError(
                f"sequential stacking needs the order of every module at {site}: {', '.join(at_site)}",
                source=source, path=f"{p}.order",
            )
        combine[site] = CombineSpec(site=site, mode=mode, order=list(order))
    for site, cs in combine.items():
        if cs.mode != "fusion":
            continue
        # the fusion layers are this adapter's module at the site (built, saved and counted as one)
        fname = fusion_module_name(site)
        if fname in modules:
            raise SpecError(f"the module name {fname!r} is taken by the fusion at {site}; rename the module",
                            source=source, path=f"modules.{fname}")
        modules[fname] = ModuleSpec(name=fname, method="fusion", sites=[site], layers=cs.layers, config=cs.config,
                                    params={}, site_paths=[f"combine.{site}"])

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
                raise SpecError(f"expected a positive integer (or '1.5M', '300K'), got {excerpt(b['max_params'])}", source=source, path="budget.max_params")
        if fr is not None and (not isinstance(fr, (int, float)) or isinstance(fr, bool) or not 0 < fr <= 1):
            raise SpecError(f"expected a fraction in (0, 1], got {excerpt(fr)}", source=source, path="budget.fraction")
        if count not in ("kept", "training"):
            raise SpecError(f"expected 'kept' or 'training', got {excerpt(count)}", source=source, path="budget.count")
        budget = BudgetSpec(max_params=mp, fraction=float(fr) if fr is not None else None, count=count)

    for k in ("name", "description"):
        if k in data and not isinstance(data[k], str):
            raise SpecError("expected a string", source=source, path=k)
    executor = data.get("executor")
    if executor is not None and executor not in EXECUTOR_CHOICES:
        raise SpecError(f"expected one of {', '.join(EXECUTOR_CHOICES)}, got {excerpt(executor)}", source=source, path="executor")
    prune = _parse_prune(data["prune"], source=source, path="prune") if data.get("prune") is not None else None
    drop = _parse_drop(data["drop"], modules, source=source) if data.get("drop") is not None else None
    for where, ps in [("prune", prune)] + [(f"modules.{n}.prune", m.prune) for n, m in modules.items()]:
        if isinstance(ps, PruneSpec) and ps.to_budget and budget is None:
            raise SpecError("to_budget prunes toward the spec's budget, and the spec sets none: add "
                            "'budget: {max_params: N}' (or fraction)", source=source, path=f"{where}.to_budget")
    pruned = _parse_pruned(data.get("pruned"), modules, source=source)
    collapsed = _parse_collapsed(data.get("collapsed"), source=source)
    return Spec(
        modules=modules, gates=gates, combine=combine, budget=budget, executor=executor, version=version,
        name=data.get("name"), description=data.get("description"), source=source, raw=data,
        prune=prune, drop=drop, pruned=pruned, collapsed=collapsed,
    )


def _parse_prune(value: Any, *, source: str | None, path: str) -> PruneSpec:
    if value is True:
        value = {}
    value = _expect_mapping(value, source=source, path=path, what="true or a mapping of pruning options")
    return build_config(PruneSpec, value, source=source, path=path)


def _parse_drop(value: Any, modules: dict[str, ModuleSpec], *, source: str | None) -> DropSpec:
    path = "drop"
    value = _expect_mapping(value, source=source, path=path)
    _unknown(value, ("layers", "lowest", "rank_steps", "random", "modules"), source=source, path=path)
    # `random` alone is the paper's robust training with nothing dropped at inference (it needed a
    # `layers:` of inference layers, and an empty list is not a layer selection)
    random_alone = "random" in value and value["random"] is not False and "layers" not in value and "lowest" not in value
    if ("layers" in value) == ("lowest" in value) and not random_alone:
        raise SpecError("give exactly one of 'layers' (indices) or 'lowest' (a count, ranked by gradient norm), or "
                        "'random' alone (dropped at random while training, nothing dropped at inference)",
                        source=source, path=path)
    layers = _parse_layers(value["layers"], source=source, path=f"{path}.layers") if "layers" in value else None
    lowest = value.get("lowest")
    if lowest is not None and (type(lowest) is not int or lowest < 1):
        raise SpecError(f"expected a positive integer (how many layers to drop), got {excerpt(lowest)}",
                        source=source, path=f"{path}.lowest")
    rank_steps = value.get("rank_steps", 10)
    if type(rank_steps) is not int or rank_steps < 1:
        raise SpecError(f"expected a positive integer (optimizer steps), got {excerpt(rank_steps)}",
                        source=source, path=f"{path}.rank_steps")
    if "rank_steps" in value and lowest is None:
        raise SpecError("'rank_steps' belongs to 'lowest'", source=source, path=f"{path}.rank_steps")
    rnd = value.get("random", False)
    if not isinstance(rnd, bool) and (not isinstance(rnd, (int, float)) or not 0 < rnd <= 1):
        raise SpecError(f"expected true, false or a probability in (0, 1], got {excerpt(rnd)}",
                        source=source, path=f"{path}.random")
    if rnd is not False and lowest is not None:
        raise SpecError("'random' drops chosen layers at random while training; 'lowest' ranks layers by the "
                        "gradients of all of them: use one", source=source, path=f"{path}.random")
    mods = value.get("modules", [])
    if isinstance(mods, str):
        mods = [mods]
    if not isinstance(mods, list):
        raise SpecError("expected a module name or a list of them", source=source, path=f"{path}.modules")
    for i, m in enumerate(mods):
        if m not in modules:
            raise SpecError(f"unknown module {excerpt(m)}; modules: {', '.join(modules)}", source=source,
                            path=f"{path}.modules[{i}]")
    return DropSpec(layers=layers, lowest=lowest, rank_steps=rank_steps,
                    random=rnd if isinstance(rnd, bool) else float(rnd), modules=list(mods))


def _parse_pruned(value: Any, modules: dict[str, ModuleSpec], *, source: str | None) -> list[str]:
    """Branch keys ``<module>.<site key>``; checked against the model's branches at compile."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise SpecError("expected a list of branch keys (<module>.<layer>.<hook point>)", source=source, path="pruned")
    for i, k in enumerate(value):
        if not isinstance(k, str) or k.split(".", 1)[0] not in modules:
            raise SpecError(f"expected a branch key <module>.<layer>.<hook point> of a module of this spec, got "
                            f"{excerpt(k)}", source=source, path=f"pruned[{i}]")
    if len(set(value)) != len(value):
        raise SpecError("a branch is listed twice", source=source, path="pruned")
    return list(value)


def _parse_collapsed(value: Any, *, source: str | None) -> dict[str, list[float]]:
    """Gate key -> the constant values that replace the gate (checked against the gates at compile)."""
    if value is None:
        return {}
    value = _expect_mapping(value, source=source, path="collapsed")
    out: dict[str, list[float]] = {}
    for k, v in value.items():
        vals = v if isinstance(v, list) else [v]
        if not vals or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= x <= 1.0
                               for x in vals):
            raise SpecError(f"expected gate values in [0, 1] (a number or a list of them), got {excerpt(v)}",
                            source=source, path=f"collapsed.{_seg(k)}")
        out[k] = [float(x) for x in vals]
    return out
def fusion_module_name(site: str) -> str:
    """The module that holds the fusion layers of ``combine.<site>`` (``fusion_ffn_out``)."""
    return "fusion_" + re.sub(r"[^A-Za-z0-9_]", "_", site)


def _parse_fusion(site: str, cval: dict, modules: dict[str, ModuleSpec], registry: Registry, *,
                  source: str | None, path: str) -> CombineSpec:
    """``combine.<site>: {mode: fusion, adapters: [a, b, ...], layers, <fusion options>}``: AdapterFusion
    over adapters attached to the model by name (checked against the model when compiled)."""
    method = registry.methods.get("fusion")
    if method is None:
        raise SpecError("mode 'fusion' needs the fusion plugin (unipelt_plugins.fusion), which is not installed",
                        source=source, path=f"{path}.mode")
    names = cval.get("adapters")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise SpecError("expected a list of the names of the attached adapters to fuse", source=source,
                        path=f"{path}.adapters")
    if len(names) < 2:
        raise SpecError(f"fusion attends over two or more adapters, got {len(names)}", source=source,
                        path=f"{path}.adapters")
    for i, n in enumerate(names):
        if names.index(n) != i:
            raise SpecError(f"{excerpt(n)} is listed twice", source=source, path=f"{path}.adapters[{i}]")
    at_site = [n for n, m in modules.items() if site in m.sites]
    if at_site:
        # the fusion layer replaces the sum of the fused adapters' outputs at this hook point; a
        # module of this spec there would have no defined place (inside the attention or beside it)
        raise SpecError(f"a fusion hook point takes no modules of its own spec; at {site}: {', '.join(at_site)}",
                        source=source, path=path)
    layers = _parse_layers(cval.get("layers", "all"), source=source, path=f"{path}.layers")
    options = {k: v for k, v in cval.items() if k not in FUSION_KEYS}
    config = build_config(method.config, {"adapters": list(names), **options}, source=source, path=path)
    return CombineSpec(site=site, mode="fusion", adapters=list(names), layers=layers, config=config)


def _parse_count(text: str, *, source: str | None) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbB]?)\s*", text)
    if not m:
        raise SpecError(f"expected a positive integer (or '1.5M', '300K'), got {excerpt(text)}", source=source, path="budget.max_params")
    mult = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[m.group(2).lower()]
    value = float(m.group(1)) * mult
    if not value <= MAX_INT:  # a thousand nines read as a float are inf
        raise SpecError(f"{excerpt(text)} is out of range (at most {MAX_INT:,})", source=source, path="budget.max_params")
    return int(round(value))
