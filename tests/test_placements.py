"""Serial adapter placements against the reference formulas (METHODS.md, "Bottleneck adapter";
AdapterHub ``adapters`` 1.3, ``methods/bottleneck.py`` and ``methods/modeling.py``).

With x a sublayer's input, h its output projection and N its norm after the residual add:

- Houlsby (``attn.out``, ``ffn.out``; ``adapters``' double_seq_bn): N(h + Delta(h) + x).
- Pfeiffer (``attn.res``, ``ffn.res``; ``adapters``' seq_bn): a = N(h + x); N(h + x + Delta(a)).

On post-LN BERT, N is the sublayer's LayerNorm, computed here by hand from its weight and bias
(mean, biased variance, eps), never by calling the module. On pre-LN decoders (GPT-2, Llama) N is
the identity: ``adapters`` passes no layer norm to the adapter there, so Pfeiffer reads the
residual stream after the add and the block output is s + Delta(s), s = x + h.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import unipelt
from conftest import make_batch, make_bert, make_gpt2, make_llama, randomize

ATOL = 1e-5
ACTS = {"relu": F.relu, "swish": F.silu, "gelu": F.gelu, "tanh": torch.tanh}


class Capture:
    """The last positional inputs and the output of a module's call."""

    def __init__(self, module):
        self.args: tuple = ()
        self.out = None
        module.register_forward_pre_hook(lambda m, a: setattr(self, "args", a))
        module.register_forward_hook(lambda m, a, o: setattr(self, "out", o[0] if isinstance(o, tuple) else o))


def layer_norm_by_hand(v: torch.Tensor, ln) -> torch.Tensor:
    mean = v.sum(-1, keepdim=True) / v.shape[-1]
    var = ((v - mean) ** 2).sum(-1, keepdim=True) / v.shape[-1]
    return (v - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def delta(h, key: str, v: torch.Tensor, act: str = "relu") -> torch.Tensor:
    """Delta(v) = W_up·f(W_down·v + b_down) + b_up, from the adapter's own tensors."""
    p = {k[len(key) + 1:]: t.detach() for k, t in h.named_parameters().items() if k.startswith(key + ".")}
    return F.linear(ACTS[act](F.linear(v, p["down.weight"], p["down.bias"])), p["up.weight"], p["up.bias"])


def linear(v: torch.Tensor, lin) -> torch.Tensor:
    lin = getattr(lin, "base_layer", lin)
    return v @ lin.weight.T + lin.bias


def bert_sublayers(model, layer: int):
    """(output module, its dense, its LayerNorm) of the attention and FFN sublayers of a BERT layer."""
    blk = model.bert.encoder.layer[layer]
    return {"attn": blk.attention.output, "ffn": blk.output}


@pytest.mark.parametrize("act", ["swish", "relu", "gelu"])
def test_houlsby_bert_both_sublayers(act):
    """LN(h + Delta(h) + x) at the attention and the FFN sublayer (specs/houlsby.yaml's sites)."""
    model = make_bert()
    h = unipelt.compile(model, {"modules": {"a": {"method": "adapter", "sites": ["attn.out", "ffn.out"], "width": 5,
                                                   "activation": act}}})
    randomize(h)
    subs = bert_sublayers(model, 1)
    caps = {k: Capture(m) for k, m in subs.items()}
    with torch.no_grad():
        model(**make_batch())
        for name, site in (("attn", "attn.out"), ("ffn", "ffn.out")):
            mod = subs[name]
            proj_in, x = caps[name].args  # BertSelfOutput / BertOutput(hidden_states, input_tensor)
            hh = linear(proj_in, mod.dense)  # the output projection h, computed here
            expected = layer_norm_by_hand(hh + delta(h, f"a.1.{site}", hh, act) + x, mod.LayerNorm)
            torch.testing.assert_close(caps[name].out, expected, atol=ATOL, rtol=0)
            # and it is not the placement the engine used to compute (adapter after the LN)
            a = layer_norm_by_hand(hh + x, mod.LayerNorm)
            assert not torch.allclose(caps[name].out, a + delta(h, f"a.1.{site}", a, act), atol=1e-3)


@pytest.mark.parametrize("act", ["relu", "swish", "tanh"])
@pytest.mark.parametrize("sublayer", ["ffn", "attn"])
def test_pfeiffer_bert(sublayer, act):
    """a = LN(h + x); out = LN(h + x + Delta(a)): the adapter's output is added to the residual sum
    and the sublayer's LayerNorm is applied again (seq_bn: original_ln_before, residual_before_ln,
    original_ln_after)."""
    model = make_bert()
    site = f"{sublayer}.res"
    h = unipelt.compile(model, {"modules": {"a": {"method": "adapter", "site": site, "width": 6, "activation": act}}})
    randomize(h)
    mod = bert_sublayers(model, 0)[sublayer]
    cap = Capture(mod)
    with torch.no_grad():
        model(**make_batch())
        proj_in, x = cap.args
        s = linear(proj_in, mod.dense) + x
        a = layer_norm_by_hand(s, mod.LayerNorm)
        expected = layer_norm_by_hand(s + delta(h, f"a.0.{site}", a, act), mod.LayerNorm)
        torch.testing.assert_close(cap.out, expected, atol=ATOL, rtol=0)
        assert not torch.allclose(cap.out, a + delta(h, f"a.0.{site}", a, act), atol=1e-3)


@pytest.mark.parametrize("pooling", ["masked_mean", "mean", "token"])
def test_gated_pfeiffer_bert(pooling):
    """UniPELT's adapter: G_A = sigmoid(w·a + b) from the adapter's input a = LN(h + x), pooled;
    out = LN(h + x + G_A·Delta(a))."""
    model = make_bert()
    h = unipelt.compile(model, {"modules": {"a": {"method": "adapter", "site": "ffn.res", "width": 4,
                                                   "gate": {"pooling": pooling}}}})
    randomize(h)
    batch = make_batch(lengths=(7, 4, 2))
    mod = model.bert.encoder.layer[1].output
    cap = Capture(mod)
    with torch.no_grad():
        model(**batch)
        proj_in, x = cap.args
        s = linear(proj_in, mod.dense) + x
        a = layer_norm_by_hand(s, mod.LayerNorm)
        p = h.named_parameters()
        g = torch.sigmoid(a @ p["gate.a.1.linear.weight"].T + p["gate.a.1.linear.bias"])
        m = batch["attention_mask"].float().unsqueeze(-1)
        if pooling == "masked_mean":
            g = (g * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)
        elif pooling == "mean":
            g = g.mean(1, keepdim=True)
        expected = layer_norm_by_hand(s + g * delta(h, "a.1.ffn.res", a), mod.LayerNorm)
        torch.testing.assert_close(cap.out, expected, atol=ATOL, rtol=0)


def test_pfeiffer_and_houlsby_specs_use_the_reference_sites():
    """The shipped specs name the sites whose formulas are checked above."""
    from pathlib import Path

    from unipelt.spec import parse_spec

    root = Path(__file__).resolve().parents[1] / "specs"
    sites = {f: {n: tuple(m.sites) for n, m in parse_spec(root / f).modules.items() if m.method == "adapter"}
             for f in ("houlsby.yaml", "pfeiffer.yaml", "unipelt.yaml", "unipelt-ap.yaml", "unipelt-al.yaml")}
    assert sites["houlsby.yaml"] == {"adapter": ("attn.out", "ffn.out")}
    for f in ("pfeiffer.yaml", "unipelt.yaml", "unipelt-ap.yaml", "unipelt-al.yaml"):
        assert sites[f] == {"adapter": ("ffn.res",)}, f


# ------------------------------------------------------------------------------------------
# pre-LN decoders: N = identity
# ------------------------------------------------------------------------------------------
def _decoder(family: str):
    model = make_gpt2() if family == "gpt2" else make_llama()
    blk = (model.transformer.h if family == "gpt2" else model.model.layers)[1]
    if family == "gpt2":
        return model, blk, {"ffn": (blk.ln_2, blk.mlp), "attn": (blk.ln_1, blk.attn)}
    return model, blk, {"ffn": (blk.post_attention_layernorm, blk.mlp), "attn": (blk.input_layernorm, blk.self_attn)}


def _mlp_by_hand(family: str, mlp, n: torch.Tensor) -> torch.Tensor:
    if family == "gpt2":  # Conv1D keeps its weight as (in, out)
        mid = F.gelu(n @ mlp.c_fc.weight + mlp.c_fc.bias, approximate="tanh")
        return mid @ mlp.c_proj.weight + mlp.c_proj.bias
    return F.linear(F.silu(F.linear(n, mlp.gate_proj.weight)) * F.linear(n, mlp.up_proj.weight), mlp.down_proj.weight)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_ffn_placements_pre_ln(family, placement):
    """Block output: Houlsby x + h + Delta(h); Pfeiffer s + Delta(s) with s = x + h (the reference's
    seq_bn on GPT-2 and Llama, where no layer norm is passed to the adapter)."""
    model, blk, parts = _decoder(family)
    site = "ffn.out" if placement == "houlsby" else "ffn.res"
    h = unipelt.compile(model, {"modules": {"a": {"method": "adapter", "site": site, "width": 6, "activation": "swish"}}})
    randomize(h)
    norm, mlp = parts["ffn"]
    cap_norm, cap_blk = Capture(norm), Capture(blk)
    with torch.no_grad():
        model(**make_batch())
        x = cap_norm.args[0]  # the residual entering the FFN sublayer
        hh = _mlp_by_hand(family, mlp, norm(x))
        if placement == "houlsby":
            expected = x + hh + delta(h, f"a.1.{site}", hh, "swish")
        else:
            s = x + hh
            expected = s + delta(h, f"a.1.{site}", s, "swish")
        torch.testing.assert_close(cap_blk.out, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attn_res_pre_ln(family):
    """Pfeiffer at the attention sublayer of a pre-LN block: with s = x + attn(norm(x)), the FFN
    sublayer's input (the post-attention norm's input) is s + Delta(s)."""
    model, blk, parts = _decoder(family)
    norm1, attn = parts["attn"]
    norm2, _ = parts["ffn"]
    # registered before compile, so it sees the attention output before the engine's hook changes it
    cap_attn = Capture(attn)
    h = unipelt.compile(model, {"modules": {"a": {"method": "adapter", "site": "attn.res", "width": 5}}})
    randomize(h)
    cap_in, cap_mid = Capture(norm1), Capture(norm2)
    with torch.no_grad():
        model(**make_batch())
        s = cap_in.args[0] + cap_attn.out
        expected = s + delta(h, "a.1.attn.res", s)
    torch.testing.assert_close(cap_mid.args[0], expected, atol=ATOL, rtol=0)
