"""The prefix family through the whole engine, with specs/unipelt.yaml's gates live (LoRA q, LoRA v, prefix, adapter)."""
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
    # four gates per layer, as the reference: LoRA q, LoRA v, prefix, adapter (12·4·769)
    assert sum(v["kept"] for k, v in per.items() if k.startswith("gate:")) == 36_912
    assert s.kept == 184_320 + 294_912 + 894_528 + 36_912 == 1_410_672
    # training adds the shared prefix MLP: Linear(768,512) + Linear(512, 12*2*768) + E (10x768)
    mlp = 768 * 512 + 512 + 512 * 12 * 2 * 768 + 12 * 2 * 768 + 10 * 768
    assert s.training == s.kept - 184_320 + mlp


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_drop_reparameterization_keeps_outputs_and_reloads(kind, shared, tmp_path):
    m = tiny(kind)
    spec = copy.deepcopy(unipelt.parse_spec(SPECS / "unipelt.yaml").raw)
    # per-layer MLPs (reparam_shared: false) used to stay in the saved adapter, which then did not reload
    spec["modules"]["prefix"]["reparam_shared"] = shared
    h = unipelt.compile(m, spec)
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
# the real packaged models (docs/ENVIRONMENT.md)
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
    # the prefix MLP's init is random: under some draws (torch seed 17) greedy decoding emits EOS
    # after three tokens and stops, so the length is pinned by min_new_tokens and the init seeded
    torch.manual_seed(17)
    h = unipelt.compile(m, SPECS / "unipelt.yaml")
    enc = tok(["The capital of France is"], return_tensors="pt")
    gen_kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    base = m.generate(**enc, **gen_kw)  # gates live, LoRA/adapter at identity
    out = m(**enc, labels=enc["input_ids"])
    out.loss.backward()
    assert all(p.grad is not None for p in h.parameters())
    with torch.no_grad():
        gen = m.generate(**enc, **gen_kw)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 4 and torch.equal(gen, base)


# ---------------------------------------------------------------------------------------------
# separate K/V prefix gates, per token (UniPELT's kv: separate on a decoder)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pooling", ["token", "running_mean"])
def test_separate_kv_gates_per_token_match_hand_computed_attention(attn, pooling):
    """G_k scales each query's logits to P_k, G_v its share of P_v: both computed here by hand from
    the gate's own Linear(d, 2) on the (normalised) block input, pooled per token or as a running mean."""
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
        # pre-LN block: the layer-input gate reads the normalised block input
        g = torch.sigmoid(h.gate_modules["prefix.1"].linear(layer.input_layernorm(seen["block"])))  # (B, T, 2)
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


# ---------------------------------------------------------------------------------------------
# P-tuning at template positions: template [2, input, 3] -> [P0 P1] x [P2 P3 P4]
# ---------------------------------------------------------------------------------------------
TEMPLATE = {"modules": {"pt": {"method": "p_tuning", "encoder": "mlp", "hidden": 16, "template": [2, "input", 3]}}}


def _templated(kind, attn="sdpa"):
    m = tiny(kind, attn)
    base = copy.deepcopy(m)
    h = unipelt.compile(m, TEMPLATE)
    liven(h, std=0.3)
    return m, base, h.branch_modules["pt.embed"].prompt().detach()


def _by_hand(base, ids, mask, prompt, encoder, token_type_ids=None, labels=None):
    """The sequence P-tuning should build, written out per example from the template: the base
    model's embeddings with the virtual tokens inserted, and mask / positions / types / labels to
    match (positions count the real and virtual tokens of each example, padding excluded)."""
    emb = base.get_input_embeddings()(ids)
    rows = {"emb": [], "mask": [], "pos": [], "tt": [], "labels": []}
    for b in range(ids.shape[0]):
        hi = mask[b].nonzero().max().item() + 1  # after the last real token, before any right padding
        # decoders: the first block in front (of any left padding too); encoders keep [CLS] first, [SEP] last
        cut = [1, hi - 1] if encoder else [0, hi]
        pieces = [("tok", 0, cut[0]), ("p", 0, 2), ("tok", cut[0], cut[1]), ("p", 2, 5), ("tok", cut[1], ids.shape[1])]
        e, mk, tt, lb = [], [], [], []
        for kind, i, j in pieces:
            if kind == "p":
                e.append(prompt[i:j])
                mk += [1] * (j - i)
                tt += [0 if i == 0 else (token_type_ids[b, cut[1] - 1].item() if token_type_ids is not None else 0)] * (j - i)
                lb += [-100] * (j - i)
            else:
                e.append(emb[b, i:j])
                mk += mask[b, i:j].tolist()
                tt += token_type_ids[b, i:j].tolist() if token_type_ids is not None else [0] * (j - i)
                lb += labels[b, i:j].tolist() if labels is not None else [0] * (j - i)
        mk = torch.tensor(mk)
        rows["emb"].append(torch.cat(e))
        rows["mask"].append(mk)
        rows["pos"].append((mk.cumsum(0) - 1).clamp_min(0))
        rows["tt"].append(torch.tensor(tt))
        rows["labels"].append(torch.tensor(lb))
    return {k: torch.stack(v) for k, v in rows.items()}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_p_tuning_template_decoder_equals_hand_inserted(kind, attn):
    m, base, prompt = _templated(kind, attn)
    x = torch.randint(1, 100, (3, 6))
    mask = torch.ones_like(x)
    mask[1, 4:] = 0  # right padding: the tokens after the input go before it
    mask[2, :2] = 0  # left padding
    x = x.masked_fill(mask == 0, 0)
    pid = (mask.cumsum(-1) - 1).clamp_min(0)
    labels = x.masked_fill(mask == 0, -100)
    labels[2, 2] = -100  # left padding: a pad position would predict the first real token
    out = m(input_ids=x, attention_mask=mask, position_ids=pid, labels=labels)
    hand = _by_hand(base, x, mask, prompt, encoder=False, labels=labels)
    want = base(inputs_embeds=hand["emb"], attention_mask=hand["mask"], position_ids=hand["pos"], labels=hand["labels"])
    real = hand["mask"].bool()
    torch.testing.assert_close(out.logits[real], want.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, want.loss, atol=1e-5, rtol=1e-5)
    # the loss counts the real tokens only: the virtual ones carry label -100
    assert (hand["labels"] != -100).sum() == (labels != -100).sum()


def test_p_tuning_template_encoder_keeps_cls_first_and_sep_last():
    m, base, prompt = _templated("bert")
    x = torch.randint(5, 100, (2, 7))
    x[:, 0], x[0, -1], x[1, 4] = 1, 2, 2  # [CLS] ... [SEP], the second example right-padded after its [SEP]
    mask = torch.ones_like(x)
    mask[1, 5:] = 0
    tt = torch.zeros_like(x)
    tt[:, 3:5] = 1  # a sentence pair: the virtual tokens after the input take the second segment's type
    seen = {}
    hook = m.bert.embeddings.register_forward_hook(lambda mod, a, kw, o: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        out = m(input_ids=x, attention_mask=mask, token_type_ids=tt).logits
    hook.remove()
    hand = _by_hand(base, x, mask, prompt, encoder=True, token_type_ids=tt)
    assert torch.equal(seen["token_type_ids"], hand["tt"])
    assert torch.equal(seen["inputs_embeds"][0, -1], base.get_input_embeddings()(x[0, -1]))  # [SEP] last
    assert torch.equal(seen["inputs_embeds"][1, 9], base.get_input_embeddings()(x[1, 4]))  # before the padding
    with torch.no_grad():
        want = base(inputs_embeds=hand["emb"], attention_mask=hand["mask"], token_type_ids=hand["tt"]).logits
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_p_tuning_template_generate_with_cache_equals_recompute(kind):
    """Generated tokens follow the virtual tokens placed after the prompt; the reference decodes
    greedily by rerunning the base model on the hand-built sequence [P0 P1] x [P2 P3 P4] y."""
    m, base, prompt = _templated(kind)
    m.generation_config.eos_token_id = None
    x = torch.randint(1, 100, (2, 5))
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # batched generation pads on the left
    x = x.masked_fill(mask == 0, 0)
    with torch.no_grad():
        out = m.generate(input_ids=x, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        hand = _by_hand(base, x, mask, prompt, encoder=False)
        emb, mk = hand["emb"], hand["mask"]
        seq = x
        for _ in range(6):
            nxt = base(inputs_embeds=emb, attention_mask=mk, position_ids=(mk.cumsum(-1) - 1).clamp_min(0),
                       use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            emb = torch.cat([emb, base.get_input_embeddings()(nxt)], 1)
            mk = torch.cat([mk, torch.ones_like(nxt)], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("template,length,field,message", [
    (["input"], None, "template", "no virtual token"),
    ([3, 3], None, "template", "exactly once"),
    ([1, "input", 2, "input"], None, "template", "exactly once"),
    ([-1, "input", 3], None, "template", ">= 0"),
    ([3, "input", 3], 5, "length", "disagrees with the template's 6"),
    ([3, "prompt", 3], None, "template", "expected a list of"),
    ("3,input,3", None, "template", "expected a list of"),
])
def test_p_tuning_template_errors_name_the_field(tmp_path, template, length, field, message):
    node = {"method": "p_tuning", "template": template}
    if length is not None:
        node["length"] = length
    path = tmp_path / "bad.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"version": 1, "modules": {"pt": node}}))
    with pytest.raises(unipelt.SpecError, match=message) as e:
        unipelt.parse_spec(path)
    assert e.value.path == f"modules.pt.{field}" and str(path) in str(e.value)


def test_p_tuning_template_length_defaults_to_the_template_count():
    m = tiny("llama")
    h = unipelt.compile(m, {"modules": {"pt": {"method": "p_tuning", "encoder": "mlp", "template": [3, "input", 3]}}})
    assert h.branch_modules["pt.embed"].prompt().shape[0] == 6
    with torch.no_grad():
        assert m(input_ids=torch.randint(1, 100, (1, 4))).logits.shape[1] == 10


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_p_tuning_template_cached_step_after_right_padding(kind):
    """A cached step's mask covers the past: the virtual columns must go where the prefill put them,
    after the last real token and before the right padding, not at the end."""
    m, base, prompt = _templated(kind)
    x = torch.randint(1, 100, (2, 6))
    mask = torch.ones_like(x)
    mask[0, 4:] = 0
    x = x.masked_fill(mask == 0, 0)
    nxt = torch.randint(1, 100, (2, 1))
    with torch.no_grad():
        first = m(input_ids=x, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=True)
        mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
        step = m(input_ids=nxt, attention_mask=mask2, position_ids=mask.sum(-1, keepdim=True),
                 past_key_values=first.past_key_values, use_cache=True).logits[:, -1]
        hand = _by_hand(base, torch.cat([x, nxt], 1), mask2, prompt, encoder=False)
        # _by_hand puts the second block after the new token; the prefill put it before: move it back
        emb, mk = hand["emb"], hand["mask"]
        end = emb.shape[1]
        for b in range(2):
            r = 2 + mask[b].nonzero().max().item() + 1  # the first block and the prefill's real tokens
            order = list(range(r)) + list(range(end - 3, end)) + list(range(r, end - 3))
            emb[b], mk[b] = emb[b, order], mk[b, order]
        want = base(inputs_embeds=emb, attention_mask=mk, position_ids=(mk.cumsum(-1) - 1).clamp_min(0)).logits[:, -1]
    torch.testing.assert_close(step, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# regressions found by trying the prefix family on models and cases outside the repository
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
@pytest.mark.parametrize("spec", ["prompt.yaml", "template"])
def test_decoder_classifier_pools_the_last_real_token_under_a_prompt(kind, spec):
    """A decoder's sequence classifier finds its pooled token from input_ids; the prompt rewrite
    passes inputs_embeds, which made it pool the last position: a pad on right-padded batches."""
    torch.manual_seed(0)
    if kind == "qwen2":
        m = t.Qwen2ForSequenceClassification(t.Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100, pad_token_id=0, num_labels=3))
    else:
        m = t.GPT2ForSequenceClassification(t.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100,
                                                         pad_token_id=0, num_labels=3, bos_token_id=1, eos_token_id=2))
    m.eval()
    h = unipelt.compile(m, SPECS / spec if spec != "template" else TEMPLATE)
    liven(h)
    x = torch.randint(3, 100, (2, 7))
    mask = torch.ones_like(x)
    mask[0, 5:] = 0
    x = x.masked_fill(mask == 0, 0)
    batch = logits(m, input_ids=x, attention_mask=mask)
    torch.testing.assert_close(batch[0], logits(m, input_ids=x[:1, :5])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1], logits(m, input_ids=x[1:])[0], atol=1e-5, rtol=1e-5)


def test_flash_attention_is_refused_clearly_and_leaves_the_model_untouched():
    """flash-attn is not installable here: this checks the refusal only. Attaching used to fail with a
    KeyError in the rollback, leaving unipelt's state on the model."""
    from conftest import Snapshot

    from unipelt.errors import ModelError

    m = tiny("llama")
    m.config._attn_implementation_internal = "flash_attention_2"  # as if loaded with it
    snap = Snapshot(m)
    with pytest.raises(ModelError, match=r"attn_implementation='flash_attention_2'.*'sdpa'"):
        unipelt.compile(m, SPECS / "unipelt.yaml")
    snap.assert_same()
    assert m.config._attn_implementation == "flash_attention_2"


def _spec_file(tmp_path, node):
    import yaml

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "modules": {"p": node}}))
    return path


@pytest.mark.parametrize("node,field", [
    ({"method": "prompt", "token_ids": [1, 2]}, "token_ids"),       # was silently a random init
    ({"method": "prompt", "init": "vocab", "init_text": "hi"}, "init_text"),
])
def test_prompt_init_values_without_their_init_are_errors(tmp_path, node, field):
    path = _spec_file(tmp_path, node)
    with pytest.raises(unipelt.SpecError, match="used only with init") as e:
        unipelt.parse_spec(path)
    assert e.value.path == f"modules.p.{field}" and e.value.source == str(path)


def test_prompt_token_ids_outside_the_vocabulary_name_file_and_field(tmp_path):
    """Was a ModelError naming neither the spec file nor the field."""
    from conftest import Snapshot

    path = _spec_file(tmp_path, {"method": "prompt", "length": 2, "init": "token_ids", "token_ids": [3, 100]})
    m = tiny("gpt2")
    snap = Snapshot(m)
    with pytest.raises(unipelt.SpecError, match=r"token ids \[100\] are outside the model's vocabulary \(0\.\.99\)") as e:
        unipelt.compile(m, path)
    assert e.value.path == "modules.p.token_ids" and e.value.source == str(path)
    snap.assert_same()


def test_report_labels_of_global_hook_points_have_no_layer():
    m = tiny("llama")
    h = unipelt.compile(m, {"modules": {"p": {"method": "prompt", "length": 2}, "q": {"method": "p_tuning", "length": 2}}})
    labels = [d.get("label", "") for _, d in h.graph.graph.nodes(data=True)]
    assert "p (prompt) embed" in labels and not any("LNone" in label for label in labels)


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_p_tuning_drop_reparameterization_keeps_only_the_prompt(encoder, tmp_path):
    """The summary always counted L·d kept parameters for P-tuning, but the encoder was kept and
    saved: now drop_reparameterization keeps the produced vectors, and the adapter reloads."""
    m = tiny("llama")
    spec = {"modules": {"pt": {"method": "p_tuning", "encoder": encoder, "hidden": 16, "template": [2, "input", 1]}}}
    h = unipelt.compile(m, spec)
    liven(h)
    x = torch.randint(1, 100, (2, 5))
    ref = logits(m, input_ids=x)
    kept, training = h.summary().kept, h.summary().training
    assert kept == 3 * 64 < training
    assert h.drop_reparameterization() == training - kept
    assert h.summary().kept == h.summary().training == kept
    assert torch.allclose(ref, logits(m, input_ids=x), atol=1e-6)
    assert h.spec.raw["modules"]["pt"]["encoder"] == "none" and "hidden" not in h.spec.raw["modules"]["pt"]
    h.save(tmp_path / "a")
    fresh = tiny("llama")
    unipelt.load(fresh, tmp_path / "a")
    assert torch.allclose(ref, logits(fresh, input_ids=x), atol=1e-6)


def test_prompt_with_a_static_cache_is_refused_clearly():
    """generate() sizes a static cache for the text alone: the virtual tokens overflowed it with an
    IndexError from inside the cache. The dynamic cache (the default) works."""
    from unipelt.errors import ModelError

    m = tiny("llama")
    h = unipelt.compile(m, {"modules": {"p": {"method": "prompt", "length": 4}}})
    liven(h)
    x = torch.randint(1, 100, (1, 5))
    with torch.no_grad(), pytest.raises(ModelError, match="static KV cache"):
        m.generate(input_ids=x, max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static")
    _check_generate(m, x, n=3)


@pytest.mark.parametrize("kind,limit", [("bert", 512), ("gpt2", 1024)])
def test_prompt_beyond_the_position_table_is_a_clear_error(kind, limit):
    """Input + virtual tokens beyond a learned position table failed deep in the embeddings (a shape
    error on BERT, an index error on GPT-2); now one message says how far to truncate."""
    from unipelt.errors import ModelError

    m = tiny(kind)
    unipelt.compile(m, {"modules": {"p": {"method": "prompt", "length": 4}}})
    with torch.no_grad():
        assert m(input_ids=torch.randint(1, 100, (1, limit - 4))).logits.shape[0] == 1  # exactly fits
        with pytest.raises(ModelError, match=f"exceed the {limit} positions.*truncate the input to {limit - 4} tokens"):
            m(input_ids=torch.randint(1, 100, (1, limit - 3)))


def test_gate_report_under_a_prompt_skips_padding_and_splits_separate_kv_gates():
    """handle.gates compared the caller's mask with gate values that also cover the virtual tokens,
    so it fell back to an unmasked mean; and separate K/V gates were shown as one averaged row."""
    m = tiny("bert")
    spec = {"modules": {"p": {"method": "prompt", "length": 2},
                        "prefix": {"method": "prefix", "length": 2, "gate": {"kv": "separate"}}}}
    h = unipelt.compile(m, spec)
    liven(h, std=0.5)
    x = torch.randint(1, 100, (2, 7))
    mask = torch.ones_like(x)
    mask[0, 4:] = 0
    batch = h.gates({"input_ids": x, "attention_mask": mask}).values
    alone = h.gates({"input_ids": x[:1, :4]}).values
    assert {k[0] for k in batch} == {"prefix[k]", "prefix[v]"}
    for key in batch:
        torch.testing.assert_close(batch[key][0], alone[key][0], atol=1e-6, rtol=0)
    assert not torch.allclose(batch[("prefix[k]", 0)], batch[("prefix[v]", 0)])
