"""A unipelt model called inside an enclosing compiled module (a wrapper that adds a loss term,
as AdaLoRA's orthogonality penalty in the speed benchmark, a training-step function, a
Lightning-style module) is captured in one graph: the root pre-hook is traced inline there,
not run as a disabled frame that breaks the enclosing graph (found on the H200: AdaLoRA's
regularized step fell back with "Skip inlining torch.compiler.disable()'d function"). A mixed
batch inside such a wrapper still reads its rows eagerly (one graph break) and stays correct."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import unipelt
from conftest import FACTORIES, make_batch, randomize
from test_conformance import CASES
from unipelt.training.optim import collect_controllers, controller_loss

NAMES = ["lora_qv-llama", "unipelt_apl-llama", "unipelt_al-bert", "ia3-llama", "adalora-llama"]
WRAPPED_CASES = [c for c in CASES if c.name in NAMES]


class LossWrapper(nn.Module):
    """The model's outputs reduced to a loss, plus any controller's penalty (AdaLoRA's)."""

    def __init__(self, model, controllers=()):
        super().__init__()
        self.model, self.controllers = model, list(controllers)

    def forward(self, input_ids, attention_mask, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return controller_loss(self.controllers, logits.float().pow(2).mean())


def test_cases_found():
    assert sorted(c.name for c in WRAPPED_CASES) == sorted(NAMES)


@pytest.mark.parametrize("case", WRAPPED_CASES, ids=[c.name for c in WRAPPED_CASES])
def test_wrapped_model_compiles_fullgraph(case):
    torch._dynamo.reset()
    model = FACTORIES[case.arch]()
    handle = unipelt.compile(model, case.spec)
    randomize(handle, seed=3, std=0.2)
    wrapper = LossWrapper(model, collect_controllers(handle))
    batch = make_batch(batch=2, length=6, lengths=(6, 4))
    want = wrapper(batch["input_ids"], batch["attention_mask"])
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert want_grads, "nothing trains"
    model.zero_grad(set_to_none=True)
    # fullgraph=True raises on any graph break, the disabled hook's included
    got = torch.compile(wrapper, backend="aot_eager", fullgraph=True)(batch["input_ids"], batch["attention_mask"])
    got.backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for n, g in want_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, atol=1e-5, rtol=1e-4, msg=n)


def test_mixed_batch_inside_a_wrapper_reads_its_rows():
    torch._dynamo.reset()
    case = next(c for c in CASES if c.name == "unipelt_apl-llama")
    model = FACTORIES[case.arch]()
    for i, n in enumerate("ab"):
        randomize(unipelt.compile(model, case.spec, name=n), seed=i + 1, std=0.2)
    batch = make_batch(batch=2, length=6, lengths=(6, 4))
    names = ["b", "a"]

    def per_row_loss():
        # each row alone with its adapter, through the same reduction (mean over the two rows)
        total = 0.0
        for row, name in enumerate(names):
            unipelt.set_adapter(model, name)
            logits = model(input_ids=batch["input_ids"][row:row + 1],
                           attention_mask=batch["attention_mask"][row:row + 1]).logits
            total = total + logits.float().pow(2).mean() / len(names)
        return total

    with torch.no_grad():
        want = per_row_loss()
        got = torch.compile(LossWrapper(model), backend="aot_eager")(
            batch["input_ids"], batch["attention_mask"], adapter_names=names)
    # rows of equal length contribute equal element counts: the batch mean is the mean of rows
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
