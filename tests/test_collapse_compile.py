"""A collapsed adapter and a prefix under ``torch.compile`` (issue 12's serving target is measured
compiled: benchmarks/speed.py ``--modes reduce-overhead``).

- CPU: a collapsed UniPELT (LoRA merged, gates constant, the prefix without its MLP) compiles in
  one graph (fullgraph, aot_eager) that gives the eager outputs, and new inputs of the same shape
  compile nothing new.
- CUDA: a causal model with a prefix and no padding mask compiles to the flash kernel itself
  (``aten._scaled_dot_product_flash_attention``, lower-right causal) instead of SDPA over a dense
  mask, which takes SDPA off the flash kernel; outputs and gradients equal the eager forward
  (which reaches flash through CausalBias), with grouped-query heads and with per-query gates
  (the widened head dimension).
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import unipelt
from conftest import make_bert, make_batch, make_llama, randomize
from test_collapse import trained_ish


def _graph_ops(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


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


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash kernel needs a CUDA GPU")

PREFIX = {"version": 1, "modules": {"prefix": {"method": "prefix", "sites": "attn.kv", "length": 5,
                                               "reparam": "none"}}}
GATED = {"version": 1, "modules": {"prefix": {"method": "prefix", "sites": "attn.kv", "length": 5,
                                              "reparam": "none", "gate": {"input": "layer", "kv": "separate"}}}}


@pytest.mark.parametrize("spec,kv_heads", [(PREFIX, 2), (PREFIX, 4), (GATED, 2)],
                         ids=["gqa", "mha", "per-query-gates"])
def test_compiled_causal_prefix_calls_the_kernel_as_flash_is_called(monkeypatch, spec, kv_heads):
    """On CPU, the compiled path's plumbing (heads repeated for GQA, the widened head dimension of
    per-query gates, the scale, the output layout) with the kernel replaced by a lower-right
    causal reference: the compiled outputs are the eager ones (a dense mask + SDPA there)."""
    import unipelt.attention as attention

    calls = []

    def lower_right(q, k, v, dropout, causal, debug_mask, scale=None):
        assert causal and dropout == 0.0 and not debug_mask
        calls.append((q.shape, k.shape))
        t, s = q.shape[2], k.shape[2]
        mask = torch.ones(t, s, dtype=torch.bool).tril(s - t)  # every query sees the s - t prefix keys
        return (torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale),)

    monkeypatch.setattr(attention, "_FLASH", lower_right)
    monkeypatch.setattr(attention, "_flash_capable", lambda query: True)
    torch._dynamo.reset()
    model = make_llama(hidden=64, attn_implementation="sdpa", num_key_value_heads=kv_heads)
    h = unipelt.compile(model, spec)
    randomize(h, std=0.5)
    ids = make_batch(seed=5, batch=2, length=24)["input_ids"]  # no mask: SDPA's is_causal case
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert not calls  # eager: CausalBias
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids).logits
    width = 16 * (2 if spec is GATED else 1)  # the gated prefix's own head-dimension block
    assert calls and all(tuple(q) == (2, 4, 24, width) and tuple(k) == (2, 4, 29, width) for q, k in calls)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


@cuda
@pytest.mark.parametrize("spec,kv_heads", [(PREFIX, 2), (PREFIX, 4), (GATED, 2)],
                         ids=["gqa", "mha", "per-query-gates"])
def test_compiled_causal_prefix_runs_the_flash_kernel(spec, kv_heads):
    torch._dynamo.reset()
    model = make_llama(hidden=64, attn_implementation="sdpa", num_key_value_heads=kv_heads)  # head dim 16
    h = unipelt.compile(model, spec)
    randomize(h, std=0.5)
    model.to("cuda", torch.bfloat16)
    ids = make_batch(seed=5, batch=2, length=24)["input_ids"].cuda()  # no mask: SDPA's is_causal case
    seen: list[set[str]] = []

    def backend(gm, example_inputs):
        seen.append(_graph_ops(gm))
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
        got = compiled(input_ids=ids).logits.float()
    assert any("_scaled_dot_product_flash_attention" in op for ops in seen for op in ops), seen
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    # against a float32 reference on the dense mask path (CPU), so both bf16 paths are right, not
    # only alike
    ref = model.to("cpu", torch.float32)
    with torch.no_grad():
        exact = ref(input_ids=ids.cpu()).logits
    torch.testing.assert_close(got.cpu(), exact, atol=6e-2, rtol=6e-2)
    model.to("cuda", torch.bfloat16)

    # training: the compiled gradients are the eager ones
    model.train()
    def grads(fn):
        for p in h.parameters():
            p.grad = None
        fn(input_ids=ids).logits.float().pow(2).mean().backward()
        return [p.grad.float().clone() for p in h.parameters()]

    for g, w in zip(grads(compiled), grads(model)):
        torch.testing.assert_close(g, w, atol=2e-2, rtol=5e-2)
    torch._dynamo.reset()
