"""What a compiled mixed-batch train step leaves to the host (issue 12, BERT mixed8 host-bound
under CUDA graphs, session 8's H200 profile): the selection's index tensors must reach the
captured forward as ordinary inputs, not as *static* ones (a CUDA-graph tree checks a static
input's address at every replay: a new row-id tensor each call failed that check every step),
and each LoRA B's gradient must leave the captured backward contiguous (a strided column block
of the stacked gradient is copied by AccumulateGrad outside the graph, per adapter and projection).
"""
from __future__ import annotations

import gc

import pytest
import torch

import unipelt
from unipelt.state import get_state
from conftest import FACTORIES, make_batch, randomize
from test_conformance import CASES

CASE = next(c for c in CASES if c.name == "lora_qv-bert")  # its spec: plain LoRA on q, v


def _mixed(arch: str = "bert"):
    model = FACTORIES[arch]()
    handles = []
    for i, n in enumerate("abc"):
        h = unipelt.compile(model, CASE.spec, name=n)
        randomize(h, seed=i + 1, std=0.2)
        handles.append(h)
    model.train()
    return model, handles


def _ctx(handle):
    return get_state(handle.model).ctx


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_compiled_mixed_index_tensors_are_not_static_inputs(arch):
    torch._dynamo.reset()
    model, handles = _mixed(arch)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    batch = make_batch(batch=4, length=7, lengths=(7, 5, 3, 6))
    for names in (["a", "b", "c", "a"], ["c", "a", "b", "b"]):
        compiled(**batch, adapter_names=names).logits.pow(2).mean().backward()
        rows = _ctx(handles[0]).rows
        assert rows is not None and rows.adapters == ("a", "b", "c")
        tensors = {"row_ids": rows.row_ids, "inverse": rows.inverse, "base_rows": rows.base_rows,
                   **{f"index[{n}]": rows.index(n) for n in rows.adapters}}
        # torch.compile marks the tensors it takes for static inputs with this attribute
        # (torch._dynamo.mark_static_address); the stacked LoRA product reads row_ids
        static = [k for k, t in tensors.items() if getattr(t, "_dynamo_static_input_type", None) is not None]
        assert static == [], f"mixed-batch index tensors captured as static inputs: {static}"


def test_selection_tensors_live_per_context_and_go_with_it():
    from unipelt import runtime

    model, handles = _mixed()
    batch = make_batch(batch=4, length=7, lengths=(7, 5, 3, 6))
    ctx = _ctx(handles[0])
    with torch.no_grad():
        model(**batch, adapter_names=["a", "b", "c", "a"])
        first = ctx.rows
        assert first.row_ids.tolist() == [0, 1, 2, 0]
        model(**batch, adapter_names=["c", "c", "__base__", "b"])
    # one entry per context, replaced by the next call's selection
    assert ctx.rows.row_ids.tolist() == [2, 2, -1, 1]
    assert ctx.rows.index("c").tolist() == [0, 1] and ctx.rows.base_rows.tolist() == [2]
    slot = ctx.slot
    assert slot in runtime._CALL_TENSORS
    del model, handles, ctx, first
    gc.collect()
    assert slot not in runtime._CALL_TENSORS


def test_a_copied_model_has_its_own_selection_slot():
    import copy
    import pickle

    model, handles = _mixed()
    batch = make_batch(batch=4, length=7, lengths=(7, 5, 3, 6))
    twin = copy.deepcopy(model)
    thawed = pickle.loads(pickle.dumps(model))
    slots = {get_state(m).ctx.slot for m in (model, twin, thawed)}
    assert len(slots) == 3
    with torch.no_grad():
        model(**batch, adapter_names=["a", "b", "c", "a"])
        twin(**batch, adapter_names=["c", "c", "b", "a"])
    # the twin's call did not replace the original's selection tensors
    assert get_state(model).ctx.rows.row_ids.tolist() == [0, 1, 2, 0]
    assert get_state(twin).ctx.rows.row_ids.tolist() == [2, 2, 1, 0]


def test_compiled_mixed_lora_b_gradients_leave_the_graph_contiguous():
    torch._dynamo.reset()
    model, handles = _mixed()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    batch = make_batch(batch=4, length=7, lengths=(7, 5, 3, 6))
    names = ["b", "a", "c", "a"]
    seen: list[tuple[str, bool]] = []
    params = [(f"{h.name}.{n}", p) for h in handles for n, p in h.named_parameters().items()]
    assert any("lora_B" in n for n, _ in params)
    hooks = [p.register_hook(lambda g, n=n: seen.append((n, g.is_contiguous()))) for n, p in params]

    def grads(fn):
        seen.clear()
        for _, p in params:
            p.grad = None
        fn(**batch, adapter_names=names).logits.pow(2).mean().backward()
        return [p.grad.clone() for _, p in params]

    want = grads(model)
    got = grads(compiled)
    for h in hooks:
        h.remove()
    strided = [n for n, contiguous in seen if not contiguous]
    assert len(seen) == len(params) and strided == [], f"strided gradients out of the graph: {strided}"
    for (n, _), g, w in zip(params, got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=n)
