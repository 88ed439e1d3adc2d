"""PEFT adapters in (unipelt.peft_import): HF PEFT 0.21 as the oracle. A PEFT model is built on a
tiny model with random (non-identity) weights, saved, then read by ``unipelt.load(model, dir)``
and ``unipelt import-peft``: the logits must be PEFT's. The unipelt -> PEFT -> unipelt round trip
is exact. Bad input is one AdapterFileError naming the file and the field."""
from __future__ import annotations

import json

import pytest
import torch

import unipelt
from conftest import logits, make_batch, make_bert, make_gpt2, make_llama, randomize
from unipelt.errors import AdapterFileError

peft = pytest.importorskip("peft")


def _peft_lora(factory, tmp_path, **cfg):
    model = factory()
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, lora_dropout=0.0, **cfg))
    with torch.no_grad():  # every factor non-zero (init_lora_weights=False already draws B too)
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.mul_(3.0)
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    return pm, tmp_path / "peft"


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_llama_with_rank_and_alpha_patterns(tmp_path, rslora):
    batch = make_batch()
    pm, d = _peft_lora(make_llama, tmp_path, r=4, lora_alpha=8, use_rslora=rslora,
                       target_modules=["q_proj", "v_proj", "down_proj", "gate_proj"],
                       rank_pattern={"down_proj": 2}, alpha_pattern={"model.layers.1.self_attn.q_proj": 3})
    expect = logits(pm, batch)
    fresh = make_llama()
    h = unipelt.load(fresh, d)
    assert torch.allclose(logits(fresh, batch), expect, atol=1e-5)
    by_site = {(bp.site.layer, bp.site.site): h.branch_modules[bp.key] for bp in h.graph.branches}
    assert {k[1] for k in by_site} == {"attn.q", "attn.v", "ffn.down", "ffn.gate"}
    assert by_site[(0, "ffn.down")].r == 2 and by_site[(0, "attn.q")].r == 4  # rank_pattern
    s = (lambda a, r: a / r ** 0.5) if rslora else (lambda a, r: a / r)
    assert by_site[(1, "attn.q")].scale == pytest.approx(s(3, 4))  # alpha_pattern on one module
    assert by_site[(0, "attn.q")].scale == pytest.approx(s(8, 4))
    h.merge()  # an imported LoRA merges like any other
    assert torch.allclose(logits(fresh, batch), expect, atol=1e-4)


def test_lora_gpt2_fused_c_attn(tmp_path):
    """PEFT's LoRA on GPT-2's fused c_attn (a Conv1D, fan_in_fan_out) is one LoRA over q, k and v:
    each unipelt slice gets A and its rows of B."""
    batch = make_batch()
    pm, d = _peft_lora(make_gpt2, tmp_path, r=4, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    fresh = make_gpt2()
    h = unipelt.load(fresh, d)
    assert torch.allclose(logits(fresh, batch), logits(pm, batch), atol=1e-5)
    assert {bp.site.site for bp in h.graph.branches} == {"attn.q", "attn.k", "attn.v", "attn.o", "ffn.down"}


def test_lora_bert_classifier_with_head(tmp_path):
    batch = make_batch()
    pm, d = _peft_lora(make_bert, tmp_path, r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    with torch.no_grad():
        expect = pm(**batch).logits
    fresh = make_bert()
    with torch.no_grad():  # another head: the saved one must be used
        fresh.classifier.weight.normal_()
    h = unipelt.load(fresh, d)
    assert "head" in h.spec.modules
    assert torch.allclose(logits(fresh, batch), expect, atol=1e-5)


def test_prompt_tuning_llama(tmp_path):
    batch = make_batch()
    pm = peft.get_peft_model(make_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expect = pm(**batch).logits
    fresh = make_llama()
    unipelt.load(fresh, tmp_path / "peft")
    got = logits(fresh, batch)
    # PEFT returns the virtual positions' logits too; compare the input's
    assert torch.allclose(got[:, -batch["input_ids"].shape[1]:], expect[:, -batch["input_ids"].shape[1]:], atol=1e-5)


@pytest.mark.parametrize("factory", [make_llama, make_gpt2])
def test_prefix_tuning(tmp_path, factory):
    """PEFT's prefix sits in the KV cache, so its real tokens take positions L..L+T-1 (and PEFT
    adds L to a caller's position_ids); unipelt's prefix takes no position. Given PEFT's positions,
    the imported prefix computes PEFT's logits: the keys and values are in the right places."""
    batch = make_batch()
    pm = peft.get_peft_model(factory(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expect = pm(**batch).logits
    fresh = factory()
    unipelt.load(fresh, tmp_path / "peft")
    B, T = batch["input_ids"].shape
    with torch.no_grad():
        got = fresh(**batch, position_ids=(3 + torch.arange(T)).expand(B, T)).logits
        plain = fresh(**batch).logits
    assert torch.allclose(got, expect, atol=1e-5)
    assert not torch.allclose(plain, expect, atol=1e-3)  # the positions are the whole difference


def _round_trip(tmp_path, family: str, method_module: dict):
    """``method_module`` (+ the head on BERT) on a built-in tiny model, randomised -> saved ->
    export --format peft -> unipelt.load: asserts the same tensors under the same names and the
    same logits; returns (model name, classifier?, input ids, the adapter's logits), for more
    checks of the export in tmp_path/"peft"."""
    from unipelt.export import export_peft
    from unipelt.models import load_model

    # export loads the base by name (for its module paths): a built-in tiny model
    name = "tiny-llama" if family == "llama" else "tiny-bert"
    cls = family == "bert"
    modules = dict(method_module)
    if cls:
        modules["head"] = {"method": "train", "site": "head"}
    base, _ = load_model(name, task="classification" if cls else None, num_labels=2 if cls else None)
    h = unipelt.compile(base, {"modules": modules})
    randomize(h)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expect = base(input_ids=ids).logits
    ours = {k: v.clone() for k, v in h.state_dict().items()}
    h.save(tmp_path / "ours")
    h.detach()
    export_peft(tmp_path / "ours", tmp_path / "peft", model=name)
    back = unipelt.load(base, tmp_path / "peft")
    theirs = back.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, expect)
    back.detach()
    return name, cls, ids, expect


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_round_trip_through_peft_is_exact(tmp_path, family):
    _round_trip(tmp_path, family, {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4, "alpha": 8}})


def test_cli_import_peft(tmp_path, capsys):
    from unipelt.cli import main
    from unipelt.models import load_model

    base, _ = load_model("tiny-llama")
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "tiny-llama"
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(cfg))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expect = pm(input_ids=ids).logits
    assert main(["import-peft", str(tmp_path / "peft"), "--out", str(tmp_path / "ours")]) == 0
    fresh, _ = load_model("tiny-llama")
    unipelt.load(fresh, tmp_path / "ours")
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, expect, atol=1e-5)


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------
def _lora_dir(tmp_path):
    _, d = _peft_lora(make_llama, tmp_path, r=2, lora_alpha=4, target_modules=["q_proj"])
    return d


def _edit_config(d, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def test_unknown_type_and_refused_options(tmp_path):
    d = _lora_dir(tmp_path)
    model = make_llama()
    _edit_config(d, peft_type="NOT_A_TYPE")
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: field 'peft_type': 'NOT_A_TYPE' cannot be"):
        unipelt.load(model, d)
    _edit_config(d, peft_type="LORA", use_dora=True)
    with pytest.raises(AdapterFileError, match="field 'use_dora'"):
        unipelt.load(model, d)
    _edit_config(d, use_dora=False, init_lora_weights="pissa")
    with pytest.raises(AdapterFileError, match="field 'init_lora_weights'.*path_initial_model_for_weight_conversion"):
        unipelt.load(model, d)
    assert unipelt.compiler.get_state(model) is None  # nothing attached


def test_target_module_not_in_model_and_shape_mismatch(tmp_path):
    from safetensors.torch import load_file, save_file

    d = _lora_dir(tmp_path)
    w = d / "adapter_model.safetensors"
    t = load_file(str(w))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    renamed = {k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.nope"): v for k, v in t.items()}
    save_file(renamed, str(w))
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors: tensor '.*nope.lora_A.weight': module "
                                               r"'model.layers.0.self_attn.nope' is not a linear hook point"):
        unipelt.load(make_llama(), d)
    bad = dict(t)
    bad[key] = torch.zeros(2, 31)
    save_file(bad, str(w))
    with pytest.raises(AdapterFileError, match=r"tensor '.*q_proj.lora_A.weight': shapes A \(2, 31\)"):
        unipelt.load(make_llama(), d)
    # a model of another width: the same error
    save_file(t, str(w))
    with pytest.raises(AdapterFileError, match="do not fit"):
        unipelt.load(make_llama(hidden=64), d)


def test_corrupt_files(tmp_path):
    d = _lora_dir(tmp_path)
    (d / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors: corrupt or unreadable"):
        unipelt.load(make_llama(), d)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: corrupt JSON"):
        unipelt.load(make_llama(), d)
    (d / "adapter_config.json").write_text(json.dumps({"r": 2}))
    with pytest.raises(AdapterFileError, match="field 'peft_type': missing"):
        unipelt.load(make_llama(), d)


# ------------------------------------------------------------------------------------------
# IA3 (plugins/ia3.py's translator): PEFT's IA3 model is the oracle
# ------------------------------------------------------------------------------------------
# PEFT's targets for unipelt's attn.k, attn.v, ffn.down (feedforward: the input side)
IA3_PEFT = {
    "llama": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    # a regex (full match): BERT's attention.output.dense is attn.o, the layer's output.dense ffn.down
    "bert": dict(target_modules=r".*\.(key|value)|.*layer\.\d+\.output\.dense",
                 feedforward_modules=r".*layer\.\d+\.output\.dense"),
    # the fused c_attn: PEFT scales all of q, k, v
    "gpt2": dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
}
FACTORIES = {"llama": make_llama, "bert": make_bert, "gpt2": make_gpt2}


def _peft_ia3(family, tmp_path, **extra):
    pm = peft.get_peft_model(FACTORIES[family](), peft.IA3Config(**IA3_PEFT[family], **extra))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # vectors away from their initial 1
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    return pm, tmp_path / "peft"


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_ia3_equals_peft(tmp_path, family):
    batch = make_batch()
    task = {"task_type": "SEQ_CLS"} if family == "bert" else {}
    pm, d = _peft_ia3(family, tmp_path, **task)
    with torch.no_grad():
        expect = pm(**batch).logits
    fresh = FACTORIES[family]()
    if family == "bert":
        with torch.no_grad():  # another head: the saved one must be used
            fresh.classifier.weight.normal_()
    h = unipelt.load(fresh, d)
    assert torch.allclose(logits(fresh, batch), expect, atol=1e-5)
    ia3 = [bp for bp in h.graph.branches if bp.node.method == "ia3"]
    sides = {(bp.site.site, h.branch_modules[bp.key].side) for bp in ia3}
    want = {"llama": {("attn.k", "output"), ("attn.v", "output"), ("ffn.down", "input")},
            "bert": {("attn.k", "output"), ("attn.v", "output"), ("ffn.down", "input")},
            "gpt2": {("attn.q", "output"), ("attn.k", "output"), ("attn.v", "output"), ("ffn.down", "input")}}
    assert sides == want[family]
    if family != "gpt2":  # every side is what auto gives: one node, as specs/ia3.yaml
        assert h.spec.modules["ia3"].config.side == "auto"
    assert ("head" in h.spec.modules) == (family == "bert")
    # and merged, PEFT's merged model (rows with the bias for k/v, columns for ffn.down)
    h.merge()
    assert torch.allclose(logits(fresh, batch), expect, atol=1e-4)


def test_ia3_feedforward_side_not_the_default(tmp_path):
    """A module PEFT treats as feedforward that unipelt's auto would scale at the output (q_proj
    here) keeps PEFT's side: written explicitly in the spec."""
    batch = make_batch()
    pm = peft.get_peft_model(make_llama(), peft.IA3Config(target_modules=["q_proj", "down_proj"],
                                                          feedforward_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.mul_(torch.linspace(0.5, 1.5, p.numel()).view(p.shape))
    pm.eval().save_pretrained(tmp_path / "peft")
    fresh = make_llama()
    h = unipelt.load(fresh, tmp_path / "peft")
    assert torch.allclose(logits(fresh, batch), logits(pm, batch), atol=1e-5)
    sides = {bp.site.site: (h.branch_modules[bp.key].side, bp.node.config.side) for bp in h.graph.branches}
    assert sides == {"attn.q": ("input", "input"), "ffn.down": ("output", "output")}


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_ia3_round_trip_through_peft_is_exact(tmp_path, family):
    """specs/ia3.yaml's adapter -> export --format peft (PEFT's IA3 format) -> unipelt: the same
    tensors under the same names, and PEFT loading the export computes unipelt's logits."""
    from unipelt.models import load_model

    name, cls, ids, expect = _round_trip(tmp_path, family,
                                         {"ia3": {"method": "ia3", "sites": ["attn.k", "attn.v", "ffn.down"]}})
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3"
    # PEFT itself reads the export: the oracle for the format
    fresh, _ = load_model(name, task="classification" if cls else None, num_labels=2 if cls else None)
    pm = peft.PeftModel.from_pretrained(fresh, tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, expect, atol=1e-5, rtol=1e-5)


def test_ia3_bad_input(tmp_path):
    from safetensors.torch import load_file, save_file

    _, d = _peft_ia3("llama", tmp_path)
    w = d / "adapter_model.safetensors"
    t = load_file(str(w))
    key = "base_model.model.model.layers.0.mlp.down_proj.ia3_l"
    assert t[key].shape[0] == 1  # PEFT's feedforward vector is (1, d_in)
    bad = dict(t)
    bad[key] = t[key].reshape(-1, 1)  # the output side's shape on an input-side module
    save_file(bad, str(w))
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors: tensor '.*down_proj\.ia3_l': shape "
                                               r"\(64, 1\) is not \(1, 64\), the input \(feedforward_modules\) side of .*\(64 -> 32\)"):
        unipelt.load(make_llama(), d)
    bad = {k.replace("layers.0.self_attn.k_proj", "layers.0.self_attn.nope"): v for k, v in t.items()}
    save_file(bad, str(w))
    with pytest.raises(AdapterFileError, match=r"tensor '.*nope\.ia3_l': module 'model\.layers\.0\.self_attn\.nope' "
                                               r"is not a linear hook point"):
        unipelt.load(make_llama(), d)
    save_file(t, str(w))
    _edit_config(d, feedforward_modules=5)
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: field 'feedforward_modules': int"):
        unipelt.load(make_llama(), d)
    model = make_llama()
    _edit_config(d, feedforward_modules=["down_proj"])
    unipelt.load(model, d).detach()  # the restored file loads


def test_ia3_gpt2_fused_input_side_refused(tmp_path):
    pm = peft.get_peft_model(make_gpt2(), peft.IA3Config(target_modules=["c_attn"], feedforward_modules=["c_attn"]))
    pm.save_pretrained(tmp_path / "peft")
    model = make_gpt2()
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: field 'feedforward_modules': .*c_attn.*"
                                               r"shared"):
        unipelt.load(model, tmp_path / "peft")
    assert unipelt.compiler.get_state(model) is None


def test_ia3_export_gpt2_fused_slices(tmp_path):
    """IA3 on GPT-2's k and v slices of c_attn: one PEFT vector for the fused module, 1 on the
    q rows; PEFT computes unipelt's logits, and imported back each slice gets its part (q at 1)."""
    from unipelt.export import export_peft
    from unipelt.models import load_model

    base, _ = load_model("tiny-gpt2")
    h = unipelt.compile(base, {"modules": {"ia3": {"method": "ia3", "sites": ["attn.k", "attn.v", "ffn.down"]}}})
    randomize(h)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expect = base(input_ids=ids).logits
    h.save(tmp_path / "ours")
    h.detach()
    export_peft(tmp_path / "ours", tmp_path / "peft", model="tiny-gpt2")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and all(p.endswith("mlp.c_proj") for p in cfg["feedforward_modules"])
    fresh, _ = load_model("tiny-gpt2")
    pm = peft.PeftModel.from_pretrained(fresh, tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, expect, atol=1e-5, rtol=1e-5)
    back = unipelt.load(base, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, expect, atol=1e-6, rtol=1e-6)
    q = [back.branch_modules[bp.key].ia3_l for bp in back.graph.branches if bp.site.site == "attn.q"]
    assert q and all(torch.equal(v, torch.ones_like(v)) for v in q)


def test_adapter_loaded_onto_an_eval_model_runs_no_dropout(tmp_path):
    """A PEFT LoRA trained with lora_dropout, loaded onto a base in eval mode: PEFT's from_pretrained
    output, deterministic. The adapter's new modules once started in training mode whatever the
    model's, so the eval model dropped inputs of A (0.48 off PEFT on all-linear, and two forwards
    differed); train() turns the dropout on again."""
    pm = peft.get_peft_model(make_llama(), peft.LoraConfig(r=3, lora_alpha=5, use_rslora=True, lora_dropout=0.3,
                                                           target_modules="all-linear", init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    batch = make_batch()
    theirs = peft.PeftModel.from_pretrained(make_llama(), tmp_path / "peft")
    fresh = make_llama()
    unipelt.load(fresh, tmp_path / "peft")
    assert not fresh.training
    with torch.no_grad():
        first = fresh(**batch).logits
        assert torch.equal(fresh(**batch).logits, first)
        assert torch.allclose(first, theirs(**batch).logits, atol=1e-5)
        fresh.train()
        assert not torch.allclose(fresh(**batch).logits, first, atol=1e-3)
    # compile follows the model's mode too
    model = make_llama().train()
    h = unipelt.compile(model, {"modules": {"l": {"method": "lora", "site": "attn.q", "r": 2, "dropout": 0.3}}})
    assert all(m.training for m in h.branch_modules.values())


def test_prefix_tuning_for_sequence_classification_with_its_head(tmp_path):
    """PEFT's SEQ_CLS prefix saves the classifier (modules_to_save) next to prompt_embeddings, under
    ``base_model.<path>`` (once refused as a second tensor): the head becomes ``train`` at ``head``;
    given PEFT's positions (after the prefix), PEFT's logits."""
    pm = peft.get_peft_model(make_bert(), peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    batch = make_batch()
    with torch.no_grad():
        expect = pm(**batch).logits
    fresh = make_bert()
    h = unipelt.load(fresh, tmp_path / "peft")
    assert set(h.spec.modules) == {"prefix", "head"}
    B, T = batch["input_ids"].shape
    with torch.no_grad():
        got = fresh(**batch, position_ids=(3 + torch.arange(T)).expand(B, T)).logits
    assert torch.allclose(got, expect, atol=1e-5)
    # a tensor that is neither the prompt nor the head is still refused, naming it
    from safetensors.torch import load_file, save_file

    w = tmp_path / "peft" / "adapter_model.safetensors"
    t = load_file(str(w))
    t["base_model.bert.pooler.dense.weight"] = torch.zeros(32, 32)
    save_file(t, str(w))
    with pytest.raises(AdapterFileError, match=r"tensor 'base_model\.bert\.pooler\.dense\.weight': a prompt-learning"):
        unipelt.load(make_bert(), tmp_path / "peft")


# PEFT's DoRA (a LORA adapter with use_dora): once refused; the DoRA plugin's translator reads it
DORA_CASES = {
    "llama": (make_llama, dict(r=3, lora_alpha=5, use_rslora=True, target_modules="all-linear",
                               rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 7})),
    # the fused c_attn: one A, B and magnitude over q, k, v, split into the slices' rows
    "gpt2": (make_gpt2, dict(r=2, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True)),
    "bert": (make_bert, dict(r=2, target_modules=["query", "value", "output.dense"], modules_to_save=["classifier"],
                             task_type="SEQ_CLS")),
}


def _peft_dora_dir(tmp_path, family):
    factory, cfg = DORA_CASES[family]
    pm = peft.get_peft_model(factory(), peft.LoraConfig(use_dora=True, lora_dropout=0.0, **cfg))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every trainable tensor moved off its init (magnitudes too)
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    return factory, pm, tmp_path / "peft"


@pytest.mark.parametrize("family", list(DORA_CASES))
def test_dora_equals_peft(tmp_path, family):
    factory, pm, d = _peft_dora_dir(tmp_path, family)
    batch = make_batch()
    fresh = factory()
    h = unipelt.load(fresh, d)
    assert {n.method for n in h.spec.modules.values()} == ({"dora", "train"} if family == "bert" else {"dora"})
    with torch.no_grad():
        assert torch.allclose(fresh(**batch).logits, pm(**batch).logits, atol=1e-5)


def test_dora_bad_input(tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, d = _peft_dora_dir(tmp_path, "llama")
    w = d / "adapter_model.safetensors"
    good = load_file(str(w))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    save_file({**good, key: good[key][:5]}, str(w))
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors: tensor '.*q_proj\.lora_magnitude_vector': "
                                               r"shape \(5,\)"):
        unipelt.load(make_llama(), d)
    stray = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file({k: v for k, v in good.items() if not k.startswith(stray.rsplit(".lora_A", 1)[0] + ".lora_")
               or k == key}, str(w))
    with pytest.raises(AdapterFileError, match="a DoRA magnitude without its LoRA factors"):
        unipelt.load(make_llama(), d)
    model = make_llama()
    save_file({k: v for k, v in good.items() if k != key}, str(w))
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: field 'use_dora': true, but .*q_proj"):
        unipelt.load(model, d)
    assert unipelt.compiler.get_state(model) is None


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_dora_round_trip_through_peft_is_exact(tmp_path, family):
    """unipelt DoRA -> PEFT (LORA with use_dora; once refused) -> unipelt: the same tensors, and
    PEFT itself computes unipelt's logits from the export."""
    from unipelt.models import load_model

    name, cls, ids, expect = _round_trip(tmp_path, family, {
        "dora": {"method": "dora", "sites": ["attn.q", "attn.v", "ffn.down"], "r": 3, "alpha": 5, "rslora": True}})
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["use_rslora"] is True
    fresh, _ = load_model(name, task="classification" if cls else None, num_labels=2 if cls else None)
    pm = peft.PeftModel.from_pretrained(fresh, tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, expect, atol=1e-5, rtol=1e-5)


def test_dora_export_gpt2_fused_slices_and_refusals(tmp_path):
    """DoRA on GPT-2's q and v slices: one PEFT DoRA on c_attn (A stacked, B block-placed, each
    slice's magnitude in its rows, ‖W0_i‖ on the k rows): PEFT's logits are unipelt's. DoRA mixed
    with LoRA, or two DoRA modules on the same rows, have no PEFT form."""
    from unipelt.export import ExportError, export_peft
    from unipelt.models import load_model

    base, _ = load_model("tiny-gpt2")
    h = unipelt.compile(base, {"modules": {"dora": {"method": "dora", "sites": ["attn.q", "attn.v", "ffn.down"],
                                                    "r": 2, "alpha": 4}}})
    randomize(h, std=0.2)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expect = base(input_ids=ids).logits
    h.save(tmp_path / "ours")
    h.detach()
    export_peft(tmp_path / "ours", tmp_path / "peft", model="tiny-gpt2")
    fresh, _ = load_model("tiny-gpt2")
    pm = peft.PeftModel.from_pretrained(fresh, tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, expect, atol=1e-5, rtol=1e-5)
    for i, modules in enumerate([
        {"a": {"method": "dora", "site": "attn.q", "r": 2}, "b": {"method": "lora", "site": "attn.v", "r": 2}},
        {"a": {"method": "dora", "site": "attn.k", "r": 2}, "b": {"method": "dora", "site": "attn.k", "r": 2}},
    ]):
        base, _ = load_model("tiny-gpt2")
        h = unipelt.compile(base, {"modules": modules})
        h.save(tmp_path / f"bad{i}")
        h.detach()
        with pytest.raises(ExportError, match="use_dora is one flag" if i == 0 else "two DoRA modules at"):
            export_peft(tmp_path / f"bad{i}", tmp_path / f"out{i}", model="tiny-gpt2")
        assert not (tmp_path / f"out{i}").exists()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_prompt_round_trip_through_peft_is_exact(tmp_path, name):
    """A prompt on a decoder exported as PEFT's prompt tuning (once refused): PEFT's from_pretrained
    computes unipelt's logits on a right-padded batch, and imported back the tensor is the same."""
    from unipelt.export import export_peft
    from unipelt.models import load_model

    base, _ = load_model(name)
    h = unipelt.compile(base, {"modules": {"p": {"method": "prompt", "length": 5}}})
    randomize(h)
    batch = make_batch(length=6)
    with torch.no_grad():
        expect = base(**batch).logits
    ours = {k: v.clone() for k, v in h.state_dict().items()}
    h.save(tmp_path / "ours")
    h.detach()
    export_peft(tmp_path / "ours", tmp_path / "peft", model=name)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["num_virtual_tokens"]) == ("PROMPT_TUNING", 5)
    fresh, _ = load_model(name)
    pm = peft.PeftModel.from_pretrained(fresh, tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(**batch).logits, expect, atol=1e-5, rtol=1e-5)
    back = unipelt.load(base, tmp_path / "peft")
    theirs = back.state_dict()
    assert theirs.keys() == {"prompt.embed.embedding"} and torch.equal(theirs["prompt.embed.embedding"],
                                                                       next(iter(ours.values())))


def test_prompt_on_an_encoder_and_prefix_are_not_exported(tmp_path):
    from unipelt.export import ExportError, export_peft
    from unipelt.models import load_model

    for i, (name, node) in enumerate([("tiny-bert", {"method": "prompt", "length": 3}),
                                      ("tiny-llama", {"method": "prefix", "length": 3, "reparam": "none"})]):
        base, _ = load_model(name)
        h = unipelt.compile(base, {"modules": {"p": node}})
        h.save(tmp_path / f"a{i}")
        h.detach()
        with pytest.raises(ExportError, match="after \\[CLS\\], PEFT before it" if i == 0 else "positions L"):
            export_peft(tmp_path / f"a{i}", tmp_path / f"out{i}", model=name)
        assert not (tmp_path / f"out{i}").exists()


@pytest.mark.parametrize("field,value", [
    ("alora_invocation_tokens", [5, 6]), ("use_qalora", True), ("layer_replication", [[0, 2], [1, 2]]),
    ("use_bdlora", {"nblocks": 2}), ("lora_bias", True), ("kasa_config", {}), ("init_lora_weights", "lora_ga"),
])
def test_lora_variants_with_another_function_are_refused(tmp_path, field, value):
    """PEFT 0.21 LoRA variants whose factors compute something else than W0·x + s·B·A·x (activated
    LoRA, QA-LoRA, replicated layers, BD-LoRA, B's bias, a base rewritten by LoRA-GA) were read as a
    plain LoRA, silently: each is one error naming the field ({} counts as set: PEFT's default is None)."""
    d = _lora_dir(tmp_path)
    _edit_config(d, **{field: value})
    model = make_llama()
    with pytest.raises(AdapterFileError, match=rf"adapter_config\.json: field '{field}'"):
        unipelt.load(model, d)
    assert unipelt.compiler.get_state(model) is None


def test_eva_initialised_lora_imports(tmp_path):
    """EVA initialises A from activations with B = 0 and leaves the base weight alone: its saved
    adapter is a plain LoRA on the unmodified base (it was refused as a rewritten base)."""
    pm, d = _peft_lora(make_llama, tmp_path, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    _edit_config(d, init_lora_weights="eva")
    fresh = make_llama()
    unipelt.load(fresh, d)
    batch = make_batch()
    with torch.no_grad():
        assert torch.allclose(fresh(**batch).logits, pm(**batch).logits, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama-tied"])
def test_tied_output_head_under_modules_to_save_is_refused(tmp_path, family):
    """modules_to_save = [lm_head] on a model whose head is tied to the input embeddings (GPT-2,
    Gemma, SmolLM2): PEFT trains a copy, so its input embeddings keep their values; read into the
    tied weight (unipelt's train at head) it changed the input embeddings too (logits 2-3x off
    PEFT's, LoRA or IA3). Refused, naming the field; an untied head still imports (Llama)."""
    factory = make_gpt2 if family == "gpt2" else (lambda: make_llama(tie_word_embeddings=True))
    target = ["c_attn"] if family == "gpt2" else ["q_proj"]
    _, d = _peft_lora(factory, tmp_path, r=2, target_modules=target, modules_to_save=["lm_head"],
                      fan_in_fan_out=family == "gpt2")
    model = factory()
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: field 'modules_to_save': 'lm_head' shares its "
                                               r"weight with the input embeddings"):
        unipelt.load(model, d)
    assert unipelt.compiler.get_state(model) is None
    from safetensors.torch import load_file, save_file

    _, d2 = _peft_lora(make_llama, tmp_path / "untied", r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    w = d2 / "adapter_model.safetensors"
    t = load_file(str(w))
    t["base_model.model.lm_head.weight"] = t["base_model.model.lm_head.weight"] * 1.5  # a trained head
    save_file(t, str(w))
    theirs = peft.PeftModel.from_pretrained(make_llama(), d2).eval()
    fresh = make_llama()
    h = unipelt.load(fresh, d2)
    assert "head" in h.spec.modules
    batch = make_batch()
    with torch.no_grad():
        expect = theirs(**batch).logits
        assert not torch.allclose(expect, make_llama()(**batch).logits, atol=1e-3)
        assert torch.allclose(fresh(**batch).logits, expect, atol=1e-5)


def test_export_of_a_head_tied_to_the_input_embeddings_is_refused(tmp_path):
    """train at head on GPT-2 trains lm_head's weight, which is also the input embedding; PEFT's
    modules_to_save loads it as an untied copy (PEFT's logits were 1.1x off unipelt's): refused."""
    from unipelt.export import ExportError, export_peft
    from unipelt.models import load_model

    base, _ = load_model("tiny-gpt2")
    h = unipelt.compile(base, {"modules": {"l": {"method": "lora", "site": "attn.q", "r": 2},
                                           "head": {"method": "train", "site": "head"}}})
    h.save(tmp_path / "ours")
    h.detach()
    with pytest.raises(ExportError, match=r"ours: the module at head \(lm_head\) trained the weight this model ties"):
        export_peft(tmp_path / "ours", tmp_path / "peft", model="tiny-gpt2")
    assert not (tmp_path / "peft").exists()
