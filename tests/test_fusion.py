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
