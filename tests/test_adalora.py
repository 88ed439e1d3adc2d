"""AdaLoRA (plugins/adalora.py): the layer and the budget schedule written from the paper, then
HF PEFT 0.21 as the oracle: the same layer outputs, the same rank mask from the same importance
scores (RankAllocator.mask_to_budget), and the same masks, ranks and outputs after the same
training steps (sensitivity, EMA, uncertainty, schedule, orthogonality penalty together). Then
the controller under ``unipelt train``: ranks in report.json, the rank table and its picture,
checkpoints and --resume."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import unipelt
from conftest import Snapshot, logits, make_llama

SITES = ["attn.q", "attn.v", "ffn.down"]
PATHS = {"attn.q": "self_attn.q_proj", "attn.v": "self_attn.v_proj", "ffn.down": "mlp.down_proj"}


@pytest.fixture(autouse=True)
def adalora_registered():
    """The plugin registers through its entry point; until the package is reinstalled with it,
    register it here (the test is the same either way)."""
    from unipelt.registry import Registry, get_registry, make_plugin_manager, use_registry

    if "adalora" in get_registry().methods:
        yield
        return
    import unipelt_plugins.adalora as mod

    use_registry(Registry(make_plugin_manager(extra_plugins=(mod,))))
    yield
    use_registry(None)


def spec(**kw) -> dict:
    node = {"method": "adalora", "sites": SITES, "init_r": 4, "target_r": 2, "alpha": 8, "total_step": 12,
            "tinit": 2, "tfinal": 3, "deltaT": 2, **kw}
    return {"modules": {"ada": node}}


def controller(handle):
    from unipelt.training.optim import collect_controllers

    (c,) = collect_controllers(handle)
    return c


def randomize_E(handle, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, b in sorted(handle.branch_modules.items()):
            b.lora_E.copy_(torch.randn(b.lora_E.shape, generator=g))


# ------------------------------------------------------------------------------------------
# the formulas
# ------------------------------------------------------------------------------------------
def test_layer_formula_and_identity_at_init(batch):
    model = make_llama()
    ref = logits(model, batch)
    h = unipelt.compile(model, spec())
    assert torch.equal(logits(model, batch), ref)  # E = 0: Λ = 0
    randomize_E(h)
    b = h.branch_modules["ada.0.attn.v"]
    x = torch.randn(2, 5, 32)
    # ΔW = P·Λ·Q scaled by alpha / (r0 + 1e-5)
    delta = b.lora_B @ torch.diag(b.lora_E.view(-1)) @ b.lora_A * (8 / (4 + 1e-5))
    assert torch.allclose(b(x), x @ delta.T, atol=1e-6)
    assert torch.allclose(b.delta_weight(), delta, atol=1e-6)


def test_budget_schedule_by_hand():
    h = unipelt.compile(make_llama(), spec(total_step=20, tinit=4, tfinal=6, deltaT=3))
    c = controller(h)
    B0, BT = 6 * 4, 6 * 2  # six matrices of init_r 4, target 2 on average
    assert (c.init_bgt, c.target_bgt) == (B0, BT)
    assert c.budget_schedule(4) == (B0, False)  # warm-up: t <= tinit
    for t in range(5, 15):  # cubic decay from B0 to BT over the 10 steps after the warm-up
        budget, mask = c.budget_schedule(t)
        assert budget == int((B0 - BT) * (1 - (t - 4) / 10) ** 3 + BT) and mask == (t % 3 == 0)
    assert c.budget_schedule(15) == (BT, True)  # final phase: t > T - tfinal


def test_orthogonality_penalty_formula():
    h = unipelt.compile(make_llama(), spec(orth_reg_weight=0.3))
    c = controller(h)
    terms = []
    for b in h.branch_modules.values():
        terms.append(torch.linalg.norm(b.lora_A @ b.lora_A.T - torch.eye(4)))
        terms.append(torch.linalg.norm(b.lora_B.T @ b.lora_B - torch.eye(4)))
    assert torch.allclose(c.regularizer(), 0.3 * torch.stack(terms).mean())


def test_spec_checks():
    # a spec that only runs the layer needs no schedule; training it does
    no_total = {"modules": {"ada": {"method": "adalora", "site": "attn.q", "init_r": 4, "target_r": 2}}}
    h = unipelt.compile(make_llama(), no_total)
    with pytest.raises(unipelt.SpecError, match=r"modules\.ada\.total_step: training AdaLoRA needs total_step"):
        controller(h)
    with pytest.raises(unipelt.SpecError, match=r"modules\.ada\.target_r.*more than init_r"):
        unipelt.validate(spec(target_r=6))
    with pytest.raises(unipelt.SpecError, match=r"modules\.ada\.tinit"):
        unipelt.validate(spec(tinit=9))
    with pytest.raises(unipelt.SpecError, match=r"modules\.ada\.init_r"):
        unipelt.compile(make_llama(), spec(init_r=17, target_r=2))  # v_proj is 32 -> 16


# ------------------------------------------------------------------------------------------
# PEFT as the oracle
# ------------------------------------------------------------------------------------------
peft = pytest.importorskip("peft")


def _peft_twin(handle, **kw):
    cfg = peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=12, tinit=2, tfinal=3, deltaT=2,
                             lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], **kw)
    pm = peft.get_peft_model(make_llama(), cfg)
    with torch.no_grad():
        for layer in range(2):
            for site, path in PATHS.items():
                ours = handle.branch_modules[f"ada.{layer}.{site}"]
                mod = pm.base_model.model.get_submodule(f"model.layers.{layer}.{path}")
                for p in ("lora_A", "lora_E", "lora_B"):
                    getattr(mod, p)["default"].copy_(getattr(ours, p))
    return pm


def _peft_name(key: str, p: str, prefix: str = "") -> str:
    """PEFT's parameter name of our branch ``key``'s ``p``: as the rank allocator names it (the
    inner model's names) or, with ``prefix="base_model.model."``, as the PeftModel does."""
    _, layer, site = key.split(".", 2)
    return f"{prefix}model.layers.{layer}.{PATHS[site]}.{p}.default"


OUTER = "base_model.model."


def test_layer_matches_peft(batch):
    model = make_llama()
    h = unipelt.compile(model, spec())
    randomize_E(h)
    pm = _peft_twin(h)
    assert torch.allclose(logits(model, batch), pm(**batch).logits, atol=1e-5)


def test_mask_matches_peft_given_the_same_scores():
    h = unipelt.compile(make_llama(), spec())
    randomize_E(h)
    pm = _peft_twin(h)
    alloc = pm.base_model.rankallocator
    c = controller(h)
    g = torch.Generator().manual_seed(9)
    for key, b in c.branches.items():
        for p in ("lora_A", "lora_E", "lora_B"):
            shape = getattr(b, p).shape
            ipt, unc = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
            c.exp_avg_ipt[f"{key}.{p}"], c.exp_avg_unc[f"{key}.{p}"] = ipt, unc
            alloc.exp_avg_ipt[_peft_name(key, p)], alloc.exp_avg_unc[_peft_name(key, p)] = ipt.clone(), unc.clone()
    for budget in (20, 13, 7):
        ours = c.mask_to_budget(budget)
        theirs = alloc.mask_to_budget(pm.base_model.model, budget)
        assert {k: ours[k] for k in ours} == {k: theirs[_peft_name(k, "lora_E")] for k in ours}
        assert sum(sum(v) for v in ours.values()) == budget
        for key, b in c.branches.items():
            mod_E = dict(pm.named_parameters())[_peft_name(key, "lora_E", OUTER)]
            assert torch.equal(b.lora_E, mod_E)


def test_training_matches_peft(batch):
    """Twelve SGD steps with the orthogonality penalty, the sensitivity EMAs, the cubic budget
    (tinit 2, tfinal 3, deltaT 2): the same λ masks, kept ranks and outputs as PEFT."""
    model = make_llama()
    h = unipelt.compile(model, spec(orth_reg_weight=0.5))
    pm = _peft_twin(h, orth_reg_weight=0.5)
    c = controller(h)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    ours_opt = torch.optim.SGD(h.parameters(), lr=0.2)
    theirs_opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.2)
    for t in range(12):
        loss = model(**batch, labels=labels).loss + c.regularizer()
        loss.backward()
        ours_opt.step()
        c.on_step(t + 1, float(loss.detach()))
        ours_opt.zero_grad()
        # AdaLoraModel.forward adds PEFT's orthogonality penalty (PeftModelForCausalLM's forward
        # in peft 0.21 does not go through it: its loss has no penalty)
        theirs_loss = pm.base_model(**batch, labels=labels).loss
        assert torch.allclose(loss, theirs_loss, atol=1e-5), t
        theirs_loss.backward()
        theirs_opt.step()
        pm.base_model.update_and_allocate(t)
        theirs_opt.zero_grad()
    params = dict(pm.named_parameters())
    for key, b in c.branches.items():
        assert torch.equal(b.lora_E != 0, params[_peft_name(key, "lora_E", OUTER)] != 0), key
        assert torch.allclose(b.lora_E, params[_peft_name(key, "lora_E", OUTER)], atol=1e-5)
    assert sum(c.ranks().values()) == c.target_bgt == 12
    theirs_pattern = pm.peft_config["default"].rank_pattern
    assert {k: sum(v) for k, v in c.rank_pattern.items()} == {k: sum(theirs_pattern[_peft_name(k, "lora_E")])
                                                              for k in c.branches}
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, pm(**batch).logits, atol=1e-4)


# ------------------------------------------------------------------------------------------
# under unipelt train: report, table, picture, resume
# ------------------------------------------------------------------------------------------
def test_train_reports_ranks_and_resumes(tmp_path, capsys):
    from unipelt.data import Example
    from unipelt.train import TrainConfig, train

    rows = [Example(text=f"the cat number {i} sat on the mat", line=i + 1) for i in range(16)]
    ada = {"version": 1, "modules": {"ada": {"method": "adalora", "sites": ["attn.q", "attn.v"], "init_r": 4,
                                              "target_r": 2, "total_step": 8, "tinit": 1, "tfinal": 2}}}
    kw = dict(epochs=1, batch_size=2, lr=5e-2, save_steps=4, save_total_limit=None, progress=False)
    report = train(ada, "tiny-llama", rows, None, TrainConfig(out_dir=str(tmp_path / "full"), **kw))
    rep = json.loads((tmp_path / "full" / "report.json").read_text())["controllers"]["AdaLoRA"]
    assert report["steps"] == 8
    assert rep["kept"] == rep["target_budget"] == 2 * 2 * 2 and sum(rep["ranks"].values()) == rep["kept"]
    assert set(rep["table"]) == {"attn.q", "attn.v"} and set(rep["table"]["attn.q"]) == {"0", "1"}
    assert [e["event"] for e in rep["events"]][-1] == "final"
    # the saved adapter's λ are the masked ones
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "full" / "adapter" / "adapter.safetensors"))
    assert sum(int((saved[f"{k}.lora_E"] != 0).sum()) for k in rep["ranks"]) == rep["kept"]
    # resumed from step 4, the same ranks and the same adapter
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-4", part / "checkpoint-4")
    resumed = train(ada, "tiny-llama", rows, None, TrainConfig(out_dir=str(part), resume=True, **kw))
    assert resumed["controllers"]["AdaLoRA"]["ranks"] == rep["ranks"]
    again = load_file(str(part / "adapter" / "adapter.safetensors"))
    assert all(torch.allclose(saved[k], again[k], atol=1e-6) for k in saved)
    # the table and its picture
    from unipelt.cli import main

    assert main(["adalora-ranks", str(tmp_path / "full"), "--plot", str(tmp_path / "ranks.png")]) == 0
    out = capsys.readouterr().out
    assert "attn.q" in out and (tmp_path / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_detach_restores_and_save_load(tmp_path, batch):
    model = make_llama()
    snap = Snapshot(model)
    h = unipelt.compile(model, spec())
    randomize_E(h)
    out = logits(model, batch)
    h.save(tmp_path / "a")
    h.merge()
    assert torch.allclose(logits(model, batch), out, atol=1e-5)
    h.detach()
    snap.assert_same()
    fresh = make_llama()
    unipelt.load(fresh, tmp_path / "a")
    assert torch.equal(logits(fresh, batch), out)
