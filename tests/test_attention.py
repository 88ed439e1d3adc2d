"""Key/value prefixes inside attention (unipelt.attention): references, masks, caches, checkpointing.

Tiny random models from configs (CPU, float32). The reference computes one layer's attention by hand from
the module's own projections, so a wrong mask, alignment, scale or gate shows up as a numeric mismatch.
"""
from __future__ import annotations

import functools
import gc
import weakref

import pytest
import torch
from torch import Tensor, nn
from transformers import (
    BertConfig,
    BertModel,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    RobertaConfig,
    RobertaModel,
)

from unipelt.attention import KVPrefix, clear_kv_provider, install, is_installed, set_kv_provider, uninstall
from unipelt.errors import ModelError

VOCAB = 100
PREFIX_LEN = 3
IMPLS = ["eager", "sdpa"]
DECODERS = ["gpt2", "llama", "gemma"]
ENCODERS = ["bert", "roberta"]
FAMILIES = [*ENCODERS, *DECODERS]
ATOL = 1e-5


# --------------------------------------------------------------------------------------------------------
# Tiny models and prefixes
# --------------------------------------------------------------------------------------------------------
def make_model(family: str, impl: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    decoder = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    encoder = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)
    if family == "bert":
        model = BertModel(BertConfig(**encoder), add_pooling_layer=False)
    elif family == "roberta":
        model = RobertaModel(RobertaConfig(**encoder, pad_token_id=1), add_pooling_layer=False)
    elif family in ("gpt2", "gpt2_upcast"):
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                           reorder_and_upcast_attn=family == "gpt2_upcast"))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**decoder))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**decoder, sliding_window=None))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**decoder))
    elif family == "gemma":
        model = GemmaForCausalLM(GemmaConfig(**decoder, head_dim=8))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**decoder, head_dim=8))
    else:
        raise AssertionError(family)
    model.set_attn_implementation(impl)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = None  # greedy runs the full length, no early stop
        model.generation_config.pad_token_id = 0
    return model.eval()


def attention_modules(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, (BertModel, RobertaModel)):
        return [layer.attention.self for layer in model.encoder.layer]
    if isinstance(model, GPT2LMHeadModel):
        return [block.attn for block in model.transformer.h]
    return [layer.self_attn for layer in model.model.layers]


def kv_shape(model: nn.Module) -> tuple[int, int]:
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return kv_heads, head_dim


def query_gate(query: Tensor) -> Tensor:
    """A per-query gate in (0, 1) that depends on the query token only (so it is causal-safe)."""
    return torch.sigmoid(3.0 * query.mean(dim=(1, 3), keepdim=True))  # (B, 1, T_q, 1)


class Prefixes(nn.Module):
    """One trainable (1, H_kv, L, D) key and value per layer; optionally gated per query."""

    def __init__(self, model: nn.Module, length: int = PREFIX_LEN, gated: bool = False):
        super().__init__()
        kv_heads, head_dim = kv_shape(model)
        n = len(attention_modules(model))
        self.keys = nn.ParameterList(nn.Parameter(torch.randn(1, kv_heads, length, head_dim)) for _ in range(n))
        self.values = nn.ParameterList(nn.Parameter(torch.randn(1, kv_heads, length, head_dim)) for _ in range(n))
        self.gated = gated

    def provide(self, index: int, module: nn.Module, query: Tensor, key: Tensor, value: Tensor) -> KVPrefix:
        gate = query_gate(query) if self.gated else None
        return KVPrefix(self.keys[index], self.values[index], gate)

    def attach(self, model: nn.Module) -> Prefixes:
        for i, module in enumerate(attention_modules(model)):
            set_kv_provider(module, functools.partial(self.provide, i))
        return self


def outputs(model: nn.Module, ids: Tensor, mask: Tensor | None = None, **kwargs) -> Tensor:
    position_ids = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, **kwargs)
    return out.last_hidden_state if isinstance(model, (BertModel, RobertaModel)) else out.logits


# --------------------------------------------------------------------------------------------------------
# 1 + 6. One layer against an independent reference (plain, per-example gate, per-query gate)
# --------------------------------------------------------------------------------------------------------
def _heads(x: Tensor, n: int, d: int) -> Tensor:
    return x.view(*x.shape[:2], n, d).transpose(1, 2)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def reference_attention(model, family, module, hidden, pk, pv, gate, mask2d, position_ids, value_gate=None) -> Tensor:
    """softmax([g_k·q·P_k, q·k + mask]·scale) @ [g_v·P_v, v], computed from the module's own weights
    (g_v = g_k unless a separate ``value_gate`` is given)."""
    cfg = model.config
    batch, t, _ = hidden.shape
    heads = cfg.num_attention_heads
    kv_heads, d = kv_shape(model)
    if family in ENCODERS:
        q, k, v = (_heads(lin(hidden), heads, d) for lin in (module.query, module.key, module.value))
        causal, post = False, (lambda o: o)
    elif family.startswith("gpt2"):
        q, k, v = (_heads(x, heads, d) for x in module.c_attn(hidden).split(cfg.hidden_size, dim=2))
        causal, post = True, module.c_proj
    else:
        q = _heads(module.q_proj(hidden), heads, d)
        k = _heads(module.k_proj(hidden), kv_heads, d)
        v = _heads(module.v_proj(hidden), kv_heads, d)
        cos, sin = model.model.rotary_emb(hidden, position_ids)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        causal, post = True, module.o_proj
    rep = heads // kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    pk = pk.expand(batch, -1, -1, -1).repeat_interleave(rep, 1)
    pv = pv.expand(batch, -1, -1, -1).repeat_interleave(rep, 1)
    g = torch.ones(batch, 1, t, 1) if gate is None else gate.expand(batch, 1, t, 1)
    gv = g if value_gate is None else value_gate.expand(batch, 1, t, 1)
    scale = d**-0.5

    visible = mask2d.bool()[:, None, None, :]
    if causal:
        visible = visible & torch.ones(t, t, dtype=torch.bool).tril()
    logits_real = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    logits_prefix = g * (q @ pk.transpose(-1, -2)) * scale
    probs = torch.softmax(torch.cat([logits_prefix, logits_real], dim=-1), dim=-1)
    n = pk.shape[2]
    out = gv * (probs[..., :n] @ pv) + probs[..., n:] @ v
    return post(out.transpose(1, 2).reshape(batch, t, heads * d))


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "padded"])
@pytest.mark.parametrize("gate_kind", [None, "example", "query", "example_kv", "query_kv"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", [*FAMILIES, "gpt2_upcast"])
def test_layer_matches_independent_reference(family, impl, gate_kind, padded):
    _check_layer_against_reference(family, impl, gate_kind, padded)


@pytest.mark.parametrize("gate_kind", [None, "query"])
def test_dense_causal_fallback_matches_reference(monkeypatch, gate_kind):
    # Where transformers keeps enable_gqa=True next to a mask (XPU, MPS, or this switch), the unpadded
    # causal case uses a dense lower-right mask instead of CausalBias.
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    _check_layer_against_reference("llama", "sdpa", gate_kind, padded=False)


def _check_layer_against_reference(family: str, impl: str, gate_kind: str | None, padded: bool) -> None:
    model = make_model(family, impl)
    batch, t = 2, 6
    torch.manual_seed(1)
    ids = torch.randint(1, VOCAB, (batch, t))
    mask2d = torch.ones(batch, t, dtype=torch.long)
    if padded:
        mask2d[0, -1] = 0  # right padding
        mask2d[1, :2] = 0  # left padding
    position_ids = (mask2d.cumsum(-1) - 1).clamp(min=0)
    kv_heads, d = kv_shape(model)
    pk, pv = torch.randn(1, kv_heads, PREFIX_LEN, d), torch.randn(batch, kv_heads, PREFIX_LEN, d)
    gate = {None: None, "example": torch.tensor([0.3, 0.9]).view(batch, 1, 1, 1),
            "query": torch.rand(batch, 1, t, 1)}[(gate_kind or "").removesuffix("_kv") or None]
    # "_kv": separate K and V gates (UniPELT's kv: separate), the value gate of the same kind as the key's
    value_gate = None
    if gate_kind and gate_kind.endswith("_kv"):
        value_gate = torch.rand_like(gate)

    module = attention_modules(model)[1]
    set_kv_provider(module, lambda m, q, k, v: KVPrefix(pk, pv, gate, value_gate))
    seen = {}

    def pre_hook(mod, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]

    def hook(mod, args, kwargs, out):
        seen["out"] = out[0]

    module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    module.register_forward_hook(hook, with_kwargs=True)
    install(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask2d if padded else None, position_ids=position_ids)
        expected = reference_attention(model, family, module, seen["hidden"], pk, pv, gate, mask2d, position_ids,
                                       value_gate)
    torch.testing.assert_close(seen["out"], expected, atol=ATOL, rtol=1e-5)


def test_attention_function_called_directly_without_scaling():
    """Called as transformers would call it but with scaling=None: the widened (gated) path must keep 1/sqrt(D)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    install(make_model("bert", "eager"))  # registers "unipelt_eager" even when this test runs alone
    model = make_model("bert", "sdpa")
    install(model)
    module = attention_modules(model)[0]
    torch.manual_seed(5)
    b, h, t, d = 2, 4, 5, 8
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    pk, pv, g = torch.randn(1, h, PREFIX_LEN, d), torch.randn(1, h, PREFIX_LEN, d), torch.rand(b, 1, t, 1)
    set_kv_provider(module, lambda m, *_: KVPrefix(pk, pv, g))
    for name in ("unipelt_sdpa", "unipelt_eager"):
        out, _ = ALL_ATTENTION_FUNCTIONS[name](module, q, k, v, None, scaling=None, dropout=0.0)
        logits = torch.cat([g * (q @ pk.transpose(-1, -2)), q @ k.transpose(-1, -2)], dim=-1) * d**-0.5
        probs = logits.softmax(-1)
        want = g * (probs[..., :PREFIX_LEN] @ pv) + probs[..., PREFIX_LEN:] @ v
        torch.testing.assert_close(out, want.transpose(1, 2), atol=ATOL, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------
# Whole model: no provider is bit-identical; install/uninstall restores; provider bookkeeping
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", [*FAMILIES, "gpt2_upcast", "mistral", "qwen2", "qwen3"])
def test_no_provider_is_bit_identical_and_uninstall_restores(family, impl):
    model = make_model(family, impl)
    ids = torch.randint(1, VOCAB, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        base = outputs(model, ids), outputs(model, ids, mask)
        install(model)
        install(model)  # idempotent
        assert model.config._attn_implementation == f"unipelt_{impl}" and is_installed(model)
        assert all(torch.equal(a, b) for a, b in zip(base, (outputs(model, ids), outputs(model, ids, mask))))

        for module in attention_modules(model):  # a provider that declines is a pass-through too
            set_kv_provider(module, lambda m, q, k, v: None)
        assert torch.equal(outputs(model, ids, mask), base[1])

        prefixes = Prefixes(model).attach(model)
        assert not torch.allclose(outputs(model, ids, mask), base[1])
        clear_kv_provider(attention_modules(model)[0])
        clear_kv_provider(attention_modules(model)[1])
        assert torch.equal(outputs(model, ids, mask), base[1])

        prefixes.attach(model)
        uninstall(model)
        assert model.config._attn_implementation == impl and not is_installed(model)
        assert all(torch.equal(a, b) for a, b in zip(base, (outputs(model, ids), outputs(model, ids, mask))))
        assert not any("_unipelt_kv_provider" in vars(m) for m in model.modules())


def test_module_provider_does_not_join_the_base_state_dict():
    model = make_model("llama", "sdpa")
    keys = set(model.state_dict())
    params = len(list(model.parameters()))

    class ModuleProvider(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Parameter(torch.randn(1, 2, PREFIX_LEN, 8))

        def forward(self, module, query, key, value):
            return KVPrefix(self.k, self.k)

    install(model)
    set_kv_provider(attention_modules(model)[0], ModuleProvider())
    assert set(model.state_dict()) == keys and len(list(model.parameters())) == params
    model(torch.randint(1, VOCAB, (1, 4)))


def test_no_reference_leak():
    model = make_model("llama", "sdpa")
    prefixes = Prefixes(model, gated=True).attach(model)
    install(model)
    model(torch.randint(1, VOCAB, (1, 5))).logits.sum().backward()
    # A provider closing over the model makes a cycle: plain GC must still free everything.
    set_kv_provider(attention_modules(model)[0], lambda m, q, k, v, model=model: None)
    model_ref, prefixes_ref = weakref.ref(model), weakref.ref(prefixes)
    del model, prefixes
    gc.collect()
    assert model_ref() is None and prefixes_ref() is None


def test_unsupported_implementation_is_refused():
    model = make_model("llama", "sdpa")
    model.config._attn_implementation_internal = "flex_attention"  # as if loaded with it
    with pytest.raises(ModelError, match="flex_attention"):
        install(model)


def test_bad_prefix_shape_names_the_module():
    model = make_model("llama", "sdpa")
    install(model)
    set_kv_provider(attention_modules(model)[1], lambda m, q, k, v: KVPrefix(torch.zeros(1, 4, 2, 8),
                                                                             torch.zeros(1, 4, 2, 8)))
    with pytest.raises(ValueError, match=r"LlamaAttention\(layer_idx=1\).*\(B or 1, 2, L, 8\)"):
        model(torch.randint(1, VOCAB, (1, 4)))
    set_kv_provider(attention_modules(model)[1], lambda m, q, k, v: "not a prefix")
    with pytest.raises(TypeError, match="KVPrefix"):
        model(torch.randint(1, VOCAB, (1, 4)))


# --------------------------------------------------------------------------------------------------------
# 2. Causality among real tokens
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", DECODERS)
def test_prefix_keeps_decoder_causal(family, impl, gated):
    model = make_model(family, impl)
    Prefixes(model, gated=gated).attach(model)
    install(model)
    ids = torch.randint(1, VOCAB, (2, 8))
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 1) % VOCAB
    with torch.no_grad():
        a, b = outputs(model, ids), outputs(model, changed)
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 5:], b[:, 5:])


# --------------------------------------------------------------------------------------------------------
# 3. Padding invariance
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_padding_invariance(family, impl, gated):
    model = make_model(family, impl)
    Prefixes(model, gated=gated).attach(model)
    install(model)
    torch.manual_seed(2)
    short, long = torch.randint(1, VOCAB, (1, 5)), torch.randint(1, VOCAB, (1, 8))
    pad = torch.zeros(1, 3, dtype=torch.long)
    one = torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        alone = outputs(model, short, one)
        left = outputs(model, torch.cat([torch.cat([pad, short], 1), long]),
                       torch.cat([torch.cat([pad, one], 1), torch.ones(1, 8, dtype=torch.long)]))
        right = outputs(model, torch.cat([torch.cat([short, pad], 1), long]),
                        torch.cat([torch.cat([one, pad], 1), torch.ones(1, 8, dtype=torch.long)]))
        long_alone = outputs(model, long, torch.ones(1, 8, dtype=torch.long))
    torch.testing.assert_close(left[0, 3:], alone[0], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(right[0, :5], alone[0], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(left[1], long_alone[0], atol=ATOL, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------
# 4. Gradient checkpointing
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_same_prefix_grads(family, impl):
    model = make_model(family, impl).train()  # every dropout is 0, so train mode is deterministic
    prefixes = Prefixes(model, gated=True).attach(model)
    install(model)
    ids = torch.randint(1, VOCAB, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0

    def prefix_grads(checkpointing: dict | str | None, frozen_base: bool = False) -> list[Tensor]:
        model.requires_grad_(not frozen_base)
        prefixes.zero_grad(set_to_none=True)
        if checkpointing is None:
            model.gradient_checkpointing_disable()
        elif checkpointing == "default":
            model.gradient_checkpointing_enable()
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        kwargs = {} if family in ENCODERS else {"use_cache": False}
        outputs(model, ids, mask, **kwargs).square().mean().backward()
        return [p.grad.clone() for p in prefixes.parameters()]

    plain = prefix_grads(None)
    for checkpointing in ("default", {"use_reentrant": True}, {"use_reentrant": False}):
        # Also with only the prefix trainable (the PEFT case); for reentrant checkpointing this relies on
        # gradient_checkpointing_enable making the input embeddings require grad, as transformers 5 does.
        for frozen_base in (False, True):
            for got, want in zip(prefix_grads(checkpointing, frozen_base), plain):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------
# 5. Generation with a cache == recomputing the whole sequence
# --------------------------------------------------------------------------------------------------------
def _greedy_by_recompute(model: nn.Module, ids: Tensor, mask: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Greedy decoding that reruns the whole sequence without a cache: returns (ids, per-step logits)."""
    step_logits = []
    for _ in range(steps):
        with torch.no_grad():
            logits = outputs(model, ids, mask, use_cache=False)[:, -1]
        step_logits.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids, torch.stack(step_logits, dim=1)


def _assert_generate_matches_recompute(model: nn.Module, ids: Tensor, mask: Tensor, steps: int, **kwargs) -> None:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, **kwargs)
    want_ids, want_logits = _greedy_by_recompute(model, ids, mask, steps)
    assert torch.equal(out.sequences, want_ids)
    # Logits too, not only the argmax: a small error (e.g. a stray visible key) rarely flips a token.
    torch.testing.assert_close(torch.stack(out.logits, dim=1), want_logits, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", [*DECODERS, "mistral", "qwen2", "qwen3"])
def test_cached_generation_matches_recompute(family, impl, gated):
    model = make_model(family, impl)
    Prefixes(model, gated=gated).attach(model)
    install(model)
    torch.manual_seed(3)
    ids = torch.randint(1, VOCAB, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding, as for batched generation
    _assert_generate_matches_recompute(model, ids, mask, 8)


@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_generation_matches_recompute(padded):
    # Without padding, an empty StaticCache prefill reaches SDPA with no mask and keys longer than the
    # queries (transformers crops them): the prefix must survive that path.
    model = make_model("llama", "sdpa")
    Prefixes(model).attach(model)
    install(model)
    torch.manual_seed(4)
    ids = torch.randint(1, VOCAB, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    if padded:
        mask[0, :1] = 0
    _assert_generate_matches_recompute(model, ids, mask, 6, cache_implementation="static")


@pytest.mark.parametrize("mask_kind", ["none", "ones", "left_padded"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", DECODERS)
def test_chunk_after_cache_is_bottom_right_aligned(family, impl, mask_kind):
    """Several queries after a cached prefix (T_q < T_k) see exactly what a full recompute sees."""
    model = make_model(family, impl)
    Prefixes(model, gated=True).attach(model)
    install(model)
    ids = torch.randint(1, VOCAB, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    if mask_kind == "left_padded":
        mask[1, :3] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    # "none": no 2D mask at all, so SDPA gets transformers' batch-broadcast (stride-0) causal mask.
    given = None if mask_kind == "none" else mask
    with torch.no_grad():
        full = model(ids, attention_mask=given, position_ids=position_ids, use_cache=False).logits
        first = model(ids[:, :5], attention_mask=None if given is None else given[:, :5],
                      position_ids=position_ids[:, :5], use_cache=True)
        rest = model(ids[:, 5:], attention_mask=given, position_ids=position_ids[:, 5:],
                     past_key_values=first.past_key_values, use_cache=True).logits
    torch.testing.assert_close(rest, full[:, 5:], atol=ATOL, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------
# dtype: fp32 prefix parameters on a bf16 model
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_prefix_is_cast_to_the_key_dtype(impl):
    model = make_model("llama", impl).to(torch.bfloat16)
    prefixes = Prefixes(model, gated=True).attach(model)  # float32 parameters
    install(model)
    logits = outputs(model, torch.randint(1, VOCAB, (2, 5)))
    assert logits.dtype == torch.bfloat16
    logits.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in prefixes.parameters())
