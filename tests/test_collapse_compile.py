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


# -- the prefix's softmax split (unipelt.attention._split_prefix_attention, opt-in) -------------
import unipelt  # noqa: E402
import unipelt.attention as attention  # noqa: E402
from conftest import randomize  # noqa: E402
from test_collapse import SPEC  # noqa: E402


def _constant_collapsed(factory, adapter_closed: bool = False, **cfg):
    """A collapsed UniPELT whose every gate is constant (gate weights zero, as speed.py's
    collapse rows): the prefix is a plain one at every layer. Returns (model, handle, the gated
    model's outputs on the probe batch before the collapse, probe batch, tolerance used)."""
    model = factory(attn_implementation="sdpa", **cfg)
    h = unipelt.compile(model, SPEC)
    randomize(h)
    with torch.no_grad():
        for key, g in h.gate_modules.items():
            g.linear.weight.zero_()
            if adapter_closed and key.startswith("adapter"):
                g.linear.bias.fill_(-12.0)
    probe = make_batch(seed=9)
    with torch.no_grad():
        gated = model(**probe).logits
    h.collapse([make_batch(seed=i) for i in range(2)], tolerance=1e-4)
    return model, h, gated, probe


def _forward_graphs(model, batch) -> list:
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def fw(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=fw))
    with torch.no_grad():
        out = compiled(**batch).logits
    torch._dynamo.reset()
    return graphs, out


def _ops(graphs, name: str) -> list:
    return [n for g in graphs for n in g.graph.nodes if n.op == "call_function" and name in str(n.target)]


@pytest.mark.parametrize("factory", [make_bert, make_llama], ids=["bert", "llama-gqa"])
def test_split_prefix_equals_the_concatenation(monkeypatch, factory):
    # padded rows (make_batch pads), GQA on llama (4 query / 2 key-value heads), causal and bidirectional
    model, h, gated, probe = _constant_collapsed(factory)
    outs = {}
    for mode in ("never", "always"):
        monkeypatch.setattr(attention, "SPLIT_PREFIX", mode)
        with torch.no_grad():
            outs[mode] = model(**probe).logits
    torch.testing.assert_close(outs["always"], outs["never"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["always"], gated, atol=1e-4, rtol=1e-4)  # the collapse's tolerance


@pytest.mark.parametrize("factory", [make_bert, make_llama], ids=["bert", "llama-gqa"])
def test_compiled_collapsed_model_concatenates_no_keys(monkeypatch, factory):
    """Compiled with the split (SPLIT_PREFIX = "compiled"; not the default, measured slower on the
    H200), the prefix joins attention without [P; K] / [P; V] copies or prefix mask columns: no
    concatenation in the forward graph and every attention call sees the real keys only; with the
    concatenation ("never", the default) there are two per layer."""
    model, h, gated, probe = _constant_collapsed(factory)
    T, layers = probe["input_ids"].shape[1], model.config.num_hidden_layers
    L = SPEC["modules"]["prefix"]["length"]

    def prefix_cats(graphs):  # concatenations onto T + L keys (K, V) or mask columns; not RoPE's halves
        return [n for n in _ops(graphs, "aten.cat") if T + L in tuple(n.meta["val"].shape[2:])]

    monkeypatch.setattr(attention, "SPLIT_PREFIX", "never")
    graphs, out_never = _forward_graphs(model, probe)
    assert len(prefix_cats(graphs)) >= 2 * layers  # K and V per layer (+ the mask columns)
    monkeypatch.setattr(attention, "SPLIT_PREFIX", "compiled")
    graphs, out = _forward_graphs(model, probe)
    assert len(graphs) == 1
    assert prefix_cats(graphs) == []
    sdpa = _ops(graphs, "scaled_dot_product")
    assert len(sdpa) == layers
    for n in sdpa:  # the attention kernel gets the real keys only (T of them), and a log-sum-exp out
        assert n.args[1].meta["val"].shape[2] == T
    torch.testing.assert_close(out, out_never, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, gated, atol=1e-4, rtol=1e-4)


def test_split_prefix_is_not_used_where_gradients_flow(monkeypatch):
    """The kernels' log-sum-exp output has no gradient: with gradients into the prefix the
    concatenation runs (the prefix's gradients equal the concatenated path's)."""
    model = make_bert(attn_implementation="sdpa")
    h = unipelt.compile(model, {"version": 1, "modules": {"prefix": {"method": "prefix", "sites": "attn.kv",
                                                                      "length": 3, "reparam": "none"}}})
    randomize(h)
    batch = make_batch(seed=2)
    grads = {}
    called = []
    real = attention._split_prefix_attention
    monkeypatch.setattr(attention, "_split_prefix_attention", lambda *a, **k: called.append(1) or real(*a, **k))
    for mode in ("never", "always"):
        monkeypatch.setattr(attention, "SPLIT_PREFIX", mode)
        model.zero_grad()
        model(**batch).logits.square().sum().backward()
        grads[mode] = [p.grad.clone() for p in h.parameters() if p.grad is not None]
    assert called == []
    assert grads["always"] and all(torch.equal(a, b) for a, b in zip(grads["always"], grads["never"]))
    with torch.no_grad():  # and without gradients it is used
        model(**batch)
    assert len(called) == model.config.num_hidden_layers
