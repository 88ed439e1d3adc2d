"""``unipelt.pack_mixed`` / ``unpack_mixed`` (issue 12: a mixed train step's host work per parameter
tensor): the stacked LoRA A and B of each projection become one trainable tensor each, the
adapters' own lora_A / lora_B frozen views of them. References: the same steps on an unpacked
copy (independent per-adapter tensors, the path test_mixed_batch.py checks against per-row
single-adapter calls), saved adapters loaded into a fresh model, eager against compiled.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import unipelt
from unipelt.errors import ModelError
from unipelt.state import PACKED, get_state, memory_bytes
from conftest import FACTORIES, make_batch, randomize
from test_mixed_batch import ATOL, outputs

LORA_QV = {"modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4, "alpha": 8}}}
NAMES = ("a", "b", "c")
ROWS = ["b", "a", "__base__", "c", "a"]
LENGTHS = (7, 5, 3, 6, 4)


def mixed_model(arch: str, spec=LORA_QV, n: int = 3):
    model = FACTORIES[arch]()
    handles = []
    for i, name in enumerate(NAMES[:n]):
        h = unipelt.compile(model, spec, name=name)
        randomize(h, seed=i + 1, std=0.2)
        handles.append(h)
    model.train()
    return model, handles


def adapter_values(handles) -> dict[str, dict[str, torch.Tensor]]:
    return {h.name: {k: v.detach().clone() for k, v in h.state_dict().items()} for h in handles}


def train_steps(model, params, batches, names=ROWS):
    """forward (mixed rows), loss, backward, AdamW step; the losses."""
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    losses = []
    for batch in batches:
        loss = model(**batch, adapter_names=names).logits.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def batches(k: int = 3):
    return [make_batch(seed=s, batch=len(ROWS), length=7, lengths=LENGTHS) for s in range(1, k + 1)]


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_packed_train_steps_give_the_unpacked_weights(arch):
    ref, ref_handles = mixed_model(arch)
    model, handles = mixed_model(arch)
    before = adapter_values(handles)
    assert adapter_values(ref_handles).keys() == before.keys()
    n_lora = sum(p.requires_grad for p in model.parameters())
    memory = memory_bytes(model)
    packed = unipelt.pack_mixed(model)
    assert memory_bytes(model) == memory  # the views are not counted besides their stacks
    # one A and one B per projection (2 layers x q, v), whatever the number of adapters
    assert len(packed) == 2 * 2 * 2 and n_lora == 3 * len(packed)
    assert [p for p in model.parameters() if p.requires_grad] == packed
    # packing changes no value
    for name, tensors in adapter_values(handles).items():
        for k, v in tensors.items():
            torch.testing.assert_close(v, before[name][k], atol=0, rtol=0)

    want = train_steps(ref, [p for h in ref_handles for p in h.parameters()], batches())
    got = train_steps(model, packed, batches())
    assert got == pytest.approx(want, rel=1e-5)
    trained, reference = adapter_values(handles), adapter_values(ref_handles)
    for name in NAMES:
        for k, v in reference[name].items():
            assert not torch.equal(v, before[name][k]), f"{name}/{k} did not train"
            torch.testing.assert_close(trained[name][k], v, atol=1e-5, rtol=1e-4)


def test_saved_after_packing_loads_into_a_fresh_model(tmp_path):
    model, handles = mixed_model("bert")
    train_steps(model, unipelt.pack_mixed(model), batches(2))
    batch = make_batch(seed=7, batch=len(ROWS), length=7, lengths=LENGTHS)
    fresh = FACTORIES["bert"]()
    for h in handles:
        h.save(tmp_path / h.name)
        unipelt.load(fresh, tmp_path / h.name, name=h.name)
    model.eval()
    with torch.no_grad():
        got = outputs(model, batch, adapter_names=ROWS)
        want = outputs(fresh, batch, adapter_names=ROWS)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
        # without gradients a packed adapter runs alone from its views, as the loaded one does
        for name in NAMES:
            unipelt.set_adapter(model, name)
            unipelt.set_adapter(fresh, name)
            torch.testing.assert_close(outputs(model, batch)[0], outputs(fresh, batch)[0], atol=ATOL, rtol=0)


def test_unpack_restores_independent_trainable_parameters():
    model, handles = mixed_model("bert")
    own = [p for h in handles for p in h.parameters()]
    train_steps(model, unipelt.pack_mixed(model), batches(1))
    trained = adapter_values(handles)
    back = unipelt.unpack_mixed(model)
    assert PACKED not in model.unipelt and not get_state(model).ctx.packed
    # the same Parameter objects as before packing, trainable, each its own contiguous storage
    assert {id(p) for p in back} == {id(p) for p in own}
    assert all(p.requires_grad and p.is_contiguous() for p in own)
    assert len({p.untyped_storage().data_ptr() for p in own}) == len(own)
    for name, tensors in adapter_values(handles).items():
        for k, v in tensors.items():
            torch.testing.assert_close(v, trained[name][k], atol=0, rtol=0)
    # an ordinary call trains them again; writing one changes no other
    unipelt.set_adapter(model, "b")
    model(**make_batch(batch=3)).logits.pow(2).mean().backward()
    hb = handles[1]
    assert all(p.grad is not None and p.grad.any() for p in hb.parameters())
    assert all(p.grad is None for h in (handles[0], handles[2]) for p in h.parameters())
    a_values = adapter_values(handles[:1])
    with torch.no_grad():
        for p in hb.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, a_values["a"][k]) for k, v in adapter_values(handles[:1])["a"].items())
    assert unipelt.unpack_mixed(model) == []


def test_a_call_that_would_train_frozen_views_is_refused():
    model, handles = mixed_model("bert")
    unipelt.pack_mixed(model)
    batch = make_batch(batch=3)
    with pytest.raises(ModelError, match=r"packed for mixed batches.*unpack_mixed"):
        model(**batch)  # a single-adapter call with gradients
    with torch.no_grad():  # without gradients it runs (from the views)
        model(**batch)
    with pytest.raises(ModelError, match="packed already"):
        unipelt.pack_mixed(model)
    # an adapter attached after packing: the stack no longer holds the plan's members
    extra = unipelt.compile(model, LORA_QV, name="d", activate=False)
    randomize(extra, seed=9, std=0.2)
    with pytest.raises(ModelError, match="changed since packing"):
        model(**batch, adapter_names=["a", "d", "b"])
    with torch.no_grad():
        got = model(**batch, adapter_names=["a", "d", "b"]).logits
    unipelt.unpack_mixed(model)
    with torch.no_grad():
        torch.testing.assert_close(got, model(**batch, adapter_names=["a", "d", "b"]).logits, atol=ATOL, rtol=0)
    model(**batch, adapter_names=["a", "d", "b"]).logits.sum().backward()


def test_active_dropout_on_the_pytorch_executor_is_refused_when_packed():
    spec = {"modules": {"lora": {**LORA_QV["modules"]["lora"], "dropout": 0.1}}}
    model, _ = mixed_model("bert", spec)
    unipelt.pack_mixed(model)
    batch = make_batch(batch=3)
    with pytest.raises(ModelError, match="dropout is active"):
        model(**batch, adapter_names=["a", "b", "c"])
    model.eval()  # dropout inactive: the stack runs
    model(**batch, adapter_names=["a", "b", "c"]).logits.sum().backward()


def test_nothing_to_pack_and_lora_plus_are_refused():
    model, _ = mixed_model("bert", n=1)
    with pytest.raises(ModelError, match="no projection where the attached adapters stack"):
        unipelt.pack_mixed(model)
    spec = {"modules": {"lora": {**LORA_QV["modules"]["lora"], "lr_ratio": 16}}}
    model, _ = mixed_model("bert", spec)
    with pytest.raises(ModelError, match="lr_ratio"):
        unipelt.pack_mixed(model)
    assert PACKED not in model.unipelt


def _views_of_stacks(model) -> bool:
    """Every member's lora_A / lora_B lies inside its stack's storage."""
    for sp in model.unipelt[PACKED].values():
        for stack in (sp.A, sp.B):
            ptr = stack.untyped_storage().data_ptr()
            for b in sp.branches:
                p = b.lora_A if stack is sp.A else b.lora_B
                if p.untyped_storage().data_ptr() != ptr:
                    return False
    return True


def _copied(model, how: str):
    if how == "deepcopy":
        return copy.deepcopy(model)
    if how == "pickle":
        return pickle.loads(pickle.dumps(model))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_to_and_copies_keep_the_views(how):
    model, handles = mixed_model("bert")
    packed = unipelt.pack_mixed(model)
    model.to(torch.float64)
    assert _views_of_stacks(model) and all(p.dtype == torch.float64 for p in packed)
    assert all(p.dtype == torch.float64 for h in handles for p in h.parameters())
    twin = _copied(model, how)
    assert _views_of_stacks(twin)
    twin_packed = [p for sp in twin.unipelt[PACKED].values() for p in (sp.A, sp.B)]
    assert not {id(p) for p in twin_packed} & {id(p) for p in packed}
    before = adapter_values(handles)
    twin_handles = [get_state(twin).handles[n] for n in NAMES]
    train_steps(twin, twin_packed, batches(1))
    # the copy trained its own tensors (its saved values moved), the original's are untouched
    assert adapter_values(handles).keys() == before.keys()
    for name, tensors in adapter_values(handles).items():
        assert all(torch.equal(v, before[name][k]) for k, v in tensors.items())
    assert any(not torch.equal(v, before["a"][k]) for k, v in adapter_values(twin_handles)["a"].items())
    # training the original moves its views too (after .to(): the moved stack is what trains)
    train_steps(model, packed, batches(1))
    assert any(not torch.equal(v, before["a"][k]) for k, v in adapter_values(handles)["a"].items())


def test_compiled_packed_train_step_has_no_graph_break_and_eager_gradients():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model, _ = mixed_model("bert")
    packed = unipelt.pack_mixed(model)
    batch = make_batch(batch=len(ROWS), length=7, lengths=LENGTHS)

    def step(fn):
        for p in packed:
            p.grad = None
        out = fn(**batch, adapter_names=ROWS).logits
        out.pow(2).mean().backward()
        return out.detach(), [p.grad.clone() for p in packed]

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    want_out, want = step(model)
    got_out, got = step(compiled)
    assert counter.frame_count == 1
    torch.testing.assert_close(got_out, want_out, atol=ATOL, rtol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_packed_dropout_stack_on_the_triton_executor_equals_unpacked():
    """On the Triton executor an active dropout stacks (its mask drawn in the shrink): packed, the
    stack keeps its column order, one segment per run of a rate; same seed, same step as unpacked."""
    pytest.importorskip("unipelt_kernels.lora_group")
    from unipelt.compiler import set_executor

    spec = {"modules": {"lora": {**LORA_QV["modules"]["lora"], "dropout": 0.1}}}
    ref, ref_handles = mixed_model("llama", spec)
    model, handles = mixed_model("llama", spec)
    for m in (ref, model):
        set_executor(m, "triton")
    packed = unipelt.pack_mixed(model)
    torch.manual_seed(0)
    want = train_steps(ref, [p for h in ref_handles for p in h.parameters()], batches(2))
    torch.manual_seed(0)
    got = train_steps(model, packed, batches(2))
    assert got == pytest.approx(want, rel=1e-5)
    trained, reference = adapter_values(handles), adapter_values(ref_handles)
    for name in NAMES:
        for k, v in reference[name].items():
            torch.testing.assert_close(trained[name][k], v, atol=1e-5, rtol=1e-4)


LORA_AND_ADAPTER = {"modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4},
                                "ad": {"method": "adapter", "site": "ffn.out", "width": 4}}}
FUSE_AB = {"modules": {}, "combine": {"ffn.out": {"mode": "fusion", "adapters": ["a", "b"]}}}


def test_fusing_packed_adapters_is_refused_and_fused_ones_do_not_pack():
    """An AdapterFusion freezes the adapters it fuses, but a packed adapter's LoRA trains through
    the stacked tensors (shared with adapters not fused), which it cannot freeze; and unpacking
    while fused gave the members their pre-fusion flags back (trainable under the fusion). Fusing
    packed adapters is refused before anything changes; fused adapters' projections do not pack."""
    from conftest import make_bert
    from unipelt.state import CONTAINER

    model = make_bert()
    hs = [unipelt.compile(model, LORA_AND_ADAPTER, name=n) for n in ("a", "b")]
    for i, h in enumerate(hs):
        randomize(h, seed=i + 1, std=0.2)
    stacks = unipelt.pack_mixed(model)
    flags = {n: [p.requires_grad for p in h.parameters()] for n, h in zip("ab", hs)}
    with pytest.raises(ModelError, match=r"'a'.*packed.*unipelt.unpack_mixed"):
        unipelt.compile(model, FUSE_AB, name="f")
    state = get_state(model)
    assert set(state.handles) == {"a", "b"} and PACKED in model._modules[CONTAINER]
    assert {n: [p.requires_grad for p in h.parameters()] for n, h in zip("ab", hs)} == flags
    assert all(p.requires_grad for p in stacks)
    model.train()
    model(**make_batch(batch=2), adapter_names=["a", "b"]).logits.sum().backward()  # still trains packed
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stacks)
    # unpacked, the fusion attaches and freezes its members; they stay frozen (nothing packs them)
    unipelt.unpack_mixed(model)
    f = unipelt.compile(model, FUSE_AB, name="f")
    assert not any(p.requires_grad for h in hs for p in h.parameters())
    with pytest.raises(ModelError, match="no projection where the attached adapters stack"):
        unipelt.pack_mixed(model)
    assert not any(p.requires_grad for h in hs for p in h.parameters())
    f.detach()
    assert all(p.requires_grad for h in hs for p in h.parameters())


def test_detaching_a_packed_adapter_gives_it_its_own_tensors_and_the_rest_train_on():
    """Detach left the removed adapter's lora_A / lora_B views into the stacks (a later step of the
    others wrote into its tensors), and the remaining packed adapters were refused until unpacked.
    Now its tensors are its own (the trained values, trainable again) and the others train on, with
    the optimizer built over the stacks, exactly as unpacked adapters a and c would."""
    ref, ref_handles = mixed_model("bert")
    model, handles = mixed_model("bert")
    stacks = unipelt.pack_mixed(model)
    rows = ["c", "a", "__base__", "c", "a"]
    opt_batches = batches(2)
    train_steps(model, stacks, opt_batches[:1])
    train_steps(ref, [p for h in ref_handles for p in h.parameters()], opt_batches[:1])
    hb = handles[1]
    at_detach = adapter_values([hb])["b"]
    hb.detach()
    ref_handles[1].detach()
    assert get_state(model).ctx.packed == frozenset({"a", "c"})
    stack_ptrs = {p.untyped_storage().data_ptr() for p in stacks}
    own = list(hb.parameters())
    assert all(p.requires_grad and p.is_contiguous() for p in own)
    assert not any(p.untyped_storage().data_ptr() in stack_ptrs for p in own)
    # the remaining two train on, packed, with the same optimizer, as the unpacked reference
    opt = torch.optim.AdamW(stacks, lr=1e-2, weight_decay=0.01)
    ref_opt = torch.optim.AdamW([p for h in (ref_handles[0], ref_handles[2]) for p in h.parameters()], lr=1e-2,
                                weight_decay=0.01)
    for m, o in ((model, opt), (ref, ref_opt)):
        for batch in opt_batches[1:]:
            m(**batch, adapter_names=rows).logits.float().pow(2).mean().backward()
            o.step()
            o.zero_grad(set_to_none=True)
    trained, reference = adapter_values([handles[0], handles[2]]), adapter_values([ref_handles[0], ref_handles[2]])
    for name in ("a", "c"):
        for k, v in reference[name].items():
            torch.testing.assert_close(trained[name][k], v, atol=1e-5, rtol=1e-4)
    # b's tensors are untouched by the others' steps
    for k, v in adapter_values([hb])["b"].items():
        torch.testing.assert_close(v, at_detach[k], atol=0, rtol=0)
    # and unpacking afterwards gives a and c their tensors back (b is no member any more)
    back = unipelt.unpack_mixed(model)
    assert {id(p) for p in back} == {id(p) for h in (handles[0], handles[2]) for p in h.parameters()}


def test_detaching_all_but_one_packed_adapter_leaves_a_clear_refusal():
    """One adapter left in a stack no longer stacks (a mixed batch needs two): a call with
    gradients is refused naming the adapter left, and unpacking gives it its tensors back."""
    model, handles = mixed_model("bert", n=2)
    unipelt.pack_mixed(model)
    handles[1].detach()
    unipelt.set_adapter(model, "a")
    with pytest.raises(ModelError, match=r"'a' .*packed.*unpack_mixed") as e:
        model(**make_batch(batch=2)).logits.sum().backward()
    assert "None" not in str(e.value) and "'b'" not in str(e.value)
    unipelt.unpack_mixed(model)
    model(**make_batch(batch=2)).logits.pow(2).mean().backward()
    assert all(p.grad is not None for p in handles[0].parameters())



def test_merging_a_packed_adapter_keeps_the_stacks_for_unmerge():
    """merge() of a packed adapter (checked, not changed, in session 13): while it is merged its
    delta is in the weights every row reads, so a mixed batch is refused naming unmerge, and a call
    with gradients outside a mixed batch is refused naming unpack_mixed; without gradients each
    adapter alone gives the unpacked reference's output. It is NOT released from the stacks (as
    detach does): unmerge puts it back in the mixed plan, where releasing it would have made the
    stacks stale; after unmerge the three train on, packed, with the optimizer over the stacks,
    exactly as the unpacked reference."""
    ref, ref_handles = mixed_model("bert")
    model, handles = mixed_model("bert")
    stacks = unipelt.pack_mixed(model)
    opt_batches = batches(3)
    train_steps(model, stacks, opt_batches[:1])
    train_steps(ref, [p for h in ref_handles for p in h.parameters()], opt_batches[:1])
    report = handles[1].merge()
    ref_handles[1].merge()
    assert sorted(report["merged"]) == sorted(bp.key for bp in handles[1].graph.branches) and report["live"] == []
    batch = make_batch(seed=9, batch=len(ROWS), length=7, lengths=LENGTHS)
    with pytest.raises(ModelError, match=r"merged into the base weights.*unmerge"):
        model(**batch, adapter_names=["a", "c", "a", "c", "a"])
    unipelt.set_adapter(model, "a")
    with pytest.raises(ModelError, match=r"'a' are packed.*unpack_mixed"):
        model(**batch).logits.sum().backward()
    model.eval(), ref.eval()
    for name in NAMES:
        unipelt.set_adapter(model, name), unipelt.set_adapter(ref, name)
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, atol=ATOL, rtol=1e-4)
    handles[1].unmerge()
    ref_handles[1].unmerge()
    model.train(), ref.train()
    train_steps(model, stacks, opt_batches[1:])
    train_steps(ref, [p for h in ref_handles for p in h.parameters()], opt_batches[1:])
    trained, reference = adapter_values(handles), adapter_values(ref_handles)
    for name in NAMES:
        for k, v in reference[name].items():
            torch.testing.assert_close(trained[name][k], v, atol=1e-5, rtol=1e-4)
