"""Model-call rewriting in the core: what every prompt-style method needs.

:class:`CallBinder` reads a model call's arguments by name without ``inspect`` at call time
(``torch.compile(fullgraph=True)`` cannot trace ``Signature.bind``). :class:`PromptRewrite`
inserts the virtual tokens of every active prompt-style branch (prompt tuning, P-tuning, at the
front or at template positions) into a call and extends the attention mask, position ids, cache
positions, token types and labels consistently; cached generation steps stay consistent.
"""
from __future__ import annotations

import inspect
import typing

import torch
from torch import Tensor, nn

from unipelt.errors import ModelError


DECORATOR_KWARGS = ("return_dict", "use_cache", "output_attentions", "output_hidden_states")


class CallBinder:
    """Reads arguments of calls to one ``forward`` by name, positional or keyword."""

    def __init__(self, forward):
        names, self.var_kwargs = [], None
        try:
            params = inspect.signature(forward).parameters.values()
        except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
            params = []
        keyword_only = []
        # the keywords ``**kwargs`` takes: a transformers model types it Unpack[TransformersKwargs]
        # (a TypedDict), and silently drops any other name; None = anything (an untyped **kwargs)
        self.extra: frozenset[str] | None = None
        for p in params:
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                names.append(p.name)
            elif p.kind == p.KEYWORD_ONLY:
                keyword_only.append(p.name)
            elif p.kind == p.VAR_KEYWORD:
                self.var_kwargs = p.name
                typed = [a for a in typing.get_args(p.annotation) if isinstance(getattr(a, "__annotations__", None), dict)
                         and hasattr(a, "__total__")]
                if typed:
                    self.extra = frozenset(k for t in typed for k in t.__annotations__)
        self.positional = tuple(names)
        self.index = {n: i for i, n in enumerate(names)}
        # transformers' forward decorators (can_return_tuple, check_model_inputs) consume these
        # before the typed **kwargs
        self.known = frozenset(names) | frozenset(keyword_only) | frozenset(DECORATOR_KWARGS)
        self.name = getattr(forward, "__qualname__", "forward")

    def unknown(self, kwargs: dict) -> list[str]:
        """Keyword arguments the forward would ignore without a word (none when it says nothing)."""
        if self.var_kwargs is None or self.extra is None:
            return []
        return [k for k in kwargs if k not in self.known and k not in self.extra]

    def get(self, args: tuple, kwargs: dict, name: str):
        if name in kwargs:
            return kwargs[name]
        i = self.index.get(name)
        if i is not None and i < len(args):
            return args[i]
        return None

    def bind(self, args: tuple, kwargs: dict) -> dict:
        """Every argument of the call by name (keyword arguments beyond the signature included)."""
        call = {self.positional[i]: a for i, a in enumerate(args[:len(self.positional)])}
        call.update(kwargs)
        return call


def _position_limit(model: nn.Module) -> int | None:
    """How many positions a model with learned absolute position embeddings (BERT, RoBERTa,
    GPT-2) can number; None for rotary models, which have no such table."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in ("position_embeddings", "wpe"):
            pad = module.padding_idx  # RoBERTa numbers positions from padding_idx + 1
            return module.num_embeddings - (pad + 1 if pad is not None else 0)
    return None


def _check_cache_room(past) -> None:
    """Refuse a fixed-size (static) KV cache: generate() sizes it for the text alone, so the L
    virtual tokens would overflow it mid-generation (an IndexError deep inside the cache)."""
    try:
        from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer
    except ImportError:  # a transformers without these classes has no such cache either
        return
    layers = getattr(past, "layers", None) or []
    if any(isinstance(la, StaticLayer) and not isinstance(la, StaticSlidingWindowLayer) for la in layers):
        raise ModelError(
            "prompt tuning / P-tuning insert virtual tokens that a static KV cache (sized for the text "
            "alone) has no room for: generate with the default dynamic cache (no cache_implementation='static')"
        )


def _cache_length(past) -> int:
    if past is None:
        return 0
    try:
        return int(past.get_seq_length())
    except (AttributeError, TypeError):
        return 0


def _after_input(mask: Tensor | None, batch: int, length: int, encoder: bool, first: int, device) -> Tensor:
    """Per example, the token index the virtual tokens placed after the input go in front of.

    Decoders: right after the last real token of the text, i.e. at the first padding position
    that follows a real token (right padding), else at the end (no or left padding; in a cached
    step the tokens generated so far are all real, so this is still where the prefill put them).
    Encoders: in front of the last real token (their closing ``[SEP]``/``</s>``).
    """
    if mask is None or mask.dim() != 2:
        at = torch.full((batch,), length - 1 if encoder else length, dtype=torch.long, device=device)
        return at.clamp_min(first)
    real = mask != 0
    idx = torch.arange(length, device=device).expand(batch, length)
    if encoder:
        last = torch.where(real, idx, torch.full_like(idx, -1)).amax(1)
        return torch.where(last >= 0, last, torch.full_like(last, length)).clamp_min(first)
    started = real.cumsum(1) > 0
    hole = started & ~real  # padding after the first real token
    first_hole = torch.where(hole, idx, torch.full_like(idx, length)).amin(1)
    return first_hole.clamp_min(first)


class _Layout:
    """Where ``before`` + ``after`` virtual tokens go in a (B, T) sequence: ``before`` at index
    ``first`` (0, or 1 after an encoder's [CLS]), ``after`` in front of token ``at[b]``."""

    def __init__(self, first: int, at: Tensor, before: int, after: int, length: int):
        B, device = at.shape[0], at.device
        self.first, self.at, self.before, self.after = first, at, before, after
        j = torch.arange(length, device=device).expand(B, length)
        self.token_pos = j + before * (j >= first) + after * (j >= at[:, None])
        vb = (first + torch.arange(before, device=device)).expand(B, before)
        va = at[:, None] + before + torch.arange(after, device=device)
        # gathering from [virtual before, virtual after, tokens] with this index gives the new order
        self.order = torch.cat([vb, va, self.token_pos], 1).argsort(1)

    def insert(self, t: Tensor, before: Tensor, after: Tensor) -> Tensor:
        """t (B, T, ...) with before (B, Lb, ...) and after (B, La, ...) inserted -> (B, T + L, ...)."""
        src = torch.cat([before, after, t], 1)
        idx = self.order.view(*self.order.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
        return src.gather(1, idx)


def _row_prompts(ctx, rows) -> dict[str, list]:
    """The prompt entries of each adapter of a mixed batch, {} when no row has any. Every row must
    get the same number of virtual tokens before and after its text: the tokens that follow are
    numbered from them (positions, the cache length of later steps), so a row with fewer would
    need other positions than its single-adapter call, not only a masked pad."""
    from unipelt.runtime import BASE

    per = {n: ([] if n == BASE else ctx.embed_solo.get(n, [])) for n in dict.fromkeys(rows.names)}
    layouts = {n: (sum(e.branch.length - e.branch.after for e in es), sum(e.branch.after for e in es))
               for n, es in per.items()}
    if len(set(layouts.values())) > 1:
        shown = ", ".join(f"{n}: {b}+{a}" for n, (b, a) in layouts.items())
        raise ModelError(
            "adapter_names: the rows' adapters insert different numbers of virtual tokens (prompt tuning / "
            f"P-tuning; before+after the text: {shown}); a mixed batch needs the same layout in every row"
        )
    if not any(per.values()):
        return {}
    return per


class PromptRewrite:
    """The forward pre-hook (and decoder-classifier score hook) inserting virtual tokens."""

    def __init__(self, model: nn.Module, ctx, causal: bool):
        self.binder = CallBinder(model.forward)
        self.ctx = ctx
        self.encoder = not causal
        self.embed_fn = model.get_input_embeddings()
        self.limit = _position_limit(model)
        self.model_name = type(model).__name__
        # A decoder's sequence classifier (GPT-2's and transformers' generic one, both named `score`)
        # pools the last token that is not padding, found from input_ids; given inputs_embeds it pools
        # the last position, a pad on right-padded batches. The pre-hook works out the right index
        # from the ids and the score hook moves that token's logits to the last position.
        self.pool_at: Tensor | None = None
        self.score = model._modules.get("score") if self.encoder is False else None
        cfg = getattr(model, "config", None)
        text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
        self.pad_id = getattr(text_cfg, "pad_token_id", None)

    def __call__(self, module, args, kwargs):
        self.pool_at = None
        ctx = self.ctx
        rows = None
        if "adapter_names" in kwargs or ctx.row_names is not None:
            # a mixed batch (the root pre-hook, after this one, consumes the keyword)
            from unipelt.state import select_rows

            rows = select_rows(ctx, self.binder, args, kwargs, kwargs.get("adapter_names"), ctx.row_names)
            active = _row_prompts(ctx, rows)
        else:
            active = ctx.embed_live
        if not active:
            return None
        encoder, limit, score, pad_id, embed_fn = self.encoder, self.limit, self.score, self.pad_id, self.embed_fn
        call = self.binder.bind(args, kwargs)
        ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
        if embeds is None:
            if ids is None:
                return None
            embeds = embed_fn(ids)
        B, T = embeds.shape[:2]
        if rows is None:
            # template order: every module's tokens before the input, then every module's tokens after it
            prompts = [(e.branch.prompt(), e.branch.length - e.branch.after) for e in active]
            p_before = torch.cat([p[:n] for p, n in prompts], 0).to(embeds.dtype)
            p_after = torch.cat([p[n:] for p, n in prompts], 0).to(embeds.dtype)
            rows_before = p_before.unsqueeze(0).expand(B, -1, -1)
            rows_after = p_after.unsqueeze(0).expand(B, -1, -1)
        else:
            # one adapter's virtual tokens per row (every row has the same layout: _row_prompts)
            per = {}
            for name, entries in active.items():
                prompts = [(e.branch.prompt(), e.branch.length - e.branch.after) for e in entries]
                per[name] = (torch.cat([p[:n] for p, n in prompts], 0).to(embeds.dtype),
                             torch.cat([p[n:] for p, n in prompts], 0).to(embeds.dtype))
            rows_before = torch.stack([per[n][0] for n in rows.names])
            rows_after = torch.stack([per[n][1] for n in rows.names])
            p_before, p_after = rows_before[0], rows_after[0]
        Lb, La = p_before.shape[0], p_after.shape[0]
        L = Lb + La
        past_len = _cache_length(call.get("past_key_values"))
        if past_len == 0 and call.get("past_key_values") is not None:
            _check_cache_room(call["past_key_values"])
        if limit is not None and past_len + T + L > limit:
            # else an index error deep in the embeddings (a device-side assert on CUDA)
            raise ModelError(
                f"{T} tokens{f' after {past_len} cached' if past_len else ''} + {L} virtual tokens exceed the "
                f"{limit} positions of {self.model_name}: truncate the input to {limit - L - past_len} tokens"
            )
        first = min(1, T) if encoder and past_len == 0 else 0  # encoders keep their first ([CLS]) token first
        mask = call.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            # in a cached step the mask covers the past tokens too: the virtual columns go where the
            # prefill put them (the cache holds them there)
            m_at = _after_input(mask, B, mask.shape[1], encoder, first, mask.device)
            ml = _Layout(first, m_at, Lb, La, mask.shape[1])
            call["attention_mask"] = ml.insert(mask, mask.new_ones(B, Lb), mask.new_ones(B, La))
        if call.get("cache_position") is not None:
            cp = call["cache_position"]
            if past_len == 0:
                call["cache_position"] = torch.arange(T + L, device=cp.device, dtype=cp.dtype) + cp[:1]
            else:
                call["cache_position"] = cp + L
        if past_len > 0:
            if call.get("position_ids") is not None:
                call["position_ids"] = call["position_ids"] + L
            call["inputs_embeds"] = embeds
            call.pop("input_ids", None)
            return (), call
        at = _after_input(mask if mask is not None and mask.dim() == 2 and mask.shape[1] == T else None,
                          B, T, encoder, first, embeds.device)
        layout = _Layout(first, at, Lb, La, T)
        rows = torch.arange(B, device=embeds.device)
        pid = call.get("position_ids")
        if pid is not None:
            pid = pid.expand(B, -1) if pid.shape[0] == 1 else pid
            j = torch.arange(T, device=pid.device)
            shifted = pid + Lb * (j >= first) + La * (j >= at[:, None])
            # virtual tokens continue the numbering of the token they follow
            start_b = (pid[:, first - 1] + 1) if first else pid.new_zeros(B)
            prev = (at - 1).clamp_min(0)
            # (with nothing between the blocks, the second starts right after the first)
            start_a = torch.where(at > first, shifted[rows, prev] + 1, start_b + Lb)
            vb = start_b[:, None] + torch.arange(Lb, device=pid.device, dtype=pid.dtype)
            va = start_a[:, None] + torch.arange(La, device=pid.device, dtype=pid.dtype)
            call["position_ids"] = torch.cat([vb, va, shifted], 1).gather(1, layout.order)
        embeds = layout.insert(embeds, rows_before, rows_after)
        tt = call.get("token_type_ids")
        if tt is not None and tt.shape[:2] == (B, T):
            # after the input, the segment of the token they follow (a sentence pair's second segment)
            tt_after = tt[rows, (at - 1).clamp_min(0)][:, None].expand(B, La)
            call["token_type_ids"] = layout.insert(tt, tt.new_zeros(B, Lb), tt_after)
        if score is not None and pad_id is not None and ids is not None and ids.shape == (B, T):
            virtual = ids.new_ones(B, L, dtype=torch.bool)
            real = layout.insert(ids != pad_id, virtual[:, :Lb], virtual[:, Lb:])
            positions = torch.arange(T + L, device=ids.device)
            self.pool_at = (positions * real).argmax(-1)  # the rightmost non-pad token, as transformers finds it
        labels = call.get("labels")
        if labels is not None and labels.dim() == 2 and labels.shape == (B, T):
            call["labels"] = layout.insert(labels, labels.new_full((B, Lb), -100), labels.new_full((B, La), -100))
        call["inputs_embeds"] = embeds
        call.pop("input_ids", None)
        return (), call


    def pooled_last(self, module, args, out):
        at, self.pool_at = self.pool_at, None
        if at is None or not isinstance(out, Tensor) or out.dim() != 3 or out.shape[0] != at.shape[0]:
            return None
        picked = out[torch.arange(out.shape[0], device=out.device), at.to(out.device)]
        return torch.cat([out[:, :-1], picked.unsqueeze(1)], 1)
