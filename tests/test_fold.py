"""The base projection and its LoRA as one autograd node (unipelt.fold).

- The folded node against the unfolded computation (F.linear + s·(x·Aᵀ)·Bᵀ): forward and the
  gradients of x, every A and every B, one to three members, awkward widths, with and without
  bias, members whose output gets no gradient, float32 and bfloat16 (CPU), the base frozen.
- Models: what folds (a lone LoRA projection alone, a fusion group of LoRA projections as one
  node; not gated, dropout or reference-executor branches), and that the folded model gives the
  reference executor's outputs and gradients; compiled (aot_eager, fullgraph) the ordinary path by
  default, the fold's custom ops with ``UNIPELT_FOLD=compiled``, both equal to eager.
- On CUDA (skipped without): the same node in bfloat16 against float32.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager
from torch.nn import functional as F

import unipelt
import unipelt.fold as fold
from conftest import make_batch, make_bert, make_llama, randomize
from unipelt.compiler import get_state, set_executor
from unipelt.report import report_dict, report_text

# (dtype, atol, rtol) of the node against the unfolded float computation of the same inputs:
# float32 differs by the order of the sums only; bfloat16 rounds h = b + s·u·Bᵀ to bf16 before the
# base GEMM adds into it (the unfolded path rounds x·Wᵀ + b instead), so a few bf16 ulps of |y|
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (6e-2, 3e-2)}


@pytest.fixture(autouse=True)
def _fold_on(monkeypatch):
    # the fold is opt-in (fold.DEFAULT "0"): these tests turn it on, as a user does
    monkeypatch.setenv(fold.ENV_VAR, "eager")


def _members(widths, outs, K, bias, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.5).to(device=device, dtype=dtype)

    ws = [rnd(n, K) for n in outs]
    bs = [rnd(n) if bias else None for n in outs]
    As = [rnd(r, K).requires_grad_() for r in widths]
    Bs = [rnd(n, r).requires_grad_() for n, r in zip(outs, widths)]
    return ws, bs, As, Bs


def _reference(x, ws, bs, As, Bs, scales):
    return [F.linear(x, w, b) + s * F.linear(F.linear(x, a), bu) for w, b, a, bu, s in zip(ws, bs, As, Bs, scales)]


def _folded(x, ws, bs, As, Bs, scales):
    a = As[0] if len(As) == 1 else torch.cat(As, 0)
    return fold._FoldedLinears.apply(x, a, tuple(scales), tuple(a.shape[0] for a in As), *ws, *bs, *Bs)


def _check(M, K, widths, outs, bias, dtype, used=None, device="cpu"):
    ws, bs, As, Bs = _members(widths, outs, K, bias, dtype, device)
    scales = [2.0, 0.5, 1.25][:len(widths)]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(M, K, generator=g).to(device=device, dtype=dtype).requires_grad_()
    used = range(len(widths)) if used is None else used
    cot = [torch.randn(M, n, generator=g).to(device=device, dtype=dtype) for n in outs]
    results = []
    # the reference in float32 from the same (rounded) inputs; the node in the dtype under test
    for f, cast in ((_reference, torch.float32), (_folded, dtype)):
        leaves = [x] + As + Bs
        xs = [t.detach().to(cast).requires_grad_() for t in leaves]
        xi, Ai, Bi = xs[0], xs[1:1 + len(As)], xs[1 + len(As):]
        ys = f(xi, [w.to(cast) for w in ws], [None if b is None else b.to(cast) for b in bs], Ai, Bi, scales)
        loss = sum((ys[i].float() * cot[i].float()).sum() for i in used)
        loss.backward()
        # (an unused member's A and B: None in the reference, zeros in the node)
        results.append(([y.detach().float() for y in ys],
                        [t.grad.float() if t.grad is not None else torch.zeros(t.shape) for t in xs]))
    atol, rtol = TOL[dtype]
    (ry, rg), (fy, fg) = results
    for a, b in zip(fy, ry):
        assert torch.allclose(a, b, atol=atol * max(1.0, b.abs().max().item()), rtol=rtol), (a - b).abs().max()
    for i, (a, b) in enumerate(zip(fg, rg)):
        scale = max(1.0, b.abs().max().item())
        assert torch.allclose(a, b, atol=atol * scale, rtol=rtol), (i, (a - b).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("widths,outs", [((1,), (29,)), ((16,), (37,)), ((5, 16), (23, 23)), ((4, 1, 8), (29, 13, 29))])
def test_folded_node_equals_the_unfolded_computation(widths, outs, bias, dtype):
    _check(M=13, K=37, widths=widths, outs=outs, bias=bias, dtype=dtype)


def test_a_member_without_gradient():
    # only the first member's output reaches the loss: the others' dY is None (zero columns of dz)
    _check(M=9, K=11, widths=(3, 2, 4), outs=(7, 5, 7), bias=True, dtype=torch.float32, used=[0])


def test_frozen_base_gets_no_gradient_and_x_without_grad_is_fine():
    ws, bs, As, Bs = _members((3,), (6,), 5, True, torch.float32)
    ws[0].requires_grad_(False)
    x = torch.randn(4, 5)  # the first block's input may not require grad: dX is not computed
    (y,) = _folded(x, ws, bs, As, Bs, [2.0])
    y.sum().backward()
    assert ws[0].grad is None and x.grad is None
    assert As[0].grad is not None and Bs[0].grad is not None


# ------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------
BERT_SITES = ["attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down"]
LLAMA_SITES = ["attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate", "ffn.up", "ffn.down"]


def _lora(sites, dropout=0.0, **extra):
    return {"version": 1, "name": "lo", "modules": {"lora": {"method": "lora", "sites": sites, "r": 4, "alpha": 8,
                                                              "dropout": dropout, **extra}}}


def _adapted(make, spec):
    model = make()
    h = unipelt.compile(model, spec)
    randomize(h)
    model.train()
    return model, h


def _folds(model) -> list[tuple[int, ...]]:
    """Per fold of the model, once: the number of its members."""
    seen = {}
    for host in get_state(model).hosts.values():
        if host.fold is not None:
            seen[id(host.fold)] = len(host.fold.members)
    return sorted(seen.values())


def _step(model, h, batch):
    for p in h.parameters():
        p.grad = None
    out = model(**batch).logits
    out.float().pow(2).mean().backward()
    return out.detach(), {k: p.grad.detach().clone() for k, p in h.named_parameters().items()}


def _compare(a, b, atol=2e-5):
    (oa, ga), (ob, gb) = a, b
    assert torch.allclose(oa, ob, atol=atol, rtol=1e-5), (oa - ob).abs().max()
    assert ga.keys() == gb.keys()
    for k in ga:
        assert torch.allclose(ga[k], gb[k], atol=atol, rtol=1e-4), (k, (ga[k] - gb[k]).abs().max())


@pytest.mark.parametrize("make,sites,expected", [
    # BERT: per layer q/k/v (one group, one node), o, up, down alone
    (make_bert, BERT_SITES, [1] * 6 + [3] * 2),
    # llama: q/k/v and gate/up groups, o and down alone
    (make_llama, LLAMA_SITES, [1] * 4 + [2] * 2 + [3] * 2),
])
def test_folded_model_equals_the_reference_executor(make, sites, expected):
    model, h = _adapted(make, _lora(sites))
    batch = make_batch()
    set_executor(model, "reference")
    assert _folds(model) == []
    ref = _step(model, h, batch)
    set_executor(model, "grouped")
    assert _folds(model) == expected
    groups = report_dict(h)["fusion_groups"]
    assert groups and all(g["folded"] for g in groups)
    assert "[folded with the base projections" in report_text(h)
    calls = []
    orig = fold._FoldedLinears.apply
    try:
        fold._FoldedLinears.apply = lambda *a: calls.append(1) or orig(*a)
        got = _step(model, h, batch)
    finally:
        fold._FoldedLinears.apply = orig
    assert len(calls) == len(expected)  # each node once per forward, its members served from it
    _compare(got, ref)
    for name, p in model.named_parameters():
        if not name.startswith("unipelt."):
            assert p.grad is None, name  # the base stays frozen


def test_fold_off_by_environment(monkeypatch):
    model, h = _adapted(make_bert, _lora(BERT_SITES))
    monkeypatch.setenv(fold.ENV_VAR, "0")
    set_executor(model, "grouped")
    assert _folds(model) == []
    monkeypatch.setenv(fold.ENV_VAR, "eager")
    set_executor(model, "grouped")
    assert _folds(model) != []
    monkeypatch.delenv(fold.ENV_VAR)  # the default: off
    set_executor(model, "grouped")
    assert fold.mode() == "0" and _folds(model) == []
    monkeypatch.setenv(fold.ENV_VAR, "yes")
    with pytest.raises(ValueError, match="UNIPELT_FOLD"):
        fold.mode()


def test_what_does_not_fold():
    # input dropout (its own dropped-out x), a gate (UniPELT), a projection with two adapters live
    model, _ = _adapted(make_bert, _lora(BERT_SITES, dropout=0.1))
    assert _folds(model) == []
    model = make_bert()
    h = unipelt.compile(model, str(Path(__file__).resolve().parents[1] / "specs" / "unipelt.yaml"))
    assert _folds(model) == []
    model = make_bert()
    unipelt.compile(model, _lora(["attn.q"]), name="lo")
    h2 = unipelt.compile(model, _lora(["attn.q"]), name="lo2")
    unipelt.set_adapter(model, ["lo", "lo2"])
    assert _folds(model) == []
    unipelt.set_adapter(model, "lo")
    assert _folds(model) == [1, 1]  # q of each of the two layers
    del h, h2


def test_autocast_and_mixed_batches_take_the_ordinary_path(monkeypatch):
    # per call: under autocast (the base casts, the fold would not) and in a mixed batch (rows of
    # several adapters) nothing folds: the unfolded executor's path, bit for bit
    model, h = _adapted(make_bert, _lora(BERT_SITES))
    batch = make_batch()
    calls = []
    orig = fold._FoldedLinears.apply
    monkeypatch.setattr(fold._FoldedLinears, "apply", lambda *a: calls.append(1) or orig(*a))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(**batch).logits
        monkeypatch.setenv(fold.ENV_VAR, "0")
        set_executor(model, "grouped")
        ref = model(**batch).logits
    assert calls == [] and torch.equal(got, ref)
    monkeypatch.setenv(fold.ENV_VAR, "eager")
    set_executor(model, "grouped")
    unipelt.compile(model, _lora(["attn.q"]), name="other")
    unipelt.set_adapter(model, "default")
    assert _folds(model) != []
    with torch.no_grad():
        mixed = model(**batch, adapter_names=["default", "other", "default"]).logits
        alone = model(**batch).logits
    assert calls == [1] * len(_folds(model))  # the plain call folded, the mixed one did not
    torch.testing.assert_close(mixed[[0, 2]], alone[[0, 2]], atol=2e-5, rtol=1e-5)


def test_group_with_an_unfoldable_reader_keeps_its_path():
    # q (PiSSA: its delta carries a residual, so it cannot fold) and v (a plain LoRA) share one z:
    # v does not fold either, the group keeps its own path
    model, h = _adapted(make_bert, {"version": 1, "name": "lo", "modules": {
        "a": {"method": "lora", "sites": ["attn.q"], "r": 4, "alpha": 8, "init": "pissa"},
        "b": {"method": "lora", "sites": ["attn.v"], "r": 4, "alpha": 8}}})
    assert _folds(model) == []
    assert not any(g["folded"] for g in report_dict(h)["fusion_groups"])
    batch = make_batch()
    set_executor(model, "reference")
    ref = _step(model, h, batch)
    set_executor(model, "grouped")
    _compare(_step(model, h, batch), ref)


def test_triton_executor_folds_too():
    pytest.importorskip("triton")
    model, h = _adapted(make_llama, _lora(LLAMA_SITES))
    batch = make_batch()
    set_executor(model, "reference")
    ref = _step(model, h, batch)
    set_executor(model, "triton")
    assert _folds(model) == [1] * 4 + [2] * 2 + [3] * 2
    _compare(_step(model, h, batch), ref)


def _compiled_step(model, h, batch):
    """(the dynamo graphs' code, the outputs and gradients of one compiled step: aot_eager, fullgraph)."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm.code)
        return aot_eager(gm, inputs)

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for p in h.parameters():
        p.grad = None
    out = compiled(**batch).logits
    out.float().pow(2).mean().backward()
    got = (out.detach(), {k: p.grad.detach().clone() for k, p in h.named_parameters().items()})
    torch._dynamo.reset()
    return graphs, got


@pytest.mark.parametrize("make,sites", [(make_bert, BERT_SITES), (make_llama, LLAMA_SITES)])
def test_compiled_train_step_equals_eager(make, sites, monkeypatch):
    monkeypatch.setenv(fold.ENV_VAR, "compiled")
    model, h = _adapted(make, _lora(sites))
    set_executor(model, "grouped")
    batch = make_batch()
    eager = _step(model, h, batch)
    graphs, got = _compiled_step(model, h, batch)
    _compare(got, eager)
    # the folds are in the graph as the custom op, one call per node
    assert sum(g.count("unipelt.folded_linears") for g in graphs) == len(_folds(model))


def test_compiled_forward_does_not_fold_by_default():
    # (measured no faster compiled: unipelt.fold.MODES) the compiled graph has the ordinary path
    model, h = _adapted(make_llama, _lora(LLAMA_SITES))
    set_executor(model, "grouped")
    assert _folds(model) != []
    batch = make_batch()
    eager = _step(model, h, batch)
    graphs, got = _compiled_step(model, h, batch)
    assert "folded_linears" not in "".join(graphs)
    _compare(got, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("widths,outs", [((16,), (768,)), ((16, 16, 16), (768, 768, 768)), ((16, 8), (3072, 1000))])
def test_gpu_folded_node(widths, outs, bias):
    _check(M=4096 + 3, K=768, widths=widths, outs=outs, bias=bias, dtype=torch.bfloat16, device="cuda")
    _check(M=1000, K=300, widths=widths, outs=outs, bias=bias, dtype=torch.float32, device="cuda")
