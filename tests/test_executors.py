"""The executor axis of the conformance battery, fullgraph capture, and copies of adapted models.

- Every case runs under the per-branch reference executor and the grouped executor
  (plan.FusionGroup -> executor.GroupExecutor): equal outputs and gradients. The grouped path
  concatenates the readers of one tensor into one matrix product and multiplies the gate or
  scale into the r-wide projection instead of the output, so float32 results agree to rounding.
- ``torch.compile(fullgraph=True)`` captures every case (forward and backward, ``aot_eager`` on
  CPU) and gives the eager outputs and gradients; with ``dynamic=True`` a second sequence
  length and batch size compile nothing new.
- ``copy.deepcopy`` and pickling give an independent adapted model with the same outputs.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import unipelt
from conftest import make_batch, randomize
from test_conformance import CASES, batch, build, case, loss_fn  # noqa: F401 (fixtures)
from unipelt.compiler import get_state, set_executor

# float32, tiny models: concatenated GEMMs and the reassociated scale agree to rounding
EXEC_ATOL = 2e-5


def _run(model, handle, batch):
    for p in handle.parameters():
        p.grad = None
    loss = loss_fn(model, batch)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in handle.named_parameters().items() if p.grad is not None}
    return model(**batch).logits.detach(), grads


def _compare(a, b, atol):
    (oa, ga), (ob, gb) = a, b
    assert torch.allclose(oa, ob, atol=atol, rtol=1e-5), (oa - ob).abs().max()
    assert ga.keys() == gb.keys()
    for k in ga:
        assert torch.allclose(ga[k], gb[k], atol=atol, rtol=1e-4), (k, (ga[k] - gb[k]).abs().max())


def test_grouped_executor_equals_reference(case, batch):
    model = build(case)
    h = unipelt.compile(model, case.spec)
    randomize(h)
    model.train()
    set_executor(model, "reference")
    ref = _run(model, h, batch)
    set_executor(model, "grouped")
    grouped = _run(model, h, batch)
    _compare(grouped, ref, EXEC_ATOL)


def test_triton_executor_equals_reference(case, batch):
    # the Triton kernels (on CPU under TRITON_INTERPRET=1, set by conftest) behind the same
    # interface: float32, so the fused sigmoid and the kernels' block sums agree to rounding
    pytest.importorskip("triton")
    model = build(case)
    h = unipelt.compile(model, case.spec)
    randomize(h)
    model.train()
    set_executor(model, "reference")
    ref = _run(model, h, batch)
    set_executor(model, "triton")
    got = _run(model, h, batch)
    _compare(got, ref, EXEC_ATOL)


def test_groups_run_where_the_plan_has_them():
    # UniPELT on a 2-layer BERT: per layer, attn.in feeds LoRA q, LoRA v and the LoRA and prefix
    # gates (one product), and ffn.res (the renormalised residual sum) feeds the adapter and its gate
    from conftest import make_bert

    model = make_bert()
    h = unipelt.compile(model, "specs/unipelt.yaml")
    groups = get_state(model).ctx.groups
    on = sorted(g.group.key for g in groups.values() if g.on)
    assert on == ["0:attn.in", "0:ffn.res", "1:attn.in", "1:ffn.res"]
    assert [len(fg.members) for fg in h.graph.fusion_groups] == [len(groups[f"default/{fg.key}"].group.members) for fg in h.graph.fusion_groups]
    # the gate is evaluated once per layer per forward, not once per branch using it
    calls = []
    for gm in h.gate_modules.values():
        gm.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(**make_batch())
    assert calls == []  # grouped: no gate ran its own forward; its logits came from the group
    set_executor(model, "reference")
    with torch.no_grad():
        model(**make_batch())
    assert len(calls) >= len(h.gate_modules)
    # switching off the adapter turns its groups off (decided at switch time, not per call)
    unipelt.compile(model, {"modules": {"l": {"method": "lora", "sites": ["attn.q"], "r": 2}}}, name="other")
    assert not any(g.on for g in groups.values() if g.adapter == "default")


def test_dropout_lora_computes_alone():
    from conftest import make_bert

    model = make_bert()
    unipelt.compile(model, {"modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4, "dropout": 0.1}}})
    assert not any(g.on for g in get_state(model).ctx.groups.values())


# ------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------
def test_fullgraph_capture_equals_eager(case, batch):
    torch._dynamo.reset()
    model = build(case)
    h = unipelt.compile(model, case.spec)
    randomize(h)
    model.train()
    eager = _run(model, h, batch)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    _compare(_run(compiled, h, batch), eager, EXEC_ATOL)
    assert counter.frame_count >= 1


@pytest.mark.parametrize("name", ["lora_qv-bert", "unipelt_apl-bert", "unipelt_apl-llama", "prompt-llama",
                                  "p_tuning-bert", "unipelt_al_options-llama", "prefix-gpt2"])
def test_no_recompilation_across_lengths_and_batches(name):
    case = next(c for c in CASES if c.name == name)
    torch._dynamo.reset()
    model = build(case)
    h = unipelt.compile(model, case.spec)
    randomize(h)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    # (a decoder's inference call that returns a KV cache keeps running-mean gate state per
    # length for the next call, and compiles per length: generation is not covered here)
    no_cache = {"use_cache": False} if get_state(model).info.causal else {}
    with torch.no_grad():
        for b, t in [(3, 9), (2, 12), (4, 7)]:
            batch = make_batch(seed=t, batch=b, length=t)
            out = compiled(**batch, **no_cache).logits
            frames.append(counter.frame_count)
            assert torch.allclose(out, model(**batch).logits, atol=EXEC_ATOL)
    # whatever the first call compiled, a new length or batch size compiles nothing more
    assert frames[0] >= 1 and frames == [frames[0]] * 3, f"recompiled: frames after each call {frames}"
    # training steps (gradients on) at new lengths and batch sizes compile nothing more either
    model.train()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    for b, t in [(3, 9), (2, 12), (4, 7)]:
        loss_fn(compiled, make_batch(seed=t, batch=b, length=t)).backward()
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames == [frames[0]] * 3, f"training recompiled: frames after each call {frames}"


# ------------------------------------------------------------------------------------------
# copies
# ------------------------------------------------------------------------------------------
def test_deepcopy_and_pickle_give_independent_adapted_models(case, batch):
    model = build(case)
    h = unipelt.compile(model, case.spec)
    randomize(h)
    model.eval()
    with torch.no_grad():
        ref = model(**batch).logits
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    unpickled = pickle.loads(pickle.dumps(model))
    for other in (twin, loaded, unpickled):
        with torch.no_grad():
            assert torch.equal(other(**batch).logits, ref)
        state = get_state(other)
        assert state is not None and state is not get_state(model)
        assert state.info.model is other
        # the copy's adapter parameters are its own: changing them leaves the original alone
        with torch.no_grad():
            for p in other.unipelt.parameters():
                p.add_(0.5)
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, ref)
    # a copy detaches on its own, back to the base
    handle = get_state(twin).handles["default"]
    handle.detach()
    assert get_state(twin) is None and get_state(model) is not None


def test_unrolled_bilstm_equals_nn_lstm():
    # P-tuning's LSTM encoder under torch.compile runs unrolled from nn.LSTM's own parameters
    from unipelt_plugins.prompt import _bilstm_unrolled

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(12, 5, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(7, 12, requires_grad=True)
    ref = lstm(x[None])[0][0]
    got = _bilstm_unrolled(dict(lstm.named_parameters()), (lstm.num_layers, lstm.hidden_size), x)
    assert torch.allclose(got, ref, atol=1e-6)
    (gr,) = torch.autograd.grad(ref.square().sum(), x)
    (gg,) = torch.autograd.grad(got.square().sum(), x)
    assert torch.allclose(gg, gr, atol=1e-5)


@pytest.mark.parametrize("source", ["spec", "env"])
def test_triton_that_cannot_run_is_one_model_error_and_leaves_the_model(source, monkeypatch):
    # `executor: triton` (or UNIPELT_EXECUTOR=triton) where the kernels cannot run (a CPU tensor
    # without TRITON_INTERPRET): one ModelError naming the choice and why, before the model is
    # touched; it was a RuntimeError raised after every branch was attached, so the CLI printed a
    # traceback and a Python caller kept a half-compiled model
    pytest.importorskip("triton")
    from conftest import make_llama
    from unipelt.errors import ModelError
    from unipelt_kernels import lora_group

    monkeypatch.setattr(lora_group, "INTERPRET", False)  # as on a CPU without the interpreter
    model = make_llama()
    if source == "spec":  # onto a model that already carries an adapter: that one stays as it was
        other = unipelt.compile(model, {"modules": {"l": {"method": "lora", "sites": ["attn.k"], "r": 2}}}, name="other")
        randomize(other)
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(**make_batch()).logits
    spec = {"modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4}}}
    if source == "spec":
        spec["executor"] = "triton"
    else:  # the variable is read by the first adapter's compile
        monkeypatch.setenv("UNIPELT_EXECUTOR", "triton")
    with pytest.raises(ModelError, match=r"'triton' cannot run on this model: tensor on cpu") as err:
        unipelt.compile(model, spec, name="new")
    assert str(err.value).startswith("executor" if source == "spec" else "UNIPELT_EXECUTOR=triton")
    state = get_state(model)
    if source == "spec":
        assert list(state.handles) == ["other"] and state.ctx.active == {"other"}
        assert state.executor != "triton"
    else:
        assert state is None
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(**make_batch()).logits, before)


def test_a_failed_first_refresh_detaches(monkeypatch):
    # the plan's first refresh runs inside compile's rollback: set_executor("triton") on a model
    # where the kernels cannot run raises ModelError (was RuntimeError), and a compile whose first
    # refresh fails leaves no half-attached adapter behind
    pytest.importorskip("triton")
    from conftest import make_llama
    from unipelt import state as state_mod
    from unipelt.errors import ModelError
    from unipelt_kernels import lora_group

    model = make_llama()
    unipelt.compile(model, {"modules": {"l": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 2}}})
    monkeypatch.setattr(lora_group, "INTERPRET", False)
    with pytest.raises(ModelError, match="executor 'triton' was chosen but cannot run"):
        set_executor(model, "triton")
    set_executor(model, "grouped")
    keys = list(model.state_dict())
    calls = []

    def failing(self, names):
        calls.append(names)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(self, names)

    real = state_mod.ModelState.set_active
    monkeypatch.setattr(state_mod.ModelState, "set_active", failing)
    with pytest.raises(RuntimeError, match="boom"):
        unipelt.compile(model, {"modules": {"a": {"method": "adapter", "sites": ["ffn.out"], "reduction_factor": 8}}}, name="x")
    st = get_state(model)
    assert list(st.handles) == ["default"] and st.ctx.active == {"default"}
    assert list(model.state_dict()) == keys
