"""LoRA initialisations from the base weight: PiSSA (SVD) and OLoRA (QR).

Independent formulas first (what the papers say the factors are), then HF PEFT 0.21 as the
oracle (same A, B, and our W0 − s·B0·A0 equal to PEFT's rewritten base weight; same outputs and
gradients after the same update), then the saved form: a trained PiSSA adapter, materialized to
the rank-2r LoRA it equals, loads onto an unmodified base and gives the trained outputs.
"""
from __future__ import annotations

import pytest
import torch

import unipelt
from conftest import Snapshot, logits, make_batch, make_gpt2, make_llama

SITES = ["attn.q", "attn.v", "ffn.down"]
PATHS = {"attn.q": "self_attn.q_proj", "attn.v": "self_attn.v_proj", "ffn.down": "mlp.down_proj"}


def spec(init: str, r: int = 4, alpha: float = 8, **kw) -> dict:
    return {"modules": {"lora": {"method": "lora", "sites": SITES, "r": r, "alpha": alpha, "init": init, **kw}}}


def branch(handle, layer: int, site: str):
    return handle.branch_modules[f"lora.{layer}.{site}"]


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_factors_are_the_principal_part(rslora):
    """s·B0·A0 is the best rank-r approximation of W0 (Eckart-Young: the r largest singular
    triplets), A0 and B0 share √(S_r/s), and the residual keeps exactly the other singular values."""
    model = make_llama()
    h = unipelt.compile(model, spec("pissa", rslora=rslora))
    for layer in range(2):
        for site in SITES:
            b = branch(h, layer, site)
            w = model.get_submodule(f"model.layers.{layer}.{PATHS[site]}").base_layer.weight.detach()
            U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
            best = (U[:, :4] * S[:4]) @ Vh[:4]
            assert torch.allclose((b.lora_B @ b.lora_A).double() * b.scale, best, atol=1e-5)
            # the column norms of B0 and row norms of A0 are both sqrt(S_i / s)
            expect = (S[:4] / b.scale).sqrt().float()
            assert torch.allclose(b.lora_A.norm(dim=1), expect, atol=1e-5)
            assert torch.allclose(b.lora_B.norm(dim=0), expect, atol=1e-5)
            residual = w.double() - (b.base_B @ b.base_A).double() * b.scale
            assert torch.allclose(torch.linalg.svdvals(residual)[:S.numel() - 4], S[4:], atol=1e-5)


def test_olora_factors_are_the_leading_qr_columns():
    model = make_llama()
    h = unipelt.compile(model, spec("olora"))
    b = branch(h, 1, "ffn.down")
    w = model.get_submodule("model.layers.1.mlp.down_proj").base_layer.weight.detach()
    # B0 has orthonormal columns spanning the first r columns of W0; A0 is upper triangular
    assert torch.allclose(b.lora_B.T @ b.lora_B, torch.eye(4), atol=1e-5)
    assert torch.allclose(torch.triu(b.lora_A[:, :4]), b.lora_A[:, :4])
    assert torch.allclose(b.lora_B @ b.lora_A[:, :4], w[:, :4], atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_identity_at_init_and_detach_restores(init, batch):
    model = make_llama()
    snap = Snapshot(model)
    before = logits(model, batch)
    h = unipelt.compile(model, spec(init))
    assert torch.allclose(logits(model, batch), before, atol=1e-5)
    h.detach()
    snap.assert_same()  # the base weight itself was never rewritten


peft = pytest.importorskip("peft")


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_matches_peft(init, rslora, batch):
    """Same factors as PEFT's init_lora_weights, our effective base equals PEFT's rewritten
    weight, and after the same perturbation of A and B the outputs and gradients agree."""
    ours_model, theirs_model = make_llama(), make_llama()
    h = unipelt.compile(ours_model, spec(init, rslora=rslora))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, init_lora_weights=init, lora_dropout=0.0,
                          target_modules=["q_proj", "v_proj", "down_proj"])
    theirs = peft.get_peft_model(theirs_model, cfg)
    g = torch.Generator().manual_seed(5)
    for layer in range(2):
        for site in SITES:
            b = branch(h, layer, site)
            mod = theirs.base_model.model.get_submodule(f"model.layers.{layer}.{PATHS[site]}")
            assert torch.allclose(b.lora_A, mod.lora_A["default"].weight, atol=1e-5)
            assert torch.allclose(b.lora_B, mod.lora_B["default"].weight, atol=1e-5)
            w0 = ours_model.get_submodule(f"model.layers.{layer}.{PATHS[site]}").base_layer.weight
            effective = w0 - b.scale * b.base_B @ b.base_A
            assert torch.allclose(effective, mod.base_layer.weight, atol=1e-5)
            # the same step away from the init in both
            with torch.no_grad():
                da, db = torch.randn(b.lora_A.shape, generator=g) * 0.1, torch.randn(b.lora_B.shape, generator=g) * 0.1
                b.lora_A.add_(da), b.lora_B.add_(db)
                mod.lora_A["default"].weight.add_(da), mod.lora_B["default"].weight.add_(db)
    ours_out = ours_model(**batch).logits
    theirs_out = theirs(**batch).logits
    assert torch.allclose(ours_out, theirs_out, atol=1e-4)
    ours_out.pow(2).mean().backward()
    theirs_out.pow(2).mean().backward()
    b = branch(h, 0, "attn.v")
    mod = theirs.base_model.model.get_submodule("model.layers.0.self_attn.v_proj")
    assert torch.allclose(b.lora_A.grad, mod.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
    assert torch.allclose(b.lora_B.grad, mod.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)
    # the base stays frozen, and ours never changes it
    assert ours_model.get_submodule("model.layers.0.self_attn.v_proj").base_layer.weight.grad is None


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_trained_adapter_saves_as_plain_lora_and_loads_onto_an_unmodified_base(init, tmp_path):
    batch = make_batch()
    model = make_llama()
    h = unipelt.compile(model, spec(init))
    opt = torch.optim.SGD(h.parameters(), lr=0.5)
    for _ in range(3):
        model(**batch).logits.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    trained = logits(model, batch)
    # a checkpoint mid-training keeps the PiSSA form (A0, B0 as buffers)
    h.save(tmp_path / "ckpt")
    fresh = make_llama()
    h2 = unipelt.load(fresh, tmp_path / "ckpt")
    assert torch.allclose(logits(fresh, batch), trained, atol=1e-5)
    h2.detach()
    # the final adapter is the plain LoRA it equals: rank 2r, same scale, no decomposition at load
    before = sum(p.numel() for p in h.parameters())
    assert h.drop_reparameterization() == -before  # "dropped" a negative count: the saved form has twice the rank
    assert torch.allclose(logits(model, batch), trained, atol=1e-5)
    b = branch(h, 0, "attn.q")
    assert b.base_A is None and b.r == 8 and b.lora_A.shape == (8, 32)
    h.save(tmp_path / "final")
    meta = unipelt.io.read_adapter_meta(tmp_path / "final")
    node = meta["spec"]["modules"]["lora"]
    assert (node["r"], node["alpha"], node["init"]) == (8, 16.0, "kaiming")
    fresh = make_llama()
    torch.manual_seed(0)
    h3 = unipelt.load(fresh, tmp_path / "final")
    assert torch.allclose(logits(fresh, batch), trained, atol=1e-5)
    # merged into the unmodified base, too
    h3.merge()
    assert torch.allclose(logits(fresh, batch), trained, atol=1e-4)


def test_converted_delta_matches_peft_conversion(tmp_path):
    """PEFT's ``path_initial_model_for_weight_conversion`` turns a trained PiSSA adapter into a
    rank-2r LoRA; ours after materialize holds the same tensors and config."""
    ours_model, theirs_model = make_llama(), make_llama()
    h = unipelt.compile(ours_model, spec("pissa"))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", lora_dropout=0.0,
                          target_modules=["q_proj", "v_proj", "down_proj"])
    theirs = peft.get_peft_model(theirs_model, cfg)
    theirs.save_pretrained(tmp_path / "init")  # the initial adapter PEFT subtracts
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in range(2):
            for site in SITES:
                b = branch(h, layer, site)
                mod = theirs.base_model.model.get_submodule(f"model.layers.{layer}.{PATHS[site]}")
                da = torch.randn(b.lora_A.shape, generator=g) * 0.1
                b.lora_A.add_(da), mod.lora_A["default"].weight.add_(da)
    theirs.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    from safetensors.torch import load_file
    import json

    converted = load_file(str(tmp_path / "converted" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    h.drop_reparameterization()
    assert (config["r"], config["lora_alpha"]) == (8, 16)
    for layer in range(2):
        for site in SITES:
            b = branch(h, layer, site)
            key = f"base_model.model.model.layers.{layer}.{PATHS[site]}"
            assert torch.allclose(b.lora_A, converted[f"{key}.lora_A.weight"], atol=1e-5)
            assert torch.allclose(b.lora_B, converted[f"{key}.lora_B.weight"], atol=1e-5)


def test_gpt2_fused_slices_use_their_own_rows(batch):
    """GPT-2's c_attn is a Conv1D (weight stored (in, out)) holding q, k and v: the q slice's
    factors come from the q rows of Wᵀ only."""
    model = make_gpt2()
    h = unipelt.compile(model, {"modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 2,
                                                      "init": "pissa"}}})
    w = model.get_submodule("transformer.h.0.attn.c_attn").base_layer.weight.detach().T  # (3d, d)
    b = branch(h, 0, "attn.v")
    U, S, Vh = torch.linalg.svd(w[64:96], full_matrices=False)
    assert torch.allclose(b.lora_B @ b.lora_A * b.scale, (U[:, :2] * S[:2]) @ Vh[:2], atol=1e-5)


def test_rank_over_half_the_width_is_refused():
    with pytest.raises(unipelt.SpecError, match=r"modules\.lora\.r.*rank 2r"):
        unipelt.compile(make_llama(), spec("pissa", r=17))


def test_export_to_peft_of_an_unconverted_pissa_adapter(tmp_path):
    """A checkpoint still in PiSSA form exports as the rank-2r LoRA it equals: PEFT loads it onto
    the unmodified base and computes the same outputs."""
    from unipelt.export import export_peft
    from unipelt.models import load_model

    model, _ = load_model("tiny-llama")
    h = unipelt.compile(model, spec("pissa"))
    with torch.no_grad():
        for p in h.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expect = model(input_ids=ids).logits
    h.save(tmp_path / "ckpt")
    export_peft(tmp_path / "ckpt", tmp_path / "peft", model="tiny-llama")
    import json

    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 8
    base, _ = load_model("tiny-llama")
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()(input_ids=ids).logits
    assert torch.allclose(got, expect, atol=1e-5)


def test_pissa_niter_matches_peft_and_saves_as_plain_lora(tmp_path, monkeypatch):
    """``niter``: PiSSA from the randomized SVD, PEFT's ``pissa_niter_N`` (which unipelt did not
    offer). Both take torch.svd_lowrank's draws from the global generator: each call here is
    seeded alike, so both see the same draws and must give the same factors and residual (with
    q = r and no oversampling, as PEFT calls it, the result is not the exact principal part on a
    flat spectrum); the trained adapter saves as the plain LoRA it equals (niter leaves the spec
    with the decomposition)."""
    import peft.tuners.lora.layer as peft_layer

    real = torch.svd_lowrank

    def seeded(*a, **k):
        torch.manual_seed(1234)
        return real(*a, **k)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    monkeypatch.setattr(peft_layer, "svd_lowrank", seeded)
    batch = make_batch()
    ours_model = make_llama()
    h = unipelt.compile(ours_model, spec("pissa", niter=4))
    theirs = peft.get_peft_model(make_llama(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa_niter_4",
                                                               lora_dropout=0.0, target_modules=list(PATHS.values())))
    for layer in range(2):
        for site in SITES:
            b = branch(h, layer, site)
            mod = theirs.base_model.model.get_submodule(f"model.layers.{layer}.{PATHS[site]}")
            torch.testing.assert_close(b.lora_A, mod.lora_A["default"].weight, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(b.lora_B, mod.lora_B["default"].weight, atol=1e-6, rtol=1e-5)
            w0 = ours_model.get_submodule(f"model.layers.{layer}.{PATHS[site]}").base_layer.weight
            torch.testing.assert_close(w0 - b.scale * b.base_B @ b.base_A, mod.base_layer.weight, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        for p in h.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for layer in range(2):
            for site in SITES:
                b = branch(h, layer, site)
                mod = theirs.base_model.model.get_submodule(f"model.layers.{layer}.{PATHS[site]}")
                mod.lora_A["default"].weight.copy_(b.lora_A), mod.lora_B["default"].weight.copy_(b.lora_B)
        trained = logits(ours_model, batch)
        assert torch.allclose(trained, theirs(**batch).logits, atol=1e-5)
    h.drop_reparameterization()
    h.save(tmp_path / "final")
    node = unipelt.io.read_adapter_meta(tmp_path / "final")["spec"]["modules"]["lora"]
    assert "niter" not in node and node["init"] == "kaiming" and node["r"] == 8
    fresh = make_llama()
    unipelt.load(fresh, tmp_path / "final")
    assert torch.allclose(logits(fresh, batch), trained, atol=1e-5)


def test_niter_only_with_pissa():
    with pytest.raises(unipelt.SpecError, match=r"modules\.lora\.niter.*only with init: pissa"):
        unipelt.validate(spec("olora", niter=2))
    with pytest.raises(unipelt.SpecError, match=r"modules\.d\.niter"):
        unipelt.validate({"modules": {"d": {"method": "dora", "site": "attn.q", "niter": 2}}})


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("lora_scale", ["replace", "multiply"])
def test_gated_pissa_keeps_its_function_through_drop_reparameterization(tmp_path, init, lora_scale):
    """A gated PiSSA / OLoRA computes W0·x − s·B0·A0·x + g·(B·A·x) (the residual's correction is
    part of the base weight, not gated). drop_reparameterization — which `unipelt train` runs
    before the final save, and collapse before it merges — turned it into the rank-2r LoRA
    [B, −B0]·[A; A0] under the gate, which gates the correction too: the saved adapter computed
    another function (GPT-2 logits off by 0.06, Qwen2 by 0.2). A gated branch now keeps A0 and B0
    (the adapter saves them and reloads as it is), and collapse with a constant gate merges it
    exactly."""
    from conftest import randomize

    batch = make_batch()
    model = make_gpt2()
    h = unipelt.compile(model, spec(init, r=2, gate={"input": "layer", "lora_scale": lora_scale}))
    randomize(h, std=0.1)
    want = logits(model, batch)
    h.drop_reparameterization()
    torch.testing.assert_close(logits(model, batch), want, atol=1e-5, rtol=1e-5)
    h.save(tmp_path / "a")
    fresh = make_gpt2()
    unipelt.load(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh, batch), want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # nearly constant gates: collapse makes them constants and merges
        for g in h.gate_modules.values():
            g.linear.weight.mul_(1e-7)
    near = logits(model, batch)
    rep = h.collapse([batch])
    assert len(rep.merged) == 2 * len(SITES) and rep.max_abs_diff < 1e-4
    torch.testing.assert_close(logits(model, batch), near, atol=1e-4, rtol=1e-4)


def test_collapsed_gated_pissa_exports_its_function_to_peft(tmp_path):
    """A gated PiSSA whose gates collapse made constants keeps A0 and B0 (above); the PEFT export
    wrote only c·B·A and lost the correction −s·B0·A0 (logits off by 0.23). It is now written as
    the stacked LoRA [c·B, −s·B0]·[A; A0], which PEFT computes as the collapsed model does."""
    from conftest import randomize
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    from unipelt.export import export_peft

    batch = make_batch()
    model = make_llama()
    model.save_pretrained(tmp_path / "base")
    h = unipelt.compile(model, spec("pissa", r=2, gate={"input": "layer"}))
    randomize(h, std=0.1)
    with torch.no_grad():
        for g in h.gate_modules.values():
            g.linear.weight.mul_(1e-7)
    h.collapse([batch], merge=False)
    want = logits(model, batch)
    h.save(tmp_path / "a")
    export_peft(tmp_path / "a", tmp_path / "peft", model=str(tmp_path / "base"))
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(peft_model, batch), want, atol=1e-5, rtol=1e-5)
