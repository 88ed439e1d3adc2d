"""LoRA's expansion written into the base output (plugins/lora.py ``addmm_into``).

Where a plain ``nn.Linear`` leaf's fresh output is read by nothing but its host, LoRA's
``expand_into`` accumulates u·Bᵀ into it in place (one GEMM with beta = 1) instead of
``torch.addmm(out, u, Bᵀ)``, which copies the whole output first. Checked here:

- ``addmm_into`` gives torch.addmm's values and gradients (out's upstream, u, B) bit for bit, in
  float32 and bfloat16, with u a column slice of a wider z (the grouped executor's);
- on BERT with LoRA on every linear the in-place product is what runs (no out-of-place addmm
  remains), and outputs and gradients equal the per-branch reference executor's;
- it is not used where the old output could be read or autograd would pay for it: a forward
  hook on the base layer (which then still holds the base value), autocast (bf16 u and output,
  float32 B), a view, a leaf that requires grad, an inference tensor; results stay equal there.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import unipelt
from conftest import make_batch, make_bert, randomize
from unipelt.compiler import set_executor
from unipelt_plugins.lora import _may_write, addmm_into


@pytest.fixture(autouse=True)
def _unfolded(monkeypatch):
    # the path checked here is the unfolded one (a folded projection runs base and LoRA as one
    # node, unipelt/fold.py, tests/test_fold.py); it still runs wherever the fold does not
    monkeypatch.setenv("UNIPELT_FOLD", "0")


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("three_d", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_addmm_into_equals_addmm_values_and_gradients(dtype, three_d):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 12, generator=g).to(dtype).requires_grad_()
    w = torch.randn(9, 12, generator=g).to(dtype)
    z = torch.randn(2, 5, 24, generator=g).to(dtype).requires_grad_()
    B = torch.randn(9, 8, generator=g).to(dtype).requires_grad_()
    up = torch.randn(2, 5, 9, generator=g).to(dtype)

    def run(inplace: bool):
        for t in (x, z, B):
            t.grad = None
        # a fresh base output whose creator does not save it: 2-D (an addmm's), or 3-D and not a
        # view (matmul's _unsafe_view, as F.linear without a bias returns)
        out = torch.matmul(x, w.t()) if three_d else x.reshape(-1, 12) @ w.t()
        assert not out._is_view()
        u = (z[..., 8:16] * 2.0).reshape(-1, 8)  # a column slice of a wider z, scaled (the grouped executor's u)
        if inplace:
            y = addmm_into(out, u, B)
        else:
            y = torch.addmm(out.reshape(-1, 9), u, B.t())
        y = y.view(2, 5, 9)
        (y * up).sum().backward()
        return y.detach().clone(), x.grad.clone(), z.grad.clone(), B.grad.clone()

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


def test_addmm_into_writes_out_and_marks_it():
    out = torch.zeros(3, 4).requires_grad_().clone()  # a non-leaf
    u, B = torch.ones(3, 2), torch.ones(4, 2)
    y = addmm_into(out, u, B)
    assert y is out and torch.equal(out, torch.full((3, 4), 2.0))
    assert out.grad_fn is not None and "AddmmInto" in type(out.grad_fn).__name__


def test_may_write_refuses_leaves_views_and_inference_tensors():
    assert _may_write(torch.zeros(2, 3).requires_grad_().clone())
    assert _may_write(torch.zeros(2, 3))
    assert not _may_write(torch.zeros(2, 3, requires_grad=True))  # a leaf that requires grad
    assert not _may_write(torch.zeros(4, 3).requires_grad_().clone()[:2])  # a view
    with torch.inference_mode():
        t = torch.zeros(2, 3)
    assert not _may_write(t)


def _lora_all(r: int = 4) -> dict:
    return {"version": 1, "name": "l", "modules": {"lora": {
        "method": "lora", "sites": ["attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down"],
        "r": r, "alpha": 2 * r, "dropout": 0.0}}}


def _step(model, handle, batch):
    for p in handle.parameters():
        p.grad = None
    out = model(**batch).logits
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), {k: p.grad.clone() for k, p in handle.named_parameters().items()}


def _assert_close(a, b):
    (oa, ga), (ob, gb) = a, b
    assert torch.allclose(oa, ob, atol=2e-5, rtol=1e-5), (oa - ob).abs().max()
    assert ga.keys() == gb.keys()
    for k in ga:
        assert torch.allclose(ga[k], gb[k], atol=2e-5, rtol=1e-4), (k, (ga[k] - gb[k]).abs().max())


def _adapted(model, spec):
    """``spec`` compiled onto ``model`` with random adapter weights, in train mode."""
    h = unipelt.compile(model, spec)
    randomize(h)
    model.train()
    return h


def _grouped_against_reference(model, spec, batch):
    """The adapted model's train step on the reference executor and then on the grouped one
    (its aten ops recorded); asserts they agree and returns (handle, grouped result, ops)."""
    h = _adapted(model, spec)
    set_executor(model, "reference")
    ref = _step(model, h, batch)
    set_executor(model, "grouped")
    ops = _Ops()
    with ops:
        got = _step(model, h, batch)
    _assert_close(got, ref)
    return h, got, ops


def test_bert_lora_all_linears_runs_in_place_and_equals_reference():
    model, batch = make_bert(), make_batch()
    h, got, ops = _grouped_against_reference(model, _lora_all(), batch)
    # 6 LoRAs x 2 layers accumulate in place; the only out-of-place addmm left is the base
    # linears' own (with their bias) and the pooler / classifier
    assert ops.names.count("addmm_") == 12
    plain = _step(model, h, batch)
    _assert_close(plain, got)


def test_llama_bias_free_linears_run_in_place_and_equal_reference():
    # llama's projections have no bias: F.linear returns matmul's 3-D non-view output
    from conftest import make_llama

    model = make_llama()
    spec = {"version": 1, "name": "l", "modules": {"lora": {
        "method": "lora", "sites": ["attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.gate", "ffn.down"],
        "r": 4, "alpha": 8, "dropout": 0.0}}}
    batch = {"input_ids": make_batch()["input_ids"]}
    h, got, ops = _grouped_against_reference(model, spec, batch)
    assert ops.names.count("addmm_") == 14  # 7 LoRAs x 2 layers


def test_not_in_place_where_the_old_output_could_be_read():
    model, batch = make_bert(), make_batch()
    h = _adapted(model, _lora_all())
    set_executor(model, "reference")
    ref = _step(model, h, batch)
    set_executor(model, "grouped")
    seen = []
    q = model.bert.encoder.layer[0].attention.self.query
    # a hook on the base layer may keep its output: it must still hold the base value afterwards
    handle = q.base_layer.register_forward_hook(lambda mod, args, out: seen.append((out, out.detach().clone())))
    ops = _Ops()
    try:
        with ops:
            got = _step(model, h, batch)
    finally:
        handle.remove()
    _assert_close(got, ref)
    assert ops.names.count("addmm_") == 11  # every LoRA but the hooked query's
    kept, value = seen[0]
    assert torch.equal(kept, value)


def test_autocast_mixed_dtypes_keep_the_out_of_place_sum():
    model, batch = make_bert(), make_batch()
    h = _adapted(model, _lora_all())
    set_executor(model, "grouped")
    ops = _Ops()
    with torch.autocast("cpu", dtype=torch.bfloat16), ops:
        out = model(**batch).logits
    out.float().sum().backward()
    assert "addmm_" not in ops.names  # bf16 u and output, float32 B: addmm_ would not cast
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in h.parameters())


def test_grouped_members_take_one_split_of_z():
    # the q/k/v group's members are one split of z: its backward is one cat of their gradients,
    # not a zero-filled z-sized gradient, a strided copy and an add per member (slice_backward)
    model, batch = make_bert(), make_batch()
    h, got, ops = _grouped_against_reference(model, _lora_all(), batch)
    assert "slice_backward" not in ops.names
    assert ops.names.count("split_with_sizes") == 2  # one per layer's q/k/v group
