"""Parameter counts on a BERT-base-shaped model (12 layers, d=768) against the published numbers
(METHODS.md, "Exact counts on BERT-base"), and budget enforcement.

The model is built on the meta device: shapes without storage, so BERT-base costs nothing.
"""
from __future__ import annotations

import pytest
import torch

import unipelt
from conftest import Snapshot

D, LAYERS = 768, 12


@pytest.fixture
def bert_base():
    from transformers import BertConfig, BertForSequenceClassification

    with torch.device("meta"):
        return BertForSequenceClassification(BertConfig())


LORA = {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 8}
PFEIFFER = {"method": "adapter", "site": "ffn.res", "reduction_factor": 16}


def test_lora_qv_r8(bert_base):
    h = unipelt.compile(bert_base, {"modules": {"lora": LORA}})
    s = h.summary()
    # per layer and projection: A (8 x 768) + B (768 x 8)
    assert s.kept == s.training == 294_912 == LAYERS * 2 * (8 * D + D * 8)
    assert s.per_module() == {"lora": {"kept": 294_912, "training": 294_912}}
    assert sum(p.numel() for p in h.parameters()) == 294_912


def test_pfeiffer_m48(bert_base):
    h = unipelt.compile(bert_base, {"modules": {"adapter": PFEIFFER}})
    s = h.summary()
    # m = 768 / 16 = 48: down (768x48 + 48) + up (48x768 + 768) per layer
    assert s.kept == 894_528 == LAYERS * (D * 48 + 48 + 48 * D + D)
    assert h.named_parameters()["adapter.0.ffn.res.down.weight"].shape == (48, D)


def test_four_gates(bert_base):
    """UniPELT's gates as the reference counts them (``adapters``' UniPELTConfig): one
    Linear(768, 1) per gated module, and every LoRA-wrapped projection is a module of its own:
    LoRA q, LoRA v, prefix and adapter, 12·4·769 = 36,912."""
    h = unipelt.compile(bert_base, {"modules": {
        "lora": {**LORA, "gate": True},
        "prefix": {"method": "prefix", "length": 10, "gate": True},
        "adapter": {**PFEIFFER, "gate": True},
    }})
    s = h.summary()
    gate_total = sum(g["params"] for g in s.gates)
    assert gate_total == 36_912 == LAYERS * 4 * (D + 1)
    modules = s.per_module()
    assert {k: v["kept"] for k, v in modules.items() if k.startswith("gate:")} == {
        "gate:lora@attn.q": 9_228, "gate:lora@attn.v": 9_228, "gate:prefix": 9_228, "gate:adapter": 9_228,
    }
    assert len(s.gates) == 48
    # APL kept total (METHODS.md): LoRA 294,912 + adapter 894,528 + prefix 184,320 + gates 36,912
    assert s.kept == 1_410_672 == 294_912 + 894_528 + LAYERS * 2 * 10 * D + 36_912


def test_shared_lora_gate_is_an_option(bert_base):
    """Sharing one gate between q and v (a named shared gate): 12·3·769 = 27,684 gate parameters."""
    h = unipelt.compile(bert_base, {
        "modules": {"lora": {**LORA, "gate": "g_lora"}, "prefix": {"method": "prefix", "length": 10, "gate": True},
                    "adapter": {**PFEIFFER, "gate": True}},
        "gates": {"g_lora": {"input": "layer"}},
    })
    s = h.summary()
    assert sum(g["params"] for g in s.gates) == 27_684 == LAYERS * 3 * (D + 1)
    assert s.kept == 1_401_444


def test_shipped_unipelt_spec_counts(bert_base):
    """specs/unipelt.yaml on BERT-base: the reference's 1,410,672 kept (the prefix MLP dropped)."""
    from pathlib import Path

    spec = Path(__file__).resolve().parents[1] / "specs" / "unipelt.yaml"
    s = unipelt.compile(bert_base, spec).summary()
    assert s.kept == 1_410_672
    assert sum(g["params"] for g in s.gates) == 36_912


def test_ia3_kv_ffn(bert_base):
    """IA3 at k, v (one vector of d per projection) and the FFN intermediate (the 3,072-wide input
    of ffn.down): 12·(768 + 768 + 3,072) = 55,296, PEFT's count for IA3Config on key, value and
    output.dense with output.dense as feed-forward."""
    h = unipelt.compile(bert_base, {"modules": {"ia3": {"method": "ia3", "sites": ["attn.k", "attn.v", "ffn.down"]}}})
    s = h.summary()
    assert s.kept == s.training == 55_296 == LAYERS * (D + D + 4 * D)
    assert h.named_parameters()["ia3.0.ffn.down.ia3_l"].shape == (4 * D,)


def test_dora_qv_r8(bert_base):
    """DoRA r8 on q, v: LoRA's A and B (294,912) plus a magnitude of d per projection
    (12·2·768 = 18,432): 313,344, PEFT's count for LoraConfig(r=8, use_dora=True) on query, value."""
    h = unipelt.compile(bert_base, {"modules": {"dora": {**LORA, "method": "dora"}}})
    s = h.summary()
    assert s.kept == s.training == 313_344 == LAYERS * 2 * (8 * D + D * 8 + D)


def test_vera_qv_r256(bert_base):
    """VeRA r256 on q, v: d (256) and b (768) per projection, 12·2·1,024 = 24,576 trainable, PEFT's
    count for VeraConfig(r=256) on query, value; the shared frozen A (256 x 768) and B (768 x 256)
    are buffers, not parameters."""
    h = unipelt.compile(bert_base, {"modules": {"vera": {"method": "vera", "sites": ["attn.q", "attn.v"]}}})
    s = h.summary()
    assert s.kept == s.training == 24_576 == LAYERS * 2 * (256 + D)
    proj = h.shared_modules["vera"]
    assert proj.vera_A.shape == (256, D) and proj.vera_B.shape == (D, 256)


def test_summary_text(bert_base):
    h = unipelt.compile(bert_base, {"modules": {"lora": {**LORA, "gate": True}}})
    text = str(h.summary())
    assert "294,912" in text and "9,228" in text and "gate:lora@attn.q" in text and "gate:lora@attn.v" in text
    assert f"L0={8 * D * 4 + 2 * (D + 1):,}" in text  # LoRA q and v, and a gate for each


def _assert_budget_error(model, spec, *needles):
    snap = Snapshot(model) if not any(p.is_meta for p in model.parameters()) else None
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(unipelt.SpecError) as ei:
        unipelt.compile(model, spec)
    err = ei.value
    assert err.path == "budget"
    for n in needles:
        assert n in str(err), f"{n!r} not in {err}"
    # the model is untouched: no container, no wrappers, no state
    assert "unipelt" not in model._modules
    assert "_unipelt_state" not in model.__dict__
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert not any(p.requires_grad is False for p in model.parameters())
    if snap is not None:
        snap.assert_same()
    return err


def test_budget_max_params(bert_base):
    spec = {"modules": {"lora": LORA, "adapter": PFEIFFER}, "budget": {"max_params": 100_000}}
    err = _assert_budget_error(bert_base, spec, "1,189,440", "100,000", "294,912", "894,528", "lora", "adapter")
    # one paragraph (issue 14: the table made it 7-8 lines), each module's share named, largest first
    assert len(str(err).splitlines()) == 1
    assert "per module: adapter 894,528, lora 294,912." in str(err)


def test_budget_passes(bert_base):
    h = unipelt.compile(bert_base, {"modules": {"lora": LORA}, "budget": {"max_params": 294_912}})
    assert h.summary().kept == 294_912
    h.detach()
    unipelt.compile(bert_base, {"modules": {"lora": LORA}, "budget": {"max_params": "0.3M"}}).detach()
    with pytest.raises(unipelt.SpecError, match="294,912"):
        unipelt.compile(bert_base, {"modules": {"lora": LORA}, "budget": {"max_params": "290K"}})


def test_budget_fraction(bert_base):
    base = sum(p.numel() for p in bert_base.parameters())
    h = unipelt.compile(bert_base, {"modules": {"lora": LORA}, "budget": {"fraction": 0.01}})
    assert h.summary().kept <= 0.01 * base
    h.detach()
    limit = int(0.001 * base)
    _assert_budget_error(
        bert_base, {"modules": {"lora": LORA}, "budget": {"fraction": 0.001}}, "fraction 0.001", f"{limit:,}", "294,912",
    )


def test_budget_on_a_real_model_leaves_it_untouched(bert):
    """The same refusal on a model with storage: weights, flags and hooks are all as before."""
    spec = {"modules": {"lora": {"method": "lora", "sites": ["attn.q"], "r": 8}}, "budget": {"max_params": 10}}
    _assert_budget_error(bert, spec, "max_params 10")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_lora_pissa_olora_qv_r8(bert_base, init):
    """PiSSA / OLoRA train as many parameters as LoRA (the frozen A0, B0 are buffers); the saved
    form after training is the rank-2r LoRA it equals: twice as many."""
    h = unipelt.compile(bert_base, {"modules": {"lora": {**LORA, "init": init}}})
    s = h.summary()
    assert s.kept == s.training == 294_912 == LAYERS * 2 * (8 * D + D * 8)
    assert h.drop_reparameterization() == -294_912
    assert h.summary().kept == 589_824 == LAYERS * 2 * (16 * D + D * 16)


def test_adalora_qv_init_r12(bert_base):
    """AdaLoRA at init_r 12 on q, v: A (12 x 768), λ (12) and B (768 x 12) per matrix; the same
    count as PEFT's AdaLoraConfig(init_r=12) on BERT-base's query and value."""
    h = unipelt.compile(bert_base, {"modules": {"ada": {"method": "adalora", "sites": ["attn.q", "attn.v"],
                                                        "init_r": 12, "target_r": 8, "total_step": 100}}})
    s = h.summary()
    assert s.kept == s.training == 442_656 == LAYERS * 2 * (12 * D + 12 + D * 12)
    peft = pytest.importorskip("peft")
    from transformers import BertConfig, BertForSequenceClassification

    with torch.device("meta"):
        pm = peft.get_peft_model(BertForSequenceClassification(BertConfig()),
                                 peft.AdaLoraConfig(init_r=12, target_r=8, total_step=100, target_modules=["query", "value"]))
    assert sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n) == 442_656
