"""AdapterFusion (plugins/fusion.py): the fused output against the formula written from the paper,
save/load, training changes only the fusion layer, spec errors."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import unipelt
from unipelt.errors import SpecError
from unipelt.registry import get_registry
from unipelt.state import get_state
from conftest import Snapshot, make_batch, make_bert, make_llama, randomize

ADAPTER = {"modules": {"ad": {"method": "adapter", "site": "ffn.out", "width": 4}}}
ADAPTER_RES = {"modules": {"ad": {"method": "adapter", "site": "ffn.res", "width": 4}}}


# the fusion plugin registered for every test here (conftest.fusion_registry)
pytestmark = pytest.mark.usefixtures("fusion_registry")


def fusion_spec(site="ffn.out", adapters=("a", "b", "c"), **options):
    return {"modules": {}, "combine": {site: {"mode": "fusion", "adapters": list(adapters), **options}}}


def three_adapters(model, spec=ADAPTER):
    handles = {}
    for i, n in enumerate("abc"):
        handles[n] = unipelt.compile(model, spec, name=n)
        randomize(handles[n], seed=10 + i)
    return handles


def fused_by_hand(fusion_layer, members, h, *, temperature=1.0):
    """Pfeiffer et al. 2021, eq. (3)-(5): per token, Q = h W_Q, K_i = Δ_i W_K, V_i = Δ_i W_V,
    p = softmax(Q·K_i / T), fused delta = Σ p_i V_i (the residual is the hook point's own)."""
    deltas = []
    for ad in members:  # Δ_i of a Houlsby adapter: up(relu(down(h))) · s
        deltas.append(F.linear(torch.relu(F.linear(h, ad.down.weight, ad.down.bias)), ad.up.weight, ad.up.bias) * ad.scale)
    q = F.linear(h, fusion_layer.query.weight, fusion_layer.query.bias)
    scores = torch.stack([(q * F.linear(d, fusion_layer.key.weight, fusion_layer.key.bias)).sum(-1) for d in deltas], -1)
    p = torch.softmax(scores / temperature, -1)
    values = [F.linear(d, fusion_layer.value.weight) if fusion_layer.value is not None else d for d in deltas]
    return sum(p[..., i:i + 1] * values[i] for i in range(len(values)))


@pytest.mark.parametrize("options", [{}, {"value": False, "temperature": 2.5}], ids=["dynamic", "static-T"])
def test_fused_output_matches_the_formula(options):
    model = make_bert()
    batch = make_batch()
    handles = three_adapters(model)
    fh = unipelt.compile(model, fusion_spec(**options), name="fuse")
    randomize(fh, seed=5, std=0.2)  # a non-identity W_V and non-trivial scores
    # capture h (the FFN output projection's output) and the hook point's result in layer 1
    wrapper = model.bert.encoder.layer[1].output.dense
    seen = {}
    h1 = wrapper.base_layer.register_forward_hook(lambda m, a, o: seen.__setitem__("h", o.detach()))
    h2 = wrapper.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o.detach()))
    with torch.no_grad():
        model(**batch)
    h1.remove(), h2.remove()
    layer = fh.branch_modules["fusion_ffn_out.1.ffn.out"]
    members = [handles[n].branch_modules["ad.1.ffn.out"] for n in "abc"]
    want = seen["h"] + fused_by_hand(layer, members, seen["h"], temperature=options.get("temperature", 1.0))
    torch.testing.assert_close(seen["out"], want, atol=1e-5, rtol=1e-5)
    # and it is not the plain sum of the three adapters (the adapters active together)
    with torch.no_grad():
        fused = model(**batch).logits
    unipelt.set_adapter(model, ["a", "b", "c"])
    with torch.no_grad():
        summed = model(**batch).logits
    assert not torch.allclose(fused, summed, atol=1e-4)


def test_identity_value_init_starts_at_a_softmax_mix():
    """Untrained dynamic fusion: W_V ≈ I, so the fused delta is a convex mix of the adapters' deltas
    (AdapterHub's value_initialized): with one adapter's delta repeated, it is exactly that delta."""
    model = make_bert()
    batch = make_batch()
    a = unipelt.compile(model, ADAPTER, name="a")
    randomize(a, seed=3)
    b = unipelt.compile(model, ADAPTER, name="b")
    b.load_state_dict(a.state_dict())  # b == a
    alone = unipelt.compile(model, ADAPTER, name="alone")
    alone.load_state_dict(a.state_dict())
    with torch.no_grad():
        ref = model(**batch).logits  # "alone" active
    unipelt.compile(model, fusion_spec(adapters=("a", "b")), name="fuse")
    with torch.no_grad():
        got = model(**batch).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)  # W_V = I + 1e-6 off the diagonal


def test_pfeiffer_renorm_site_on_llama():
    model = make_llama()
    batch = make_batch()
    three_adapters(model, ADAPTER_RES)
    fh = unipelt.compile(model, fusion_spec(site="ffn.res"), name="fuse")
    randomize(fh, seed=7, std=0.2)
    seen = {}
    mlp = model.model.layers[0].mlp
    hooks = [mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o.detach())),
             model.model.layers[0].post_attention_layernorm.register_forward_pre_hook(
                 lambda m, a: seen.__setitem__("x", a[0].detach()))]
    # the mlp's own output before unipelt's hook: recompute from its input
    inner = mlp.down_proj
    hooks.append(inner.register_forward_hook(lambda m, a, o: seen.__setitem__("h", o.detach())))
    with torch.no_grad():
        model(**batch)
    for hk in hooks:
        hk.remove()
    # pre-LN Pfeiffer: the adapters read s = h + x (x the residual entering the FFN sublayer) and
    # the sublayer returns h + Δ(s)
    s = seen["h"] + seen["x"]
    layer = fh.branch_modules["fusion_ffn_res.0.ffn.res"]
    members = [get_state(model).handles[n].branch_modules["ad.0.ffn.res"] for n in "abc"]
    torch.testing.assert_close(seen["out"], seen["h"] + fused_by_hand(layer, members, s), atol=1e-5, rtol=1e-5)


def test_only_the_fusion_layer_trains_and_save_load(tmp_path):
    model = make_bert()
    batch = make_batch()
    handles = three_adapters(model)
    member_values = {n: {k: v.detach().clone() for k, v in h.state_dict().items()} for n, h in handles.items()}
    fh = unipelt.compile(model, fusion_spec(), name="fuse")
    # the fused adapters are frozen while the fusion is attached; the fusion layer trains
    assert all(not p.requires_grad for h in handles.values() for p in h.parameters())
    assert fh.parameters() and all(p.requires_grad for p in fh.parameters())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".fuse." in n for n in trainable)
    before = {k: v.detach().clone() for k, v in fh.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    labels = torch.tensor([0, 1, 0])
    for _ in range(3):
        loss = model(**batch, labels=labels).loss
        # the training controller's regulariser (AdapterHub's 0.01·‖I − W_V‖²)
        controllers = [c for c in get_registry().hook.unipelt_training_controllers(handle=fh) for c in c]
        assert len(controllers) == 1
        loss = loss + controllers[0].regularizer()
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = fh.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the fusion layer did not move"
    for n, h in handles.items():
        for k, v in h.state_dict().items():
            assert torch.equal(v, member_values[n][k]), f"{n}.{k} changed"
    with torch.no_grad():
        ref = model(**batch).logits
    fh.save(tmp_path / "fuse")
    for n in "abc":
        handles[n].save(tmp_path / n)

    # a fresh model: the fused adapters by name, then the fusion
    fresh = make_bert()
    for n in "abc":
        unipelt.load(fresh, tmp_path / n, name=n)
    flags = {n: [p.requires_grad for p in get_state(fresh).handles[n].parameters()] for n in "abc"}
    loaded = unipelt.load(fresh, tmp_path / "fuse", name="fuse")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, ref, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for n in "abc" for p in get_state(fresh).handles[n].parameters())
    # detaching the fusion gives the adapters back their own flags
    loaded.detach()
    assert flags == {n: [p.requires_grad for p in get_state(fresh).handles[n].parameters()] for n in "abc"}


def test_detach_restores_the_model():
    model = make_bert()
    snap = Snapshot(model)
    handles = three_adapters(model)
    fh = unipelt.compile(model, fusion_spec(), name="fuse")
    fh.detach()
    for h in handles.values():
        h.detach()
    snap.assert_same()


def test_fusion_spec_errors():
    model = make_bert()
    unipelt.compile(model, ADAPTER, name="a")
    with pytest.raises(SpecError, match=r"combine.ffn.out.adapters\[1\].*no adapter named 'zz'"):
        unipelt.compile(model, fusion_spec(adapters=("a", "zz")), name="f")
    assert "f" not in get_state(model).handles  # nothing left attached
    assert all(p.requires_grad for p in get_state(model).handles["a"].parameters())
    with pytest.raises(SpecError, match=r"combine.ffn.out.adapters: fusion attends over two or more"):
        unipelt.compile(model, fusion_spec(adapters=("a",)), name="f")
    with pytest.raises(SpecError, match=r"combine.ffn.out.adapters\[1\]: 'a' is listed twice"):
        unipelt.compile(model, fusion_spec(adapters=("a", "a")), name="f")
    with pytest.raises(SpecError, match=r"combine.ffn.out.temperature"):
        unipelt.compile(model, fusion_spec(adapters=("a", "b"), temperature="hot"), name="f")
    with pytest.raises(SpecError, match=r"combine.ffn.out.colour: unknown field"):
        unipelt.compile(model, fusion_spec(adapters=("a", "b"), colour=1), name="f")
    with pytest.raises(SpecError, match=r"modules.x.method: AdapterFusion is declared under combine"):
        unipelt.compile(model, {"modules": {"x": {"method": "fusion", "site": "ffn.out"}}}, name="f")
    # a fused adapter with no branch at the hook point
    unipelt.compile(model, {"modules": {"l": {"method": "lora", "site": "attn.q", "r": 2}}}, name="l")
    with pytest.raises(SpecError, match=r"adapters\[1\]: adapter 'l' has no branch at ffn.out"):
        unipelt.compile(model, fusion_spec(adapters=("a", "l")), name="f")


def test_attach_errors_name_the_spec_file(tmp_path):
    model = make_bert()
    unipelt.compile(model, ADAPTER, name="a")
    path = tmp_path / "fuse.yaml"
    path.write_text("modules: {}\ncombine:\n  ffn.out: {mode: fusion, adapters: [a, missing]}\n")
    with pytest.raises(SpecError, match=r"fuse.yaml: combine.ffn.out.adapters\[1\]: no adapter named 'missing'"):
        unipelt.compile(model, path, name="f")


# ------------------------------------------------------------------------------------------
# a saved fusion records what identifies each fused adapter
# ------------------------------------------------------------------------------------------
def _saved_fusion(tmp_path):
    """Three adapters and a fusion over them, each saved; returns the fused output on a batch."""
    model = make_bert()
    handles = three_adapters(model)
    fh = unipelt.compile(model, fusion_spec(), name="fuse")
    randomize(fh, seed=3)
    with torch.no_grad():
        ref = model(**make_batch()).logits
    fh.save(tmp_path / "fuse")
    for n, h in handles.items():
        h.save(tmp_path / n)
    return ref


def test_fusion_loads_onto_the_adapters_it_was_trained_with(tmp_path):
    """The record survives a save/load round trip of the members (and of a member's dtype-preserving
    reload): the fusion loads onto them without a warning and gives the saved model's output."""
    import json
    import warnings

    ref = _saved_fusion(tmp_path)
    meta = json.loads((tmp_path / "fuse" / "unipelt.json").read_text())
    assert sorted(meta["fusion"]["members"]) == ["a", "b", "c"]
    assert meta["fusion"]["members"]["a"]["modules"] == {"ad": "adapter"}
    fresh = make_bert()
    for n in "abc":
        unipelt.load(fresh, tmp_path / n, name=n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unipelt.load(fresh, tmp_path / "fuse")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**make_batch()).logits, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("how", ["other tensors", "other method"])
def test_fusion_refuses_another_adapter_under_a_members_name(tmp_path, how):
    """A fusion saved over a, b, c loaded onto a model whose 'b' is another adapter: its attention
    would run over the wrong adapter. One AdapterFileError naming the file, the fusion and the
    member; nothing stays attached and the members keep their flags."""
    from unipelt.errors import AdapterFileError

    _saved_fusion(tmp_path)
    fresh = make_bert()
    for n in "ac":
        unipelt.load(fresh, tmp_path / n, name=n)
    if how == "other tensors":
        other = unipelt.compile(fresh, ADAPTER, name="b")
        randomize(other, seed=99)
    else:  # the same adapter module beside a LoRA
        unipelt.compile(fresh, {"modules": dict(ADAPTER["modules"], lq={"method": "lora", "site": "attn.q", "r": 2})},
                        name="b")
    state = get_state(fresh)
    flags = {n: [p.requires_grad for p in state.handles[n].parameters()] for n in "abc"}
    active = set(state.ctx.active)
    with pytest.raises(AdapterFileError, match=r"fuse/unipelt.json: fusion 'fuse': the adapter attached as 'b' is not "
                                               r"the one it was saved with") as e:
        unipelt.load(fresh, tmp_path / "fuse")
    assert "'a'" not in str(e.value) and "'c'" not in str(e.value)
    if how == "other method":
        assert "modules lq: none saved, lora attached" in str(e.value)
    assert "fuse" not in state.handles
    assert flags == {n: [p.requires_grad for p in state.handles[n].parameters()] for n in "abc"}
    assert set(state.ctx.active) == active


def test_fusion_with_a_detached_member_is_not_saved(tmp_path):
    """The saved fusion records each adapter it fuses: with one detached there is nothing to record,
    and the save is refused before anything is written."""
    from unipelt.errors import ModelError

    model = make_bert()
    handles = three_adapters(model)
    fh = unipelt.compile(model, fusion_spec(), name="fuse")
    handles["b"].detach()
    with pytest.raises(ModelError, match=r"fusion 'fuse' cannot be saved: fused adapter\(s\) no longer attached: 'b';"):
        fh.save(tmp_path / "fuse")
    assert not (tmp_path / "fuse").exists()


def test_fusion_saved_without_the_record_loads_with_a_warning(tmp_path):
    """A fusion saved before the record (no 'fusion' field) still loads, saying its members are not
    checked; a malformed record is one error naming the field."""
    import json

    from unipelt.errors import AdapterFileError, UnipeltWarning

    ref = _saved_fusion(tmp_path)
    meta_path = tmp_path / "fuse" / "unipelt.json"
    meta = json.loads(meta_path.read_text())
    good = meta.pop("fusion")
    meta_path.write_text(json.dumps(meta))
    fresh = make_bert()
    for n in "abc":
        unipelt.load(fresh, tmp_path / n, name=n)
    with pytest.warns(UnipeltWarning, match=r"fusion 'fuse' records no fingerprint of the adapters it fuses.*a, b, c"):
        h = unipelt.load(fresh, tmp_path / "fuse")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**make_batch()).logits, ref, atol=1e-6, rtol=0)
    h.detach()
    del good["members"]["c"]
    meta_path.write_text(json.dumps(dict(meta, fusion=good)))
    with pytest.raises(AdapterFileError, match=r"unipelt.json: field 'fusion.members.c': missing"):
        unipelt.load(fresh, tmp_path / "fuse")
    assert "fuse" not in get_state(fresh).handles


def test_fusion_record_is_stable_with_heads_trained_in_place(tmp_path):
    """Classification adapters train the head in place (kept aside while another adapter holds it),
    and the fusion trains its own: the record of each member is the member's own values, so the
    fusion trained over them reloads onto the members reloaded from their files."""
    head = {"head": {"method": "train", "sites": "head"}}
    member = {"modules": dict(ADAPTER["modules"], **head)}
    model = make_bert()
    batch = make_batch()
    handles = {}
    for i, n in enumerate("abc"):
        handles[n] = unipelt.compile(model, member, name=n)
        randomize(handles[n], seed=20 + i)
    fh = unipelt.compile(model, dict(fusion_spec(), modules=head), name="fuse")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        model(**batch, labels=torch.tensor([0, 1, 0])).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        ref = model(**batch).logits
    fh.save(tmp_path / "fuse")
    for n, h in handles.items():
        h.save(tmp_path / n)
    fresh = make_bert()
    for n in "abc":
        unipelt.load(fresh, tmp_path / n, name=n)
    unipelt.load(fresh, tmp_path / "fuse")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, ref, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------
# a fused adapter's reparameterisation dropped while the fusion is attached
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [True, False])
def test_drop_reparameterization_of_a_fused_adapter(tmp_path, shared):
    """The fusion froze the member's parameters and gives them back on detach; the member's
    drop_reparameterization made new ones (the prefix P instead of its MLP), which stayed frozen
    after the fusion's detach (it gave the flags back to the dropped MLP). Now the new P is frozen
    while fused and trains again after, the output is unchanged, and a fusion saved after the drop
    records the member's new form (it reloads onto the member saved then)."""
    prefix = {"method": "prefix", "sites": "attn.kv", "length": 3, "reparam": "mlp", "reparam_hidden": 8,
              "reparam_shared": shared}
    member = {"modules": dict(ADAPTER["modules"], pre=prefix)}
    model = make_bert()
    batch = make_batch()
    handles = three_adapters(model, member)
    # c's layer-0 prefix pruned before the fusion: frozen for good, after its drop and the fusion's detach
    from unipelt.pruning import prune

    prune(handles["c"], ["pre.0.attn.kv"])
    fh = unipelt.compile(model, fusion_spec(), name="fuse")
    randomize(fh, seed=5)
    model.eval()
    with torch.no_grad():
        ref = model(**batch).logits
    dropped = handles["b"].drop_reparameterization()
    assert dropped > 0 and handles["c"].drop_reparameterization() > 0
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref, atol=1e-6, rtol=0)
    # frozen while fused: only the fusion layer trains
    assert not any(p.requires_grad for h in handles.values() for p in h.parameters())
    fh.save(tmp_path / "fuse")
    for n, h in handles.items():
        h.save(tmp_path / n)
    fh.detach()
    # every member trains again, b's new prefix included; c's pruned one does not
    flags = {(n, k): p.requires_grad for n, h in handles.items() for k, p in h.named_parameters().items()}
    assert [key for key, on in flags.items() if not on] == [("c", "pre.0.attn.kv.prefix_kv")]
    assert ("b", "pre.0.attn.kv.prefix_kv") in flags
    fresh = make_bert()
    for n in "abc":
        unipelt.load(fresh, tmp_path / n, name=n)
    unipelt.load(fresh, tmp_path / "fuse")
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, ref, atol=1e-6, rtol=0)
