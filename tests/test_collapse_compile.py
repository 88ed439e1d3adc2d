"""A collapsed adapter under ``torch.compile`` (issue 12's serving target is measured compiled:
benchmarks/speed.py ``--modes reduce-overhead``): a collapsed UniPELT (LoRA merged, gates
constant, the prefix without its MLP) compiles in one graph (fullgraph, aot_eager) that gives the
eager outputs, and new inputs of the same shape compile nothing new.

(The compiled causal prefix calling the flash kernel itself was tried in session 7 and taken out:
on the H200's torch 2.11 the compiled graph never reached it, benchmarks/RESULTS.md.)
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from conftest import make_bert, make_batch, make_llama
from test_collapse import trained_ish


@pytest.mark.parametrize("factory", [make_bert, make_llama], ids=["bert", "llama"])
def test_collapsed_model_compiles_in_one_graph(factory):
    torch._dynamo.reset()
    model = factory()
    h = trained_ish(model)
    calib = [make_batch(seed=i) for i in range(2)]
    h.collapse(calib)
    assert h.spec.collapsed  # some gates are constants now
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        for seed in (3, 4):  # same shapes, other values: the one graph serves both
            b = make_batch(seed=seed)
            torch.testing.assert_close(compiled(**b).logits, model(**b).logits, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1
    torch._dynamo.reset()
