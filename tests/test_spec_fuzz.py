"""Property-based fuzz of the spec loader and validator (issue 14).

Random documents and mutations of every shipped spec, given as a dict, a YAML file or a JSON
file (and YAML text cut or edited by line), must each end in exactly one of:

- a valid compile on a tiny model: a forward pass with finite outputs, no more parameters than
  the base-size cap allows, and ``detach()`` leaves the model exactly as it was;
- a ``SpecError`` that names where (a field path, or for text that is not YAML/JSON at all, a
  line) and the file, in a bounded message, leaving the model untouched;
- on these tiny models without a tokenizer, the one ModelError a spec can cause (``init: text``).

All within hypothesis' deadline per example. Examples are derandomized (CI sees the same ones
every run) and few enough for two CPU cores: 250 in all, about 15 s.
"""
from __future__ import annotations

import copy
import json
import math
import re
import resource
import types
import typing
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import pytest
import torch
import yaml

import unipelt
from conftest import FACTORIES, Snapshot, make_batch

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz needs hypothesis (pyproject's test extra)")
from hypothesis import example, HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from unipelt.errors import MAX_MESSAGE_CHARS  # noqa: E402
from unipelt.graph import MAX_PARAMS_FLOOR  # noqa: E402
from unipelt.registry import config_fields, get_registry  # noqa: E402
from unipelt.spec import GATE_FIELDS, GateSpec, load_spec_data  # noqa: E402

SPECS = sorted((Path(__file__).parent.parent / "specs").glob("*.yaml"))
FUZZ = settings(
    derandomize=True, database=None, deadline=timedelta(seconds=10), print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)

REGISTRY = get_registry()
METHODS = sorted(REGISTRY.methods)
SITES = REGISTRY.site_names()


def _literals(hint: Any) -> list[str]:
    """The string choices inside a type hint (``Literal[...]``, also within unions and lists)."""
    if get_origin(hint) is Literal:
        return [a for a in get_args(hint) if isinstance(a, str)]
    return [x for a in get_args(hint) for x in _literals(a)]


CHOICES = {a for m in REGISTRY.methods.values() for h in get_type_hints(m.config).values() for a in _literals(h)}
WORDS = sorted({
    *METHODS, *SITES, *CHOICES, *(a for h in get_type_hints(GateSpec).values() for a in _literals(h)),
    "all", "0:1", "1:", "-1:", ":0", "0:2:0", "::-1", "5:-5", "1.5M", "300K", "kept", "training",
    "parallel", "sequential", "average", "g", "lora", "adapter", "prefix", "",
})

# values at the edges of what the checks bound: the tiny models are 32 wide with 64 positions
INTS = st.one_of(
    st.integers(1, 40),
    st.integers(-2, 70),
    st.sampled_from([0, 1, 31, 32, 33, 63, 64, 65, 100_000, 10**8, 2**31, 2**63 - 1, 2**63, -(2**63) - 1]),
    st.integers(),
)
FLOATS = st.one_of(
    st.floats(0, 1),
    st.sampled_from([0.0, -0.0, 0.5, 0.99, 1.0, 4.0, 16.0, 1e-300, 1e308, math.inf, math.nan]),
    st.floats(allow_nan=True, allow_infinity=True),
)
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, st.sampled_from(WORDS), st.text(max_size=8))
KEYS = st.one_of(st.sampled_from(WORDS), st.text(max_size=6))
ANY = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=3),
                   max_leaves=8)


def _sane(hint: Any) -> st.SearchStrategy:
    """Values of a field's type in the range where compiles happen on the tiny models."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[_sane(a) for a in get_args(hint)])
    if hint is int:
        return st.integers(1, 40)
    if hint is float:
        return st.floats(0, 0.9)
    return _typed(hint)


def _typed(hint: Any) -> st.SearchStrategy:
    """Values of a config field's type (edges included), and now and then anything at all."""
    origin = get_origin(hint)
    if origin is Literal:
        base = st.sampled_from(get_args(hint))
    elif origin in (typing.Union, types.UnionType):
        base = st.one_of(*[_typed(a) for a in get_args(hint)])
    elif hint is type(None):
        base = st.none()
    elif hint is bool:
        base = st.booleans()
    elif hint is int:
        base = INTS
    elif hint is float:
        base = st.one_of(FLOATS, st.integers(0, 64))
    elif hint is str:
        base = st.text(max_size=8)
    elif origin in (list, tuple):
        (inner, *_) = get_args(hint) or (Any,)
        base = st.lists(_typed(inner), max_size=4)
    else:
        base = ANY
    return st.one_of(base, ANY)


LAYERS = st.one_of(st.just("all"), st.sampled_from(["0:1", "1:", "-1:", ":0", "0:2:0", "::-1", "5:-5", "3:1", "0-1"]),
                   INTS, st.lists(st.one_of(st.integers(-3, 3), st.sampled_from(["0:1", "1:", ":0"])), max_size=3), ANY)
GATE = st.one_of(st.booleans(), st.just("g"),
                 st.fixed_dictionaries({}, optional={f: _typed(get_type_hints(GateSpec)[f]) for f in GATE_FIELDS}), ANY)


def _rarely(draw) -> bool:
    # hypothesis favours the ends of a range (0 and 9 here): 4 is drawn about one time in ten
    return draw(st.integers(0, 9)) == 4


# hook points each kind of method attaches to (on every architecture of the fuzz)
SITES_OF = {"linear": ["attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down"],
            "output": ["attn.out", "ffn.out"], "io": ["ffn"], "kv": ["attn.kv"], "embed": ["embed"],
            "params": ["bias", "norm", "head"]}


@st.composite
def _names(draw) -> str:
    return draw(st.text(max_size=6)) if _rarely(draw) else draw(st.sampled_from(["lora", "adapter", "prefix", "a1", "p"]))


NAMES = _names()


@st.composite
def nodes(draw) -> dict:
    method = draw(st.sampled_from(METHODS))
    definition = REGISTRY.methods[method]
    hints = get_type_hints(definition.config)
    fields = sorted(config_fields(definition.config))
    node: dict[str, Any] = {"method": method}
    for f in draw(st.lists(st.sampled_from(fields), max_size=3, unique=True)) if fields else []:
        node[f] = draw(_typed(hints[f]) if _rarely(draw) else _sane(hints[f]))
    fitting = sorted({s for k in definition.site_kinds for s in SITES_OF.get(k, [])})
    sites = draw(st.one_of(st.sampled_from(fitting), st.lists(st.sampled_from(fitting), min_size=1, max_size=2),
                           st.none(), ANY))
    if sites is not None:
        node["sites" if draw(st.booleans()) else "site"] = sites
    for key, strategy in (("layers", LAYERS), ("gate", GATE), ("lr_scale", st.one_of(FLOATS, INTS, ANY))):
        if draw(st.integers(0, 3)) == 2:
            node[key] = draw(strategy)
    if _rarely(draw):
        node[draw(KEYS)] = draw(ANY)  # an unknown or misplaced key
    return node


@st.composite
def documents(draw) -> dict:
    doc: dict[str, Any] = {"modules": draw(st.dictionaries(NAMES, nodes(), min_size=1, max_size=2))}
    if draw(st.booleans()):
        doc["version"] = draw(SCALARS) if _rarely(draw) else 1
    if draw(st.integers(0, 3)) == 2:
        doc["gates"] = draw(st.dictionaries(st.sampled_from(["g", "h", "g g"]), GATE, max_size=2))
    if draw(st.integers(0, 3)) == 2:
        doc["combine"] = draw(st.dictionaries(st.sampled_from(SITES), st.one_of(
            st.sampled_from(["parallel", "average", "sequential", "stack"]),
            st.fixed_dictionaries({"mode": st.sampled_from(["parallel", "average", "sequential"])},
                                  optional={"order": st.lists(NAMES, max_size=3)}), ANY), max_size=2))
    if draw(st.integers(0, 3)) == 2:
        doc["budget"] = draw(st.one_of(
            st.fixed_dictionaries({}, optional={"max_params": st.one_of(INTS, st.sampled_from(["1.5M", "300K", "lots"])),
                                                "fraction": FLOATS, "count": st.sampled_from(["kept", "training", "all"])}),
            ANY))
    if _rarely(draw):
        doc[draw(KEYS)] = draw(ANY)
    return doc


# ------------------------------------------------------------------------------------------
# mutations of the shipped specs
# ------------------------------------------------------------------------------------------
def _places(value: Any, path: tuple = (), seen: set[int] | None = None) -> list[tuple]:
    """Every (container path, key) of a document, entering each container once: a bomb from an
    earlier mutation holds the same list nine times per level."""
    seen = set() if seen is None else seen
    if id(value) in seen or len(path) > 40:
        return []
    seen.add(id(value))
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        out.append(path + (k,))
        out.extend(_places(v, path + (k,), seen))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def _bomb(levels: int) -> list:
    """A list whose expansion is 9**levels strings, held as 9 references per level (YAML writes
    it with anchors and aliases: a few hundred bytes)."""
    x: list = ["lol"] * 9
    for _ in range(levels - 1):
        x = [x] * 9
    return x


def _deep(depth: int) -> list:
    x: list = []
    for _ in range(depth):
        x = [x]
    return x


# (hypothesis draws the first elements more often: the plausible ones come first)
EDGE_INTS = [4, 33, 65, 100_000, 32, 64, 2, 10**8, 1, 31, 63, 0, -1, 2**63 - 1, 2**63]
EDGE_FLOATS = [0.5, 0.99, 1.0, 0.0, -0.0, 1e308, math.nan, math.inf, -math.inf]


@st.composite
def _edge(draw, value: Any) -> Any:
    """A value of the same kind at an edge (now and then of another kind: 8.0 or "8" for 8)."""
    if isinstance(value, bool):
        return draw(st.sampled_from([not value, int(value), str(value).lower()]))
    if isinstance(value, int):
        if _rarely(draw):
            return draw(st.sampled_from([float(value), str(value)]))
        return draw(st.one_of(st.sampled_from(EDGE_INTS), st.integers(1, 200)))
    if isinstance(value, float):
        if _rarely(draw):
            return draw(st.sampled_from([int(value), str(value)]))
        return draw(st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(0, 1), st.integers(0, 200)))
    if isinstance(value, str):
        return draw(st.sampled_from(WORDS))
    return draw(ANY)


@st.composite
def mutated(draw, form: str) -> dict:
    doc, _ = load_spec_data(draw(st.sampled_from(SPECS)))
    for _ in range(draw(st.integers(1, 2))):
        places = _places(doc)
        # half the time a number of a module (a size, a scale: what the model bounds), else a
        # field of a module, else any key of the document
        fields = [p for p in places if len(p) >= 3 and p[0] == "modules"]
        numbers = [p for p in fields if type(_get(doc, p)) in (int, float)]
        pick = draw(st.integers(0, 3))
        where = draw(st.sampled_from(numbers if numbers and pick < 3 else fields if fields and _rarely(draw) else places))
        *parent_path, key = where
        parent = _get(doc, tuple(parent_path))
        # mostly a value of the same kind at an edge (sizes around the tiny models' widths and
        # positions, non-finite numbers, other choices), so that many mutants still parse
        ops = ["edge"] * 6 + ["any", "delete", "rename", "copy_node", "deep", "wrap"] + (["bomb"] if form != "json" else [])
        op = draw(st.sampled_from(ops))
        if op == "edge":
            parent[key] = draw(_edge(parent[key]))
        elif op == "any":
            parent[key] = draw(ANY)
        elif op == "delete":
            del parent[key]
        elif op == "rename" and isinstance(parent, dict):
            parent[draw(KEYS)] = parent.pop(key)
        elif op == "copy_node" and isinstance(parent, dict):
            parent[f"{key}_copy"] = copy.deepcopy(parent[key])
        elif op == "deep":
            parent[key] = _deep(draw(st.integers(30, 40)))  # around the 32-level bound
        elif op == "wrap":
            parent[key] = draw(st.sampled_from([[parent[key]], {"value": parent[key]}]))
        elif op == "bomb":
            parent[key] = _bomb(draw(st.integers(3, 8)))  # 729 to 43 million strings expanded
        if not doc:
            doc["modules"] = {}
    return doc


# ------------------------------------------------------------------------------------------
# the property
# ------------------------------------------------------------------------------------------
@cache
def _model(arch: str) -> torch.nn.Module:
    return FACTORIES[arch]()


def _base_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _write(doc: dict, form: str, tmp: Path, edit: tuple[str, int] | None) -> str | dict:
    if form == "dict":
        return doc
    if form == "json":
        path = tmp / "spec.json"
        path.write_text(json.dumps(doc), encoding="utf-8")  # NaN/Infinity as Python writes them
        return str(path)
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    if edit is not None:  # the text itself edited: a line repeated, dropped, or the file cut
        kind, at = edit
        lines = text.splitlines(keepends=True)
        i = at % max(len(lines), 1)
        if kind == "repeat" and lines:
            lines.insert(i, lines[i])
        elif kind == "drop" and lines:
            del lines[i]
        text = "".join(lines) if kind != "cut" else text[: at % max(len(text), 1)]
    path = tmp / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


# the errors about a file as a whole, which have no field to name (a cut file can be empty, or
# hold a single word)
DOCUMENT_ERRORS = ("the spec file is empty",)
# the process' peak memory when the fuzz started (not at import: other test files run between)
_RSS_KB: dict[str, int] = {}


def _check_outcome(spec_input: str | dict, arch: str, outcomes: dict) -> None:
    _RSS_KB.setdefault("start", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    source = spec_input if isinstance(spec_input, str) else None
    model = _model(arch)
    snap = Snapshot(model)

    def refused(e: unipelt.SpecError, kind: str) -> None:
        text = str(e)
        # where: a field path, or for a file that is not YAML/JSON (or JSON past the depth
        # bound, read before any field exists) the line; the file is named
        assert e.path or re.search(r"line \d+", text) or text.endswith(DOCUMENT_ERRORS) or (
            "expected a mapping at the top level" in text), text
        assert e.source == source and (source is None or source in text), text
        assert len(text) <= MAX_MESSAGE_CHARS + len(e.path or "") + len(source or "") + 4, len(text)
        snap.assert_same()
        outcomes[kind] = outcomes.get(kind, 0) + 1

    try:
        spec = unipelt.parse_spec(spec_input)
    except unipelt.SpecError as e:
        return refused(e, "refused by validate")
    try:
        handle = unipelt.compile(model, spec)
    except unipelt.SpecError as e:
        return refused(e, "refused by compile")
    except unipelt.ModelError as e:
        # the tiny models have no tokenizer: the one model error a valid spec can meet here
        assert "init: text needs the model's tokenizer" in str(e), str(e)
        snap.assert_same()
        outcomes["needs a tokenizer"] = outcomes.get("needs a tokenizer", 0) + 1
        return
    try:
        assert sum(p.numel() for p in handle.container.parameters()) <= max(_base_params(model), MAX_PARAMS_FLOOR)
        with torch.no_grad():
            out = model(**make_batch(batch=2, length=1)).logits  # one token: room for 63 virtual ones
        assert torch.isfinite(out).all(), "a valid spec gave non-finite outputs"
    finally:
        handle.detach()
    snap.assert_same()
    outcomes["compiled"] = outcomes.get("compiled", 0) + 1


OUTCOMES: dict[str, dict[str, int]] = {"random": {}, "mutated": {}}


# Documents only the model can refuse, always tried besides the drawn ones: the draws are
# derandomized and every added method plugin shifts them (with IA3, DoRA, VeRA, AdaLoRA, fusion
# and pruning registered, 100 draws reached a compile-stage refusal twice), while what this
# file promises is that such refusals are reached and are SpecErrors with a field path.
@settings(FUZZ, max_examples=100)
@given(doc=documents(), form=st.sampled_from(["dict", "yaml", "json"]), arch=st.sampled_from(["bert", "llama"]))
@example(doc={"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q"], "r": 100_000}}},
         form="yaml", arch="bert")  # r beyond min(d_in, d_out)
@example(doc={"version": 1, "modules": {"a": {"method": "adapter", "site": "ffn.gate"}}},
         form="dict", arch="bert")  # a hook point BERT does not have
@example(doc={"version": 1, "modules": {"p": {"method": "prefix", "length": 100_000}}},
         form="json", arch="llama")  # more virtual positions than the model has
def test_random_documents(doc, form, arch, tmp_path):
    _check_outcome(_write(doc, form, tmp_path, None), arch, OUTCOMES["random"])


@settings(FUZZ, max_examples=150)
@given(data=st.data(), form=st.sampled_from(["dict", "yaml", "yaml", "json"]), arch=st.sampled_from(["bert", "llama"]),
       edit=st.one_of(st.none(), st.none(), st.tuples(st.sampled_from(["repeat", "drop", "cut"]), st.integers(0, 10**4))))
def test_mutations_of_the_shipped_specs(data, form, arch, edit, tmp_path):
    doc = data.draw(mutated(form))
    _check_outcome(_write(doc, form, tmp_path, edit if form == "yaml" else None), arch, OUTCOMES["mutated"])


def test_the_fuzz_reached_every_outcome():
    """The fuzz is only worth its time if it reaches compiles and refusals at both stages (runs
    after the two properties, in file order); and the whole of it stayed within a bounded memory."""
    if not OUTCOMES["random"] or not OUTCOMES["mutated"]:
        pytest.skip("run with the two fuzz tests above")
    for name, seen in OUTCOMES.items():
        for kind in ("compiled", "refused by validate", "refused by compile"):
            assert seen.get(kind, 0) >= 3, (name, seen)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - _RSS_KB["start"]) / 1024
    assert grown_mb < 1500, f"peak memory grew {grown_mb:.0f} MB during the fuzz"
