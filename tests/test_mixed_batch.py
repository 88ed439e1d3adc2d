"""Several adapters in one batch (``model(..., adapter_names=[...])``, PEFT's keyword): every row
gets what a call with only its adapter gives it, for every method of the conformance battery;
gradients reach only each row's adapter; generate() with mixed rows; errors."""
from __future__ import annotations

import pytest
import torch

import unipelt
from unipelt.errors import ModelError
from unipelt.registry import Registry, get_registry, make_plugin_manager, use_registry
from conftest import FACTORIES, make_batch, make_gpt2, make_llama, randomize
from test_conformance import CASES

# the base-tensor methods (BitFit, LN/head tuning) change every row: refused, tested below. IA3's
# rescaling of ffn.down's input is applied per row (Host.scale_input), so IA3 mixes like the rest
MIXABLE = [c for c in CASES if not c.name.startswith(("bitfit", "ln_head"))]
PROMPT_FAMILY = ("prompt", "p_tuning-")
ATOL = 2e-5


def outputs(model, batch, **kw):
    out = model(**batch, output_hidden_states=True, **kw)
    return out.logits, out.hidden_states[-1]


def per_row(model, batch, names):
    """Reference: each row from a call with only its adapter active."""
    rows_logits, rows_hidden = [], []
    for i, n in enumerate(names):
        unipelt.set_adapter(model, [] if n == "__base__" else n)
        lg, hd = outputs(model, batch)
        rows_logits.append(lg[i])
        rows_hidden.append(hd[i])
    return torch.stack(rows_logits), torch.stack(rows_hidden)


def two_adapters(case):
    model = FACTORIES[case.arch]()
    ha = unipelt.compile(model, case.spec, name="a")
    randomize(ha, seed=1, std=0.2)
    hb = unipelt.compile(model, case.spec, name="b")
    randomize(hb, seed=2, std=0.2)
    return model, ha, hb


def names_for(case):
    # prompt tuning shifts every later position by its length: a base row (no virtual tokens) and a
    # prompted row cannot share a batch (refused, tested below)
    if case.name.startswith(PROMPT_FAMILY):
        return ["a", "b", "b", "a"]
    return ["a", "b", "__base__", "a"]


@pytest.mark.parametrize("case", MIXABLE, ids=[c.name for c in MIXABLE])
def test_mixed_rows_equal_single_adapter_calls(case):
    model, ha, hb = two_adapters(case)
    batch = make_batch(batch=4, length=7, lengths=(7, 5, 3, 6))
    names = names_for(case)
    with torch.no_grad():
        want = per_row(model, batch, names)
        unipelt.set_adapter(model, "a")  # what is active does not matter to a mixed call
        got = outputs(model, batch, adapter_names=names)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
    # the rows of the two adapters really differ (the test is not vacuous)
    assert not torch.allclose(got[1][0], want[1][1], atol=1e-3) or case.name.startswith(PROMPT_FAMILY)


GRAD_CASES = [c for c in MIXABLE if c.name.split("-")[0] in
              ("lora_qv", "unipelt_al", "houlsby", "unipelt_apl", "prefix", "p_tuning_v2", "prompt", "mam")]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.name for c in GRAD_CASES])
def test_training_gradients_reach_each_rows_adapter_only(case):
    """The mixed batch's loss has, for each adapter, the gradient of its rows' loss under a
    single-adapter call (PEFT refuses mixed batches in training)."""
    model, ha, hb = two_adapters(case)
    model.train()
    for m in model.modules():  # dropout off: the two computations must see the same noise (none)
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = make_batch(batch=4, length=7, lengths=(7, 5, 3, 6))
    names = ["a", "b", "b", "a"]
    w = torch.randn(4, *model(**batch).logits.shape[1:], generator=torch.Generator().manual_seed(0))

    def loss_of(logits, rows):
        return sum((logits[i] * w[i]).sum() for i in rows)

    for h in (ha, hb):
        for p in h.parameters():
            p.grad = None
    loss_of(model(**batch, adapter_names=names).logits, range(4)).backward()
    mixed = {n: [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in h.parameters()]
             for n, h in (("a", ha), ("b", hb))}
    for n, h in (("a", ha), ("b", hb)):
        unipelt.set_adapter(model, n)
        for hh in (ha, hb):
            for p in hh.parameters():
                p.grad = None
        rows = [i for i, m in enumerate(names) if m == n]
        loss_of(model(**batch).logits, rows).backward()
        want = [p.grad if p.grad is not None else torch.zeros_like(p) for p in h.parameters()]
        assert any(g.abs().sum() > 0 for g in want)
        for g, ww in zip(mixed[n], want):
            torch.testing.assert_close(g, ww, atol=1e-5, rtol=1e-4)


def test_rows_of_one_adapter_leave_the_other_without_gradient():
    case = next(c for c in MIXABLE if c.name == "unipelt_al-bert")
    model, ha, hb = two_adapters(case)
    batch = make_batch(batch=3)
    model(**batch, adapter_names=["b", "__base__", "b"]).logits.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in ha.parameters())
    assert any(p.grad is not None and p.grad.any() for p in hb.parameters())


@pytest.mark.parametrize("factory", [make_llama, make_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("spec", [
    {"modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4}}},
    {"modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4, "gate": True},
                 "prefix": {"method": "prefix", "length": 3, "reparam_hidden": 8, "gate": True},
                 "adapter": {"method": "adapter", "site": "ffn.res", "reduction_factor": 4,
                             "gate": {"pooling": "running_mean"}}}},
], ids=["lora", "unipelt"])
def test_generate_with_mixed_rows(factory, spec):
    model = factory()
    ha = unipelt.compile(model, spec, name="a")
    randomize(ha, seed=1, std=0.3)
    hb = unipelt.compile(model, spec, name="b")
    randomize(hb, seed=2, std=0.3)
    ids = torch.randint(3, 90, (3, 5), generator=torch.Generator().manual_seed(4))
    names = ["b", "__base__", "a"]
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    want = []
    for i, n in enumerate(names):
        unipelt.set_adapter(model, [] if n == "__base__" else n)
        want.append(model.generate(ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), **kw)[0])
    with unipelt.adapter_names(model, names):
        got = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(got, torch.stack(want))
    assert len({tuple(t.tolist()) for t in want}) > 1  # the adapters generate differently
    # the block is left: the next call is an ordinary one
    unipelt.set_adapter(model, "a")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(ids, adapter_names=["a"] * 3).logits, atol=0, rtol=0)


def test_prefixes_of_different_lengths_in_one_batch():
    """A row attends to its own adapter's L prefix columns only (the others are masked out): with
    L = 2 and L = 5 in one batch, every row as alone — on SDPA and eager, padded and not."""
    for impl in ("sdpa", "eager"):
        model = make_llama(attn_implementation=impl) if impl == "eager" else make_llama()
        ha = unipelt.compile(model, {"modules": {"p": {"method": "p_tuning_v2", "length": 2}}}, name="a")
        randomize(ha, seed=1)
        hb = unipelt.compile(model, {"modules": {"p": {"method": "prefix", "length": 5, "reparam_hidden": 8}}}, name="b")
        randomize(hb, seed=2)
        for batch in (make_batch(batch=3, lengths=(7, 4, 2)), {"input_ids": make_batch(batch=3)["input_ids"]}):
            names = ["b", "a", "__base__"]
            with torch.no_grad():
                want = per_row(model, batch, names)
                got = outputs(model, batch, adapter_names=names)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


def test_fusion_rows_beside_plain_adapter_rows():
    if "fusion" not in get_registry().methods:
        from unipelt_plugins import fusion

        use_registry(Registry(make_plugin_manager(extra_plugins=(fusion,))))
    try:
        model = FACTORIES["bert"]()
        spec = {"modules": {"ad": {"method": "adapter", "site": "ffn.out", "width": 4}}}
        for i, n in enumerate("abc"):
            randomize(unipelt.compile(model, spec, name=n), seed=i)
        fh = unipelt.compile(model, {"modules": {}, "combine": {"ffn.out": {"mode": "fusion", "adapters": ["a", "b"]}}},
                             name="fuse")
        randomize(fh, seed=9, std=0.1)
        batch = make_batch(batch=4, lengths=(7, 5, 3, 6))
        names = ["fuse", "c", "a", "fuse"]
        with torch.no_grad():
            want = per_row(model, batch, names)
            got = outputs(model, batch, adapter_names=names)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
    finally:
        use_registry(None)


def test_errors():
    model = FACTORIES["bert"]()
    h = unipelt.compile(model, {"modules": {"l": {"method": "lora", "sites": ["attn.q"], "r": 2}}}, name="a")
    batch = make_batch(batch=3)
    with pytest.raises(ModelError, match=r"adapter_names\[1\]: no adapter named 'zz'; attached: a"):
        model(**batch, adapter_names=["a", "zz", "a"])
    with pytest.raises(ModelError, match="2 names for a batch of 3 rows"):
        model(**batch, adapter_names=["a", "a"])
    with pytest.raises(ModelError, match="one adapter name per row"):
        model(**batch, adapter_names="a")
    with pytest.raises(ModelError, match=r"adapter_names\[0\]: no adapter named 'x'"):
        unipelt.adapter_names(model, ["x"])
    h.merge()
    with pytest.raises(ModelError, match="merged into the base weights"):
        model(**batch, adapter_names=["a", "__base__", "a"])
    h.unmerge()
    # BitFit trains base tensors in place: every row would see it (the message names module and method)
    unipelt.compile(model, {"modules": {"bf": {"method": "bitfit", "site": "bias"}}}, name="bf")
    with pytest.raises(ModelError, match=r"adapter_names\[2\]: adapter 'bf': its module 'bf' \(method bitfit\) "
                                         r"trains base tensors in place"):
        model(**batch, adapter_names=["a", "__base__", "bf"])
    # prompt tuning next to a row without virtual tokens
    m2 = FACTORIES["llama"]()
    unipelt.compile(m2, {"modules": {"p": {"method": "prompt", "length": 3}}}, name="p")
    with pytest.raises(ModelError, match="different numbers of virtual tokens"):
        m2(**batch, adapter_names=["p", "__base__", "p"])


def test_no_per_call_work_without_adapter_names():
    """The ordinary path is untouched: no selection is planned for a call that names none."""
    model = FACTORIES["bert"]()
    unipelt.compile(model, {"modules": {"l": {"method": "lora", "sites": ["attn.q"], "r": 2}}}, name="a")
    from unipelt.state import get_state

    ctx = get_state(model).ctx
    model(**make_batch(), adapter_names=["a", "a", "__base__"])
    assert ctx.rows is not None
    model(**make_batch())
    assert ctx.rows is None


def test_ungated_lora_rows_run_as_one_stacked_product():
    """Eight ungated LoRAs in one batch: one x·[A_1|..|A_8]ᵀ and one product with [B_1|..|B_8] per
    projection (the plan), and every row as its adapter alone."""
    model = FACTORIES["llama"]()
    spec = {"modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 2, "alpha": 3}}}
    for i in range(8):
        randomize(unipelt.compile(model, spec, name=f"a{i}"), seed=i, std=0.2)
    from unipelt.state import get_state

    state = get_state(model)
    rts = [rt for h in state.hosts.values() for rt in h.runtimes.values()]
    assert rts and all(rt.stacked is not None and len(rt.stacked) == 8 for rt in rts)
    batch = make_batch(batch=6, lengths=(7, 6, 5, 4, 3, 2))
    names = ["a3", "a0", "__base__", "a7", "a3", "a5"]
    with torch.no_grad():
        want = per_row(model, batch, names)
        got = outputs(model, batch, adapter_names=names)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["lora-r8-qv-mixed8", "lora-r8-qv-mixed8-unpacked"])
def test_speed_variant_mixes_eight_adapters(variant):
    """benchmarks/speed.py's lora-r8-qv-mixed8: eight adapters on one model, rows round-robin, all
    trained (one optimizer group per setting; packed by unipelt.pack_mixed, as many tensors as one
    adapter has, or -unpacked, eight times as many), and a step runs."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
    spec = importlib.util.spec_from_file_location("speed_bench_mixed", path)
    speed = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = speed
    spec.loader.exec_module(speed)
    scn = speed.TINY["llama"]
    prep = speed.prepare(speed.VARIANTS[variant], scn, "train", torch.device("cpu"), torch.float32)
    one = speed.prepare(speed.VARIANTS["lora-r8-qv"], scn, "train", torch.device("cpu"), torch.float32)
    assert prep.trainable == 8 * one.trainable
    assert prep.call_kwargs["adapter_names"] == [f"m{i % 8}" for i in range(scn.train_shape[0])]
    assert len(prep.params) == len(one.params)
    tensors = sum(len(g["params"]) for g in prep.params)
    assert tensors == (1 if variant.endswith("mixed8") else 8) * sum(len(g["params"]) for g in one.params)
    batch = {**speed.make_batch(scn, "train", 512, torch.device("cpu")), **prep.call_kwargs}
    prep.model(**batch).loss.backward()
    if variant.endswith("mixed8"):
        # the stacks' gradients, per adapter: B's column block (A's is 0 while every B is 0)
        from unipelt.state import PACKED

        graded = set()
        for sp in prep.model.unipelt[PACKED].values():
            at = 0
            for name, r in zip(sp.names, sp.widths):
                if sp.B.grad[:, at:at + r].any():
                    graded.add(name)
                at += r
    else:
        graded = {h.name for h in prep.keep if any(p.grad is not None and p.grad.any() for p in h.parameters())}
    assert graded == {f"m{i}" for i in range(scn.train_shape[0])}  # the rows' adapters, no others


def test_beam_search_rows_keep_their_adapter():
    """generate(num_beams=2, num_return_sequences=2) repeats each row: the repeats keep its adapter."""
    model = make_llama()
    spec = {"modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4},
                        "p": {"method": "p_tuning_v2", "length": 2}}}
    for i, n in enumerate("ab"):
        randomize(unipelt.compile(model, spec, name=n), seed=i + 1, std=0.3)
    ids = torch.randint(3, 90, (2, 4), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=4, min_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False,
              pad_token_id=0)
    names = ["b", "a"]
    want = []
    for i, n in enumerate(names):
        unipelt.set_adapter(model, n)
        want.append(model.generate(ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), **kw))
    with unipelt.adapter_names(model, names):
        got = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(got, torch.cat(want))


def test_gradient_checkpointing_recomputes_the_same_rows():
    case = next(c for c in MIXABLE if c.name == "unipelt_apl-llama")
    grads = []
    for checkpointing in (False, True):
        model, ha, hb = two_adapters(case)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        batch = make_batch(batch=3, lengths=(7, 5, 6))
        model(**batch, adapter_names=["a", "b", "__base__"]).logits.pow(2).mean().backward()
        grads.append([p.grad.clone() for h in (ha, hb) for p in h.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)


def test_input_scaling_rows_run_one_base_projection():
    """IA3 at ffn.down rescales the projection's input: in a mixed batch each row gets its own
    adapter's scaling (a base row none) and ffn.down's base layer still runs once per call; the
    gradient of each scaling vector comes from its rows only."""
    model = FACTORIES["llama"]()
    spec = {"modules": {"s": {"method": "ia3", "sites": ["ffn.down"]}}}
    ha = unipelt.compile(model, spec, name="a")
    randomize(ha, seed=1, std=0.3)
    hb = unipelt.compile(model, spec, name="b")
    randomize(hb, seed=2, std=0.3)
    batch = make_batch(batch=3, lengths=(7, 5, 6))
    names = ["b", "__base__", "a"]
    calls = []
    down = model.model.layers[0].mlp.down_proj.base_layer
    hook = down.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        want = per_row(model, batch, names)
        calls.clear()
        got = outputs(model, batch, adapter_names=names)
    hook.remove()
    assert len(calls) == 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
    assert not torch.allclose(got[1][0], want[1][1], atol=1e-3)
    model(**batch, adapter_names=["b", "__base__", "b"]).logits.pow(2).mean().backward()
    assert all(p.grad is None or not p.grad.any() for p in ha.parameters())
    assert any(p.grad is not None and p.grad.any() for p in hb.parameters())


def test_stacked_lora_casts_the_column_scale_once_per_call():
    """The stacked LoRA product of a bf16 mixed batch scales its columns with a bf16 mask made
    once per call, not cast again at every projection (one kernel each in an eager forward): the
    mixed call has one more dtype conversion than a single-adapter call, whatever the number of
    projections, and the rows still get their own adapter's outputs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.overloadpacket is torch.ops.aten._to_copy
            return func(*args, **(kwargs or {}))

    spec = {"modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4}}}
    model = make_llama(layers=3)
    for i, n in enumerate("abc"):
        randomize(unipelt.compile(model, spec, name=n), seed=i + 1)
    model.to(torch.bfloat16)
    batch = make_batch(batch=4)
    names = ["a", "b", "c", "a"]
    with torch.no_grad():
        model(**batch, adapter_names=names)  # warm-up: the side-by-side weights are cached
        with CountCasts() as mixed:
            got = model(**batch, adapter_names=names).logits
        unipelt.set_adapter(model, "a")
        with CountCasts() as single:
            model(**batch)
        want = per_row(model, batch, names)[0]
    assert mixed.n == single.n + 1  # six projections, one cast of the column scale
    torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)
