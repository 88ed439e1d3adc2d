"""Each method's output against its formula, written here independently from METHODS.md.

The module under test is hooked: its input is captured by a forward pre-hook, its output by a
forward hook registered *after* compile (so it sees the adapted output), and the expected value
is computed by hand from the base weights and the adapter tensors. Last, LoRA is compared with
HF PEFT's LoRA given the same weights.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

import unipelt
from conftest import make_batch, make_bert, make_gpt2, make_llama, randomize

ATOL = 1e-5  # float32, reassociated sums of a few dozen terms


class Capture:
    """Records the (first) input and the output of a module at every call."""

    def __init__(self, module, kwarg: str | None = None):
        self.inputs: list[tuple] = []
        self.outputs: list = []
        self._h = [
            module.register_forward_pre_hook(lambda m, a, k: self.inputs.append((a, k)), with_kwargs=True),
            module.register_forward_hook(lambda m, a, o: self.outputs.append(o)),
        ]

    @property
    def x(self) -> torch.Tensor:
        args, kwargs = self.inputs[-1]
        return args[0] if args else kwargs["hidden_states"]

    @property
    def y(self) -> torch.Tensor:
        o = self.outputs[-1]
        return o[0] if isinstance(o, tuple) else o

    def remove(self):
        for h in self._h:
            h.remove()


def run(model, batch):
    with torch.no_grad():
        return model(**batch)


def lora_scale(r, alpha=None, rslora=False):
    """METHODS.md: s = alpha/r, rsLoRA alpha/sqrt(r); the engine's default alpha is 2r."""
    alpha = 2 * r if alpha is None else alpha
    return alpha / (math.sqrt(r) if rslora else r)


def adapter_delta(p, x, act=F.relu, scale=1.0):
    """Delta = s · (W_up·f(W_down·x + b_down) + b_up)."""
    return scale * F.linear(act(F.linear(x, p["down.weight"], p["down.bias"])), p["up.weight"], p["up.bias"])


def branch_params(h, key):
    return {k[len(key) + 1:]: v.detach() for k, v in h.named_parameters().items() if k.startswith(key + ".")}


# ------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [
    {"r": 4}, {"r": 4, "alpha": 6}, {"r": 4, "alpha": 6, "rslora": True}, {"r": 8, "alpha": 4, "init": "gaussian"},
], ids=["default_alpha", "alpha_over_r", "rslora", "gaussian"])
def test_lora_on_linear(params):
    model = make_bert()
    h = unipelt.compile(model, {"modules": {"l": {"method": "lora", "site": "attn.v", **params}}})
    randomize(h)
    wrapper = model.bert.encoder.layer[1].attention.self.value
    cap = Capture(wrapper)
    run(model, make_batch())
    base = wrapper.base_layer
    A, B = h.named_parameters()["l.1.attn.v.lora_A"], h.named_parameters()["l.1.attn.v.lora_B"]
    assert A.shape == (params["r"], 32) and B.shape == (32, params["r"])
    s = lora_scale(params["r"], params.get("alpha"), params.get("rslora", False))
    x = cap.x
    expected = x @ base.weight.T + base.bias + s * (x @ A.T) @ B.T
    torch.testing.assert_close(cap.y, expected, atol=ATOL, rtol=0)


def test_lora_init():
    model = make_bert()
    h = unipelt.compile(model, {"modules": {
        "k": {"method": "lora", "site": "attn.q", "r": 8},
        "g": {"method": "lora", "site": "attn.k", "r": 8, "init": "gaussian"},
    }})
    p = h.named_parameters()
    for key in ("k.0.attn.q", "g.0.attn.k"):
        assert torch.count_nonzero(p[f"{key}.lora_B"]) == 0  # B = 0: the layer starts unchanged
        assert torch.count_nonzero(p[f"{key}.lora_A"]) == p[f"{key}.lora_A"].numel()
    # Kaiming-uniform with a=sqrt(5) (nn.Linear's init): bound 1/sqrt(fan_in)
    assert p["k.0.attn.q.lora_A"].abs().max() <= 1 / math.sqrt(32)
    # Gaussian N(0, 1/r): the sample std of 256 draws is within ~25% of 1/8
    assert abs(p["g.0.attn.k.lora_A"].std().item() - 1 / 8) < 0.04


def test_lora_on_gpt2_fused_v_slice():
    model = make_gpt2()
    h = unipelt.compile(model, {"modules": {"l": {"method": "lora", "site": "attn.v", "r": 4, "alpha": 12}}})
    randomize(h)
    wrapper = model.transformer.h[0].attn.c_attn
    cap = Capture(wrapper)
    run(model, make_batch())
    conv = wrapper.base_layer
    A, B = h.named_parameters()["l.0.attn.v.lora_A"], h.named_parameters()["l.0.attn.v.lora_B"]
    d = 32
    assert A.shape == (4, d) and B.shape == (d, 4)
    x = cap.x
    expected = x @ conv.weight + conv.bias  # Conv1D keeps its weight as (in, out)
    expected[..., 2 * d:] += 3.0 * (x @ A.T) @ B.T  # s = 12/4, on the value slice only
    torch.testing.assert_close(cap.y, expected, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------
# bottleneck adapters
# ------------------------------------------------------------------------------------------
def test_serial_adapter_bert_ffn_out():
    """Houlsby's FFN position: the adapter reads the output projection h = dense(mid), before the
    residual add and LayerNorm: out = LN(h + Delta(h) + x). (Pfeiffer's ffn.res: test_placements.py.)"""
    model = make_bert()
    h = unipelt.compile(model, {"modules": {"a": {"method": "adapter", "site": "ffn.out", "width": 5, "scale": 2.0}}})
    randomize(h)
    out_mod = model.bert.encoder.layer[0].output
    cap = Capture(out_mod)
    run(model, make_batch())
    (mid, residual), _ = cap.inputs[-1]
    proj = out_mod.dense.base_layer(mid)
    p = branch_params(h, "a.0.ffn.out")
    assert p["down.weight"].shape == (5, 32)
    expected = out_mod.LayerNorm(proj + adapter_delta(p, proj, scale=2.0) + residual)
    torch.testing.assert_close(cap.y, expected, atol=ATOL, rtol=0)


def test_serial_adapter_llama_attn_out_gelu():
    """Houlsby position 1 on a decoder: the attention output before the residual add."""
    model = make_llama()
    h = unipelt.compile(model, {"modules": {"a": {"method": "adapter", "site": "attn.out", "width": 6, "activation": "gelu"}}})
    randomize(h)
    attn = model.model.layers[1].self_attn
    cap, cap_o = Capture(attn), Capture(attn.o_proj)
    run(model, make_batch())
    base = cap_o.y  # the attention output before the adapter: o_proj of the attention context
    p = branch_params(h, "a.1.attn.out")
    torch.testing.assert_close(cap.y, base + adapter_delta(p, base, act=F.gelu), atol=ATOL, rtol=0)


def test_parallel_adapter_bert():
    """PA: h = FFN(x) + s·Delta(x), x the FFN input, added before the residual add and LN."""
    model = make_bert()
    h = unipelt.compile(model, {"modules": {"pa": {"method": "adapter", "site": "ffn", "width": 8, "scale": 4.0}}})
    randomize(h)
    layer = model.bert.encoder.layer[1]
    cap_in = Capture(layer.intermediate)
    cap_dense = Capture(layer.output.dense)
    run(model, make_batch())
    x = cap_in.x
    base = layer.output.dense.base_layer(cap_dense.x)
    p = branch_params(h, "pa.1.ffn")
    torch.testing.assert_close(cap_dense.y, base + adapter_delta(p, x, scale=4.0), atol=ATOL, rtol=0)


def test_parallel_adapter_llama_learned_scale():
    model = make_llama()
    h = unipelt.compile(model, {"modules": {"pa": {"method": "adapter", "site": "ffn", "width": 8, "scale": 4.0, "learned_scale": True}}})
    p = branch_params(h, "pa.0.ffn")
    assert p["scale"].item() == 4.0  # the learned scale starts at `scale`
    randomize(h)
    mlp = model.model.layers[0].mlp
    cap = Capture(mlp)
    run(model, make_batch())
    x = cap.x
    base = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    p = branch_params(h, "pa.0.ffn")
    torch.testing.assert_close(cap.y, base + adapter_delta(p, x, scale=p["scale"]), atol=ATOL, rtol=0)


def test_sequential_combine_order():
    """Sequential stacking: the second adapter reads the first one's output."""
    model = make_bert()
    h = unipelt.compile(model, {
        "modules": {"a1": {"method": "adapter", "site": "ffn.out", "width": 4},
                    "a2": {"method": "adapter", "site": "ffn.out", "width": 4}},
        "combine": {"ffn.out": {"mode": "sequential", "order": ["a2", "a1"]}},
    })
    randomize(h)
    out_mod = model.bert.encoder.layer[0].output
    cap = Capture(out_mod)
    run(model, make_batch())
    (mid, residual), _ = cap.inputs[-1]
    y = out_mod.dense.base_layer(mid)  # ffn.out: the output projection, before residual and LN
    y = y + adapter_delta(branch_params(h, "a2.0.ffn.out"), y)
    y = y + adapter_delta(branch_params(h, "a1.0.ffn.out"), y)
    torch.testing.assert_close(cap.y, out_mod.LayerNorm(y + residual), atol=ATOL, rtol=0)


def test_average_combine():
    model = make_llama()
    h = unipelt.compile(model, {
        "modules": {"l1": {"method": "lora", "site": "attn.q", "r": 2}, "l2": {"method": "lora", "site": "attn.q", "r": 3}},
        "combine": {"attn.q": "average"},
    })
    randomize(h)
    wrapper = model.model.layers[0].self_attn.q_proj
    cap = Capture(wrapper)
    run(model, make_batch())
    x, p = cap.x, h.named_parameters()
    d1 = 2.0 * (x @ p["l1.0.attn.q.lora_A"].T) @ p["l1.0.attn.q.lora_B"].T
    d2 = 2.0 * (x @ p["l2.0.attn.q.lora_A"].T) @ p["l2.0.attn.q.lora_B"].T
    torch.testing.assert_close(cap.y, wrapper.base_layer(x) + (d1 + d2) / 2, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------
# gates
# ------------------------------------------------------------------------------------------
def pooled(g, mask, pooling):
    """The gate pooling of METHODS.md, from per-token values g (B, T, 1) and mask (B, T)."""
    m = mask.to(g.dtype).unsqueeze(-1)
    if pooling == "token":
        return g
    if pooling == "mean":  # the reference code: every position, padding included
        return g.mean(dim=1, keepdim=True)
    if pooling == "masked_mean":
        return (g * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)
    if pooling == "running_mean":
        return torch.cumsum(g * m, 1) / torch.cumsum(m, 1).clamp_min(1)
    raise AssertionError(pooling)


@pytest.mark.parametrize("pooling", ["masked_mean", "mean", "token"])
def test_adapter_gate_pooling_bert(pooling):
    """G_A = sigmoid(w·h + b) from the adapter's input h (the FFN's output projection at ffn.out);
    out = LN(h + G_A·Delta(h) + x)."""
    model = make_bert()
    h = unipelt.compile(model, {"modules": {"a": {"method": "adapter", "site": "ffn.out", "width": 4, "gate": {"pooling": pooling}}}})
    randomize(h)
    batch = make_batch(lengths=(7, 4, 2))
    out_mod = model.bert.encoder.layer[1].output
    cap = Capture(out_mod)
    run(model, batch)
    (mid, residual), _ = cap.inputs[-1]
    y = out_mod.dense.base_layer(mid)
    p = h.named_parameters()
    w, b = p["gate.a.1.linear.weight"], p["gate.a.1.linear.bias"]
    assert w.shape == (1, 32) and b.shape == (1,)
    g = pooled(torch.sigmoid(y @ w.T + b), batch["attention_mask"], pooling)
    expected = out_mod.LayerNorm(y + g * adapter_delta(branch_params(h, "a.1.ffn.out"), y) + residual)
    torch.testing.assert_close(cap.y, expected, atol=ATOL, rtol=0)

    # the gate report: one value per example, averaged over its real tokens
    report = h.gates(batch)
    m = batch["attention_mask"].float()
    per_example = g.squeeze(-1)
    if per_example.shape[1] > 1:
        per_example = (per_example * m).sum(1) / m.sum(1)
    else:
        per_example = per_example[:, 0]
    torch.testing.assert_close(report.values[("a", 1)], per_example, atol=ATOL, rtol=0)
    assert set(report.table()) == {"a"}


def test_masked_mean_differs_from_mean_with_padding():
    """The reason the default is masked_mean: the reference mean counts padding positions."""
    outs = {}
    batch = make_batch(lengths=(7, 2, 2))
    for pooling in ("masked_mean", "mean"):
        model = make_bert()
        h = unipelt.compile(model, {"modules": {"a": {"method": "adapter", "site": "ffn.out", "gate": {"pooling": pooling}}}})
        randomize(h)
        outs[pooling] = h.gates(batch).values[("a", 0)]
    assert torch.allclose(outs["masked_mean"][0], outs["mean"][0])  # no padding: the same
    assert not torch.allclose(outs["masked_mean"][1:], outs["mean"][1:], atol=1e-3)


@pytest.mark.parametrize("lora_scale", ["replace", "multiply"])
@pytest.mark.parametrize("pooling", ["token", "running_mean"])
def test_lora_gate_llama(lora_scale, pooling):
    """G_L = sigmoid(w·x_layer + b) from the block input; on this pre-LN block that is the input
    norm's output (the q projection's input), not the raw residual stream, whose norm grows with
    depth and would saturate the gate; ``replace``: h = W0x + G·B·A·x (alpha ignored),
    ``multiply``: W0x + G·s·B·A·x."""
    model = make_llama()
    h = unipelt.compile(model, {"modules": {"l": {
        "method": "lora", "site": "attn.q", "r": 4, "alpha": 12, "gate": {"lora_scale": lora_scale, "pooling": pooling},
    }}})
    randomize(h)
    batch = make_batch(lengths=(7, 5, 3))
    layer = model.model.layers[1]
    cap_layer = Capture(layer)
    cap_q = Capture(layer.self_attn.q_proj)
    run(model, batch)
    p = h.named_parameters()
    A, B = p["l.1.attn.q.lora_A"], p["l.1.attn.q.lora_B"]
    w, b = p["gate.l.1.linear.weight"], p["gate.l.1.linear.bias"]
    normed = model.model.layers[1].input_layernorm(cap_layer.x)  # computed here from the block input
    g = pooled(torch.sigmoid(normed @ w.T + b), batch["attention_mask"], pooling)
    s = 1.0 if lora_scale == "replace" else 12 / 4
    x = cap_q.x
    expected = x @ layer.self_attn.q_proj.base_layer.weight.T + g * s * ((x @ A.T) @ B.T)
    torch.testing.assert_close(cap_q.y, expected, atol=ATOL, rtol=0)


def test_lora_gate_bert_masked_mean_layer_input():
    """On the post-LN encoder the block input is the attention input. As in the UniPELT reference,
    every LoRA-wrapped projection has its own gate: q and v one each, both reading the layer input."""
    model = make_bert()
    h = unipelt.compile(model, {"modules": {"l": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4, "gate": True}}})
    randomize(h)
    assert sorted(k for k in h.named_parameters() if k.startswith("gate.") and ".0.linear" in k) == [
        "gate.l@attn.q.0.linear.bias", "gate.l@attn.q.0.linear.weight",
        "gate.l@attn.v.0.linear.bias", "gate.l@attn.v.0.linear.weight",
    ]
    batch = make_batch(lengths=(7, 4, 1))
    attn = model.bert.encoder.layer[0].attention.self
    cap_q, cap_v = Capture(attn.query), Capture(attn.value)
    report = h.gates(batch)
    p = h.named_parameters()
    x = cap_q.x
    m = batch["attention_mask"]
    for cap, site, lin in ((cap_q, "attn.q", attn.query), (cap_v, "attn.v", attn.value)):
        w, b = p[f"gate.l@{site}.0.linear.weight"], p[f"gate.l@{site}.0.linear.bias"]
        g = pooled(torch.sigmoid(x @ w.T + b), m, "masked_mean")
        A, B = p[f"l.0.{site}.lora_A"], p[f"l.0.{site}.lora_B"]
        expected = lin.base_layer(x) + g * ((x @ A.T) @ B.T)  # replace: alpha/r is ignored
        torch.testing.assert_close(cap.y, expected, atol=ATOL, rtol=0)
        # the gate report has one row per projection
        torch.testing.assert_close(report.values[(f"l@{site}", 0)], g[:, 0, 0], atol=ATOL, rtol=0)
    assert not torch.allclose(report.values[("l@attn.q", 0)], report.values[("l@attn.v", 0)])


def test_lora_gate_shared_by_q_and_v_is_an_explicit_option():
    """One gate for both projections: a shared gate named under ``gates:``."""
    model = make_bert()
    h = unipelt.compile(model, {"modules": {"l": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4, "gate": "g"}},
                                "gates": {"g": {"input": "layer"}}})
    randomize(h)
    assert sorted(k for k in h.named_parameters() if k.startswith("gate.")) == [
        "gate.g.0.linear.bias", "gate.g.0.linear.weight", "gate.g.1.linear.bias", "gate.g.1.linear.weight",
    ]
    batch = make_batch(lengths=(7, 4, 1))
    attn = model.bert.encoder.layer[1].attention.self
    cap_q, cap_v = Capture(attn.query), Capture(attn.value)
    run(model, batch)
    p = h.named_parameters()
    x = cap_q.x
    g = pooled(torch.sigmoid(x @ p["gate.g.1.linear.weight"].T + p["gate.g.1.linear.bias"]), batch["attention_mask"], "masked_mean")
    for cap, site, lin in ((cap_q, "attn.q", attn.query), (cap_v, "attn.v", attn.value)):
        A, B = p[f"l.1.{site}.lora_A"], p[f"l.1.{site}.lora_B"]
        torch.testing.assert_close(cap.y, lin.base_layer(x) + g * ((x @ A.T) @ B.T), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_layer_gate_reads_the_normalised_block_input_on_pre_ln(family):
    """On pre-LN decoders the layer-input gate reads norm(x_block), computed here by the block's
    own norm from the captured block input; the gate report averages it over the real tokens."""
    model = make_gpt2() if family == "gpt2" else make_llama()
    h = unipelt.compile(model, {"modules": {"l": {"method": "lora", "site": "attn.v", "r": 2, "gate": {"pooling": "token"}}}})
    randomize(h)
    batch = make_batch(lengths=(7, 5, 3))
    layer = (model.transformer.h if family == "gpt2" else model.model.layers)[1]
    norm = layer.ln_1 if family == "gpt2" else layer.input_layernorm
    cap = Capture(layer)
    report = h.gates(batch)
    p = h.named_parameters()
    with torch.no_grad():
        g = torch.sigmoid(norm(cap.x) @ p["gate.l.1.linear.weight"].T + p["gate.l.1.linear.bias"])[..., 0]
    m = batch["attention_mask"].float()
    torch.testing.assert_close(report.values[("l", 1)], (g * m).sum(1) / m.sum(1), atol=ATOL, rtol=0)


def test_gate_init_bias():
    model = make_bert()
    h = unipelt.compile(model, {"modules": {"a": {"method": "adapter", "site": "ffn.out", "gate": {"init_bias": -2.5}}}})
    assert h.named_parameters()["gate.a.0.linear.bias"].item() == -2.5


# ------------------------------------------------------------------------------------------
# LoRA equals HF PEFT's LoRA given the same weights
# ------------------------------------------------------------------------------------------
peft = pytest.importorskip("peft")


def _peft_module(peft_model, path):
    return peft_model.base_model.model.get_submodule(path)


def _outputs(model, batch):
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


@pytest.mark.parametrize("arch,sites,targets,rslora", [
    ("bert", ["attn.q", "attn.v"], {"attn.q": "attention.self.query", "attn.v": "attention.self.value"}, False),
    ("bert", ["attn.o", "ffn.up"], {"attn.o": "attention.output.dense", "ffn.up": "intermediate.dense"}, True),
    ("llama", ["attn.q", "attn.v"], {"attn.q": "self_attn.q_proj", "attn.v": "self_attn.v_proj"}, False),
    ("llama", ["attn.k", "attn.o", "ffn.gate", "ffn.up", "ffn.down"],
     {"attn.k": "self_attn.k_proj", "attn.o": "self_attn.o_proj", "ffn.gate": "mlp.gate_proj",
      "ffn.up": "mlp.up_proj", "ffn.down": "mlp.down_proj"}, True),
], ids=["bert-qv", "bert-o-up-rslora", "llama-qv", "llama-rest-rslora"])
def test_lora_matches_peft(arch, sites, targets, rslora):
    factory = {"bert": make_bert, "llama": make_llama}[arch]
    layers_path = {"bert": "bert.encoder.layer", "llama": "model.layers"}[arch]
    r, alpha = 4, 6
    ours = factory()
    h = unipelt.compile(ours, {"modules": {"l": {"method": "lora", "sites": sites, "r": r, "alpha": alpha, "rslora": rslora}}})
    randomize(h)

    cfg = peft.LoraConfig(
        r=r, lora_alpha=alpha, use_rslora=rslora, lora_dropout=0.0,
        target_modules=sorted({t.rsplit(".", 1)[-1] for t in targets.values()}) if arch == "llama"
        else [t for t in targets.values()],
    )
    theirs = peft.get_peft_model(factory(), cfg).eval()
    p = h.named_parameters()
    with torch.no_grad():
        for i in range(2):
            for site, path in targets.items():
                mod = _peft_module(theirs, f"{layers_path}.{i}.{path}")
                mod.lora_A["default"].weight.copy_(p[f"l.{i}.{site}.lora_A"])
                mod.lora_B["default"].weight.copy_(p[f"l.{i}.{site}.lora_B"])
    # PEFT wrapped exactly the layers we adapted, and nothing else
    wrapped = {n for n, m in theirs.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(wrapped) == 2 * len(sites)

    batch = make_batch()
    for a, b in zip(_outputs(ours, batch), _outputs(theirs, batch)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)
    assert not torch.allclose(_outputs(ours, batch)[0], _outputs(factory(), batch)[0], atol=1e-4)


def test_lora_matches_peft_gpt2_fused_qv():
    """PEFT puts one LoRA on the whole fused c_attn (fan_in_fan_out). Our separate q and v
    updates are that LoRA at rank 2r with A = [A_q; A_v] and a block B that leaves the k slice
    alone; PEFT's scale alpha'/(2r) equals ours (alpha/r) with alpha' = 2·alpha."""
    r, alpha, d = 4, 6, 32
    ours = make_gpt2()
    h = unipelt.compile(ours, {"modules": {"l": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": r, "alpha": alpha}}})
    randomize(h)
    cfg = peft.LoraConfig(r=2 * r, lora_alpha=2 * alpha, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    theirs = peft.get_peft_model(make_gpt2(), cfg).eval()
    p = h.named_parameters()
    with torch.no_grad():
        for i in range(2):
            mod = _peft_module(theirs, f"transformer.h.{i}.attn.c_attn")
            A = torch.cat([p[f"l.{i}.attn.q.lora_A"], p[f"l.{i}.attn.v.lora_A"]])
            B = torch.zeros(3 * d, 2 * r)
            B[:d, :r] = p[f"l.{i}.attn.q.lora_B"]
            B[2 * d:, r:] = p[f"l.{i}.attn.v.lora_B"]
            mod.lora_A["default"].weight.copy_(A)
            mod.lora_B["default"].weight.copy_(B)
    batch = make_batch()
    for a, b in zip(_outputs(ours, batch), _outputs(theirs, batch)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)
    assert not torch.allclose(_outputs(ours, batch)[0], _outputs(make_gpt2(), batch)[0], atol=1e-4)
