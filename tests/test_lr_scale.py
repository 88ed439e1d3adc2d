"""Per-module learning rates (``lr_scale`` on a spec node): validation, the optimizer groups that
``unipelt.train.param_groups`` builds from it, and one AdamW step that moves each module by its
own rate."""
from __future__ import annotations

import pytest
import torch

import unipelt
from conftest import make_bert
from unipelt.train import param_groups

PREFIX = {"method": "prefix", "site": "attn.kv", "length": 3, "reparam_hidden": 8}
LORA = {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 2}


def _compile(**nodes):
    return unipelt.compile(make_bert(), {"modules": nodes})


@pytest.mark.parametrize("value", [0, -0.5, "fast", True, None, float("inf")])
def test_bad_lr_scale_names_the_field(value):
    with pytest.raises(unipelt.SpecError) as e:
        unipelt.validate({"modules": {"p": {**PREFIX, "lr_scale": value}}})
    assert e.value.path == "modules.p.lr_scale"
    # every non-finite number of a spec is refused by one document-wide check, before the field's own
    assert ("expected a finite number, got inf" if value == float("inf") else "positive number") in str(e.value)


def test_unknown_key_message_lists_lr_scale():
    with pytest.raises(unipelt.SpecError) as e:
        unipelt.validate({"modules": {"p": {**PREFIX, "lr_scael": 0.1}}})
    assert "lr_scale" in str(e.value)


def test_groups_scale_branches_and_shared_modules_but_not_gates():
    h = _compile(p={**PREFIX, "lr_scale": 0.1, "gate": True}, l={**LORA, "lr_ratio": 4.0, "lr_scale": 0.5, "gate": True})
    groups = {g["name"]: g for g in param_groups(h, 1e-2, gate_lr=3e-2)}
    assert set(groups) == {"gate", "lr_scale x0.1", "lr_scale x0.5", "lora_B x4 lr_scale x0.5"}
    assert groups["gate"]["lr"] == pytest.approx(3e-2)
    assert groups["lr_scale x0.1"]["lr"] == pytest.approx(1e-3)
    assert groups["lr_scale x0.5"]["lr"] == pytest.approx(5e-3)
    assert groups["lora_B x4 lr_scale x0.5"]["lr"] == pytest.approx(2e-2)
    # the shared prefix MLP (not a branch) is in the prefix group; every parameter is in one group
    shared = {id(p) for p in h.shared_modules["p"].parameters()}
    assert shared and shared <= {id(p) for p in groups["lr_scale x0.1"]["params"]}
    listed = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in h.parameters())


def test_default_scale_keeps_one_group():
    h = _compile(p=PREFIX, l=LORA)
    assert [g["name"] for g in param_groups(h, 1e-3)] == ["default"]


def test_one_adamw_step_moves_each_module_by_its_rate():
    # Adam's first step moves every coordinate by about lr (sign of the gradient): the prefix
    # MLP at 0.1x the rate must move 10x less than LoRA's B (A has no gradient while B = 0).
    h = _compile(p={**PREFIX, "lr_scale": 0.1}, l=LORA)
    lora_b = next(p for k, p in h.named_parameters().items() if k.startswith("l.") and k.endswith("lora_B"))
    mlp_up = h.shared_modules["p"].up.weight
    before = {id(p): p.detach().clone() for p in (lora_b, mlp_up)}
    opt = torch.optim.AdamW(param_groups(h, 1e-2), weight_decay=0.0)
    ids = torch.randint(3, 100, (2, 7))
    h.model(input_ids=ids, labels=torch.tensor([0, 2])).loss.backward()
    opt.step()
    step_b = (lora_b.detach() - before[id(lora_b)]).abs()
    step_up = (mlp_up.detach() - before[id(mlp_up)]).abs()
    assert step_b[step_b > 0].median() == pytest.approx(1e-2, rel=0.05)
    assert step_up[step_up > 0].median() == pytest.approx(1e-3, rel=0.05)


def test_lr_scale_survives_save_and_load(tmp_path):
    h = _compile(p={**PREFIX, "lr_scale": 0.25})
    h.save(tmp_path / "a")
    h2 = unipelt.load(make_bert(), tmp_path / "a")
    assert h2.spec.modules["p"].lr_scale == 0.25
    assert {g["name"] for g in param_groups(h2, 1e-3)} == {"lr_scale x0.25"}
