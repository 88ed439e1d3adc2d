"""A corpus of malformed specs: each raises one SpecError naming the exact field path (and, when
the spec came from a file, the file), and a failed compile leaves the model untouched
(STYLE.md item 15: one test per validation branch).

Each case runs three ways: as a dict, as a YAML file, and (for model-dependent problems) only
at compile time against a tiny model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import yaml

import unipelt
from conftest import FACTORIES, Snapshot

LORA = {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4}
ADAPTER = {"method": "adapter", "site": "ffn.out"}


def mods(**nodes):
    return {"modules": nodes}


@dataclass(frozen=True)
class Bad:
    name: str
    spec: dict
    path: str
    needles: tuple[str, ...] = ()  # substrings the message must contain
    arch: str = "bert"  # the model the compile-time check runs on
    # "parse": caught without a model (unipelt.validate); "compile": needs the model (a
    # model-free validation must accept it); "either": only the compile-time error is checked
    phase: str = "parse"


CORPUS = [
    # top level ---------------------------------------------------------------------------
    Bad("unknown_top_key", {**mods(l=LORA), "modle": {}}, "modle", ("unknown key 'modle'", "modules")),
    Bad("missing_modules", {"version": 1}, "modules", ("missing required key 'modules'",)),
    Bad("empty_modules", {"modules": {}}, "modules", ("empty",)),
    Bad("modules_not_mapping", {"modules": ["lora"]}, "modules", ("expected a mapping",)),
    Bad("version_2", {**mods(l=LORA), "version": 2}, "version", ("unsupported format version 2",)),
    Bad("name_not_string", {**mods(l=LORA), "name": 3}, "name", ("expected a string",)),
    # nodes -------------------------------------------------------------------------------
    Bad("bad_node_name", mods(**{"1lora": LORA}), "modules.1lora", ("module names",)),
    Bad("node_not_mapping", mods(l=8), "modules.l", ("expected a mapping",)),
    Bad("missing_method", mods(l={"sites": ["attn.q"]}), "modules.l.method", ("missing 'method'", "adapter", "lora")),
    Bad("unknown_method", mods(l={**LORA, "method": "lorra"}), "modules.l.method",
        ("unknown method 'lorra'", "available methods: ", "adapter, ", "lora")),
    Bad("param_typo", mods(x={**LORA, "rr": 8}), "modules.x.rr", ("unknown key 'rr'", "alpha", "r")),
    Bad("adapter_param_on_lora", mods(x={**LORA, "reduction_factor": 8}), "modules.x.reduction_factor", ("unknown key",)),
    Bad("wrong_type", mods(x={**LORA, "r": "eight"}), "modules.x.r", ("expected an integer", "'eight'")),
    Bad("bool_is_not_int", mods(x={**LORA, "r": True}), "modules.x.r", ("expected an integer",)),
    Bad("out_of_range", mods(x={**LORA, "r": 0}), "modules.x.r", (">= 1", "0")),
    Bad("dropout_too_big", mods(x={**LORA, "dropout": 1.5}), "modules.x.dropout", ("<= 0.99",)),
    Bad("bad_choice", mods(x={**LORA, "init": "xavier"}), "modules.x.init", ("'kaiming'", "'gaussian'", "'xavier'")),
    Bad("adapter_bad_activation", mods(a={**ADAPTER, "activation": "softmax"}), "modules.a.activation", ("'relu'",)),
    # sites -------------------------------------------------------------------------------
    Bad("missing_sites", mods(x={"method": "lora", "r": 4}), "modules.x.sites", ("missing 'sites'", "attn.q")),
    Bad("site_and_sites", mods(x={**LORA, "site": "attn.k"}), "modules.x.sites", ("either 'site' or 'sites'",)),
    Bad("unknown_site", mods(x={**LORA, "sites": ["attn.q", "attn.qq"]}), "modules.x.sites[1]",
        ("unknown hook point 'attn.qq'", "attn.kv", "ffn.out", "ffn.gate")),
    Bad("unknown_single_site", mods(a={**ADAPTER, "site": "ffn_out"}), "modules.a.site", ("unknown hook point 'ffn_out'",)),
    Bad("site_twice", mods(x={**LORA, "sites": ["attn.q", "attn.q"]}), "modules.x.sites", ("listed twice",)),
    Bad("empty_sites", mods(x={**LORA, "sites": []}), "modules.x.sites", ("hook point",)),
    Bad("method_cannot_use_site", mods(x={**LORA, "sites": ["attn.q", "ffn.out"]}), "modules.x.sites[1]",
        ("cannot attach to 'ffn.out'", "attn.q", "ffn.down"), phase="either"),
    Bad("adapter_at_linear_site", mods(a={**ADAPTER, "site": "attn.q"}), "modules.a.site",
        ("cannot attach to 'attn.q'", "ffn.out"), phase="either"),
    Bad("site_not_on_architecture", mods(x={**LORA, "sites": ["attn.q", "ffn.gate"]}), "modules.x.sites[1]",
        ("'ffn.gate' is not available on architecture 'bert'",), phase="compile"),
    Bad("single_site_not_on_architecture", mods(x={"method": "lora", "site": "ffn.gate"}), "modules.x.site",
        ("'ffn.gate' is not available",), phase="compile"),
    # layers ------------------------------------------------------------------------------
    Bad("layer_out_of_range", mods(x={**LORA, "layers": [0, 5]}), "modules.x.layers[1]",
        ("layer 5 out of range for a 2-layer model",), phase="compile"),
    Bad("negative_layer_out_of_range", mods(x={**LORA, "layers": -3}), "modules.x.layers", ("layer -3",), phase="compile"),
    Bad("range_selects_nothing", mods(x={**LORA, "layers": "4:"}), "modules.x.layers", ("selects no layer",), phase="compile"),
    Bad("layer_twice", mods(x={**LORA, "layers": [0, -2]}), "modules.x.layers", ("selected twice",), phase="compile"),
    Bad("layer_syntax", mods(x={**LORA, "layers": "0-1"}), "modules.x.layers", ("'0-1'", "range like")),
    Bad("layer_syntax_in_list", mods(x={**LORA, "layers": [0, "a:b"]}), "modules.x.layers[1]", ("'a:b'",)),
    Bad("layer_bool", mods(x={**LORA, "layers": True}), "modules.x.layers", ("True",)),
    Bad("layers_empty", mods(x={**LORA, "layers": []}), "modules.x.layers", ("empty list",)),
    # gates -------------------------------------------------------------------------------
    Bad("unknown_shared_gate", {**mods(x={**LORA, "gate": "g9"}), "gates": {"g": {}}}, "modules.x.gate",
        ("unknown shared gate 'g9'", "shared gates: g")),
    Bad("shared_gate_none_defined", mods(x={**LORA, "gate": "g"}), "modules.x.gate", ("no shared gates defined",)),
    Bad("bad_gate_pooling", mods(x={**LORA, "gate": {"pooling": "max"}}), "modules.x.gate.pooling",
        ("'masked_mean'", "'max'")),
    Bad("unknown_gate_option", mods(x={**LORA, "gate": {"poolin": "token"}}), "modules.x.gate.poolin", ("unknown field",)),
    Bad("gate_option_type", mods(x={**LORA, "gate": {"init_bias": "high"}}), "modules.x.gate.init_bias", ("a number",)),
    Bad("gate_not_mapping", mods(x={**LORA, "gate": 3}), "modules.x.gate", ("shared gate",)),
    Bad("bad_shared_gate_option", {**mods(x={**LORA, "gate": "g"}), "gates": {"g": {"lora_scale": "add"}}},
        "gates.g.lora_scale", ("'replace'",)),
    Bad("bad_shared_gate_name", {**mods(x=LORA), "gates": {"g g": {}}}, "gates.g g", ("gate names",)),
    Bad("sequence_pooling_on_causal", mods(x={**LORA, "gate": {"pooling": "masked_mean"}}), "modules.x.gate.pooling",
        ("causal", "allow_noncausal"), arch="gpt2", phase="compile"),
    Bad("mean_pooling_on_causal", mods(a={**ADAPTER, "gate": {"pooling": "mean"}}), "modules.a.gate.pooling",
        ("later tokens",), arch="llama", phase="compile"),
    Bad("shared_gate_sequence_pooling_on_causal",
        {**mods(x={**LORA, "gate": "g"}), "gates": {"g": {"pooling": "masked_mean"}}}, "gates.g.pooling",
        ("causal",), arch="llama", phase="compile"),
    Bad("shared_gate_different_inputs",
        {**mods(x={**LORA, "gate": "g"}, a={**ADAPTER, "gate": "g"}), "gates": {"g": {"input": "site"}}}, "gates.g",
        ("set input: layer",), phase="compile"),
    # combine -----------------------------------------------------------------------------
    Bad("sequential_at_linear_site",
        {**mods(l1={**LORA, "sites": ["attn.q"]}, l2={**LORA, "sites": ["attn.q"]}),
         "combine": {"attn.q": {"mode": "sequential", "order": ["l1", "l2"]}}},
        "combine.attn.q.mode", ("sequential", "not well defined"), phase="compile"),
    Bad("combine_order_wrong_module",
        {**mods(a1=ADAPTER, l=LORA), "combine": {"ffn.out": {"mode": "sequential", "order": ["a1", "l"]}}},
        "combine.ffn.out.order[1]", ("'l' is not a module at ffn.out", "a1")),
    Bad("combine_order_incomplete",
        {**mods(a1=ADAPTER, a2=ADAPTER), "combine": {"ffn.out": {"mode": "sequential", "order": ["a1"]}}},
        "combine.ffn.out.order", ("a1, a2",)),
    Bad("combine_bad_mode", {**mods(a1=ADAPTER), "combine": {"ffn.out": "stack"}}, "combine.ffn.out.mode",
        ("parallel, sequential, average",)),
    Bad("combine_unknown_site", {**mods(a1=ADAPTER), "combine": {"ffn.outt": "average"}}, "combine.ffn.outt",
        ("unknown hook point",)),
    Bad("combine_unknown_key", {**mods(a1=ADAPTER), "combine": {"ffn.out": {"mode": "average", "ordr": []}}},
        "combine.ffn.out.ordr", ("unknown key",)),
    # budget ------------------------------------------------------------------------------
    Bad("budget_negative", {**mods(l=LORA), "budget": {"max_params": -5}}, "budget.max_params", ("positive integer",)),
    Bad("budget_bad_text", {**mods(l=LORA), "budget": {"max_params": "lots"}}, "budget.max_params", ("'lots'",)),
    Bad("budget_empty", {**mods(l=LORA), "budget": {}}, "budget", ("exactly one",)),
    Bad("budget_both", {**mods(l=LORA), "budget": {"max_params": 10, "fraction": 0.1}}, "budget", ("exactly one",)),
    Bad("budget_fraction_range", {**mods(l=LORA), "budget": {"fraction": 1.5}}, "budget.fraction", ("(0, 1]",)),
    Bad("budget_count", {**mods(l=LORA), "budget": {"max_params": 10, "count": "all"}}, "budget.count", ("'kept'",)),
    Bad("budget_unknown_key", {**mods(l=LORA), "budget": {"max_param": 10}}, "budget.max_param", ("unknown key",)),
    Bad("budget_not_mapping", {**mods(l=LORA), "budget": 1000}, "budget", ("expected a mapping",)),
    Bad("budget_exceeded", {**mods(l=LORA), "budget": {"max_params": 100}}, "budget", ("over the budget",), phase="compile"),
]


@pytest.fixture(params=CORPUS, ids=[b.name for b in CORPUS])
def bad(request) -> Bad:
    return request.param


def _check(err: unipelt.SpecError, bad: Bad, source=None):
    assert err.path == bad.path, f"{bad.name}: path {err.path!r}, expected {bad.path!r} ({err})"
    for n in bad.needles:
        assert n in str(err), f"{bad.name}: {n!r} not in message {str(err)!r}"
    assert err.source == (str(source) if source is not None else None)
    if source is not None:
        assert str(source) in str(err)
    # the field path is printed with the message
    assert f"{bad.path}: " in str(err)


def test_dict_spec(bad):
    if bad.phase == "parse":
        with pytest.raises(unipelt.SpecError) as ei:
            unipelt.validate(bad.spec)
        _check(ei.value, bad)
    elif bad.phase == "compile":
        # model-dependent: a model-free validation cannot know, and must not refuse
        assert unipelt.validate(bad.spec) is not None
    model = FACTORIES[bad.arch]()
    snap = Snapshot(model)
    with pytest.raises(unipelt.SpecError) as ei:
        unipelt.compile(model, bad.spec)
    _check(ei.value, bad)
    snap.assert_same()  # a failed compile leaves the model untouched


def test_yaml_file_spec(bad, tmp_path):
    """The same error from a file: the message names the file too."""
    path = tmp_path / f"{bad.name}.yaml"
    path.write_text(yaml.safe_dump(bad.spec, sort_keys=False), encoding="utf-8")
    model = FACTORIES[bad.arch]()
    snap = Snapshot(model)
    with pytest.raises(unipelt.SpecError) as ei:
        unipelt.compile(model, path)
    _check(ei.value, bad, source=path)
    assert path.name in str(ei.value)
    snap.assert_same()


def test_unknown_method_lists_every_registered_method():
    from unipelt.registry import get_registry

    with pytest.raises(unipelt.SpecError) as ei:
        unipelt.validate(mods(x={"method": "nope"}))
    assert f"available methods: {', '.join(sorted(get_registry().methods))}" in str(ei.value)


def test_the_corpus_specs_are_otherwise_valid():
    """Guard against a corpus entry failing for a reason other than the one it documents: the
    base specs it is built from compile."""
    model = FACTORIES["bert"]()
    unipelt.compile(model, {**mods(l=LORA, a=ADAPTER), "gates": {"g": {}}, "budget": {"max_params": "1M"}}).detach()
    unipelt.compile(model, {**mods(a1=ADAPTER, a2=ADAPTER), "combine": {"ffn.out": {"mode": "sequential", "order": ["a2", "a1"]}}}).detach()


# ------------------------------------------------------------------------------------------
# files: YAML and JSON syntax, allow_noncausal, empty files
# ------------------------------------------------------------------------------------------
INVALID_YAML = """\
version: 1
modules:
  lora:
    method: lora
    sites: [attn.q, attn.v
    r: 8
"""


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(INVALID_YAML, encoding="utf-8")
    with pytest.raises(unipelt.SpecError) as ei:
        unipelt.validate(path)
    err = ei.value
    assert err.source == str(path)
    assert str(path) in str(err)
    assert "invalid YAML at line" in str(err)
    line = int(str(err).split("at line ")[1].split(",")[0])
    assert 5 <= line <= 7  # the unclosed flow sequence opened on line 5


def test_yaml_tab_indentation(tmp_path):
    path = tmp_path / "tabs.yml"
    path.write_text("modules:\n\tlora:\n\t\tmethod: lora\n", encoding="utf-8")
    with pytest.raises(unipelt.SpecError, match=r"invalid YAML at line 2") as ei:
        unipelt.validate(path)
    assert ei.value.source == str(path)


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"modules": {\n  "l": {"method": "lora",}\n}}', encoding="utf-8")
    with pytest.raises(unipelt.SpecError, match=r"invalid JSON at line 2") as ei:
        unipelt.validate(path)
    assert ei.value.source == str(path) and "broken.json" in str(ei.value)


def test_json_spec_file_works(tmp_path, bert):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"version": 1, **mods(l=LORA, a={**ADAPTER, "gate": True})}), encoding="utf-8")
    h = unipelt.compile(bert, path)
    assert h.spec.source == str(path)
    assert set(h.spec.modules) == {"l", "a"}


def test_yaml_spec_file_with_comments_works(tmp_path, bert):
    path = tmp_path / "spec.yaml"
    path.write_text(
        "# unipelt train --spec spec.yaml\nversion: 1\nmodules:\n  lora:\n    method: lora\n"
        "    sites: [attn.q, attn.v]\n    r: 8  # rank\n    layers: ['0:1', -1]\n", encoding="utf-8",
    )
    h = unipelt.compile(bert, path)
    assert sorted(h.named_parameters()) == sorted(
        f"lora.{i}.attn.{s}.lora_{m}" for i in (0, 1) for s in "qv" for m in "AB"
    )


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(unipelt.SpecError, match="empty") as ei:
        unipelt.validate(empty)
    assert ei.value.source == str(empty)
    with pytest.raises(unipelt.SpecError, match="not found") as ei:
        unipelt.validate(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(ei.value)
    top = tmp_path / "list.yaml"
    top.write_text("- lora\n", encoding="utf-8")
    with pytest.raises(unipelt.SpecError, match="mapping at the top level"):
        unipelt.validate(top)


@pytest.mark.parametrize("pooling", ["masked_mean", "mean"])
def test_sequence_pooling_on_causal_with_opt_in(pooling, gpt2):
    spec = mods(x={**LORA, "gate": {"pooling": pooling, "allow_noncausal": True}})
    h = unipelt.compile(gpt2, spec)
    assert {gp.spec.pooling for gp in h.graph.gates.values()} == {pooling}


def test_auto_pooling_per_architecture(bert, llama):
    spec = mods(x={**LORA, "gate": True}, a={**ADAPTER, "gate": {"pooling": "auto"}})
    enc = unipelt.compile(bert, spec)
    dec = unipelt.compile(llama, spec)
    assert {gp.spec.pooling for gp in enc.graph.gates.values()} == {"masked_mean"}
    assert {gp.spec.pooling for gp in dec.graph.gates.values()} == {"token"}
    # and the published gate inputs: LoRA from the layer input (one gate per projection, as the
    # reference), the adapter from its own input
    assert {gp.gate_id: gp.input for gp in enc.graph.gates.values()} == {"x@attn.q": "layer", "x@attn.v": "layer", "a": "site"}


def test_valid_layer_syntax(bert):
    for layers, expected in [("all", [0, 1]), (1, [1]), (-1, [1]), ("1:", [1]), (":1", [0]), (["0:1", -1], [0, 1])]:
        h = unipelt.compile(bert, mods(x={**LORA, "sites": ["attn.q"], "layers": layers}))
        assert sorted(bp.site.layer for bp in h.graph.branches) == expected, layers
        h.detach()
