"""Gate pruning, collapse, AdapterDrop and AdapterFusion tried as a new user tries them (issue 12):
models and data that are not the repository's (a local model directory of an architecture the other
tests use least, field names that are not the defaults), followed to the next command. Each test
is a regression test for something that broke there."""
from __future__ import annotations

import json

import pytest
import torch

import unipelt
from conftest import make_batch, make_bert, randomize
from unipelt.cli import main
from unipelt.collapse import forward_times
from unipelt.models import load_model
from unipelt.state import get_state
from unipelt.train import record_training_info

GATED = {"version": 1, "modules": {
    "lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 2, "gate": {"input": "layer"}},
    "adapter": {"method": "adapter", "sites": "ffn.res", "reduction_factor": 4, "gate": {"input": "site"}},
}}




def _qa_files(tmp_path):
    """Prompt/response pairs under the field names a user's file has (question/answer)."""
    pairs = [("what colour is the sky", "blue"), ("how many legs has a cat", "four"), ("what do bees make", "honey"),
             ("where do fish live", "in water"), ("what is ice", "frozen water")]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs))
    return data


def test_collapsed_adapter_keeps_the_training_record(tmp_path, capsys):
    """`unipelt collapse` saved the collapsed adapter without what training recorded (model, task,
    field names, max length): `unipelt eval` of the collapsed adapter then read the data with the
    default field names and failed (exit 5, "missing field 'text'"), and a second collapse too.
    Also: the JSON reports the ratios per interleaved pairing and the merged LoRA's parameters."""
    model, _ = load_model("tiny-llama", task="causal-lm")
    h = unipelt.compile(model, GATED)
    randomize(h)
    with torch.no_grad():  # nearly constant gates: collapse makes them constants and merges the LoRA
        for g in h.gate_modules.values():
            g.linear.weight.mul_(1e-4)
    info = {"model": "tiny-llama", "task": "causal-lm", "labels": None, "max_length": 32, "use_chat_template": True,
            "fields": {"text": "text", "label": "label", "prompt": "question", "response": "answer"}}
    record_training_info(h, info)
    h.save(tmp_path / "a")
    data = _qa_files(tmp_path)
    code = main(["collapse", str(tmp_path / "a"), "--data", str(data), "--out", str(tmp_path / "c"), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0, res
    meta = json.loads((tmp_path / "c" / "unipelt.json").read_text())
    assert meta["workflow"]["fields"] == info["fields"] and meta["workflow"]["model"] == "tiny-llama"
    assert meta["workflow"]["max_length"] == 32
    # the merged LoRA (every q and v projection: 2 layers x 2) and their parameter count
    assert len(res["merged"]) == 4
    lora = sum(p.numel() for k in res["merged"] for p in h.branch_modules[k].parameters())
    assert res["merged_params"] == lora > 0
    assert res["collapsed_over_base"] > 0 and res["gated_over_base"] > 0
    # the next commands need no repeated flags
    assert main(["eval", str(tmp_path / "c"), "--data", str(data)]) == 0
    assert main(["collapse", str(tmp_path / "c"), "--data", str(data), "--out", str(tmp_path / "c2")]) == 0
    text = capsys.readouterr().out
    assert "of them in merged LoRA" in text and "x base" in text


def test_forward_times_interleaves_the_variants():
    """The times of base, gated and collapsed were taken one variant after the other (three
    passes each), so a slower stretch of a shared machine fell on one of them: the command printed
    the base model slower than the gated one. The variants now alternate round by round."""
    calls = []
    model = make_bert()
    batch = make_batch()
    times = forward_times(model, [batch], {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed rounds, alternating
    assert set(times) == {"a", "b"} and all(t > 0 for t in times.values())


def test_fusion_trains_its_own_head(tmp_path, fusion_registry):
    """Adapters trained by `unipelt train` for classification carry the head they trained in place
    (`train` at `head`), and `train()` adds one to a fusion spec too. Attaching the fusion froze
    every parameter of the fused adapters, the shared head included, so the fusion's own head was
    silently frozen (report: 'kept' counted it, 'trainable' did not). The fusion's head now trains
    with the fusion layer; the fused adapters' own modules stay frozen."""
    member = {"version": 1, "modules": {"ad": {"method": "adapter", "site": "ffn.res", "width": 4},
                                        "head": {"method": "train", "sites": "head"}}}
    model = make_bert()
    members = {}
    for i, n in enumerate("abc"):
        members[n] = unipelt.compile(model, member, name=n)
        randomize(members[n], seed=20 + i)
    fusion = {"version": 1, "modules": {"head": {"method": "train", "sites": "head"}},
              "combine": {"ffn.res": {"mode": "fusion", "adapters": ["a", "b", "c"]}}}
    fh = unipelt.compile(model, fusion, name="fuse")
    head = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
    assert head and all(p.requires_grad for p in head)
    own = {id(p) for p in head}
    for h in members.values():  # the fused adapters' own modules are frozen
        assert all(not p.requires_grad for p in h.parameters() if id(p) not in own)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == own | {id(p) for p in fh.parameters() if id(p) not in own}
    loss = model(**make_batch(), labels=torch.tensor([0, 1, 2])).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)
    assert all(p.grad is None for h in members.values() for p in h.parameters() if id(p) not in own)
    assert get_state(model).ctx.active == {"fuse"}




def _lm_rows(n: int = 8) -> list:
    from unipelt.data import Example

    return [Example(text=f"the cat number {i} sat on the mat", line=i + 1) for i in range(n)]


@pytest.mark.parametrize("how", ["every gate closed", "budget below any branch"])
def test_pruning_keeps_the_last_branch_to_train(how, prune_plugin):
    """Every gate closed, or a `to_budget` budget below the cheapest branch (`budget: {max_params:
    10}` on a Mistral): pruning switched off every branch and the next step died inside backward
    with a traceback ("element 0 of tensors does not require grad"). The last branch left to train
    is now kept, with one `kept` event saying why; training runs to the end."""
    from unipelt.train import TrainConfig, train

    bias = -12.0 if how == "every gate closed" else 0.0
    spec = {"version": 1, "modules": {
        "lq": {"method": "lora", "sites": ["attn.q"], "r": 2, "gate": {"input": "layer", "init_bias": bias}},
        "lv": {"method": "lora", "sites": ["attn.v"], "r": 2, "gate": {"input": "layer", "init_bias": bias - 1}},
    }, "prune": {"epsilon": 0.01, "patience": 1, "to_budget": how != "every gate closed"}}
    if how != "every gate closed":
        spec["budget"] = {"max_params": 10}
    rep = train(spec, "tiny-llama", _lm_rows(), None, TrainConfig(epochs=1, batch_size=2, lr=1e-2, progress=False))
    assert rep["steps"] == 4
    ev = rep["controllers"]["prune"]["events"]
    pruned, kept = [e for e in ev if e["event"] == "pruned"], [e for e in ev if e["event"] == "kept"]
    assert len(pruned) == 3 and len(kept) == 1  # 2 layers x (q, v): three go, the last stays
    assert "last branch left to train" in kept[0]["reason"] and kept[0]["step"] >= pruned[-1]["step"]
    assert ("budget 10 not reachable" in kept[0]["reason"]) == (how != "every gate closed")
    live = [k for k, e in rep.handle.entries.items() if not e.pruned]
    assert live == [kept[0]["branch"]] and rep["controllers"]["prune"]["active_params"] > 0


def test_drop_lowest_must_leave_a_layer(prune_plugin):
    """`drop: {lowest: 5}` (or 3) on a 3-layer model compiled, then the ranking dropped every layer
    and the next step died inside backward. Refused at compile, naming the field."""
    from unipelt.errors import SpecError

    model, _ = load_model("tiny-llama", task="causal-lm")  # 2 layers
    spec = dict(GATED, drop={"lowest": 2})
    with pytest.raises(SpecError, match=r"drop.lowest: 2 would drop every one of the 2 layer\(s\).*at most 1"):
        unipelt.compile(model, spec)
    assert get_state(model) is None or not get_state(model).handles  # nothing attached
    with pytest.raises(SpecError, match=r"drop.lowest: 2 would drop .* branches of adapter; at most 1"):
        unipelt.compile(model, dict(GATED, drop={"lowest": 2, "modules": ["adapter"]}))
    unipelt.compile(model, dict(GATED, drop={"lowest": 1}))  # one layer left: fine


def test_compile_report_says_training_prunes_toward_the_budget(tmp_path, capsys, prune_plugin):
    """A `to_budget` spec over its budget compiles (training prunes toward it) but the report said
    `budget 7,524 / 3,000 (kept): EXCEEDED`, as for a spec that cannot fit."""
    spec = dict(GATED, prune={"to_budget": True}, budget={"max_params": 300})
    path = tmp_path / "s.json"
    path.write_text(json.dumps(spec))
    assert main(["compile", str(path), "tiny-llama"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("budget"))
    assert "EXCEEDED" not in line and "training prunes the lowest gates toward it" in line and "/ 300 " in line
    assert main(["compile", str(path), "tiny-llama", "--json"]) == 0
    b = json.loads(capsys.readouterr().out)["budget"]
    assert b["to_budget"] is True and b["unprunable"] == 0 and b["used"] > b["limit"] == 300
    # without to_budget the same numbers are refused, and a fitting budget is still OK
    path.write_text(json.dumps(dict(GATED, budget={"max_params": 300})))
    assert main(["compile", str(path), "tiny-llama"]) == 2
    assert "over the budget" in capsys.readouterr().err
    path.write_text(json.dumps(dict(GATED, budget={"max_params": 10**6})))
    assert main(["compile", str(path), "tiny-llama"]) == 0
    assert "): OK" in capsys.readouterr().out


def test_compile_report_shows_the_pruning_and_adapterdrop_rules(tmp_path, capsys, prune_plugin):
    """`unipelt compile` said nothing of a spec's prune: and drop: rules, which decide what training
    switches off; the text and --json reports name them per module, with the layers resolved."""
    path = tmp_path / "s.json"
    path.write_text(json.dumps(dict(GATED, prune={"epsilon": 0.05, "patience": 7, "min_step": 3},
                                    drop={"layers": "0:1", "random": 0.5})))
    assert main(["compile", str(path), "tiny-llama"]) == 0
    out = capsys.readouterr().out.splitlines()
    prune = [x for x in out if x.startswith("pruning")]
    assert prune and all("gate mean < 0.05 for 7 steps from step 3" in x for x in prune), prune
    drop = next(x for x in out if x.startswith("adapterdrop"))
    assert "every module: layers 0" in drop and "probability 0.5" in drop, drop
    assert main(["compile", str(path), "tiny-llama", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["drop"]["layers"] == [0] and r["drop"]["random"] == 0.5
    gated = [m["name"] for m in r["modules"] if m["gate"]]
    assert gated and all(r["prune"][n] == {"epsilon": 0.05, "patience": 7, "min_step": 3, "to_budget": False}
                         for n in gated)
    # no rules: said so, and no adapterdrop line
    path.write_text(json.dumps(GATED))
    assert main(["compile", str(path), "tiny-llama"]) == 0
    out = capsys.readouterr().out
    assert "pruning       none" in out and "adapterdrop" not in out


def test_collapse_does_not_count_the_gates_of_dropped_layers():
    """Collapsing an adapter trained with `drop: {layers: "0:2"}` (AdapterDrop, fixed) printed the
    gates of the dropped layers, which nothing computes, as "still gated"."""
    model, _ = load_model("tiny-llama", task="causal-lm")  # 2 layers
    h = unipelt.compile(model, dict(GATED, drop={"layers": [0]}))
    randomize(h)
    calib = [make_batch(seed=3)]
    rep = h.collapse(calib, spread=0.0, merge=False)  # no gate made constant
    assert rep.constant == {}
    assert sorted(rep.kept_gates) == sorted(k for k in h.graph.gates if k.endswith(".1"))
    assert sorted(rep.stats) == sorted(rep.kept_gates)  # the dropped layer's gates were never computed


def test_collapse_calibrates_a_classifier_on_unlabelled_text(tmp_path, capsys):
    """Calibration needs the model's inputs only, but collapsing a classifier refused a file of
    plain sentences ("missing field 'mood'", exit 5) and one whose labels the adapter never saw."""
    model, _ = load_model("tiny-bert", task="classification", num_labels=2)
    h = unipelt.compile(model, GATED)
    randomize(h)
    record_training_info(h, {"model": "tiny-bert", "task": "classification", "labels": ["neg", "pos"],
                             "fields": {"text": "sentence", "label": "mood", "prompt": "prompt", "response": "response"}})
    h.save(tmp_path / "a")
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"sentence": f"words {i} and more"}) + "\n" for i in range(4)))
    other = tmp_path / "other.csv"
    other.write_text("sentence,mood\nthe soup,angry\nthe view,calm\n")
    for data in (plain, other):
        assert main(["collapse", str(tmp_path / "a"), "--data", str(data), "--out", str(tmp_path / data.stem),
                     "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["examples"] == (4 if data is plain else 2)
        # `unipelt gates` reads the gates on the inputs alone as well (it refused the same files)
        assert main(["gates", str(tmp_path / "a"), "--data", str(data), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["examples"] == (4 if data is plain else 2)
    # a file without the recorded text field is still one clear data error
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"text": "x"}) + "\n")
    assert main(["collapse", str(tmp_path / "a"), "--data", str(wrong), "--out", str(tmp_path / "w")]) == 5
    assert "missing field 'sentence'" in capsys.readouterr().err and not (tmp_path / "w").exists()


def _uni(layers="all", **extra) -> dict:
    """UniPELT (APL) without the prefix MLP (a per-layer prefix is then the same tensor in a model
    built with fewer layers)."""
    s = {"version": 1, "modules": {
        "lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 2, "layers": layers, "gate": {"input": "layer"}},
        "prefix": {"method": "prefix", "sites": "attn.kv", "length": 2, "reparam": "none", "layers": layers,
                   "gate": {"input": "layer"}},
        "adapter": {"method": "adapter", "sites": "ffn.res", "reduction_factor": 4, "layers": layers,
                    "gate": {"input": "site"}},
    }}
    s.update(extra)
    return s


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "qwen2", "gemma"])
def test_lifecycle_on_every_catalogued_architecture(arch, tmp_path, prune_plugin):
    """The lifecycle on each architecture of the catalog the tests build (the other lifecycle
    tests use BERT and Llama): AdapterDrop of layer 0 computes what the adapter built on layer 1
    alone computes; a pruned adapter saves without its branches and reloads to the same outputs;
    a collapsed one (every gate a constant, LoRA merged) reloads, merges the same LoRA and gives
    the collapsed outputs."""
    from conftest import FACTORIES

    make = FACTORIES[arch]
    batch = make_batch()
    model = make()
    h = unipelt.compile(model, _uni())
    randomize(h, std=0.1)
    state = h.state_dict()
    # AdapterDrop (fixed) == the adapter without those layers
    dropped = make()
    d = unipelt.compile(dropped, _uni(drop={"layers": [0]}))
    d.load_state_dict(state)
    only1 = make()
    o = unipelt.compile(only1, _uni(layers=[1]))
    o.load_state_dict({k: v for k, v in state.items() if k in o.state_dict()})
    torch.testing.assert_close(_logits(dropped, batch), _logits(only1, batch), rtol=0, atol=0)
    assert not torch.allclose(_logits(dropped, batch), _logits(model, batch))
    # pruned: saved without the branches, reloaded as pruned with the same outputs
    unipelt.pruning.prune(h, ["lora.1.attn.v", "adapter.0.ffn.res", "prefix.1.attn.kv"])
    pruned_out = _logits(model, batch)
    h.save(tmp_path / "p")
    fresh = make()
    lp = unipelt.load(fresh, tmp_path / "p")
    assert lp.spec.pruned == ["lora.1.attn.v", "adapter.0.ffn.res", "prefix.1.attn.kv"]
    torch.testing.assert_close(_logits(fresh, batch), pruned_out, rtol=1e-5, atol=1e-6)
    # collapsed: every remaining gate constant, LoRA merged; reloaded and merged: the same outputs
    rep = h.collapse([batch], spread=1.0)
    assert rep.merged and not rep.kept_gates
    collapsed_out = _logits(model, batch)
    # collapse measures on real tokens only: at most the unmasked difference
    assert 0 < rep.max_abs_diff <= float((collapsed_out - pruned_out).abs().max()) + 1e-6
    h.save(tmp_path / "c")
    again = make()
    lc = unipelt.load(again, tmp_path / "c")
    assert sorted(lc.merge()["merged"]) == sorted(rep.merged)
    torch.testing.assert_close(_logits(again, batch), collapsed_out, rtol=1e-5, atol=1e-5)


def test_random_drop_alone_drops_nothing_at_inference(tmp_path, prune_plugin):
    """The paper's robust training drops the first n layers at random per step and lets the user
    choose at inference; `drop: {random: true}` was refused ("give exactly one of 'layers' or
    'lowest'") and `layers: []` is not a layer selection, so some layer had to be dropped at
    inference. `random` alone now drops at random in training and nothing at inference."""
    from unipelt.errors import SpecError
    from unipelt.training.optim import collect_controllers

    model = make_bert(layers=3)
    h = unipelt.compile(model, dict(GATED, drop={"random": True}))
    assert not any(e.dropped for e in h.entries.values())
    (c,) = [c for c in collect_controllers(h) if c.name == "adapterdrop"]
    seen = set()
    for step in range(10):
        c.before_step(step)
        now = sorted({e.layer for e in h.entries.values() if e.dropped})
        assert now == list(range(len(now))) and len(now) < 3
        seen.add(len(now))
        c.on_step(step + 1, None)
        assert not any(e.dropped for e in h.entries.values())  # back to nothing dropped
    assert len(seen) > 1
    h.save(tmp_path / "a")
    fresh = make_bert(layers=3)
    loaded = unipelt.load(fresh, tmp_path / "a")
    assert not any(e.dropped for e in loaded.entries.values())
    with pytest.raises(SpecError, match=r"drop: give exactly one of .*or 'random' alone"):
        unipelt.compile(make_bert(layers=3), dict(GATED, drop={"random": False}))


def test_prune_false_exempts_one_module(tmp_path, prune_plugin):
    """`prune:` for the whole spec with `modules.x.prune: false` to keep one module (the README's
    caveat: a gated KV prefix is not zero at a zero gate) was refused: "expected true or a mapping
    of pruning options, got bool False". It now exempts that module, from the epsilon rule and from
    budget pruning (which then counts it as what pruning cannot remove)."""
    from unipelt.errors import SpecError
    from unipelt.train import TrainConfig, train

    spec = {"version": 1, "modules": {
        "lq": {"method": "lora", "sites": ["attn.q"], "r": 2, "gate": {"input": "layer", "init_bias": -12.0},
               "prune": False},
        "lv": {"method": "lora", "sites": ["attn.v"], "r": 2, "gate": {"input": "layer", "init_bias": -12.0}},
    }, "prune": {"epsilon": 0.01, "patience": 1}}
    rep = train(spec, "tiny-llama", _lm_rows(), None, TrainConfig(epochs=1, batch_size=2, lr=1e-2, progress=False))
    assert sorted(rep["controllers"]["prune"]["pruned"]) == ["lv.0.attn.v", "lv.1.attn.v"]  # lq's gates closed too
    # a gate shared with an exempt module is not pruned (its branches go together), whichever
    # module comes first
    for first, second in (("a", "b"), ("b", "a")):
        shared = {"version": 1, "gates": {"g": {"input": "layer", "init_bias": -12.0}}, "modules": {
            first: {"method": "lora", "sites": ["attn.q"], "r": 2, "gate": "g"},
            second: {"method": "lora", "sites": ["attn.v"], "r": 2, "gate": "g"},
            "other": {"method": "lora", "sites": ["attn.k"], "r": 2, "gate": {"input": "layer", "init_bias": -12.0}}},
            "prune": {"patience": 1}}
        shared["modules"]["b"]["prune"] = False
        r = train(shared, "tiny-llama", _lm_rows(), None, TrainConfig(epochs=1, batch_size=2, lr=1e-2, progress=False))
        assert sorted(r["controllers"]["prune"]["pruned"]) == ["other.0.attn.k", "other.1.attn.k"], first
    # budget pruning: the exempt module is what cannot be pruned, and must fit the budget itself
    model, _ = load_model("tiny-llama", task="causal-lm")
    lq_only = unipelt.compile(model, {"version": 1, "modules": {"lq": spec["modules"]["lq"]}}).summary().kept
    over = dict(spec, prune={"to_budget": True}, budget={"max_params": lq_only - 1})
    with pytest.raises(SpecError, match=r"budget"):
        unipelt.compile(load_model("tiny-llama", task="causal-lm")[0], over)
    unipelt.compile(load_model("tiny-llama", task="causal-lm")[0], dict(over, budget={"max_params": lq_only}))
    # the top level still refuses false (nothing to exempt it from: leave `prune:` out)
    with pytest.raises(SpecError, match=r"^.*prune: expected true or a mapping"):
        unipelt.compile(load_model("tiny-llama", task="causal-lm")[0], dict(spec, prune=False))


def test_fusion_over_a_member_pruned_at_one_layer(fusion_registry):
    """A fused adapter whose branch at a layer was pruned (by training) takes no part in that
    layer's attention: the softmax runs over the others there, over all of them elsewhere."""
    member = {"version": 1, "modules": {"ad": {"method": "adapter", "site": "ffn.res", "width": 4,
                                               "gate": {"input": "site"}}}}
    model = make_bert()
    hs = {}
    for i, n in enumerate("abc"):
        hs[n] = unipelt.compile(model, member, name=n)
        randomize(hs[n], seed=30 + i)
    unipelt.pruning.prune(hs["a"], ["ad.0.ffn.res"])
    fh = unipelt.compile(model, {"version": 1, "modules": {},
                                 "combine": {"ffn.res": {"mode": "fusion", "adapters": ["a", "b", "c"]}}}, name="f")
    seen = {}
    for key, layer in fh.branch_modules.items():
        original = layer.fuse

        def spy(query, deltas, _key=key, _original=original):
            seen[_key] = deltas.shape[-2]
            return _original(query, deltas)

        layer.fuse = spy
    with torch.no_grad():
        model(**make_batch())
    assert seen == {"fusion_ffn_res.0.ffn.res": 2, "fusion_ffn_res.1.ffn.res": 3}


@pytest.mark.parametrize("option", [["--closed", "2"], ["--spread", "-0.1"], ["--spread", "nan"],
                                    ["--tolerance", "-1"], ["--max-examples", "0"], ["--batch-size", "0"]])
def test_collapse_refuses_out_of_range_options(tmp_path, capsys, option):
    """`--closed 2` pruned every branch, a negative tolerance refused every collapse after doing
    the work, and `--max-examples 0` meant all examples: usage errors now (exit 2), before any
    model is loaded, and the API refuses the same values."""
    with pytest.raises(SystemExit) as e:
        main(["collapse", str(tmp_path / "a"), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "c"), *option])
    assert e.value.code == 2 and f"argument {option[0]}" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    if option[0] in ("--closed", "--spread", "--tolerance"):
        model, _ = load_model("tiny-llama", task="causal-lm")
        h = unipelt.compile(model, GATED)
        with pytest.raises(ValueError, match=option[0][2:]):
            h.collapse([make_batch()], **{option[0][2:]: float(option[1])})


def test_train_command_says_what_was_pruned_without_progress(tmp_path, capsys, prune_plugin):
    """Pruning events went to the progress output only: `unipelt train --no-progress` said nothing
    of the pruned branches (nor of AdapterDrop's ranked choice) outside report.json."""
    spec = {"version": 1, "modules": {
        "lq": {"method": "lora", "sites": ["attn.q"], "r": 2, "gate": {"input": "layer", "init_bias": 2.0}},
        "lv": {"method": "lora", "sites": ["attn.v"], "r": 2, "gate": {"input": "layer", "init_bias": -12.0}},
    }, "prune": {"patience": 1}, "drop": {"lowest": 1, "rank_steps": 2}}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(spec))
    data = _qa_files(tmp_path)
    code = main(["train", str(path), "tiny-llama", "--data", str(data), "--prompt-field", "question",
                 "--response-field", "answer", "--max-steps", "3", "--batch-size", "2", "--out", str(tmp_path / "r"),
                 "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0
    line = next(x for x in text.splitlines() if x.startswith("pruned"))
    assert "2 branch(es) during training" in line and "lv.0.attn.v, lv.1.attn.v" in line
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    layers = report["controllers"]["adapterdrop"]["inference_layers"]
    assert len(layers) == 1 and f"adapterdrop   layers {layers[0]} dropped at inference" in text


def test_drop_of_every_branch_is_refused():
    """`drop: {layers: all}` compiled, and `unipelt train` then died inside backward with a
    traceback: refused at compile, naming drop.layers; the model is left as it was."""
    from conftest import Snapshot
    from unipelt.errors import SpecError

    model, _ = load_model("tiny-llama", task="causal-lm")
    snap = Snapshot(model)
    with pytest.raises(SpecError, match=r"drop.layers: drops every branch of the adapter"):
        unipelt.compile(model, dict(GATED, drop={"layers": "all"}))
    snap.assert_same()
    # every layer of one module only, or of every module but a head that still trains: fine
    unipelt.compile(model, dict(GATED, drop={"layers": "all", "modules": ["adapter"]}), name="a")
    bert = make_bert()
    unipelt.compile(bert, {"version": 1, "modules": {**GATED["modules"], "head": {"method": "train", "sites": "head"}},
                           "drop": {"layers": "all"}})
