"""Mixed batches run as segments (issue 12): at every hook point each adapter of the batch runs on
its own rows only (Host._run_rows), not over the whole batch once per adapter.

The oracle is the definition: each adapter alone (``set_adapter``) on the sub-batch of its rows.
UniPELT (gated LoRA q/v + gated prefix + a gated bottleneck adapter) with three adapters and a
base row, the adapter at each placement (serial at ffn.out, parallel to the FFN, Pfeiffer's
renormalised ffn.res, and at attn.res), on a pre-LN decoder and a post-LN encoder: outputs and
every adapter's gradients; the branches see their segment's rows only; compiled (fullgraph,
aot_eager) equals eager and a new assignment of rows with other segment sizes recompiles nothing.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import unipelt
from conftest import make_batch, make_bert, make_llama, randomize

PLACEMENTS = {"serial": "ffn.out", "parallel": "ffn", "pfeiffer": "ffn.res", "attn_res": "attn.res"}
FACTORY = {"llama": make_llama, "bert": make_bert}
NAMES = ["a", "b", "c", "a", "__base__", "c"]  # three adapters of 2, 1 and 2 rows, one base row
ATOL = 2e-5


def unipelt_spec(site: str) -> dict:
    return {"modules": {
        "lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4, "gate": True},
        "prefix": {"method": "prefix", "length": 3, "reparam_hidden": 16, "gate": True},
        "adapter": {"method": "adapter", "site": site, "reduction_factor": 4, "gate": True},
    }}


def three_adapters(arch: str, site: str):
    model = FACTORY[arch]()
    handles = {}
    for i, n in enumerate("abc"):
        h = unipelt.compile(model, unipelt_spec(site), name=n)
        randomize(h, seed=i + 1, std=0.2)
        handles[n] = h
    model.train()
    for m in model.modules():  # dropout off: the two computations must see the same noise (none)
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model, handles


def sub_batch(batch: dict, rows: list[int]) -> dict:
    return {k: v[rows] for k, v in batch.items()}


def zero_grads(handles) -> None:
    for h in handles.values():
        for p in h.parameters():
            p.grad = None


def grads(h) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in h.parameters()]


def weights_for(model, batch) -> torch.Tensor:
    with torch.no_grad():
        shape = model(**batch).logits.shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_segments_equal_each_adapter_alone_on_its_rows(arch, placement):
    model, handles = three_adapters(arch, PLACEMENTS[placement])
    batch = make_batch(batch=6, length=7, lengths=(7, 5, 3, 6, 4, 7))
    w = weights_for(model, batch)

    zero_grads(handles)
    out = model(**batch, adapter_names=NAMES, output_hidden_states=True)
    (out.logits * w).sum().backward()
    mixed = {n: grads(h) for n, h in handles.items()}

    for n in ["a", "b", "c", "__base__"]:
        rows = [i for i, m in enumerate(NAMES) if m == n]
        unipelt.set_adapter(model, [] if n == "__base__" else n)
        zero_grads(handles)
        alone = model(**sub_batch(batch, rows), output_hidden_states=True)
        torch.testing.assert_close(out.logits[rows].detach(), alone.logits.detach(), atol=ATOL, rtol=0)
        torch.testing.assert_close(out.hidden_states[-1][rows].detach(), alone.hidden_states[-1].detach(),
                                   atol=ATOL, rtol=0)
        if n == "__base__":
            continue
        (alone.logits * w[rows]).sum().backward()
        want = grads(handles[n])
        assert all(g.abs().sum() > 0 for g in want), "every parameter of the adapter has a gradient"
        for name, g, ww in zip(handles[n].parameters(), mixed[n], want):
            torch.testing.assert_close(g, ww, atol=1e-5, rtol=1e-4)
    # not vacuous: the adapters give their rows different outputs
    a0, c0 = NAMES.index("a"), NAMES.index("c")
    unipelt.set_adapter(model, "c")
    with torch.no_grad():
        other = model(**sub_batch(batch, [a0])).logits
    assert not torch.allclose(out.logits[a0].detach(), other[0], atol=1e-3)
    assert c0 != a0


def test_each_adapters_branches_see_its_rows_only(monkeypatch):
    """The work is per segment: every hook point runs adapter a's branches (LoRA q/v, the adapter)
    on a's rows, not on the batch (before segments each adapter ran over all six rows)."""
    from unipelt.runtime import SiteRuntime

    model, handles = three_adapters("llama", "ffn.res")
    seen: dict[str, set] = {n: set() for n in "abc"}
    calls = {"n": 0}
    original = SiteRuntime.apply_solo

    def spy(self, name, x, y, ctx):
        calls["n"] += 1
        seen[name].add((self.kind, None if x is None else x.shape[0], y.shape[0]))
        return original(self, name, x, y, ctx)

    monkeypatch.setattr(SiteRuntime, "apply_solo", spy)
    batch = make_batch(batch=6, length=7, lengths=(7, 5, 3, 6, 4, 7))
    with torch.no_grad():
        model(**batch, adapter_names=NAMES)
    rows = {"a": 2, "b": 1, "c": 2}
    for n, got in seen.items():
        assert {(k, r) for k, _, r in got} == {("linear", rows[n]), ("renorm", rows[n])}, (n, got)
        assert {xr for _, xr, _ in got} == {rows[n]}, (n, got)
    assert calls["n"] == 3 * 2 * 3  # three adapters x two layers x (q, v, ffn.res)


@pytest.mark.parametrize("arch,placement", [("llama", "serial"), ("llama", "parallel"), ("bert", "pfeiffer")])
def test_compiled_segments_equal_eager_without_recompiling(arch, placement):
    torch._dynamo.reset()
    model, handles = three_adapters(arch, PLACEMENTS[placement])
    batch = make_batch(batch=6, length=7, lengths=(7, 5, 3, 6, 4, 7))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    w = weights_for(model, batch)
    # segment sizes 2/1/2, then 1/3/1 and 1/1/4 (sizes of 1 included: no 0/1 specialisation)
    assignments = [NAMES, ["b", "b", "a", "b", "__base__", "c"], ["c", "a", "c", "c", "b", "c"]]
    frames = None
    for names in assignments:
        zero_grads(handles)
        got = compiled(**batch, adapter_names=names).logits
        (got * w).sum().backward()
        got_grads = {n: grads(h) for n, h in handles.items()}
        # the same step eagerly (the uncompiled model), on the same parameters
        zero_grads(handles)
        want = model(**batch, adapter_names=names).logits
        (want * w).sum().backward()
        torch.testing.assert_close(got.detach(), want.detach(), atol=ATOL, rtol=0)
        for n, h in handles.items():
            for g, ww in zip(got_grads[n], grads(h)):
                torch.testing.assert_close(g, ww, atol=1e-6, rtol=1e-4)
        if frames is None:
            frames = counter.frame_count
            assert frames >= 1
        assert counter.frame_count == frames, f"assignment {names} recompiled the forward"
    torch._dynamo.reset()


def test_gate_statistics_of_a_mixed_batch_are_each_adapters_own_rows():
    """What gate pruning reads (ctx.gate_log: each gate's mean per step) for every gate in a mixed
    batch (LoRA, prefix, adapter) is that adapter's rows' mean, as in a call of the adapter alone
    on them (over the whole batch, before segments, it mixed in the other adapters' rows)."""
    from unipelt.state import get_state

    model, handles = three_adapters("bert", "ffn.res")
    model.eval()
    ctx = get_state(model).ctx
    batch = make_batch(batch=6, length=7, lengths=(7, 5, 3, 6, 4, 7))

    def logged(**kw):
        ctx.gate_log = []
        with torch.no_grad():
            model(**kw)
        log, ctx.gate_log = ctx.gate_log, None
        return {(a, k): m for a, k, m in log}

    mixed = logged(**batch, adapter_names=NAMES)
    assert {a for a, _ in mixed} == {"a", "b", "c"}
    assert {k.split(".")[0].split("@")[0] for _, k in mixed} == {"lora", "prefix", "adapter"}, sorted(mixed)
    for n in "abc":
        rows = [i for i, m in enumerate(NAMES) if m == n]
        unipelt.set_adapter(model, n)
        alone = logged(**sub_batch(batch, rows))
        assert alone and set(alone) == {key for key in mixed if key[0] == n}
        for key, m in alone.items():
            torch.testing.assert_close(mixed[key], m, atol=1e-6, rtol=1e-5)
