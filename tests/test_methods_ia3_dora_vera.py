"""IA3, DoRA and VeRA (issue 11): each method's equation written out independently, and HF PEFT
(0.21) as the oracle for outputs and gradients given the same trainable tensors.

The independent references are built from the papers' equations on a fresh base model (forward
hooks that rescale, or weights replaced by the formula's W'), not from the plugins' code.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

import unipelt
from conftest import make_batch, make_bert, make_gpt2, make_llama, randomize
from unipelt.errors import SpecError

peft = pytest.importorskip("peft")

FACTORY = {"bert": make_bert, "gpt2": make_gpt2, "llama": make_llama}
# the same projections named as PEFT's target_modules (regexes matched against the full module name)
IA3_TARGETS = {
    "llama": (r".*\.(k_proj|v_proj|down_proj)", r".*\.down_proj"),
    "bert": (r".*\.(key|value)|.*layer\.\d+\.output\.dense", r".*layer\.\d+\.output\.dense"),
    # PEFT rescales the whole fused c_attn (q, k and v); unipelt the k and v slices
    "gpt2": (r".*\.(c_attn|mlp\.c_proj)", r".*mlp\.c_proj"),
}
IA3_SPEC = {"modules": {"ia3": {"method": "ia3", "sites": ["attn.k", "attn.v", "ffn.down"]}}}


def _batch():
    return make_batch(seed=7, batch=3, length=9)


def _loss(model, batch):
    return (model(**batch).logits.float() ** 2).mean()


def _peft_module(peft_model, site_path: str):
    return peft_model.get_submodule("base_model.model." + site_path)


def _grads(params: dict) -> dict:
    return {k: p.grad.detach().clone() for k, p in params.items()}


# ------------------------------------------------------------------------------------------
# IA3
# ------------------------------------------------------------------------------------------
def _ia3_by_hooks(model, vectors: dict) -> None:
    """The paper's k = l_k ⊙ (W_k x + b_k), v likewise, and W_down (l_ff ⊙ h) on a plain model:
    a forward hook multiplies the projection's output, a pre-hook its input (``vectors``: module
    path -> (side, l, out_slice))."""
    for path, (side, l, out_slice) in vectors.items():
        mod = model.get_submodule(path)
        if side == "output":
            def hook(m, args, out, l=l, sl=out_slice):
                scale = torch.ones(out.shape[-1])
                if sl is None:
                    scale = l
                else:
                    scale[sl[0]:sl[1]] = l
                return out * scale
            mod.register_forward_hook(hook)
        else:
            mod.register_forward_pre_hook(lambda m, args, l=l: (args[0] * l,) + tuple(args[1:]))


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_ia3_formula(arch):
    batch = _batch()
    model = FACTORY[arch]()
    h = unipelt.compile(model, IA3_SPEC)
    randomize(h)
    ref = FACTORY[arch]()
    vectors = {}
    for bp in h.graph.branches:
        br = h.branch_modules[bp.key]
        # several slices of one fused projection: one hook with their vectors combined
        side, l, sl = br.side, br.ia3_l.detach().clone(), bp.site.out_slice
        if bp.site.path in vectors:
            _, l0, sl0 = vectors[bp.site.path]
            full = torch.ones(bp.site.out_features * 3)
            full[sl0[0]:sl0[1]] = l0
            full[sl[0]:sl[1]] = l
            vectors[bp.site.path] = ("output", full, None)
        else:
            vectors[bp.site.path] = (side, l, sl)
    assert {v[0] for v in vectors.values()} == {"output", "input"}
    _ia3_by_hooks(ref, vectors)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, atol=1e-5, rtol=1e-5)


def _ia3_peft(arch):
    targets, ff = IA3_TARGETS[arch]
    return peft.get_peft_model(FACTORY[arch](), peft.IA3Config(target_modules=targets, feedforward_modules=ff))


@pytest.mark.parametrize("executor", ["grouped", "reference"])
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_ia3_equals_peft(arch, executor):
    batch = _batch()
    pm = _ia3_peft(arch)
    model = FACTORY[arch]()
    h = unipelt.compile(model, IA3_SPEC)
    unipelt.compiler.set_executor(model, executor)
    randomize(h)
    peft_of = {}
    with torch.no_grad():
        for bp in h.graph.branches:
            mine = h.branch_modules[bp.key].ia3_l
            theirs = _peft_module(pm, bp.site.path).ia3_l["default"]
            sl = bp.site.out_slice
            flat = theirs.view(-1)
            part = flat if sl is None else flat[sl[0]:sl[1]]
            part.copy_(mine)
            peft_of[bp.key] = (theirs, sl)
    model.train(), pm.train()
    _loss(model, batch).backward()
    _loss(pm, batch).backward()
    with torch.no_grad():
        model.eval(), pm.eval()
        torch.testing.assert_close(model(**batch).logits, pm(**batch).logits, atol=1e-5, rtol=1e-5)
    for bp in h.graph.branches:
        theirs, sl = peft_of[bp.key]
        g = theirs.grad.view(-1)
        g = g if sl is None else g[sl[0]:sl[1]]
        torch.testing.assert_close(h.branch_modules[bp.key].ia3_l.grad, g, atol=1e-5, rtol=1e-4)


def test_ia3_merge_equals_peft_merge():
    """Merged into the rows (k, v: bias too) and the columns (ffn.down), as PEFT merges."""
    pm = _ia3_peft("bert")
    model = make_bert()
    h = unipelt.compile(model, IA3_SPEC)
    randomize(h)
    with torch.no_grad():
        for bp in h.graph.branches:
            _peft_module(pm, bp.site.path).ia3_l["default"].view(-1).copy_(h.branch_modules[bp.key].ia3_l)
    h.merge()
    merged = pm.merge_and_unload()
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("unipelt.")}
    theirs = merged.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-6, msg=k)


def test_ia3_input_side_refused_on_a_fused_slice():
    spec = {"modules": {"ia3": {"method": "ia3", "site": "attn.k", "side": "input"}}}
    with pytest.raises(SpecError, match=r"modules\.ia3\.side.*fused projection"):
        unipelt.compile(make_gpt2(), spec)


def test_ia3_starts_at_one_and_counts():
    h = unipelt.compile(make_llama(), IA3_SPEC)
    for bp in h.graph.branches:
        l = h.branch_modules[bp.key].ia3_l
        assert torch.equal(l, torch.ones_like(l))
        # k, v: the output width (GQA: 2 kv heads of 8); ffn.down: its input, the intermediate
        assert l.numel() == {"attn.k": 16, "attn.v": 16, "ffn.down": 64}[bp.site.site]


# ------------------------------------------------------------------------------------------
# DoRA
# ------------------------------------------------------------------------------------------
def _dora_weight(W0, A, B, m, s, detach):
    """The paper's W' = m ⊙ V / ‖V‖ with V = W0 + s·B·A, the norm per output row (materialised)."""
    V = W0 + s * (B @ A)
    n = torch.linalg.norm(V, dim=1)
    if detach:
        n = n.detach()
    return (m / n)[:, None] * V


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("arch,site", [("llama", "attn.q"), ("bert", "attn.v"), ("gpt2", "attn.k")])
def test_dora_formula_outputs_and_gradients(arch, site, detach):
    model = FACTORY[arch]()
    spec = {"modules": {"d": {"method": "dora", "site": site, "r": 4, "alpha": 8, "layers": [0], "detach_norm": detach}}}
    h = unipelt.compile(model, spec)
    randomize(h, std=0.2)
    (bp,) = h.graph.branches
    br = h.branch_modules[bp.key]
    wrapper = model.get_submodule(bp.site.path)
    base = wrapper.base_layer
    W = base.weight.T if type(base).__name__ == "Conv1D" else base.weight
    sl = bp.site.out_slice or (0, W.shape[0])
    W0 = W[sl[0]:sl[1]].detach()
    b0 = None if base.bias is None else base.bias[sl[0]:sl[1]].detach()
    x = torch.randn(2, 5, bp.site.in_features, generator=torch.Generator().manual_seed(0))
    out = wrapper(x)[..., sl[0]:sl[1]]
    (out.square().sum()).backward()
    got = {k: getattr(br, k).grad.clone() for k in ("lora_A", "lora_B", "magnitude")}

    A, B, m = (getattr(br, k).detach().clone().requires_grad_(True) for k in ("lora_A", "lora_B", "magnitude"))
    ref = F.linear(x, _dora_weight(W0, A, B, m, br.scale, detach), b0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    ref.square().sum().backward()
    for k, t in (("lora_A", A), ("lora_B", B), ("magnitude", m)):
        torch.testing.assert_close(got[k], t.grad, atol=1e-4, rtol=1e-4, msg=k)


def test_dora_magnitude_starts_at_the_row_norms():
    model = make_llama()
    h = unipelt.compile(model, {"modules": {"d": {"method": "dora", "sites": ["attn.q", "ffn.down"], "r": 4}}})
    for bp in h.graph.branches:
        W = model.get_submodule(bp.site.path).base_layer.weight
        torch.testing.assert_close(h.branch_modules[bp.key].magnitude.detach(), torch.linalg.norm(W, dim=1))


DORA_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": r".*\.(query|value)|.*layer\.\d+\.output\.dense"}


@pytest.mark.parametrize("executor", ["grouped", "reference"])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_dora_equals_peft(arch, executor):
    batch = _batch()
    pm = peft.get_peft_model(FACTORY[arch](), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=DORA_TARGETS[arch], use_dora=True, lora_dropout=0.0))
    model = FACTORY[arch]()
    h = unipelt.compile(model, {"modules": {"dora": {"method": "dora", "sites": ["attn.q", "attn.v", "ffn.down"],
                                                     "r": 4, "alpha": 8}}})
    unipelt.compiler.set_executor(model, executor)
    # PEFT's magnitude starts at the row norms of W0, as ours
    for bp in h.graph.branches:
        torch.testing.assert_close(h.branch_modules[bp.key].magnitude,
                                   _peft_module(pm, bp.site.path).lora_magnitude_vector["default"].weight)
    randomize(h, std=0.2)
    pairs = _copy_dora_into_peft(h, pm)
    model.train(), pm.train()
    _loss(model, batch).backward()
    _loss(pm, batch).backward()
    for key, a, b in pairs:
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=key)
    with torch.no_grad():
        model.eval(), pm.eval()
        torch.testing.assert_close(model(**batch).logits, pm(**batch).logits, atol=1e-5, rtol=1e-5)
        # merged: the same weights as PEFT's merge
        h.merge()
        merged = pm.merge_and_unload()
        ours = {k: v for k, v in model.state_dict().items() if not k.startswith("unipelt.")}
        for k, v in merged.state_dict().items():
            torch.testing.assert_close(ours[k], v, atol=1e-5, rtol=1e-5, msg=k)


def _copy_dora_into_peft(h, pm) -> list:
    """Our DoRA factors and magnitudes copied into PEFT's model; (branch key, ours, PEFT's) pairs."""
    pairs = []
    with torch.no_grad():
        for bp in h.graph.branches:
            mine, theirs = h.branch_modules[bp.key], _peft_module(pm, bp.site.path)
            for a, b in ((mine.lora_A, theirs.lora_A["default"].weight), (mine.lora_B, theirs.lora_B["default"].weight),
                         (mine.magnitude, theirs.lora_magnitude_vector["default"].weight)):
                b.copy_(a)
                pairs.append((bp.key, a, b))
    return pairs


def test_dora_equals_peft_in_float64():
    """A float64 model: the norm is taken in float64, as PEFT's (it was float32 always, 1e-7
    relative in every row norm: PEFT's outputs and gradients only to ~1e-7, 2e-6 in a 30-layer
    model's logits; now to float64 rounding)."""
    batch = _batch()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = peft.get_peft_model(make_llama().double(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                    use_dora=True, lora_dropout=0.0))
    model = make_llama().double()
    h = unipelt.compile(model, {"modules": {"dora": {"method": "dora", "sites": ["attn.q", "attn.k", "attn.v", "attn.o",
                                                                                "ffn.gate", "ffn.up", "ffn.down"],
                                                     "r": 4, "alpha": 8}}})
    randomize(h, std=0.2)
    assert all(h.branch_modules[bp.key].magnitude.dtype == torch.float64 for bp in h.graph.branches)
    pairs = _copy_dora_into_peft(h, pm)
    model.train(), pm.train()
    _loss(model, batch).backward()
    _loss(pm, batch).backward()
    for key, a, b in pairs:
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-10, msg=key)
    with torch.no_grad():
        model.eval(), pm.eval()
        torch.testing.assert_close(model(**batch).logits, pm(**batch).logits, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("compiled", [False, True])
def test_dora_cached_row_norms_follow_a_change_of_the_base(compiled):
    """‖W0‖² is cached (W0 is frozen); another adapter merged into the same projection changes W0,
    and DoRA, still live, must then use the new weight's norms: eager through the tensor's
    version, compiled through the leaf's weight_version (a guard: the graph is traced again).
    The reference is the formula on the weight as it is after the merge."""
    model = make_llama()
    h = unipelt.compile(model, {"modules": {"d": {"method": "dora", "site": "attn.q", "r": 4, "layers": [0]}}},
                        name="dora")
    randomize(h, std=0.2)
    other = unipelt.compile(model, {"modules": {"l": {"method": "lora", "site": "attn.q", "r": 4, "layers": [0]}}},
                            name="lora")
    randomize(other, std=0.5)
    unipelt.set_adapter(model, ["dora", "lora"])  # both live at attn.q
    (bp,) = h.graph.branches
    br = h.branch_modules[bp.key]
    wrapper = model.get_submodule(bp.site.path)
    x = torch.randn(2, 5, bp.site.in_features, generator=torch.Generator().manual_seed(0))
    fn = torch.compile(wrapper, backend="eager", fullgraph=True) if compiled else wrapper

    def reference() -> torch.Tensor:
        W0 = wrapper.base_layer.weight.detach()
        A, B, m = br.lora_A.detach(), br.lora_B.detach(), br.magnitude.detach()
        return F.linear(x, _dora_weight(W0, A, B, m, br.scale, True))

    with torch.no_grad():
        before = fn(x)
        other_live = before - reference()  # the LoRA's own term while it is live
        other.merge()
        after = fn(x)
        # the merged LoRA is now part of W0: DoRA renormalises W0 + s_l·B_l·A_l; the LoRA's term
        # is no longer added on its own
        torch.testing.assert_close(after, reference(), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(after, before, atol=1e-3)
        assert other_live.abs().max() > 1e-3  # the LoRA did change the output: a real change of W0
        other.unmerge()
        torch.testing.assert_close(fn(x), before, atol=1e-5, rtol=1e-5)


def test_dora_cached_row_norms_follow_the_model_to_another_dtype():
    """model.to(dtype) after attaching: the cache is made again from the converted weight (a graph
    compiled afterwards reads it rather than computing ‖W0‖² at every step)."""
    model = make_llama()
    h = unipelt.compile(model, {"modules": {"d": {"method": "dora", "site": "attn.q", "r": 4, "layers": [0]}}})
    randomize(h, std=0.2)
    (bp,) = h.graph.branches
    br = h.branch_modules[bp.key]
    model.to(torch.float64)
    wrapper = model.get_submodule(bp.site.path)
    W0 = wrapper.base_layer.weight.detach()
    assert br._w0_cache[0][4] == torch.float64
    # kept in the weight's dtype where wider than float32 (float64 here), as PEFT's norm
    torch.testing.assert_close(br._w0_cache[1], W0.square().sum(1), rtol=1e-12, atol=0)
    x = torch.randn(2, 5, bp.site.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fn = torch.compile(wrapper, backend="eager", fullgraph=True)
    with torch.no_grad():
        ref = F.linear(x, _dora_weight(W0, br.lora_A.detach(), br.lora_B.detach(), br.magnitude.detach(), br.scale, True))
        torch.testing.assert_close(fn(x), ref, atol=1e-5, rtol=1e-5)


def test_dora_rejects_a_rank_beyond_the_widths():
    with pytest.raises(SpecError, match=r"modules\.d\.r"):
        unipelt.compile(make_llama(), {"modules": {"d": {"method": "dora", "site": "attn.k", "r": 17}}})


# ------------------------------------------------------------------------------------------
# VeRA
# ------------------------------------------------------------------------------------------
VERA_SITES = ["attn.q", "attn.v", "ffn.up", "ffn.down"]
VERA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _vera(seed=3, r=8, **kw):
    return {"modules": {"vera": {"method": "vera", "sites": VERA_SITES, "r": r, "seed": seed, **kw}}}


def test_vera_formula():
    """h = W0·x + Λ_b·B·Λ_d·A·x with A, B the shared matrices cut to each projection's widths."""
    batch = _batch()
    model = make_llama()
    h = unipelt.compile(model, _vera())
    randomize(h)
    proj = h.shared_modules["vera"]
    A, B = proj.vera_A, proj.vera_B
    # one pair for the node at the largest widths (up: 32 -> 64, down: 64 -> 32)
    assert A.shape == (8, 64) and B.shape == (64, 8)
    ref = make_llama()
    for bp in h.graph.branches:
        br = h.branch_modules[bp.key]
        d, b = br.vera_lambda_d.detach(), br.vera_lambda_b.detach()
        a_, b_ = A[:, :bp.site.in_features], B[:bp.site.out_features]

        def hook(m, args, out, d=d, b=b, a_=a_, b_=b_):
            return out + (args[0] @ a_.T * d) @ b_.T * b
        ref.get_submodule(bp.site.path).register_forward_hook(hook)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("executor", ["grouped", "reference"])
def test_vera_equals_peft(executor):
    batch = _batch()
    pm = peft.get_peft_model(make_llama(), peft.VeraConfig(
        r=8, target_modules=VERA_TARGETS, projection_prng_key=3, d_initial=0.1, save_projection=True))
    model = make_llama()
    h = unipelt.compile(model, _vera())
    unipelt.compiler.set_executor(model, executor)
    # the same seed draws the same projections as PEFT's generator
    proj = h.shared_modules["vera"]
    assert torch.equal(proj.vera_A, pm.base_model.vera_A["default"])
    assert torch.equal(proj.vera_B, pm.base_model.vera_B["default"])
    # and the same initial d and b (0.1, 0)
    for bp in h.graph.branches:
        theirs = _peft_module(pm, bp.site.path)
        assert torch.equal(h.branch_modules[bp.key].vera_lambda_d, theirs.vera_lambda_d["default"])
        assert torch.equal(h.branch_modules[bp.key].vera_lambda_b, theirs.vera_lambda_b["default"])
    randomize(h)
    pairs = []
    with torch.no_grad():
        for bp in h.graph.branches:
            mine, theirs = h.branch_modules[bp.key], _peft_module(pm, bp.site.path)
            for a, b in ((mine.vera_lambda_d, theirs.vera_lambda_d["default"]),
                         (mine.vera_lambda_b, theirs.vera_lambda_b["default"])):
                b.copy_(a)
                pairs.append((bp.key, a, b))
    model.train(), pm.train()
    _loss(model, batch).backward()
    _loss(pm, batch).backward()
    for key, a, b in pairs:
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=key)
    with torch.no_grad():
        model.eval(), pm.eval()
        torch.testing.assert_close(model(**batch).logits, pm(**batch).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("save_projection", [True, False])
def test_vera_saves_the_seed_and_the_projections_on_request(tmp_path, save_projection):
    from safetensors.torch import load_file

    batch = _batch()
    model = make_llama()
    h = unipelt.compile(model, _vera(seed=11, save_projection=save_projection))
    randomize(h)
    expected = model(**batch).logits.detach()
    h.save(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "unipelt.json").read_text())
    assert meta["spec"]["modules"]["vera"]["seed"] == 11
    keys = set(load_file(str(tmp_path / "a" / "adapter.safetensors")))
    assert ({"vera.shared.vera_A", "vera.shared.vera_B"} <= keys) is save_projection
    assert not any("shared" in k for k in keys) or save_projection
    fresh = make_llama()
    h2 = unipelt.load(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(**batch).logits, expected, atol=0, rtol=0)
    assert torch.equal(h2.shared_modules["vera"].vera_A, h.shared_modules["vera"].vera_A)


def test_vera_saved_projection_is_what_loads(tmp_path):
    """With save_projection the file's matrices are used, not the seed's (PEFT's behaviour)."""
    model = make_llama()
    h = unipelt.compile(model, _vera(seed=1))
    with torch.no_grad():
        h.shared_modules["vera"].vera_A.mul_(2.0)
    h.save(tmp_path / "a")
    h2 = unipelt.load(make_llama(), tmp_path / "a")
    assert torch.equal(h2.shared_modules["vera"].vera_A, h.shared_modules["vera"].vera_A)


def test_vera_projection_survives_drop_reparameterization(tmp_path):
    batch = _batch()
    model = make_llama()
    h = unipelt.compile(model, _vera())
    randomize(h)
    expected = model(**batch).logits.detach()
    assert h.drop_reparameterization() == 0
    assert "vera" in h.shared_modules
    h.save(tmp_path / "a")
    fresh = make_llama()
    unipelt.load(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(**batch).logits, expected, atol=0, rtol=0)


def test_vera_seed_changes_the_projections():
    a = unipelt.compile(make_llama(), _vera(seed=1)).shared_modules["vera"].vera_A
    b = unipelt.compile(make_llama(), _vera(seed=2)).shared_modules["vera"].vera_A
    assert not torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# merged into a plain model (`unipelt merge`)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
def test_merge_adapter_writes_a_plain_model(tmp_path, name):
    """IA3, DoRA and VeRA merged by ``unipelt merge``: the saved model loads without unipelt and
    gives the adapted outputs."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from unipelt.export import merge_adapter
    from unipelt.models import load_model
    from unipelt.train import record_training_info

    task = "classification" if name == "tiny-bert" else "causal-lm"
    labels = ["a", "b"] if task == "classification" else None
    model, tok = load_model(name, task=task, num_labels=2 if labels else None)
    h = unipelt.compile(model, {"modules": {
        "ia3": {"method": "ia3", "sites": ["attn.k", "attn.v", "ffn.down"]},
        "dora": {"method": "dora", "sites": ["attn.q"], "r": 4},
        "vera": {"method": "vera", "sites": ["attn.o", "ffn.up"], "r": 8},
    }})
    randomize(h, std=0.1)
    record_training_info(h, {"model": name, "task": task, "labels": labels})
    h.save(tmp_path / "a")
    batch = dict(tok(["hello there", "a longer sentence"], return_tensors="pt", padding=True))
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    out = merge_adapter(tmp_path / "a", None, tmp_path / "merged")
    auto = AutoModelForSequenceClassification if labels else AutoModelForCausalLM
    plain = auto.from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# several scalings of one projection's input, merged
# ------------------------------------------------------------------------------------------
_DOWN = {
    "two input scalings": {"a": {"method": "ia3", "site": "ffn.down"}, "b": {"method": "ia3", "site": "ffn.down"}},
    "input scaling and DoRA": {"a": {"method": "ia3", "site": "ffn.down"},
                               "d": {"method": "dora", "site": "ffn.down", "r": 4}},
    "input and output scaling": {"a": {"method": "ia3", "site": "ffn.down"},
                                 "o": {"method": "ia3", "site": "ffn.down", "side": "output"}},
    "all of them with LoRA": {"a": {"method": "ia3", "site": "ffn.down"}, "b": {"method": "ia3", "site": "ffn.down"},
                              "o": {"method": "ia3", "site": "ffn.down", "side": "output"},
                              "d": {"method": "dora", "site": "ffn.down", "r": 4},
                              "l": {"method": "lora", "site": "ffn.down", "r": 4}},
}


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", list(_DOWN))
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_input_scalings_at_one_projection_merge_exactly(arch, case, reverse):
    """Live, the base computes W·diag(l_a ⊙ l_b)·x and an output-side vector or DoRA rescales
    that; merged, the weight must be the same product (it was the sum W·diag(l_a + l_b - 1) and
    DoRA's (g - 1) took W instead of W·diag(l): off by ~1 before the fix). Either node order."""
    batch = _batch()
    modules = _DOWN[case]
    if reverse:
        modules = dict(reversed(list(modules.items())))
    model = FACTORY[arch]()
    h = unipelt.compile(model, {"modules": modules})
    randomize(h, std=0.2)
    with torch.no_grad():
        for bp in h.graph.branches:  # the vectors well away from 1 (randomize centres them near 0)
            br = h.branch_modules[bp.key]
            if hasattr(br, "ia3_l"):
                br.ia3_l.add_(1.0)
        # at the projection itself (layer 0's ffn.down: every branch above), and the whole model
        proj = model.get_submodule(h.graph.branches[0].site.path)
        base_proj = FACTORY[arch]().get_submodule(h.graph.branches[0].site.path)
        x = torch.randn(3, 5, base_proj.in_features, generator=torch.Generator().manual_seed(1))
        live, live_out = proj(x), _last_hidden(model, batch)
        assert (live - base_proj(x)).abs().max() > 0.1  # the adapter changes the projection
        h.merge()
        torch.testing.assert_close(proj(x), live, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(_last_hidden(model, batch), live_out, atol=2e-5, rtol=2e-5)
        h.unmerge()
        torch.testing.assert_close(proj(x), live, atol=1e-6, rtol=1e-6)


def _last_hidden(model, batch):
    return model(**batch, output_hidden_states=True).hidden_states[-1]
