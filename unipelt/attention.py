"""Key/value prefixes injected inside attention (prefix tuning, P-tuning v2, UniPELT's gated prefix).

How it works
------------
Every attention module of BERT/RoBERTa, GPT-2 and the Llama family (Llama, Mistral, Qwen2, Qwen3) in
transformers 5.x computes its projections, applies RoPE, updates the KV cache and then calls
``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)``
(``transformers.modeling_utils.AttentionInterface``). That lookup is the supported extension point:

* :func:`install` registers, once per process, a wrapper ``"unipelt_<base>"`` for the model's current
  implementation (``"sdpa"`` or ``"eager"``) with ``AttentionInterface.register``, registers the *same* mask
  builder under that name with ``AttentionMaskInterface.register`` (without it, ``masking_utils.
  _preprocess_mask_arguments`` treats an unknown name as "needs no mask" and silently drops padding and
  causal masks), and switches the model with ``PreTrainedModel.set_attn_implementation``.
* The wrapper looks for a provider on the attention module (:func:`set_kv_provider`). With none, or when
  it returns ``None``, it calls the original implementation with the original arguments: the output is
  bit-identical. Otherwise it prepends the provider's keys/values to the keys/values it received. Those
  are already past RoPE and past ``Cache.update``, so prefix keys get no rotation, are never written into
  the cache, and are seen exactly once per decoding step. Prefix positions are keys only, never queries.
* Masks. The wrapper receives the mask transformers built for the real tokens and prepends ``L``
  "visible" columns: ``True`` for SDPA's boolean masks, ``0.0`` for eager's additive float masks. Those
  masks are already bottom-right aligned for cached decoding (``sdpa_mask`` offsets queries by the cache
  length), so causality among real tokens is kept. When SDPA got no mask because it relies on
  ``is_causal=True`` (``masking_utils._ignore_causal_mask_sdpa``), prepending keys would break that
  upper-left-aligned flag, so the wrapper passes a lower-right ``torch.nn.attention.bias.CausalBias`` over
  ``(T_q, L + T_q)`` instead of a dense mask: on CUDA SDPA then runs the flash (or memory-efficient) kernel
  with lower-right causality. Measured on an H100 (torch 2.11, bf16, SDPA forward+backward, B=2, 32 query /
  8 KV heads, D=128, T=4096, L=16, median of 20): 4.3 ms against 7.9 ms with a dense boolean mask (T=1024,
  B=4: 1.1 ms against 1.7 ms); the model without prefix takes 2.2 ms. On CPU torch materialises the bias
  itself, which costs what a dense mask would. Eager never gets ``None`` for a causal model (``eager_mask``
  always materialises), so there the prefix columns are simply prepended.
* Sliding windows (Mistral; the sliding layers of Qwen2 / Qwen3 with ``use_sliding_window``, whose
  attention gets ``sliding_window``): a prefix vector is a key before the first real token, as PEFT's
  prefix sits in the cache slots before the text. A row's visible prefix columns take positions -n..-1,
  and a query at position p (the ``position_ids`` passed down to attention, so a left-padded row counts
  from its first real token and a truncated sliding-window cache changes nothing) sees the one at
  distance d while p + d < window, transformers' rule for every cached key
  (``masking_utils.sliding_window_overlay``): the prefix leaves the window as the text grows (see
  :func:`_in_window`). The mask then has per-query prefix columns, built densely.
* Gates (UniPELT). A gate per example scales ``P_k`` and ``P_v``. A gate per query cannot be applied by
  scaling keys, so the wrapper widens the head dimension instead, exactly: ``Q' = [q, g_k·q]``, real keys
  ``[k, 0]``, prefix keys ``[0, P_k]``, real values ``[v, 0]``, prefix values ``[0, P_v]``, scale kept at
  the module's ``scaling``; then ``out = out'[..., :D] + g_v·out'[..., D:]`` (one extra block per gated
  prefix). ``g_k`` and ``g_v`` are the same gate unless the prefix has separate K and V gates.
* GQA: prefixes come per key/value head and are concatenated before the original implementation repeats
  (or lets SDPA's ``enable_gqa`` broadcast) heads, exactly as it does for the model's own keys.

Not supported, refused at :func:`install`: flash-attention (``flash_attention_forward`` passes
``config._attn_implementation`` to its kernel loader, which cannot resolve a wrapped name), flex-attention
(block masks) and the paged implementations of continuous batching. SDPA reaches the flash kernel itself.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention.bias import CausalBias, CausalVariant

from unipelt.errors import ModelError

__all__ = ["KVPrefix", "install", "uninstall", "set_kv_provider", "clear_kv_provider", "is_installed"]

_NAME_PREFIX = "unipelt_"
# Implementations whose calling convention (mask format, cache handling, kernel loading) is understood here.
_SUPPORTED_BASES = ("sdpa", "eager")
# Stored in the attention module's __dict__ (not as a registered attribute): a provider that is itself an
# nn.Module must not become a submodule of the base model, or it would leak into the base state dict.
_PROVIDER_ATTR = "_unipelt_kv_provider"


@dataclass
class KVPrefix:
    """``L`` key/value vectors prepended inside one attention layer.

    key, value: ``(B or 1, H_kv, L, D)``, one set per key/value head (not repeated to query heads), as
    post-RoPE keys (they get no rotation). Cast to the key dtype and device when used.
    query_gate: ``None``, ``(B, 1, 1, 1)`` (one gate per example) or ``(B or 1, 1, T_q, 1)`` (one per
    query): the query's logits to this prefix become ``g·(q·P_k)·scaling`` and its value
    contribution ``g·P_v``, i.e. both ``P_k`` and ``P_v`` are multiplied by ``g``.
    value_gate: ``None`` (``query_gate`` gates ``P_v`` too) or a second gate of the same shapes; then
    ``query_gate`` multiplies only ``P_k`` and ``value_gate`` only ``P_v`` (UniPELT's separate K/V gates).
    """

    key: Tensor
    value: Tensor
    query_gate: Tensor | None = None
    value_gate: Tensor | None = None
    # (B, L) bool, or None (every row sees every column): which rows attend to which prefix
    # columns. A mixed batch (several adapters in one call) puts every adapter's prefix side by side
    # and shows each row its own adapter's columns only; a hidden column gets exactly zero weight.
    visible: Tensor | None = None


KVProvider = Callable[[nn.Module, Tensor, Tensor, Tensor], KVPrefix | Sequence[KVPrefix] | None]


# ---------------------------------------------------------------------------------------------------------
# Public interface
# ---------------------------------------------------------------------------------------------------------
def install(model: nn.Module) -> None:
    """Route every attention module of ``model`` through the unipelt attention function (idempotent).

    ``model`` is a ``PreTrainedModel`` or a module containing one or more of them. Switching the
    implementation afterwards (``set_attn_implementation``) bypasses the prefixes: uninstall, switch, install.
    """
    for root in _pretrained_roots(model):
        config = root.config
        current = config._attn_implementation
        if isinstance(current, str) and current.startswith(_NAME_PREFIX):
            continue  # already installed
        _check_supported(root, current)
        wrapped = _register(current)
        root.set_attn_implementation(wrapped)
        # set_attn_implementation only logs a warning for a model class whose source does not use
        # ALL_ATTENTION_FUNCTIONS (PreTrainedModel._can_set_attn_implementation): refuse loudly instead.
        if config._attn_implementation != wrapped:
            raise ModelError(
                f"{type(root).__name__}: transformers did not switch the attention implementation to "
                f"{wrapped!r} (the model does not dispatch attention through AttentionInterface)"
            )


def uninstall(model: nn.Module) -> None:
    """Restore the model's original attention implementation and drop every provider set on its modules."""
    for root in _pretrained_roots(model):
        current = root.config._attn_implementation
        if isinstance(current, str) and current.startswith(_NAME_PREFIX):
            root.set_attn_implementation(current[len(_NAME_PREFIX):])
    for module in model.modules():
        module.__dict__.pop(_PROVIDER_ATTR, None)


def is_installed(model: nn.Module) -> bool:
    """Whether :func:`install` is in effect on (every PreTrainedModel of) ``model``."""
    roots = _pretrained_roots(model)
    return all(str(r.config._attn_implementation).startswith(_NAME_PREFIX) for r in roots)


def set_kv_provider(attn_module: nn.Module, provider: KVProvider) -> None:
    """Make ``provider(module, query, key, value)`` supply the prefixes of ``attn_module``.

    The provider is not registered as a submodule: its parameters must be registered (and moved across
    devices) by whoever owns them. Only consulted while the model is :func:`install`-ed.
    """
    if not callable(provider):
        raise TypeError(f"kv provider for {_where(attn_module)} must be callable, got {type(provider).__name__}")
    # object.__setattr__ bypasses nn.Module.__setattr__, which would register an nn.Module provider as a
    # child (changing state_dict/parameters of the base model). A reference cycle through a bound method
    # is fine: plain GC collects it, unlike a WeakKeyDictionary whose value references its key.
    object.__setattr__(attn_module, _PROVIDER_ATTR, provider)


def get_kv_provider(attn_module: nn.Module) -> KVProvider | None:
    return attn_module.__dict__.get(_PROVIDER_ATTR)


def register_all() -> None:
    """Register the unipelt attention functions for every supported base (idempotent): a model
    unpickled in a fresh process names one in its config, but the function registry is per process."""
    for base in _SUPPORTED_BASES:
        _register(base)


def clear_kv_provider(attn_module: nn.Module) -> None:
    """Remove the provider of ``attn_module`` (no-op when none is set)."""
    attn_module.__dict__.pop(_PROVIDER_ATTR, None)


# ---------------------------------------------------------------------------------------------------------
# Installation helpers
# ---------------------------------------------------------------------------------------------------------
def _pretrained_roots(model: nn.Module) -> list[nn.Module]:
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return [model]
    # Outermost PreTrainedModels only: set_attn_implementation already dispatches to nested ones.
    roots: list[nn.Module] = []
    root_names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and not any(name.startswith(r + ".") for r in root_names):
            roots.append(module)
            root_names.append(name)
    if not roots:
        raise ModelError(f"{type(model).__name__} contains no transformers PreTrainedModel to install into")
    return roots


def _check_supported(root: nn.Module, current: Any) -> None:
    if current not in _SUPPORTED_BASES:
        raise ModelError(
            f"{type(root).__name__} uses attn_implementation={current!r}; key/value prefixes support "
            f"{list(_SUPPORTED_BASES)}. Load the model with attn_implementation='sdpa' (SDPA dispatches to the "
            "flash kernel by itself) or 'eager'."
        )
    # A sub-config on another implementation would be switched by set_attn_implementation(str) and not be
    # restorable to its own value by uninstall(): refuse rather than restore inexactly.
    stack = [root.config]
    while stack:
        cfg = stack.pop()
        for key in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, key, None)
            if sub is None:
                continue
            if sub._attn_implementation != current:
                raise ModelError(
                    f"{type(root).__name__}: sub-config {key!r} uses attn_implementation="
                    f"{sub._attn_implementation!r} but the model uses {current!r}; mixed implementations are "
                    "not supported by unipelt.attention"
                )
            stack.append(sub)


def _register(base: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = _NAME_PREFIX + base
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_attention_forward(base))

        # Same mask as the base: create_causal_mask / create_bidirectional_mask look masks up by the config's
        # implementation name. Resolved at call time so a later re-registration of the base is followed.
        def unipelt_mask(*args: Any, **kwargs: Any) -> Any:
            return ALL_MASK_ATTENTION_FUNCTIONS[base](*args, **kwargs)

        unipelt_mask.__name__ = f"unipelt_{base}_mask"
        AttentionMaskInterface.register(name, unipelt_mask)
    return name


def _where(module: nn.Module) -> str:
    layer = getattr(module, "layer_idx", None)
    return f"{type(module).__name__}(layer_idx={layer})" if layer is not None else type(module).__name__


# ---------------------------------------------------------------------------------------------------------
# The attention function
# ---------------------------------------------------------------------------------------------------------
AttentionForward = Callable[..., tuple[Tensor, Tensor | None]]


def _make_attention_forward(base: str) -> AttentionForward:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def unipelt_attention_forward(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        base_forward = _base_forward(base, module, ALL_ATTENTION_FUNCTIONS)
        provider = module.__dict__.get(_PROVIDER_ATTR)
        prefixes = _as_list(provider(module, query, key, value)) if provider is not None else []
        if not prefixes:
            return base_forward(module, query, key, value, attention_mask, **kwargs)
        return _forward_with_prefixes(base, base_forward, module, query, key, value, attention_mask, prefixes, kwargs)

    unipelt_attention_forward.__name__ = f"unipelt_{base}_attention_forward"
    unipelt_attention_forward.__qualname__ = unipelt_attention_forward.__name__
    return unipelt_attention_forward


def _base_forward(base: str, module: nn.Module, functions: Any) -> AttentionForward:
    if base != "eager":
        return functions[base]  # looked up per call, so a later re-registration of the base is followed
    # GPT2Attention.forward bypasses the interface when `config._attn_implementation == "eager"` and
    # `reorder_and_upcast_attn` is set; the wrapped name fails that string test, so mirror it here.
    if getattr(module, "reorder_and_upcast_attn", False) and hasattr(module, "_upcast_and_reordered_attn"):
        return _gpt2_upcast_forward
    # "eager" is not in the interface: each modeling file passes its own `eager_attention_forward` as the
    # default of get_interface (Llama's upcasts the softmax to fp32, BERT's does not). Use the same one.
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise ModelError(f"{_where(module)}: no eager_attention_forward in {type(module).__module__}")
    return eager


def _gpt2_upcast_forward(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> tuple[Tensor, Tensor | None]:
    return module._upcast_and_reordered_attn(query, key, value, attention_mask)


def _as_list(result: Any) -> list[KVPrefix]:
    if result is None:
        return []
    if isinstance(result, KVPrefix):
        return [result]
    if isinstance(result, (list, tuple)):
        out = [p for p in result if p is not None]
        if not all(isinstance(p, KVPrefix) for p in out):
            raise TypeError("a kv provider must return None, a KVPrefix or a sequence of KVPrefix")
        return out
    raise TypeError(f"a kv provider must return None, a KVPrefix or a sequence of KVPrefix, got {type(result)}")


def _forward_with_prefixes(
    base: str,
    base_forward: AttentionForward,
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    prefixes: list[KVPrefix],
    kwargs: dict[str, Any],
) -> tuple[Tensor, Tensor | None]:
    if kwargs.get("position_bias") is not None:
        raise ModelError(f"{_where(module)}: key/value prefixes with a position_bias are not supported")
    q_len, head_dim = query.shape[2], query.shape[3]

    # Prefixes without a per-query gate are folded into the plain key/value sequence (an example gate
    # simply scales P_k and P_v); per-query-gated ones need their own head-dimension block.
    plain_k: list[Tensor] = []
    plain_v: list[Tensor] = []
    gated: list[tuple[Tensor, Tensor, Tensor | None, Tensor | None]] = []  # (P_k, P_v, g_k, g_v)
    plain_vis: list[Tensor | None] = []
    gated_vis: list[Tensor | None] = []
    for p in prefixes:
        pk, pv, gk, gv = _checked(module, p, query, key, value)
        if pk.shape[2] == 0:
            continue
        if all(g is None or g.shape[2] == 1 for g in (gk, gv)):
            # ungated, or one gate per example (or a single query while decoding): scale P_k, P_v
            plain_k.append(pk if gk is None else pk * gk)
            plain_v.append(pv if gv is None else pv * gv)
            plain_vis.append(p.visible)
        else:
            gated.append((pk, pv, gk, gv))
            gated_vis.append(p.visible)
    n_prefix = sum(t.shape[2] for t in plain_k) + sum(g[0].shape[2] for g in gated)
    if n_prefix == 0:
        return base_forward(module, query, key, value, attention_mask, **kwargs)

    # the real keys' own mask and causal flag, before the prefix columns are put in front (what the
    # split path below, which never concatenates, gives the attention kernel over the real keys)
    real_mask, real_causal = attention_mask, False
    # --- mask: L visible columns in front of the real keys -------------------------------------------
    window = kwargs.get("sliding_window")
    if any(v is not None for v in plain_vis + gated_vis) or window is not None:
        # per-row prefix columns (a mixed batch), in the order the keys are laid out below
        sizes = [t.shape[2] for t in plain_k] + [g[0].shape[2] for g in gated]
        vis = torch.cat([
            (v.to(device=query.device, dtype=torch.bool) if v is not None
             else torch.ones(query.shape[0], n, dtype=torch.bool, device=query.device))
            for v, n in zip(plain_vis + gated_vis, sizes)
        ], dim=1)
        if window is not None:  # (B, T_q, L): each query's window over the prefix positions
            vis = _in_window(module, vis, int(window), q_len, kwargs)
        attention_mask, key, value = _rows_mask(base, module, query, key, value, attention_mask, vis, kwargs)
    elif attention_mask is not None:
        attention_mask = _prepend_visible(attention_mask, n_prefix)
    elif base == "sdpa" and q_len > 1 and _sdpa_is_causal(module, kwargs):
        # sdpa_attention_forward would run `is_causal=True` (upper-left aligned) on keys cropped to q_len
        # (the crop drops an empty StaticCache's future slots). Keep that meaning for the real keys and let
        # every query see the prefix: lower-right causality over (q_len, L + q_len) is exactly that.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        attention_mask = _lower_right_causal(module, query, key, value, q_len, n_prefix + q_len)
        real_causal = True  # over the q_len real keys, upper-left = lower-right
    # else: eager got no mask (bidirectional, no padding), or SDPA decodes one token / is bidirectional.

    if not gated:
        if _can_split(base, (query, key, value, *plain_k, *plain_v), plain_vis, kwargs):
            out = _split_prefix_attention(module, query, key, value, real_mask, real_causal, plain_k, plain_v, kwargs)
            if out is not None:
                return out, None
        key = torch.cat([*plain_k, key], dim=2)
        value = torch.cat([*plain_v, value], dim=2)
        return base_forward(module, query, key, value, attention_mask, **kwargs)

    # --- per-query gates: widen the head dimension (see the module docstring) -------------------------
    v_dim = value.shape[-1]
    n_blocks = 1 + len(gated)

    def place(t: Tensor, block: int) -> Tensor:
        width = t.shape[-1]
        return nn.functional.pad(t, (block * width, (n_blocks - 1 - block) * width))

    key_parts = [place(t, 0) for t in plain_k] + [place(g[0], i + 1) for i, g in enumerate(gated)]
    value_parts = [place(t, 0) for t in plain_v] + [place(g[1], i + 1) for i, g in enumerate(gated)]
    wide_key = torch.cat([*key_parts, place(key, 0)], dim=2)
    wide_value = torch.cat([*value_parts, place(value, 0)], dim=2)
    wide_query = torch.cat([query, *(query if gk is None else gk * query for _, _, gk, _ in gated)], dim=-1)
    # The widened dot product must keep the original 1/sqrt(D)-style scale, not 1/sqrt(n_blocks·D).
    wide_kwargs = dict(kwargs)
    if wide_kwargs.get("scaling") is None:
        wide_kwargs["scaling"] = head_dim**-0.5
    out, weights = base_forward(module, wide_query, wide_key, wide_value, attention_mask, **wide_kwargs)
    # out: (B, T_q, H, n_blocks·Dv), as every attention function returns (transposed back to tokens first).
    result = out[..., :v_dim]
    for i, (_, _, _, gv) in enumerate(gated):
        block = out[..., (i + 1) * v_dim : (i + 2) * v_dim]
        result = result + (block if gv is None else gv.transpose(1, 2) * block)
    return result, weights


# How plain prefixes (no per-query gate, every row seeing every prefix column) join the real keys
# in SDPA models: "never" (the default) concatenates them in front of the real keys; "compiled"
# splits the softmax (_split_prefix_attention) under torch.compile, "always" also in eager calls
# (for tests). The split is exact but measured SLOWER on an H200 (session 8, reduce-overhead,
# benchmarks/RESULTS.md "Session 8 (helper coll)"): collapsed llama 1.32x the base forward against
# 1.07x concatenated, BERT 1.77x against 1.24x. So it is not the default; it stays for the
# profile that would say why (benchmarks/results-2026-12-01/coll-s8/collapse_profile.py) and
# benchmarks/speed.py --prefix-attention compiled selects it.
SPLIT_PREFIX = "never"


def _can_split(base: str, tensors: tuple[Tensor, ...], vis: list[Tensor | None], kwargs: dict[str, Any]) -> bool:
    """Whether :func:`_split_prefix_attention` may serve this call: SDPA, an inference call (the
    kernels' log-sum-exp output has no gradient), no dropout, no per-row prefix columns, equal
    key/value widths, nothing transformers' own SDPA call would treat specially (a paged cache,
    softcapping, a position bias)."""
    if SPLIT_PREFIX == "never" or (SPLIT_PREFIX != "always" and not torch.compiler.is_compiling()):
        return False
    if base != "sdpa" or any(v is not None for v in vis) or kwargs.get("sliding_window") is not None:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):  # query, key, value, prefixes
        return False
    if float(kwargs.get("dropout", 0.0) or 0.0) != 0.0 or kwargs.get("cache") is not None \
            or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        return False
    query, key, value = tensors[:3]
    return query.shape[-1] == key.shape[-1] == value.shape[-1]


def _split_prefix_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                            causal: bool, plain_k: list[Tensor], plain_v: list[Tensor],
                            kwargs: dict[str, Any]) -> Tensor | None:
    """Attention over [prefix keys, real keys] without concatenating them: the real keys go through
    the attention kernel alone (the base model's own call: same keys, same mask, same kernel) with
    its log-sum-exp ``lse``; the L prefix keys, a few columns, are scored next to it,
    ``s = q·P_kᵀ·scale``, and the two softmax parts are joined exactly:

        m = max(lse, max_j s_j),  w_r = e^(lse - m),  w_j = e^(s_j - m)
        out = (w_r·out_real + Σ_j w_j·P_v[j]) / (w_r + Σ_j w_j)

    (out_real is the kernel's softmax-weighted mean over the real keys, ``e^lse`` its denominator).
    What it saves against the concatenation: the copy of every layer's keys and values into
    [P; K] and [P; V], the prefix columns of the mask, and L more keys inside the kernel (10 keys over
    128 start a third 64-key block). On the H200 it cost more than it saved (not the default: see
    :data:`SPLIT_PREFIX`). Returns ``(B, T, H, D)`` as transformers' SDPA function does, or ``None``
    where no kernel with a log-sum-exp takes these inputs (then the caller concatenates)."""
    groups = query.shape[1] // key.shape[1]
    pk = torch.cat(plain_k, dim=2) if len(plain_k) > 1 else plain_k[0]  # (B, H_kv, L, D)
    pv = torch.cat(plain_v, dim=2) if len(plain_v) > 1 else plain_v[0]
    if groups > 1:  # as transformers' repeat_kv next to a mask: one key/value head per query head
        key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
        pk, pv = (t.repeat_interleave(groups, dim=1) for t in (pk, pv))
    if mask is not None and mask.shape[-1] != key.shape[2]:
        return None
    scale = kwargs.get("scaling")
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    got = _attention_with_lse(query, key, value, mask, causal, scale)
    if got is None:
        return None
    out_r, lse = got  # (B, H, T, D) in the query dtype, (B, H, T) float32
    if torch.compiler.is_compiling():
        # as broadcast products summed: inductor makes each one reduction kernel that reads q (or the
        # weights) once in their own dtype, without a float32 copy of q for a GEMM
        s = (query.unsqueeze(3).float() * pk.unsqueeze(2).float()).sum(-1) * scale  # (B, H, T, L)
    else:
        s = torch.matmul(query.float(), pk.float().transpose(-1, -2)) * scale
    m = torch.maximum(lse, s.amax(-1))
    w_r = torch.exp(lse - m)  # 0 where every real key is masked (lse = -inf): the prefix alone
    w_p = torch.exp(s - m.unsqueeze(-1))
    denom = w_r + w_p.sum(-1)
    if torch.compiler.is_compiling():
        out_p = (w_p.unsqueeze(-1) * pv.unsqueeze(2).float()).sum(-2)  # (B, H, T, D)
    else:
        out_p = torch.matmul(w_p, pv.float())
    w_r = w_r.unsqueeze(-1)
    # a fully masked query row's kernel output is not defined (0 or NaN by kernel): weight 0 exactly
    real = torch.where(w_r > 0, out_r.float(), torch.zeros((), dtype=torch.float32, device=out_r.device))
    out = (w_r * real + out_p) / denom.unsqueeze(-1)
    return out.to(query.dtype).transpose(1, 2).contiguous()


_MEM_EFFICIENT_ALIGN = 16  # the memory-efficient kernel reads its bias in rows aligned to 16 elements


def _attention_with_lse(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, causal: bool,
                        scale: float) -> tuple[Tensor, Tensor] | None:
    """SDPA over (query, key, value) with the mask (boolean: True = visible, or additive) or the
    causal flag, as ``(out (B, H, T, D), lse (B, H, T) float32)``: the ATen kernels SDPA itself
    dispatches to, called for their log-sum-exp (CPU: the flash kernel for CPU; CUDA: the
    memory-efficient kernel, which takes a bias and runs on every CUDA architecture; the flash kernel,
    which the base model reaches without a mask, is not used: whether the device has it cannot be
    asked inside a compiled graph). ``None`` for other devices and dtypes."""
    bias = mask
    if mask is not None and mask.dtype == torch.bool:  # as SDPA converts a boolean mask
        bias = torch.where(mask, torch.zeros((), dtype=query.dtype, device=mask.device),
                           torch.full((), float("-inf"), dtype=query.dtype, device=mask.device))
    elif mask is not None:
        bias = mask.to(query.dtype)
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, causal, attn_mask=bias, scale=scale)
        return out, lse
    if query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16, torch.float32) \
            or query.shape[-1] % 8:
        return None
    B, H, T = query.shape[:3]
    S = key.shape[2]
    if bias is not None:
        bias = bias.expand(B, H, T, S)
        if S % _MEM_EFFICIENT_ALIGN:  # SDPA pads the same way (preprocess_mask): a view of aligned rows
            bias = nn.functional.pad(bias, (0, _MEM_EFFICIENT_ALIGN - S % _MEM_EFFICIENT_ALIGN))[..., :S]
    res = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, 0.0, causal,
                                                                 scale=scale)
    return res[0], res[1][..., :T]


def _checked(
    module: nn.Module, p: KVPrefix, query: Tensor, key: Tensor, value: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    batch, _, q_len, _ = query.shape
    kv_heads, k_dim, v_dim = key.shape[1], key.shape[-1], value.shape[-1]
    pk, pv = p.key, p.value
    ok = (
        pk.dim() == 4
        and pv.dim() == 4
        and pk.shape[0] in (1, batch)
        and pv.shape[0] in (1, batch)
        and pk.shape[1] == kv_heads
        and pv.shape[1] == kv_heads
        and pk.shape[2] == pv.shape[2]
        and pk.shape[3] == k_dim
        and pv.shape[3] == v_dim
    )
    if not ok:
        raise ValueError(
            f"{_where(module)}: KVPrefix key {tuple(pk.shape)} / value {tuple(pv.shape)} do not fit; expected "
            f"(B or 1, {kv_heads}, L, {k_dim}) / (B or 1, {kv_heads}, L, {v_dim}) with B={batch}"
        )
    pk = pk.to(device=key.device, dtype=key.dtype).expand(batch, -1, -1, -1)
    pv = pv.to(device=value.device, dtype=value.dtype).expand(batch, -1, -1, -1)
    gates = []
    for name, gate in (("query_gate", p.query_gate), ("value_gate", p.value_gate)):
        if gate is not None:
            if not (gate.dim() == 4 and gate.shape[0] in (1, batch) and gate.shape[1] == 1
                    and gate.shape[3] == 1 and gate.shape[2] in (1, q_len)):
                raise ValueError(
                    f"{_where(module)}: KVPrefix {name} {tuple(gate.shape)} does not fit; expected "
                    f"(B or 1, 1, 1, 1) or (B or 1, 1, {q_len}, 1) with B={batch}"
                )
            gate = gate.to(device=query.device, dtype=query.dtype)
        gates.append(gate)
    gk, gv = gates
    if p.value_gate is None:
        gv = gk  # one gate for P_k and P_v
    return pk, pv, gk, gv


def _rows_mask(base: str, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
               mask: Tensor | None, vis: Tensor, kwargs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """The mask over [prefix columns, real keys] when rows see different prefix columns ``vis``
    (B, L), or each query its own (B, T_q, L, a sliding window): the real keys' mask as
    transformers built it (or the one it stands for when it passed none), the prefix columns
    visible where ``vis`` says. Boolean for SDPA, additive for eager."""
    B, q_len = query.shape[0], query.shape[2]
    n = vis.shape[-1]
    if mask is None:
        if base == "sdpa" and q_len > 1 and _sdpa_is_causal(module, kwargs):
            key, value = key[:, :, :q_len], value[:, :, :q_len]
            real = torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).tril()[None, None]
        else:
            real = torch.ones(1, 1, q_len, key.shape[2], dtype=torch.bool, device=query.device)
        real = real.expand(B, 1, q_len, -1)
        if base != "sdpa":  # eager adds its mask to the scores
            zero = torch.zeros((), dtype=query.dtype, device=query.device)
            real = torch.where(real, zero, torch.finfo(query.dtype).min)
        mask = real
    mask = mask.expand(B, *mask.shape[1:]) if mask.shape[0] == 1 else mask
    if vis.dim() == 3:  # (B, T_q, L): per query (a sliding window)
        mask = mask.expand(B, mask.shape[1], q_len, mask.shape[3]) if mask.shape[2] == 1 else mask
        cols = vis[:, None, :, :].expand(B, mask.shape[1], mask.shape[2], n)
    else:
        cols = vis[:, None, None, :].expand(B, mask.shape[1], mask.shape[2], n)
    if mask.dtype == torch.bool:
        front = cols
    else:
        front = torch.where(cols, torch.zeros((), dtype=mask.dtype, device=mask.device),
                            torch.finfo(mask.dtype).min)
    return torch.cat([front, mask], dim=-1), key, value


def _in_window(module: nn.Module, vis: Tensor, window: int, q_len: int, kwargs: dict[str, Any]) -> Tensor:
    """Which prefix columns each query sees under a sliding window (Mistral; Qwen2 / Qwen3 layers
    with ``use_sliding_window``), ``(B, T_q, L)`` from the per-row columns ``vis`` (B, L).

    A prefix vector is a key before the first real token: the row's visible columns, in layout
    order, take positions -n..-1 (the last one -1), as PEFT's prefix takes the cache positions just
    before the text. transformers' window (``masking_utils.sliding_window_overlay``: key position >
    query position - window) keeps a key at distance d from a query at position p while p + d <
    window, which is what every cached key gets, so the prefix leaves the window as the text grows.
    Query positions are the ``position_ids`` transformers passes down to attention (each row's own:
    counted from its first real token when it is left-padded, as ``generate`` does), not cache
    slots, so a truncated sliding-window cache keeps them."""
    pos = kwargs.get("position_ids")
    if pos is None:
        raise ModelError(f"{_where(module)}: a key/value prefix under a sliding window needs the position_ids "
                         "transformers passes to attention; this model's attention got none")
    B = vis.shape[0]
    pos = pos.to(device=vis.device).reshape(-1, pos.shape[-1])[:, -q_len:].expand(B, q_len)
    # distance of each visible column before the text: the number of visible columns from it to the end
    dist = vis.flip(-1).cumsum(-1).flip(-1)  # (B, L)
    return vis[:, None, :] & (pos[:, :, None] + dist[:, None, :] < window)


def _sdpa_is_causal(module: nn.Module, kwargs: dict[str, Any]) -> bool:
    # Same rule as sdpa_attention_forward: the `is_causal` kwarg wins over the module attribute.
    is_causal = kwargs.get("is_causal")
    return bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))


def _prepend_visible(mask: Tensor, n_prefix: int) -> Tensor:
    """Prepend ``n_prefix`` visible key columns to a boolean (True = visible) or additive (0 = visible) mask."""
    if mask.dim() == 4 and mask.shape[0] > 1 and mask.stride(0) == 0:
        # sdpa_mask returns `.expand(batch, ...)` of a batch-free causal mask when there is no padding:
        # extend the single copy and expand again rather than materialising B copies.
        return _prepend_visible(mask[:1], n_prefix).expand(mask.shape[0], *([-1] * (mask.dim() - 1)))
    fill = True if mask.dtype == torch.bool else 0
    visible = torch.full((*mask.shape[:-1], n_prefix), fill, dtype=mask.dtype, device=mask.device)
    return torch.cat([visible, mask], dim=-1)


def _lower_right_causal(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, q_len: int, kv_len: int
) -> Tensor:
    dense = torch.compiler.is_compiling()  # keep a plain tensor under dynamo rather than a tensor subclass
    if not dense and getattr(module, "num_key_value_groups", 1) > 1:
        # Where transformers would still pass enable_gqa=True with a mask (XPU, MPS, or forced by
        # TRANSFORMERS_SDPA_FORCE_GQA), CausalBias' flash path would get unrepeated kv heads: use a dense mask.
        try:
            from transformers.integrations.sdpa_attention import use_gqa_in_sdpa
        except ImportError:  # not in this transformers version: assume heads are repeated next to a mask
            use_gqa_in_sdpa = None
        if use_gqa_in_sdpa is not None and use_gqa_in_sdpa(torch.empty(0, dtype=torch.bool), key, value):
            dense = True
    if dense:
        return torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)[None, None]
    # causal_lower_right(q, kv) would allocate an uninitialised (2, q, kv) float32 tensor: CausalBias
    # forwards its constructor arguments to torch.Tensor.__new__ as a size. Build the subclass on an
    # empty tensor instead; CausalBias only reads these three attributes when SDPA dispatches on it.
    bias = torch.empty(0).as_subclass(CausalBias)
    bias.variant = CausalVariant.LOWER_RIGHT
    bias.seq_len_q = q_len
    bias.seq_len_kv = kv_len
    return bias
