"""The prefix family through the whole engine, with specs/unipelt.yaml's three gates live."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers as t

import unipelt

SPECS = Path(__file__).resolve().parents[1] / "specs"


def tiny(kind: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    if kind == "bert":
        cfg = t.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        m = t.BertForSequenceClassification(cfg)
    elif kind == "gpt2":
        cfg = t.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        m = t.GPT2LMHeadModel(cfg)
    else:
        cfg = t.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128, vocab_size=100, bos_token_id=0, eos_token_id=0)
        m = t.LlamaForCausalLM(cfg)
    m.config._attn_implementation = attn
    return m.eval()


def liven(handle, seed=1, std=0.1):
    """Make every branch non-trivial (LoRA B and adapter up start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def logits(m, **kw):
    with torch.no_grad():
        return m(**kw).logits


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_causal_with_all_gates_live(kind, attn):
    m = tiny(kind, attn)
    h = unipelt.compile(m, SPECS / "unipelt.yaml")
    assert {gp.spec.pooling for gp in h.graph.gates.values()} == {"token"}  # auto -> causal-safe
    liven(h)
    x = torch.randint(1, 100, (2, 10))
    y = x.clone()
    y[:, 7:] = torch.randint(1, 100, (2, 3))
    a, b = logits(m, input_ids=x), logits(m, input_ids=y)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-5)
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-3)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_running_mean_gates_are_causal_and_cache_consistent(kind):
    spec = unipelt.parse_spec(SPECS / "unipelt.yaml").raw
    spec = copy.deepcopy(spec)
    for node in spec["modules"].values():
        node["gate"]["pooling"] = "running_mean"
    m = tiny(kind)
    h = unipelt.compile(m, spec)
    liven(h)
    x = torch.randint(1, 100, (1, 9))
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 7) % 99 + 1
    a, b = logits(m, input_ids=x), logits(m, input_ids=y)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-5)
    _check_generate(m, x[:, :5])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_sequence_pooling_on_decoder_refused_unless_opted_in(kind):
    spec = copy.deepcopy(unipelt.parse_spec(SPECS / "unipelt.yaml").raw)
    spec["modules"]["prefix"]["gate"]["pooling"] = "masked_mean"
    with pytest.raises(unipelt.SpecError) as e:
        unipelt.compile(tiny(kind), spec)
    assert e.value.path == "modules.prefix.gate.pooling"
    spec["modules"]["prefix"]["gate"]["allow_noncausal"] = True
    m = tiny(kind)
    h = unipelt.compile(m, spec)
    liven(h)
    x = torch.randint(1, 100, (1, 8))
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 99 + 1
    # the opt-in really is non-causal: a later token reaches earlier positions through the gate
    assert not torch.allclose(logits(m, input_ids=x)[:, :-1], logits(m, input_ids=y)[:, :-1], atol=1e-7)


def _padded(x: torch.Tensor, n_pad: int, side: str, pad_id: int = 0):
    B, T = x.shape
    pad = torch.full((B, n_pad), pad_id, dtype=x.dtype)
    ids = torch.cat([pad, x], 1) if side == "left" else torch.cat([x, pad], 1)
    mask = torch.cat([torch.zeros(B, n_pad, dtype=torch.long), torch.ones(B, T, dtype=torch.long)], 1)
    if side == "right":
        mask = mask.flip(1)
    return ids, mask


# BERT pads on the right only: its classifier pools position 0 and its positions are absolute
@pytest.mark.parametrize("kind,side", [("bert", "right"), ("gpt2", "left"), ("gpt2", "right"),
                                       ("llama", "left"), ("llama", "right")])
def test_padding_invariance(kind, side):
    m = tiny(kind)
    h = unipelt.compile(m, SPECS / "unipelt.yaml")
    liven(h)
    x = torch.randint(1, 100, (1, 7))
    other = torch.randint(1, 100, (1, 10))
    ids, mask = _padded(x, 3, side)
    batch_ids = torch.cat([ids, other])
    batch_mask = torch.cat([mask, torch.ones(1, 10, dtype=torch.long)])
    kw_alone, kw_batch = {"input_ids": x}, {"input_ids": batch_ids, "attention_mask": batch_mask}
    if kind != "bert":  # decoders: positions follow the real tokens (as generate() does)
        kw_batch["position_ids"] = (batch_mask.cumsum(-1) - 1).clamp_min(0)
    alone = logits(m, **kw_alone)
    batch = logits(m, **kw_batch)[:1]
    real = mask[0].bool()
    if kind == "bert":  # sequence classification: one row of logits per example
        assert torch.allclose(alone, batch, atol=1e-5)
    else:
        assert torch.allclose(alone[0], batch[0, real], atol=1e-5)


def test_reference_mean_pooling_is_not_padding_invariant():
    """Why the default differs from the reference code: its unmasked mean counts padding."""
    spec = copy.deepcopy(unipelt.parse_spec(SPECS / "unipelt.yaml").raw)
    for node in spec["modules"].values():
        node["gate"]["pooling"] = "mean"
    m = tiny("bert")
    h = unipelt.compile(m, spec)
    liven(h)
    x = torch.randint(1, 100, (1, 7))
    ids, mask = _padded(x, 3, "right")
    assert not torch.allclose(logits(m, input_ids=x), logits(m, input_ids=ids, attention_mask=mask), atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_gradient_checkpointing_same_gradients(kind):
    grads = []
    for ckpt in (False, True):
        m = tiny(kind)
        h = unipelt.compile(m, SPECS / "unipelt.yaml")
        liven(h)
        m.train()
        if ckpt:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        x = torch.randint(1, 100, (2, 9))
        mask = torch.ones_like(x)
        mask[1, 6:] = 0
        labels = torch.tensor([0, 1]) if kind == "bert" else x
        m(input_ids=x, attention_mask=mask, labels=labels).loss.backward()
        grads.append({k: p.grad.clone() for k, p in h.named_parameters().items()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6), k


def _check_generate(m, prompt, n=8):
    with torch.no_grad():
        out = m.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)
        seq = prompt
        for _ in range(n):
            nxt = m(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("spec", ["unipelt.yaml", "mam.yaml", "p-tuning-v2.yaml", "prompt.yaml"])
def test_generate_with_cache_equals_recompute(kind, spec):
    m = tiny(kind)
    h = unipelt.compile(m, SPECS / spec)
    liven(h, std=0.3)
    _check_generate(m, torch.randint(1, 100, (1, 6)))


def test_bert_base_counts_prefix_kept_and_total():
    m = t.BertForSequenceClassification(t.BertConfig())
    h = unipelt.compile(m, SPECS / "unipelt.yaml")
    s = h.summary()
    per = s.per_module()
    assert per["prefix"]["kept"] == 184_320
    assert per["lora"]["kept"] == 294_912 and per["adapter"]["kept"] == 894_528
    assert sum(v["kept"] for k, v in per.items() if k.startswith("gate:")) == 27_684
    assert s.kept == 184_320 + 294_912 + 894_528 + 27_684 == 1_401_444
    # training adds the shared prefix MLP: Linear(768,512) + Linear(512, 12*2*768) + E (10x768)
    mlp = 768 * 512 + 512 + 512 * 12 * 2 * 768 + 12 * 2 * 768 + 10 * 768
    assert s.training == s.kept - 184_320 + mlp


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_drop_reparameterization_keeps_outputs_and_reloads(kind, tmp_path):
    m = tiny(kind)
    h = unipelt.compile(m, SPECS / "unipelt.yaml")
    liven(h)
    x = torch.randint(1, 100, (2, 8))
    ref = logits(m, input_ids=x)
    dropped = h.drop_reparameterization()
    assert dropped > 0 and h.summary().kept == h.summary().training
    assert torch.allclose(ref, logits(m, input_ids=x), atol=1e-5)
    h.save(tmp_path / "a")
    h.detach()
    fresh = tiny(kind)
    unipelt.load(fresh, tmp_path / "a")
    assert torch.allclose(ref, logits(fresh, input_ids=x), atol=1e-5)


def test_merge_keeps_prefix_live():
    m = tiny("llama")
    spec = {"modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4},
                        "prefix": {"method": "prefix", "length": 4, "reparam": "none"}}}
    h = unipelt.compile(m, spec)
    liven(h)
    x = torch.randint(1, 100, (1, 8))
    ref = logits(m, input_ids=x)
    res = h.merge()
    assert all(k.startswith("lora.") for k in res["merged"]) and all(k.startswith("prefix.") for k in res["live"])
    assert len(res["live"]) == 2
    assert torch.allclose(ref, logits(m, input_ids=x), atol=1e-5)
    h.detach()
    base = tiny("llama")
    assert torch.equal(logits(m, input_ids=x), logits(base, input_ids=x))


def test_prompt_keeps_cls_first_and_extends_labels():
    m = tiny("bert")
    h = unipelt.compile(m, {"modules": {"p": {"method": "prompt", "length": 3}}})
    seen = {}
    hook = m.bert.embeddings.register_forward_hook(lambda mod, args, kwargs, out: seen.update(kwargs), with_kwargs=True)
    x = torch.randint(1, 100, (2, 5))
    x[:, 0] = 7
    m(input_ids=x, attention_mask=torch.ones_like(x))
    hook.remove()
    emb = seen["inputs_embeds"]
    assert emb.shape[1] == 8
    assert torch.equal(emb[:, 0], m.bert.embeddings.word_embeddings(x[:, 0]))
    assert torch.equal(emb[0, 1:4], h.branch_modules["p.embed"].prompt())
    # decoder: LM loss is computed on the real tokens only
    g = tiny("gpt2")
    hg = unipelt.compile(g, {"modules": {"p": {"method": "prompt", "length": 3}}})
    liven(hg)
    y = torch.randint(1, 100, (2, 6))
    out = g(input_ids=y, labels=y)
    # labels get L=3 ignored positions in front; the last virtual token predicts the first real
    # token (as in PEFT's prompt tuning): positions 2 .. L+T-2 predict y[0] .. y[T-1]
    lg = out.logits[:, 2:-1]
    ref = torch.nn.functional.cross_entropy(lg.reshape(-1, 100), y.reshape(-1))
    assert torch.allclose(out.loss, ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the real packaged models (ENVIRONMENT.md)
# ---------------------------------------------------------------------------------------------
def _real(name):
    from unipelt.errors import ModelError
    from unipelt.models import load_model

    try:
        return load_model(name)
    except ModelError as e:  # the package is not installed: .ci/setup installs it
        pytest.skip(f"{name} not installed: {e}")


def test_real_minilm_unipelt_forward_backward():
    m, tok = _real("minilm")
    h = unipelt.compile(m, SPECS / "unipelt.yaml")
    assert h.info.num_layers == 6
    enc = tok(["a great drug, no side effects", "it made me feel terrible"], padding=True, return_tensors="pt")
    out = m(**enc, labels=torch.tensor([1, 0]))
    out.loss.backward()
    assert all(p.grad is not None for p in h.parameters())
    assert all(p.grad is None for n, p in m.named_parameters() if not n.startswith("unipelt."))


def test_real_smollm2_unipelt_forward_backward_generate():
    m, tok = _real("smollm2")
    assert m.config.num_hidden_layers == 30 and m.config.num_key_value_heads == 3
    h = unipelt.compile(m, SPECS / "unipelt.yaml")
    enc = tok(["The capital of France is"], return_tensors="pt")
    base = m.generate(**enc, max_new_tokens=4, do_sample=False)  # gates live, LoRA/adapter at identity
    out = m(**enc, labels=enc["input_ids"])
    out.loss.backward()
    assert all(p.grad is not None for p in h.parameters())
    with torch.no_grad():
        gen = m.generate(**enc, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 4 and torch.equal(gen, base)


# ---------------------------------------------------------------------------------------------
# separate K/V prefix gates, per token (UniPELT's kv: separate on a decoder)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pooling", ["token", "running_mean"])
def test_separate_kv_gates_per_token_match_hand_computed_attention(attn, pooling):
    """G_k scales each query's logits to P_k, G_v its share of P_v: both computed here by hand from
    the gate's own Linear(d, 2) on the block input, pooled per token or as a running mean."""
    from test_attention import reference_attention

    m = tiny("llama", attn)
    spec = {"modules": {"prefix": {"method": "prefix", "length": 3, "reparam": "none",
                                   "gate": {"input": "layer", "kv": "separate", "pooling": pooling}}}}
    h = unipelt.compile(m, spec)
    liven(h, std=0.5)
    layer = m.model.layers[1]
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, args: seen.update(block=args[0])),
             layer.self_attn.register_forward_pre_hook(lambda mod, args, kw: seen.update(hidden=kw["hidden_states"]),
                                                       with_kwargs=True),
             layer.self_attn.register_forward_hook(lambda mod, args, out: seen.update(out=out[0]))]
    x = torch.randint(1, 100, (2, 7))
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # left padding: the running mean must skip it
    pid = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        m(input_ids=x, attention_mask=mask, position_ids=pid)
        g = torch.sigmoid(h.gate_modules["prefix.1"].linear(seen["block"]))  # (B, T, 2)
        if pooling == "running_mean":
            w = mask[..., None].float()
            g = (g * w).cumsum(1) / w.cumsum(1).clamp_min(1.0)
        gk, gv = g[..., 0][:, None, :, None], g[..., 1][:, None, :, None]
        assert not torch.allclose(gk, gv, atol=1e-3)  # two different gates, or the test proves nothing
        pk, pv = h.branch_modules["prefix.1.attn.kv"].prefix()
        want = reference_attention(m, "llama", layer.self_attn, seen["hidden"], pk[None], pv[None], gk, mask, pid,
                                   value_gate=gv)
    for hk in hooks:
        hk.remove()
    torch.testing.assert_close(seen["out"], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_separate_kv_gates_on_decoder_are_causal_and_cache_consistent(kind):
    spec = copy.deepcopy(unipelt.parse_spec(SPECS / "unipelt.yaml").raw)
    spec["modules"]["prefix"]["gate"]["kv"] = "separate"
    m = tiny(kind)
    h = unipelt.compile(m, spec)
    assert h.gate_modules["prefix.0"].linear.out_features == 2
    liven(h, std=0.3)
    x = torch.randint(1, 100, (2, 9))
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 7) % 99 + 1
    a, b = logits(m, input_ids=x), logits(m, input_ids=y)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-5)
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-3)
    _check_generate(m, x[:1, :5])
