"""A corpus of malformed specs: each raises one SpecError naming the exact field path (and, when
the spec came from a file, the file), and a failed compile leaves the model untouched
(STYLE.md item 15: one test per validation branch).

Each case runs three ways: as a dict, as a YAML file, and (for model-dependent problems) only
at compile time against a tiny model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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
    Bad("adapter_without_width", mods(a={**ADAPTER, "reduction_factor": None}), "modules.a.reduction_factor",
        ("give reduction_factor",)),  # found by the fuzz: a TypeError at build
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
    Bad("budget_text_out_of_range", {**mods(l=LORA), "budget": {"max_params": "9" * 400}}, "budget.max_params",
        ("out of range",)),
    # sizes against the model, before anything is allocated (issue 14): these once allocated
    # until the machine ran out, or crashed compile with a traceback ----------------------------
    Bad("lora_rank_above_widths", mods(x={**LORA, "r": 100000000}), "modules.x.r",
        ("rank 100000000", "min(d_in, d_out) = 32", "at most 32"), phase="compile"),
    Bad("lora_rank_one_above_widths", mods(x={**LORA, "r": 33}), "modules.x.r", ("at most 32",), phase="compile"),
    Bad("adapter_width_above_d", mods(a={**ADAPTER, "width": 10000000}), "modules.a.width",
        ("width 10000000", "at most 32"), phase="compile"),
    Bad("adapter_reduction_factor_leaves_no_width", mods(a={**ADAPTER, "reduction_factor": 64}),
        "modules.a.reduction_factor", ("leaves no width", "at most 32"), phase="compile"),
    Bad("prefix_length_above_context", mods(p={"method": "prefix", "length": 100000}), "modules.p.length",
        ("64 positions", "at most 64"), phase="compile"),
    Bad("prefix_mlp_larger_than_the_base", mods(p={"method": "prefix", "reparam_hidden": 10000000}),
        "modules.p.reparam_hidden", ("more than the base model", "50,000,000", "reparam_hidden: 10000000"), phase="compile"),
    Bad("p_tuning_encoder_larger_than_the_base", mods(p={"method": "p_tuning", "hidden": 10000000}), "modules.p.hidden",
        ("more than the base model",), phase="compile"),
    Bad("prompt_leaves_no_position_for_the_input", mods(p={"method": "prompt", "length": 64}), "modules.p.length",
        ("no room for the input", "64 positions of BertForSequenceClassification", "at most 63"), phase="compile"),
    Bad("prompt_length_on_a_rotary_model", mods(p={"method": "prompt", "length": 500}), "modules.p.length",
        ("64 positions of LlamaForCausalLM",), arch="llama", phase="compile"),
    Bad("p_tuning_template_leaves_no_position", mods(p={"method": "p_tuning", "template": [70, "input"]}),
        "modules.p.template", ("70 virtual tokens",), phase="compile"),
    Bad("number_beyond_int64", mods(x={**LORA, "r": 2**70}), "modules.x.r", ("out of range", "64 bits")),
    # non-finite numbers changed the model's outputs before training --------------------------
    Bad("nan_alpha", mods(x={**LORA, "alpha": float("nan")}), "modules.x.alpha", ("expected a finite number", "nan")),
    Bad("inf_lr_scale", mods(x={**LORA, "lr_scale": float("inf")}), "modules.x.lr_scale", ("finite",)),
    Bad("inf_gate_init_bias", mods(x={**LORA, "gate": {"init_bias": float("-inf")}}), "modules.x.gate.init_bias",
        ("finite", "-inf")),
    Bad("nan_adapter_scale", mods(a={**ADAPTER, "scale": float("nan")}), "modules.a.scale", ("finite",)),
    Bad("nan_shared_gate_bias", {**mods(x={**LORA, "gate": "g"}), "gates": {"g": {"init_bias": float("nan")}}},
        "gates.g.init_bias", ("finite",)),
    Bad("nan_budget_fraction", {**mods(l=LORA), "budget": {"fraction": float("nan")}}, "budget.fraction", ("finite",)),
    # types as written: nothing is coerced (bool is not int, 8.0 is not 8, "8" is not 8) -------
    Bad("int_as_string", mods(x={**LORA, "r": "8"}), "modules.x.r", ("expected an integer", "'8'")),
    Bad("int_as_float", mods(x={**LORA, "r": 8.0}), "modules.x.r", ("expected an integer", "8.0")),
    Bad("float_as_string", mods(x={**LORA, "dropout": "0.1"}), "modules.x.dropout", ("a number", "'0.1'")),
    Bad("float_as_bool", mods(x={**LORA, "alpha": True}), "modules.x.alpha", ("a number",)),
    Bad("bool_as_int", mods(x={**LORA, "rslora": 1}), "modules.x.rslora", ("true/false",)),
    Bad("bool_as_string", mods(x={**LORA, "rslora": "true"}), "modules.x.rslora", ("true/false", "'true'")),
    Bad("version_float", {**mods(l=LORA), "version": 1.0}, "version", ("unsupported format version 1.0",)),
    Bad("version_bool", {**mods(l=LORA), "version": True}, "version", ("unsupported format version True",)),
    Bad("gate_zero_is_not_false", mods(x={**LORA, "gate": 0}), "modules.x.gate", ("shared gate", "got int 0")),
    Bad("node_name_with_newline", mods(**{"l\n": LORA}), "modules.l\n", ("module names",)),
    Bad("node_name_too_long", mods(**{"l" * 65: LORA}), "modules." + "l" * 65, ("at most 64",)),
    Bad("combine_order_repeats", {**mods(a1=ADAPTER), "combine": {"ffn.out": {"mode": "average", "order": ["a1", "a1"]}}},
        "combine.ffn.out.order", ("listed twice",)),
    # layer ranges: a zero step crashed compile, a range selecting nothing passed validate -------
    Bad("layer_range_zero_step", mods(x={**LORA, "layers": "0:2:0"}), "modules.x.layers", ("step 0",)),
    Bad("layer_range_empty_on_every_model", mods(x={**LORA, "layers": "3:1"}), "modules.x.layers",
        ("'3:1' selects no layer of any model",)),
    Bad("layer_range_empty_in_a_list", mods(x={**LORA, "layers": [0, ":0"]}), "modules.x.layers[1]", ("any model",)),
    Bad("layer_range_negative_empty", mods(x={**LORA, "layers": "-1:-3"}), "modules.x.layers", ("any model",)),
    Bad("layer_range_bare_sign", mods(x={**LORA, "layers": "-:1"}), "modules.x.layers", ("range like",)),
    Bad("layer_range_huge_number", mods(x={**LORA, "layers": "0:" + "9" * 30}), "modules.x.layers", ("range like",)),
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
    for node in ({"method": "prefix"}, {"method": "p_tuning"}, {"method": "prompt", "length": 63},
                 {**LORA, "r": 32, "layers": "1:"}, {**ADAPTER, "width": 32}, {**ADAPTER, "reduction_factor": 32}):
        unipelt.compile(model, mods(p=node)).detach()  # the edges of the size checks above are valid
    unipelt.compile(FACTORIES["llama"](), mods(p={"method": "prompt", "length": 63}))


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


# ------------------------------------------------------------------------------------------
# hostile documents (issue 14): bounded time, memory and output; one SpecError, no traceback
# ------------------------------------------------------------------------------------------
def _levels(n: int) -> str:
    names = "abcdefghi"
    out = [f"&{names[0]} [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    for i in range(1, n):
        out.append(f"&{names[i]} [" + ",".join([f"*{names[i - 1]}"] * 9) + "]")
    return "[" + ", ".join(out) + "]"


# nine levels of nine aliases: 9**9 = 387,420,489 strings once expanded
ALIAS_BOMB = f"modules:\n  l:\n    method: lora\n    sites: [attn.q]\n    r: {_levels(9)}\n"


def test_alias_bomb_fails_fast_with_a_bounded_message(tmp_path, capsys):
    """A 395-byte spec made `unipelt validate` write 2 GB to stderr with 6 GB of memory (this one
    is 365 bytes: nine levels of nine aliases, 9**9 strings once expanded)."""
    import time
    import tracemalloc

    from unipelt.cli import main

    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB, encoding="utf-8")
    assert len(ALIAS_BOMB.encode()) < 400
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(unipelt.SpecError) as ei:
        unipelt.validate(path)
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    err = ei.value
    assert err.source == str(path) and str(path) in str(err)
    # refused at the first level past 100,000 values: 9**6 > 100,000 > 9**5 (the sixth list)
    assert err.path == "modules.l.r[5]", err.path
    assert "more than 100,000 values" in str(err) and "alias" in str(err) and "line 5" in str(err)
    assert len(str(err)) < 400
    assert elapsed < 5 and peak < 20 * 2**20, (elapsed, peak)
    assert main(["validate", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err) < 400 and "modules.l.r[5]" in captured.err


def test_aliases_within_the_bounds_still_work(tmp_path):
    """Anchors, aliases and merge keys are YAML: a spec may reuse a node and override its keys."""
    path = tmp_path / "aliases.yaml"
    path.write_text(
        "modules:\n"
        "  a1: &adapter {method: adapter, site: ffn.out, width: 4, gate: &g {pooling: token}}\n"
        "  a2:\n"
        "    <<: *adapter\n"
        "    width: 6\n"  # overrides the merged width: not a duplicate key
        "  l: {method: lora, sites: [attn.q], gate: *g}\n", encoding="utf-8")
    spec = unipelt.validate(path)
    assert spec.modules["a1"].config.width == 4 and spec.modules["a2"].config.width == 6
    assert spec.modules["a2"].method == "adapter" and spec.modules["l"].gate.pooling == "token"


def test_error_messages_quote_a_bounded_excerpt_of_a_value():
    big = list(range(50_000))
    with pytest.raises(unipelt.SpecError) as ei:
        unipelt.validate(mods(x={**LORA, "r": big}))
    assert ei.value.path == "modules.x.r" and "expected an integer, got [0, 1, 2, 3, 4, 5, ...]" in str(ei.value)
    assert len(str(ei.value)) < 200
    with pytest.raises(unipelt.SpecError) as ei:
        unipelt.validate(mods(x={**LORA, "init": "x" * 100_000}))
    assert len(str(ei.value)) < 300 and "'xxxx" in str(ei.value)
    with pytest.raises(unipelt.SpecError) as ei:  # a key is a path: cut too
        unipelt.validate(mods(x={**LORA, "k" * 100_000: 1}))
    assert len(str(ei.value)) < 1000 and len(ei.value.path) <= 200


def test_recursive_alias(tmp_path):
    path = tmp_path / "rec.yaml"
    path.write_text("modules:\n  l: {method: lora, sites: [attn.q], r: &x [1, *x]}\n", encoding="utf-8")
    with pytest.raises(unipelt.SpecError, match="recursive alias") as ei:
        unipelt.validate(path)
    assert ei.value.path == "modules.l.r[1]" and "line 2" in str(ei.value)


def test_a_dict_spec_that_contains_itself():
    spec = mods(x=dict(LORA))
    spec["modules"]["x"]["gate"] = spec
    with pytest.raises(unipelt.SpecError, match="contains itself") as ei:
        unipelt.validate(spec)
    assert ei.value.path == "modules.x.gate"


@pytest.mark.parametrize("fmt", ["yaml", "json", "dict"])
def test_deep_nesting_is_a_spec_error_not_a_recursion_error(fmt, tmp_path):
    depth = 100_000 if fmt == "dict" else 5_000
    if fmt == "dict":
        value: list = []
        for _ in range(depth):
            value = [value]
        spec = mods(x={**LORA, "r": value})
    else:
        text = '{"modules": {"x": {"method": "lora", "sites": ["attn.q"], "r": ' + "[" * depth + "]" * depth + "}}}"
        spec = tmp_path / f"deep.{fmt}"
        spec.write_text(text, encoding="utf-8")  # JSON is YAML too
    with pytest.raises(unipelt.SpecError, match="nested deeper than 32 levels") as ei:
        unipelt.validate(spec)
    if fmt != "json":  # the JSON reader knows the line and column, not the field
        assert ei.value.path.startswith("modules.x.r[0][0]")
    else:
        assert "line 1, column" in str(ei.value)


DUPLICATE_MODULES = """\
version: 1
modules:
  lora:
    method: lora
    sites: [attn.q]
  adapter: {method: adapter, site: ffn.out}
  lora:
    method: lora
    sites: [attn.v]
"""


def test_duplicate_module_names_are_refused(tmp_path):
    """The last one used to win without a word."""
    path = tmp_path / "dup.yaml"
    path.write_text(DUPLICATE_MODULES, encoding="utf-8")
    with pytest.raises(unipelt.SpecError) as ei:
        unipelt.validate(path)
    err = ei.value
    assert err.source == str(path) and err.path == "modules.lora"
    assert "duplicate key 'lora' (first at line 3)" in str(err) and "(line 7, column 3)" in str(err)


def test_duplicate_keys_inside_a_node_and_quoted(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("modules:\n  l:\n    method: lora\n    sites: [attn.q]\n    r: 4\n    'r': 8\n", encoding="utf-8")
    with pytest.raises(unipelt.SpecError, match=r"duplicate key 'r' \(first at line 5\)") as ei:
        unipelt.validate(path)
    assert ei.value.path == "modules.l.r" and "line 6" in str(ei.value)


def test_duplicate_keys_in_json(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"modules": {\n  "l": {"method": "lora", "sites": ["attn.q"]},\n'
                    '  "a": {"method": "adapter", "site": "ffn.out", "width": 4, "width": 8},\n'
                    '  "l": {"method": "lora", "sites": ["attn.v"]}\n}}', encoding="utf-8")
    with pytest.raises(unipelt.SpecError) as ei:
        unipelt.validate(path)
    # the inner object is read (and refused) first
    assert "duplicate key 'width' (first at line 3)" in str(ei.value) and "line 3, column 61" in str(ei.value)
    path.write_text('{"modules": {\n  "l": {"method": "lora", "sites": ["attn.q"]},\n'
                    '  "l": {"method": "lora", "sites": ["attn.v"]}\n}}', encoding="utf-8")
    with pytest.raises(unipelt.SpecError, match=r"duplicate key 'l' \(first at line 2\)") as ei:
        unipelt.validate(path)
    assert "line 3, column 3" in str(ei.value) and ei.value.source == str(path)


@pytest.mark.parametrize("text, field, expected", [
    ("layers: 1:2", "layers", ("1:2",)),  # YAML 1.1: the base-60 number 62
    ("dropout: 1e-2", "dropout", 0.01),  # YAML 1.1: the string '1e-2'
    ("r: 010", "r", 10),  # YAML 1.1: octal 8
    ("r: 0o10", "r", 8),
    ("r: 0x8", "r", 8),
    ("rslora: True", "rslora", True),
    ("alpha: ~", "alpha", None),
    ("dropout: .5", "dropout", 0.5),
])
def test_yaml_scalars_follow_the_core_schema(text, field, expected, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(f"modules:\n  x:\n    method: lora\n    sites: [attn.q]\n    {text}\n", encoding="utf-8")
    node = unipelt.validate(path).modules["x"]
    got = node.layers.items if field == "layers" else getattr(node.config, field)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("text, path, needle", [
    ("rslora: yes", "modules.x.rslora", "got 'yes'"),  # YAML 1.1: true
    ("rslora: off", "modules.x.rslora", "got 'off'"),
    ("r: 1_0", "modules.x.r", "got '1_0'"),  # YAML 1.1: 10
    ("alpha: .NaN", "modules.x.alpha", "finite"),
    ("alpha: -.inf", "modules.x.alpha", "finite"),
    ("alpha: 1e400", "modules.x.alpha", "finite"),  # overflows to inf
    ("r: " + "9" * 5000, "modules.x.r", "an integer of 5,000 digits"),  # Python refuses to read it
    ("r: !!int abc", "modules.x.r", "'abc' is not an integer"),
    ("rslora: !!bool maybe", "modules.x.rslora", "'maybe' is not true or false"),
    ("alpha: !!float x", "modules.x.alpha", "'x' is not a number"),
])
def test_yaml_scalars_refused(text, path, needle, tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(f"modules:\n  x:\n    method: lora\n    sites: [attn.q]\n    {text}\n", encoding="utf-8")
    with pytest.raises(unipelt.SpecError) as ei:
        unipelt.validate(f)
    assert ei.value.path == path and needle in str(ei.value) and ei.value.source == str(f)


@pytest.mark.parametrize("value", ["!!binary aGVsbG8=", "!!timestamp 2001-12-14", "!!set {a, b}",
                                   "!!python/object/apply:os.getcwd []", "!!omap [a: 1]"])
def test_yaml_tags_outside_a_spec_are_refused(value, tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(f"modules:\n  x:\n    method: lora\n    sites: [attn.q]\n    init: {value}\n", encoding="utf-8")
    with pytest.raises(unipelt.SpecError, match=r"invalid YAML at line 5") as ei:
        unipelt.validate(f)
    assert "constructor" in str(ei.value)


def test_json_numbers(tmp_path):
    f = tmp_path / "s.json"
    for text, needle in [('"r": ' + "9" * 5000, "an integer of 5,000 digits"), ('"alpha": NaN', "finite"),
                         ('"alpha": -Infinity', "finite"), ('"alpha": 1e999', "finite"), ('"r": 8.0', "expected an integer")]:
        f.write_text('{"modules": {"x": {"method": "lora", "sites": ["attn.q"], ' + text + "}}}", encoding="utf-8")
        with pytest.raises(unipelt.SpecError) as ei:
            unipelt.validate(f)
        assert needle in str(ei.value) and ei.value.source == str(f), text


def test_spec_file_size_is_bounded(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("modules: {}\n" + "#" * (1 << 20), encoding="utf-8")
    with pytest.raises(unipelt.SpecError, match="larger than 1,048,576 bytes") as ei:
        unipelt.validate(big)
    assert ei.value.source == str(big)
    with pytest.raises(unipelt.SpecError, match="larger than"):
        unipelt.validate("/dev/zero")  # an endless file is read no further than the bound
    bad = tmp_path / "latin1.yaml"
    text = "modules:\n  l: {method: lora, sites: [attn.q]}  # caf\xe9\n"
    bad.write_bytes(text.encode("latin-1"))
    with pytest.raises(unipelt.SpecError, match=rf"not UTF-8: byte {text.index(chr(0xe9))} is 0xe9"):
        unipelt.validate(bad)


def test_too_many_values():
    with pytest.raises(unipelt.SpecError, match="more than 100,000 values") as ei:
        unipelt.validate(mods(x={**LORA, "token_ids": list(range(200_000))}))
    assert ei.value.path.startswith("modules.x.token_ids[")


# ------------------------------------------------------------------------------------------
# counted before allocated: the meta build, the base-size cap, free memory, the budget
# ------------------------------------------------------------------------------------------
SHIPPED = sorted((Path(__file__).parent.parent / "specs").glob("*.yaml"))


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("spec_path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_the_meta_count_is_what_the_build_allocates(spec_path, arch):
    from unipelt.arch import resolve_model
    from unipelt.graph import build_graph, meta_build
    from unipelt.registry import get_registry

    reg = get_registry()
    model = FACTORIES[arch]()
    spec = unipelt.parse_spec(spec_path)
    info = resolve_model(model, reg.architectures)
    built = meta_build(spec, build_graph(spec, info, reg), info, reg)
    handle = unipelt.compile(model, spec_path)
    real = sum(p.numel() for p in handle.container.parameters())
    if spec_path.stem == "prompt":
        # initialised from vocabulary embeddings: cannot run on meta, counted after its real build
        assert not built.complete and built.allocated == {}
    elif all(node.method in ("train", "bitfit") for node in spec.modules.values()):
        # LN tuning trains base tensors in place: nothing to allocate, on meta or for real
        assert built.complete and sum(built.allocated.values()) == real == 0
    else:
        assert built.complete and sum(built.allocated.values()) == real > 0


@pytest.fixture
def record_builds(monkeypatch):
    """The device every prefix MLP is created on: meta for the count, the real one for the build."""
    import torch

    from unipelt_plugins import prefix

    devices: list[str] = []
    original = prefix.PrefixMLP.__init__

    def spy(self, *args, **kwargs):
        devices.append(torch.empty(0).device.type)
        original(self, *args, **kwargs)

    monkeypatch.setattr(prefix.PrefixMLP, "__init__", spy)
    return devices


def test_the_budget_is_checked_before_anything_is_allocated(bert, record_builds):
    # 20,000 x (32 + 2 x 2 x 32 x 2) = 5.8M parameters: within the base-size cap, over the budget
    spec = {**mods(p={"method": "prefix", "reparam_hidden": 20000}), "budget": {"max_params": 1000, "count": "training"}}
    snap = Snapshot(bert)
    with pytest.raises(unipelt.SpecError, match="over the budget") as ei:
        unipelt.compile(bert, spec)
    assert ei.value.path == "budget"
    assert record_builds == ["meta"]  # counted, never built
    snap.assert_same()
    unipelt.compile(bert, mods(p={"method": "prefix", "reparam_hidden": 16}))
    assert record_builds == ["meta", "meta", "cpu"]


def test_more_parameters_than_the_base_are_refused_before_allocation(bert, record_builds):
    snap = Snapshot(bert)
    with pytest.raises(unipelt.SpecError, match=r"would allocate 1,610,000,448 parameters, more than the base") as ei:
        unipelt.compile(bert, mods(p={"method": "prefix", "reparam_hidden": 10_000_000}))
    assert ei.value.path == "modules.p.reparam_hidden" and record_builds == ["meta"]
    snap.assert_same()


def test_free_memory_is_checked_before_allocation(bert, monkeypatch):
    from unipelt import graph

    monkeypatch.setattr(graph, "_available_bytes", lambda device: 1000)
    snap = Snapshot(bert)
    with pytest.raises(unipelt.SpecError, match=r"\(0.00 GiB\), more than the 0.00 GiB free in host memory") as ei:
        unipelt.compile(bert, mods(x=LORA))
    assert ei.value.path == "modules.x.r" and "'x' with 1,024 (r: 4)" in str(ei.value)
    snap.assert_same()


def test_an_edited_saved_adapter_is_checked_the_same_way(bert, tmp_path):
    """An adapter whose unipelt.json was edited to r: 100000000 failed with a traceback."""
    h = unipelt.compile(bert, mods(x=LORA, a=ADAPTER))
    h.save(tmp_path / "ad")
    meta_path = tmp_path / "ad" / "unipelt.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    for edit, needle in [({"x": {"r": 100000000}}, "modules.x.r: rank 100000000"),
                         ({"a": {"width": 10000000}}, "modules.a.width: width 10000000"),
                         ({"x": {"alpha": float("nan")}}, "modules.x.alpha: expected a finite number"),
                         ({"x": {"layers": "1:1"}}, "modules.x.layers: range '1:1' selects no layer")]:
        edited = json.loads(json.dumps(meta))
        for node, fields in edit.items():
            edited["spec"]["modules"][node].update(fields)
        meta_path.write_text(json.dumps(edited), encoding="utf-8")  # NaN as Python's json writes it
        fresh = FACTORIES["bert"]()
        snap = Snapshot(fresh)
        with pytest.raises(unipelt.AdapterFileError) as ei:
            unipelt.load(fresh, tmp_path / "ad")
        assert needle in str(ei.value) and "unipelt.json" in str(ei.value), str(ei.value)
        snap.assert_same()


def test_causal_pooling_error_names_the_models_type_not_the_catalog():
    # a Qwen2 model matched the Llama catalog, and the message said "on the causal model 'llama'":
    # a newcomer with a Qwen2 model read that as the wrong model; it names the model type and,
    # where it differs, the catalog
    from conftest import make_qwen2
    from unipelt.errors import SpecError

    with pytest.raises(SpecError, match=r"on the causal model 'qwen2' \(catalog 'llama'\)"):
        unipelt.compile(make_qwen2(), {"modules": {"x": {"method": "lora", "sites": "attn.q",
                                                          "gate": {"pooling": "masked_mean"}}}})
