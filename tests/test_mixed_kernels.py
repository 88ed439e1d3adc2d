"""Mixed batches (``adapter_names=[...]``) of plain LoRA adapters on the Triton path: the stacked
product x·[A_1|..|A_N]ᵀ, the per-row column mask and the product with [B_1|..|B_N] run as the
fusion group's shrink and expand kernels, and a LoRA with input dropout joins the stack (its mask
drawn in the shrink as its own column segment), where the PyTorch path must run it as a segment
of its own rows. On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest)."""
from __future__ import annotations

import pytest
import torch

import unipelt
from unipelt.compiler import set_executor
from unipelt.runtime import SiteRuntime
from conftest import make_batch, make_bert, make_llama, randomize

lg = pytest.importorskip("unipelt_kernels.lora_group")

R = 4


def lora(dropout: float, sites=("attn.q", "attn.v")) -> dict:
    return {"modules": {"lora": {"method": "lora", "sites": list(sites), "r": R, "alpha": 8, "dropout": dropout}}}


def adapters(factory, dropouts: dict[str, float], executor: str):
    model = factory()
    handles = {}
    for i, (name, p) in enumerate(dropouts.items()):
        handles[name] = unipelt.compile(model, lora(p), name=name)
        randomize(handles[name], seed=10 + i, std=0.2)
    set_executor(model, executor)
    return model, handles


def per_row(model, batch, names):
    """Reference: each row from a call with only its adapter active (eval: dropout is identity)."""
    rows = []
    for i, n in enumerate(names):
        unipelt.set_adapter(model, [] if n == "__base__" else n)
        rows.append(model(**batch).logits[i])
    return torch.stack(rows)


class Calls:
    """Counts (and records) the kernel launches and the segment path of a forward."""

    def __init__(self, monkeypatch):
        self.shrink, self.expand, self.solo = [], [], 0
        shrink, expand, solo = lg.lora_shrink, lg.lora_expand, SiteRuntime.apply_solo

        def rec_shrink(x, weight, bias=None, act_start=None, segments=None, seed=None, replayed_only=False):
            z = shrink(x, weight, bias, act_start, segments, seed, replayed_only)
            self.shrink.append(dict(x=x.detach(), w=weight.detach(), segments=segments, seed=seed, z=z.detach()))
            return z

        def rec_expand(out, u, b, gate=None, scale=1.0, replayed_only=False):
            y = expand(out, u, b, gate, scale, replayed_only)
            self.expand.append(dict(out=out.detach(), u=u.detach(), b=b.detach(), y=y.detach()))
            return y

        def count_solo(rt, *a, **k):
            self.solo += 1
            return solo(rt, *a, **k)

        monkeypatch.setattr(lg, "lora_shrink", rec_shrink)
        monkeypatch.setattr(lg, "lora_expand", rec_expand)
        monkeypatch.setattr(SiteRuntime, "apply_solo", count_solo)


NAMES = ["a", "b", "__base__", "c", "a"]


@pytest.mark.parametrize("factory", [make_llama, make_bert], ids=["llama", "bert"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_triton_mixed_inference_equals_single_adapter_calls(monkeypatch, factory, dropout):
    model, _ = adapters(factory, {"a": dropout, "b": dropout, "c": 0.0}, "triton")
    model.eval()
    batch = make_batch(batch=5, length=7, lengths=(7, 5, 3, 6, 4))
    with torch.no_grad():
        want = per_row(model, batch, NAMES)
        calls = Calls(monkeypatch)
        got = model(**batch, adapter_names=NAMES).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    # one stacked shrink and one expand per projection (q and v of each layer), no segment
    layers = model.config.num_hidden_layers
    assert len(calls.shrink) == len(calls.expand) == 2 * layers and calls.solo == 0
    assert all(c["w"].shape[0] == 3 * R for c in calls.shrink)


def test_dropout_lora_stacks_in_eval_on_the_pytorch_path(monkeypatch):
    # eval: a LoRA's input dropout is the identity, so it runs in the stacked product like any
    # plain LoRA (before, an nn.Dropout excluded it from the stack: N segments of index_select)
    model, _ = adapters(make_llama, {"a": 0.1, "b": 0.2}, "grouped")
    model.eval()
    batch = make_batch(batch=4, length=7, lengths=(7, 5, 3, 6))
    names = ["a", "b", "__base__", "a"]
    with torch.no_grad():
        want = per_row(model, batch, names)
        calls = Calls(monkeypatch)
        got = model(**batch, adapter_names=names).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert calls.solo == 0 and not calls.shrink


def test_dropout_lora_in_training_runs_as_segments_without_the_kernels(monkeypatch):
    # training with an active dropout on the PyTorch path: the stack would need N dropped-out
    # copies of the whole x, so the adapters run on their own rows (segments), as before
    model, handles = adapters(make_llama, {"a": 0.2, "b": 0.0}, "grouped")
    model.train()
    calls = Calls(monkeypatch)
    model(**make_batch(batch=3), adapter_names=["a", "b", "a"]).logits.sum().backward()
    assert calls.solo > 0 and not calls.shrink
    assert all(p.grad is not None and p.grad.any() for h in handles.values() for p in h.parameters())


def test_triton_mixed_training_with_dropout_follows_the_formula(monkeypatch):
    """Each row of a projection gets y0 + s_a·((m ⊙ x)/(1 - p_a))·A_aᵀ·B_aᵀ, m the keep-mask the
    shrink draws from the call's seed for the column segment of a's rate: adapters of one rate
    share a segment (each row is read by its own adapter's columns only), their columns placed
    together; base rows keep y0; the loss of one adapter's rows trains that adapter only."""
    drops = {"a": 0.25, "b": 0.0, "c": 0.25}
    model, handles = adapters(make_llama, drops, "triton")
    model.train()  # (the tiny llama has no dropout of its own: attention_dropout is 0)
    batch = make_batch(batch=5, length=7, lengths=(7, 5, 3, 6, 4))
    calls = Calls(monkeypatch)
    logits = model(**batch, adapter_names=NAMES).logits
    assert calls.solo == 0 and len(calls.shrink) == 2 * model.config.num_hidden_layers
    T = batch["input_ids"].shape[1]
    row_adapter = [n for n in NAMES for _ in range(T)]  # the flattened token rows' adapters
    scale = 8 / R
    for sh, ex in zip(calls.shrink, calls.expand):
        assert sh["segments"] == [(2 * R, 0.25), (R, 0.0)] and sh["seed"] is not None
        x = sh["x"].reshape(-1, sh["x"].shape[-1])
        keep = lg.dropout_mask(sh["seed"], 0, tuple(x.shape), 0.25)
        x_a = x * keep / 0.75
        y0 = ex["out"].reshape(-1, ex["out"].shape[-1])
        want = y0.clone()
        w, b = sh["w"], ex["b"]
        for i, n in enumerate(row_adapter):
            if n == "__base__":
                continue
            j = "acb".index(n)  # the columns: the rate-0.25 segment (a, c), then b's
            xi = x[i] if n == "b" else x_a[i]
            want[i] = y0[i] + scale * (xi @ w[j * R:(j + 1) * R].t()) @ b[:, j * R:(j + 1) * R].t()
        torch.testing.assert_close(ex["y"].reshape(want.shape), want, atol=1e-4, rtol=1e-4)
    # the dropout really dropped something in a's rows (the test is not vacuous)
    assert not bool(keep.all())
    rows_a = [i for i, n in enumerate(NAMES) if n == "a"]
    logits[rows_a].sum().backward()
    assert all(p.grad is not None and p.grad.any() for p in handles["a"].parameters() if p.requires_grad)
    for n in ("b", "c"):  # c shares a's mask draw, not its gradient
        assert all(p.grad is None or not p.grad.any() for p in handles[n].parameters())


def test_triton_mixed_training_gradients_equal_single_adapter_calls(monkeypatch):
    # dropout p = 0 (no noise to match): the mixed loss's gradient for each adapter equals that of
    # its rows' loss under a single-adapter call, through the kernels' backward
    model, handles = adapters(make_bert, {"a": 0.0, "b": 0.0}, "triton")
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = make_batch(batch=4, length=7, lengths=(7, 5, 3, 6))
    names = ["a", "b", "b", "a"]
    calls = Calls(monkeypatch)

    def zero():
        for h in handles.values():
            for p in h.parameters():
                p.grad = None

    zero()
    model(**batch, adapter_names=names).logits.pow(2).sum().backward()
    assert calls.shrink and calls.solo == 0
    mixed = {n: [p.grad.clone() for p in h.parameters()] for n, h in handles.items()}
    for n, h in handles.items():
        unipelt.set_adapter(model, n)
        zero()
        rows = [i for i, m in enumerate(names) if m == n]
        model(**batch).logits[rows].pow(2).sum().backward()
        for g, p in zip(mixed[n], h.parameters()):
            assert p.grad.abs().sum() > 0
            torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


def test_triton_mixed_compiles_fullgraph():
    # the kernels are custom ops in the captured graph (forward and backward), with no segment
    # gathers; a new assignment of rows to the same adapters reuses it; compiled outputs equal
    # per-row single-adapter calls
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model, _ = adapters(make_llama, {"a": 0.2, "b": 0.0}, "triton")
    batch = make_batch(batch=3)
    ops: list[str] = []

    def record(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    counter = CompileCounterWithBackend(aot_autograd(fw_compiler=record, bw_compiler=record))
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    model.train()
    compiled(**batch, adapter_names=["a", "b", "a"]).logits.sum().backward()
    layers = model.config.num_hidden_layers
    assert sum("unipelt.lora_shrink.default" == o for o in ops) == 2 * layers, ops
    assert sum("unipelt.lora_expand_bwd.default" == o for o in ops) == 2 * layers
    assert not any("index_select" in o for o in ops)
    model.eval()
    with torch.no_grad():
        want = per_row(model, batch, ["b", "a", "a"])
        got = compiled(**batch, adapter_names=["b", "a", "a"]).logits
        frames = counter.frame_count
        compiled(**batch, adapter_names=["a", "a", "b"])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert counter.frame_count == frames, "a new row assignment recompiled the forward"
    torch._dynamo.reset()


@pytest.mark.parametrize("auto_on", [True, False])
def test_auto_stacks_dropout_on_the_kernels_when_compiled_only(monkeypatch, auto_on):
    # executor auto, even with the kernels off for ordinary groups (AUTO_USES_KERNELS False): a
    # mixed batch whose stack has an active dropout still runs the kernels in a
    # compiled forward (the PyTorch path could only run it as segments), but not in eager mode,
    # and a stack without dropout keeps the PyTorch products (on CPU the interpreter stands in
    # for CUDA: AUTO_DEVICES widened)
    from torch._dynamo.backends.common import aot_autograd
    from unipelt import executor as ex

    monkeypatch.setattr(ex, "AUTO_USES_KERNELS", auto_on)
    monkeypatch.setattr(ex, "AUTO_DEVICES", ("cuda", "cpu"))
    batch = make_batch(batch=3)
    for p, want_kernel in ((0.2, True), (0.0, False)):
        torch._dynamo.reset()
        model, _ = adapters(make_llama, {"a": p, "b": p}, "auto")
        model.train()
        calls = Calls(monkeypatch)
        model(**batch, adapter_names=["a", "b", "a"]).logits.sum().backward()
        assert not calls.shrink and (calls.solo > 0) == (p > 0)  # eager: segments / PyTorch stack
        ops: list[str] = []

        def record(gm, example_inputs):
            ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return gm

        compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
        compiled(**batch, adapter_names=["a", "b", "a"]).logits.sum().backward()
        assert ("unipelt.lora_shrink.default" in ops) == want_kernel
        assert (not any("index_select" in o for o in ops)) or not want_kernel
    torch._dynamo.reset()
