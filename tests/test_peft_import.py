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
    drops a caller's position_ids); unipelt's prefix takes no position. Given PEFT's positions,
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


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_round_trip_through_peft_is_exact(tmp_path, family):
    from unipelt.export import export_peft

    factory = make_llama if family == "llama" else make_bert
    modules = {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4, "alpha": 8}}
    if family == "bert":
        modules["head"] = {"method": "train", "site": "head"}
    from unipelt.models import load_model

    # export loads the base by name (for its module paths): a built-in tiny model
    name = "tiny-llama" if family == "llama" else "tiny-bert"
    base, _ = load_model(name, task="classification" if family == "bert" else None,
                         num_labels=2 if family == "bert" else None)
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
