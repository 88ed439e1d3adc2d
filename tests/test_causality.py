"""Gates and causality / padding (METHODS.md, "UniPELT as published").

A gate pooled over the whole sequence lets later tokens change earlier positions: on a decoder
that breaks causal-LM training and cached generation, so there the default is causal-safe (per
token, or a running mean). On an encoder the default is a mean over the *real* tokens, so that
padding changes nothing; the reference code's unmasked mean is not padding invariant.
"""
from __future__ import annotations

import pytest
import torch

import unipelt
from conftest import make_bert, make_gpt2, make_llama, make_qwen2, randomize

DECODERS = {"gpt2": make_gpt2, "llama": make_llama, "qwen2": make_qwen2}
ATOL = 1e-5


def unipelt_al(gate):
    spec = {"modules": {
        "lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4, "gate": gate},
        "adapter": {"method": "adapter", "site": "ffn.out", "width": 8, "gate": gate},
    }}
    if isinstance(gate, str):  # one shared gate per layer, read by every branch of the layer
        spec["gates"] = {gate: {"input": "layer", "pooling": "running_mean"}}
    return spec


def adapted(factory, gate, seed=11):
    model = factory()
    h = unipelt.compile(model, unipelt_al(gate))
    randomize(h, seed=seed, std=0.5)
    return model, h


def run(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask).logits


def _ids(seed=3, b=2, t=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (b, t), generator=g)


@pytest.mark.parametrize("arch", list(DECODERS))
@pytest.mark.parametrize("gate", [True, {"pooling": "token"}, {"pooling": "running_mean"},
                                  {"pooling": "running_mean", "input": "site"}],
                         ids=["default", "token", "running_mean", "running_mean_site"])
def test_later_tokens_never_change_earlier_positions(arch, gate):
    model, _ = adapted(DECODERS[arch], gate)
    ids = _ids()
    base = run(model, ids)
    for t in (3, 7, 9):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 17) % 97 + 3
        out = run(model, changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=ATOL, rtol=0)
        assert not torch.allclose(out[:, t:], base[:, t:], atol=1e-4)


@pytest.mark.parametrize("arch", list(DECODERS))
@pytest.mark.parametrize("pooling", ["masked_mean", "mean"])
def test_sequence_pooling_opt_in_sees_the_future(arch, pooling):
    """Why sequence pooling is refused on decoders unless opted in: the first position's
    logits depend on the last token."""
    model, _ = adapted(DECODERS[arch], {"pooling": pooling, "allow_noncausal": True})
    ids = _ids()
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 17) % 97 + 3
    assert not torch.allclose(run(model, changed)[:, 0], run(model, ids)[:, 0], atol=1e-6)


@pytest.mark.parametrize("arch", list(DECODERS))
@pytest.mark.parametrize("gate", [True, {"pooling": "running_mean"}], ids=["default", "running_mean"])
def test_decoder_right_padding_invariance(arch, gate):
    model, _ = adapted(DECODERS[arch], gate)
    ids = _ids(b=2, t=9)
    n = 5
    alone = run(model, ids[:1, :n])
    mask = torch.ones_like(ids)
    mask[0, n:] = 0
    padded = run(model, ids, mask)
    torch.testing.assert_close(padded[:1, :n], alone, atol=ATOL, rtol=0)


def _bert_padding(gate, seed=11):
    model = make_bert()
    h = unipelt.compile(model, unipelt_al(gate))
    randomize(h, seed=seed, std=0.5)
    ids = _ids(b=2, t=9)
    n = 5
    alone = run(model, ids[:1, :n])
    mask = torch.ones_like(ids)
    mask[0, n:] = 0
    padded_ids = ids.masked_fill(mask == 0, 0)
    padded = run(model, padded_ids, mask)
    return alone, padded[:1]


@pytest.mark.parametrize("gate", [True, {"pooling": "masked_mean"}, {"pooling": "token"},
                                  {"pooling": "masked_mean", "input": "site", "lora_scale": "multiply"}],
                         ids=["default", "masked_mean", "token", "masked_mean_site"])
def test_encoder_padding_invariance(gate):
    """An example alone and the same example right-padded inside a batch: the same logits."""
    alone, padded = _bert_padding(gate)
    torch.testing.assert_close(padded, alone, atol=ATOL, rtol=0)


def test_reference_mean_is_not_padding_invariant():
    """The reference code's unmasked mean counts the padding positions: the same example gets
    other logits when it is padded. This is why the default is masked_mean."""
    alone, padded = _bert_padding({"pooling": "mean"})
    assert not torch.allclose(padded, alone, atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("gate", [True, {"pooling": "running_mean"}, {"pooling": "running_mean", "input": "site"}, "g"],
                         ids=["default", "running_mean", "running_mean_site", "shared_running_mean"])
def test_cached_generation_matches_recomputation(arch, gate):
    """Feeding tokens one at a time through the KV cache gives the logits of one full forward:
    a causal-safe gate does not change as the text grows (the running mean carries its state
    across steps, also when one gate serves several branches of a layer)."""
    model, _ = adapted(DECODERS[arch], gate)
    ids = _ids(b=2, t=9)
    full = run(model, ids)
    torch.testing.assert_close(_decode_stepwise(model, ids), full, atol=ATOL, rtol=0)


def _decode_stepwise(model, ids, n: int = 4):
    """Logits of ``ids`` from a prompt of ``n`` tokens, then one token at a time through the KV cache."""
    b = ids.shape[0]
    with torch.no_grad():
        out = model(input_ids=ids[:, :n], attention_mask=torch.ones(b, n, dtype=torch.long), use_cache=True)
        steps, past = [out.logits], out.past_key_values
        for t in range(n, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], attention_mask=torch.ones(b, t + 1, dtype=torch.long),
                        past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits)
    return torch.cat(steps, 1)


def _gated_prefix(kv, pooling):
    return {"modules": {"prefix": {"method": "prefix", "length": 3, "reparam": "none",
                                   "gate": {"input": "layer", "kv": kv, "pooling": pooling}}}}


@pytest.mark.parametrize("arch", list(DECODERS))
@pytest.mark.parametrize("pooling", ["token", "running_mean"])
def test_separate_kv_prefix_gates_are_causal(arch, pooling):
    """One gate for P_k and one for P_v, per token: a later token still changes nothing before it,
    and token-by-token decoding through the cache gives the full forward's logits."""
    model = DECODERS[arch]()
    h = unipelt.compile(model, _gated_prefix("separate", pooling))
    randomize(h, seed=5, std=0.5)
    ids = _ids()
    base = run(model, ids)
    for t in (3, 7):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 17) % 97 + 3
        out = run(model, changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=ATOL, rtol=0)
        assert not torch.allclose(out[:, t:], base[:, t:], atol=1e-4)
    torch.testing.assert_close(_decode_stepwise(model, ids), base, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("spec", ["al", "prefix"])
def test_running_mean_through_generate_equals_recompute_logits(arch, spec):
    """generate() drops an all-ones attention mask, so the mask could not tell a cached step from a
    fresh call: the running mean restarted at every decoding step (off by ~1e-3 in the logits, rarely
    enough to flip a greedy token). The cache length now says how many tokens came before."""
    gate = {"pooling": "running_mean"}
    model = DECODERS[arch]()
    h = unipelt.compile(model, unipelt_al(gate) if spec == "al" else _gated_prefix("separate", "running_mean"))
    randomize(h, seed=5, std=0.5)
    ids = _ids(b=2, t=5)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=0, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
        seq, want = ids, []
        for _ in range(4):
            step = run(model, seq)[:, -1]
            want.append(step)
            seq = torch.cat([seq, step.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.sequences, seq)
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(want, 1), atol=ATOL, rtol=0)
