"""Merging several LoRA adapters (unipelt.merging): the combinations written from the TIES and
DARE papers, then HF PEFT's ``add_weighted_adapter`` as the oracle on the same adapters (equal
ΔW per module, equal outputs), the CLI, and the refusals."""
from __future__ import annotations

import json

import pytest
import torch

import unipelt
from conftest import logits, make_batch, make_bert, make_llama, randomize
from unipelt.merging import MergeError, combine, elect_and_average, merge_adapters, prune_magnitude

SPEC = {"modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v", "ffn.down"], "r": 4, "alpha": 8}}}
PATHS = {"attn.q": "self_attn.q_proj", "attn.v": "self_attn.v_proj", "ffn.down": "mlp.down_proj"}


def _save(tmp_path, name, seed, spec=SPEC, factory=make_llama):
    model = factory()
    h = unipelt.compile(model, spec)
    randomize(h, seed=seed, std=0.2)
    return h, h.save(tmp_path / name)


# ------------------------------------------------------------------------------------------
# the combinations, from the papers
# ------------------------------------------------------------------------------------------
def test_ties_by_hand():
    """TIES on two 2x2 tensors, density 0.5 (keep 2 of 4): trim, elect sign of the sum,
    average the agreeing weighted entries."""
    a = torch.tensor([[3.0, -1.0], [0.5, -4.0]])
    b = torch.tensor([[-2.0, 2.5], [0.1, 1.0]])
    # trimmed: a keeps 3 and -4; b keeps -2 and 2.5
    assert torch.equal(prune_magnitude(a, 0.5), torch.tensor([[3.0, 0.0], [0.0, -4.0]]))
    out = combine([a, b], [1.0, 2.0], "ties", 0.5)
    # entry (0,0): 3 vs -2 -> sum +1 -> sign +, only a agrees: 1*3 / 1 = 3
    # entry (0,1): 0 vs 2.5 -> +, b: 2*2.5 = 5 (a's 0 has sign 0, does not count)
    # entry (1,0): both pruned -> 0;  entry (1,1): -4 vs 0 -> -, a: -4
    assert torch.equal(out, torch.tensor([[3.0, 5.0], [0.0, -4.0]]))


def test_elect_frequency_and_dare_rescale():
    t = torch.tensor([[[1.0]], [[1.0]], [[-5.0]]])
    # total: 1 + 1 - 5 < 0 -> the negative entry; frequency: two positives win
    assert elect_and_average(t, t, "total").item() == -5.0
    assert elect_and_average(t, t, "frequency").item() == 1.0
    g = torch.Generator().manual_seed(0)
    x = torch.ones(10_000)
    kept = combine([x], [1.0], "dare_linear", 0.25, generator=g)
    # DARE keeps a quarter and rescales by 4: the expectation is unchanged
    assert set(kept.unique().tolist()) <= {0.0, 4.0}
    assert abs(kept.mean().item() - 1.0) < 0.1


def test_linear_of_one_adapter_is_exact_and_cat_is_the_weighted_sum(tmp_path):
    batch = make_batch()
    ha, a = _save(tmp_path, "a", 1)
    hb, b = _save(tmp_path, "b", 2)
    # one adapter, weight 1: the same function (A and B are each scaled by sqrt(s))
    one = merge_adapters([a], tmp_path / "one")
    m = make_llama()
    unipelt.load(m, one)
    assert torch.allclose(logits(m, batch), logits(ha.model, batch), atol=1e-5)
    # cat: the exact sum 0.5·ΔW_a + 2·ΔW_b
    cat = merge_adapters([a, b], tmp_path / "cat", weights=[0.5, 2.0], method="cat")
    m = make_llama()
    hc = unipelt.load(m, cat)
    for layer in range(2):
        for site in PATHS:
            k = f"lora.{layer}.{site}"
            expect = 0.5 * ha.branch_modules[k].delta_weight() + 2.0 * hb.branch_modules[k].delta_weight()
            assert torch.allclose(hc.branch_modules[k].delta_weight(), expect, atol=1e-5)
    meta = json.loads((cat / "unipelt.json").read_text())
    assert meta["spec"]["modules"]["lora"]["r"] == 8 and meta["merged_from"]["method"] == "cat"


# ------------------------------------------------------------------------------------------
# PEFT as the oracle
# ------------------------------------------------------------------------------------------
peft = pytest.importorskip("peft")


def _peft_twin(handles):
    """A PEFT model on the same base holding the unipelt adapters' A and B as adapters a, b, ..."""
    names = [chr(ord("a") + i) for i in range(len(handles))]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    pm = peft.get_peft_model(make_llama(), cfg, adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, cfg)
    with torch.no_grad():
        for n, h in zip(names, handles):
            for layer in range(2):
                for site, path in PATHS.items():
                    mod = pm.base_model.model.get_submodule(f"model.layers.{layer}.{path}")
                    b = h.branch_modules[f"lora.{layer}.{site}"]
                    mod.lora_A[n].weight.copy_(b.lora_A)
                    mod.lora_B[n].weight.copy_(b.lora_B)
    return pm, names


@pytest.mark.parametrize("method,density,svd_rank", [
    ("linear", None, None), ("svd", None, None), ("svd", None, 3), ("ties", 0.5, None), ("dare_linear", 0.6, None),
    ("dare_ties", 0.5, None), ("magnitude_prune", 0.3, None), ("ties_svd", 0.5, 6), ("dare_ties_svd", 0.7, None),
    ("cat", None, None),
])
def test_matches_peft_add_weighted_adapter(tmp_path, method, density, svd_rank, monkeypatch):
    batch = make_batch()
    ha, a = _save(tmp_path, "a", 1)
    hb, b = _save(tmp_path, "b", 2)
    hc, c = _save(tmp_path, "c", 3)
    weights = [0.7, -0.4, 1.3]
    out = merge_adapters([a, b, c], tmp_path / "m", weights=weights, method=method, density=density,
                         svd_rank=svd_rank, seed=11)
    pm, names = _peft_twin([ha, hb, hc])
    # PEFT draws DARE's masks from the global generator, after the new adapter's initialisation drew
    # from it too: hand its bernoulli calls a generator seeded as ours, so both see one stream
    bernoulli, g = torch.bernoulli, torch.Generator().manual_seed(11)
    monkeypatch.setattr(torch, "bernoulli", lambda t, *a, **k: bernoulli(t, *a, **{"generator": g, **k}))
    pm.add_weighted_adapter(names, weights, "m", combination_type=method, density=density, svd_rank=svd_rank)
    monkeypatch.undo()
    pm.set_adapter("m")
    fresh = make_llama()
    hm = unipelt.load(fresh, out)
    for layer in range(2):
        for site, path in PATHS.items():
            mod = pm.base_model.model.get_submodule(f"model.layers.{layer}.{path}")
            theirs = mod.get_delta_weight("m")
            ours = hm.branch_modules[f"lora.{layer}.{site}"].delta_weight()
            assert torch.allclose(ours, theirs, atol=1e-5), (layer, site)
    assert torch.allclose(logits(fresh, batch), pm(**batch).logits, atol=1e-4)


def test_cli_merge_adapters(tmp_path, capsys):
    from unipelt.cli import main

    _, a = _save(tmp_path, "a", 1)
    _, b = _save(tmp_path, "b", 2)
    rc = main(["merge-adapters", str(a), str(b), "--weights", "0.5", "0.5", "--method", "ties", "--density", "0.5",
               "--out", str(tmp_path / "c")])
    assert rc == 0
    expect = merge_adapters([a, b], tmp_path / "c2", weights=[0.5, 0.5], method="ties", density=0.5)
    from unipelt.io import read_weights

    ours, ref = read_weights(tmp_path / "c"), read_weights(expect)
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ours)
    # a missing density is one error line and exit 1
    rc = main(["merge-adapters", str(a), str(b), "--method", "dare_ties", "--out", str(tmp_path / "d")])
    assert rc == 1 and "needs --density" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()



def test_cli_merge_one_adapter_says_one_adapter(tmp_path, capsys):
    """One adapter (a rescaled copy, --weights 0.5) printed "merged 1 adapters"."""
    from unipelt.cli import main

    _, a = _save(tmp_path, "a", 1)
    assert main(["merge-adapters", str(a), "--weights", "0.5", "--out", str(tmp_path / "one")]) == 0
    assert f"merged 1 adapter (linear) into {tmp_path / 'one'}" in capsys.readouterr().out
    _, b = _save(tmp_path, "b", 2)
    assert main(["merge-adapters", str(a), str(b), "--out", str(tmp_path / "two")]) == 0
    assert "merged 2 adapters (linear)" in capsys.readouterr().out

def test_refusals(tmp_path):
    _, a = _save(tmp_path, "a", 1)
    r8 = {"modules": {"lora": {**SPEC["modules"]["lora"], "r": 8}}}
    _, b8 = _save(tmp_path, "b8", 2, spec=r8)
    with pytest.raises(MergeError, match="same rank"):
        merge_adapters([a, b8], tmp_path / "x", method="ties", density=0.5)
    # different ranks are fine for svd and cat
    merge_adapters([a, b8], tmp_path / "svd", method="svd")
    with pytest.raises(MergeError, match="2 weights for 1 adapters"):
        merge_adapters([a], tmp_path / "x", weights=[1, 2])
    with pytest.raises(MergeError, match=r"density 1\.5 is not in"):
        merge_adapters([a, b8], tmp_path / "x", method="ties", density=1.5)
    _, bert = _save(tmp_path, "bert", 3, spec={"modules": {"lora": {"method": "lora", "site": "attn.q", "r": 4}}},
                    factory=make_bert)
    with pytest.raises(MergeError, match="another base"):
        merge_adapters([a, bert], tmp_path / "x")
    _, gated = _save(tmp_path, "gated", 4, spec={"modules": {"lora": {**SPEC["modules"]["lora"], "gate": True}}})
    with pytest.raises(MergeError, match="'lora' is gated"):
        merge_adapters([a, gated], tmp_path / "x")
    _, ad = _save(tmp_path, "ad", 5, spec={"modules": {"ad": {"method": "adapter", "site": "ffn.res", "width": 4}}})
    with pytest.raises(MergeError, match="not a LoRA"):
        merge_adapters([ad], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_pissa_checkpoint_merges_as_the_lora_it_equals(tmp_path):
    """An adapter saved in PiSSA form (A0, B0 still buffers) enters a merge as its rank-2r LoRA."""
    batch = make_batch()
    model = make_llama()
    h = unipelt.compile(model, {"modules": {"lora": {**SPEC["modules"]["lora"], "init": "pissa"}}})
    with torch.no_grad():
        for p in h.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expect = logits(model, batch)
    out = merge_adapters([h.save(tmp_path / "p")], tmp_path / "m", method="cat")
    fresh = make_llama()
    unipelt.load(fresh, out)
    assert torch.allclose(logits(fresh, batch), expect, atol=1e-5)


# GPT-2 (Conv1D, PEFT's fan_in_fan_out) with inputs of different ranks, alphas, rsLoRA and hook
# points, against PEFT: DARE's draws land where PEFT's land only when the deltas are combined in
# the layout GPT-2 stores them, (in, out) (before: off by 2-4 in ΔW); svd_clamp as PEFT's
GPT2_INPUTS = [(["attn.o", "ffn.up", "ffn.down"], 2, 4, False), (["attn.o", "ffn.up", "ffn.down"], 4, 16, True),
               (["ffn.up", "ffn.down"], 6, 3, False)]


@pytest.mark.parametrize("method,density,svd_clamp", [
    ("dare_linear_svd", 0.5, None), ("dare_ties_svd", 0.6, None), ("svd", None, 0.9), ("ties_svd", 0.5, 0.5),
])
def test_gpt2_svd_methods_match_peft(tmp_path, method, density, svd_clamp, monkeypatch):
    from conftest import make_gpt2

    handles, dirs, names, pm = [], [], [], None
    for i, (sites, r, alpha, rslora) in enumerate(GPT2_INPUTS):
        h, d = _save(tmp_path, f"in{i}", i + 1, factory=make_gpt2,
                     spec={"modules": {"lora": {"method": "lora", "sites": sites, "r": r, "alpha": alpha, "rslora": rslora}}})
        handles.append(h), dirs.append(d), names.append(chr(ord("a") + i))
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, lora_dropout=0.0, fan_in_fan_out=True,
                              target_modules=sorted({bp.site.path for bp in h.graph.branches}))
        if pm is None:
            pm = peft.get_peft_model(make_gpt2(), cfg, adapter_name=names[0])
        else:
            pm.add_adapter(names[-1], cfg)
        with torch.no_grad():
            for bp in h.graph.branches:
                mod = pm.base_model.model.get_submodule(bp.site.path)
                mod.lora_A[names[-1]].weight.copy_(h.branch_modules[bp.key].lora_A)
                mod.lora_B[names[-1]].weight.copy_(h.branch_modules[bp.key].lora_B)
    weights = [0.8, -0.5, 1.2]
    out = merge_adapters(dirs, tmp_path / "m", weights=weights, method=method, density=density, svd_clamp=svd_clamp,
                         majority_sign="frequency", seed=11)
    bernoulli, g = torch.bernoulli, torch.Generator().manual_seed(11)
    monkeypatch.setattr(torch, "bernoulli", lambda t, *a, **k: bernoulli(t, *a, **{"generator": g, **k}))
    pm.add_weighted_adapter(names, weights, "m", combination_type=method, density=density, svd_clamp=svd_clamp,
                            majority_sign_method="frequency")
    monkeypatch.undo()
    pm.set_adapter("m")
    fresh = make_gpt2()
    hm = unipelt.load(fresh, out)
    assert len(hm.graph.branches) == 6
    for bp in hm.graph.branches:
        theirs = pm.base_model.model.get_submodule(bp.site.path).get_delta_weight("m").T  # stored (in, out)
        assert torch.allclose(hm.branch_modules[bp.key].delta_weight(), theirs, atol=1e-5), bp.key
    batch = make_batch()
    assert torch.allclose(logits(fresh, batch), pm(**batch).logits, atol=1e-4)


def test_svd_clamp_refusals(tmp_path):
    _, a = _save(tmp_path, "a", 1)
    _, b = _save(tmp_path, "b", 2)
    with pytest.raises(MergeError, match=r"svd_clamp 1\.5 is not a quantile"):
        merge_adapters([a, b], tmp_path / "x", method="svd", svd_clamp=1.5)
    with pytest.raises(MergeError, match="svd_clamp clamps the factors of an svd method, not of ties"):
        merge_adapters([a, b], tmp_path / "x", method="ties", density=0.5, svd_clamp=0.9)
    assert not (tmp_path / "x").exists()
