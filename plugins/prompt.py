"""Prompt tuning (Lester et al., 2021, arXiv 2104.08691) and P-tuning (Liu et al., 2021,
arXiv 2103.10385): L virtual tokens at the input embeddings.

Prompt tuning trains the L embeddings directly (random init, or the embeddings of given words /
token ids). P-tuning produces them with a prompt encoder: BiLSTM + MLP (the paper) or an MLP,
and may place them at template positions: ``template: [3, input, 3]`` puts the first three
virtual tokens before the input and the other three after it (the paper's "[P] x [P]").

The virtual tokens are inserted by one forward pre-hook on the model, which rewrites the call:
``input_ids`` become ``inputs_embeds`` with the prompt inserted, and ``attention_mask``,
``token_type_ids``, ``position_ids``, ``cache_position`` and ``labels`` are extended to match.
The tokens before the input go in front on decoders and right after the first token on
encoders, so the pooled token of a classifier stays the model's own ``[CLS]``. The tokens after
the input go right after each example's last real token (before its right padding) on decoders,
and right before it on encoders, so an encoder's closing ``[SEP]``/``</s>`` stays last as in the
P-tuning reference (``[CLS] P x P [SEP]``). During cached generation only the mask and positions
are extended: the prompt sits in the cache from the first step, and generated tokens follow the
tokens placed after the input. A call without a cache cannot tell generated text from the input:
it wraps all of it, so ``generate(use_cache=False)`` differs from ``generate()`` when tokens go
after the input.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from unipelt.arch import ModelInfo, ResolvedSite
from unipelt.errors import ModelError, SpecError, excerpt
from unipelt.hookspecs import hookimpl
from unipelt.registry import MethodDef


@dataclass
class PromptConfig:
    """length: L virtual tokens. init: ``random`` (N(0, init_std)), ``vocab`` (embeddings of
    random vocabulary tokens), ``text`` (embeddings of ``init_text``'s tokens, repeated or cut to
    L; needs the model's tokenizer in its local directory) or ``token_ids`` (given ids)."""

    length: int = field(default=20, metadata={"min": 1})
    init: Literal["random", "vocab", "text", "token_ids"] = "random"
    init_text: str | None = None
    token_ids: list[int] | None = None
    init_std: float = field(default=0.02, metadata={"min": 0})
    default_sites = ("embed",)

    def validate(self):
        if self.init == "text" and not self.init_text:
            return "init_text", "init: text needs init_text (the words whose embeddings start the prompt)"
        if self.init == "token_ids" and not self.token_ids:
            return "token_ids", "init: token_ids needs a list of token ids"
        # given but unused would silently start from another init than the one written
        if self.token_ids is not None and self.init != "token_ids":
            return "token_ids", f"token_ids is used only with init: token_ids (init is {self.init!r})"
        if self.init_text is not None and self.init != "text":
            return "init_text", f"init_text is used only with init: text (init is {self.init!r})"
        return None

    def check_site(self, site: ResolvedSite, model: ModelInfo) -> tuple[str, str] | None:
        problem = _check_length(self.length, model)
        if problem is not None:
            return "length", problem
        vocab = site.module.weight.shape[0] if hasattr(site.module, "weight") else None
        if self.token_ids and vocab is not None:
            bad = [i for i in self.token_ids if not 0 <= i < vocab]
            if bad:
                return "token_ids", f"token ids {excerpt(bad)} are outside the model's vocabulary (0..{vocab - 1})"
        return None


def _check_length(length: int, model: ModelInfo) -> str | None:
    """Virtual tokens take positions: L of them must leave room for at least one input token in
    the position table (BERT, RoBERTa, GPT-2) or the trained context (rotary models)."""
    limit = _position_limit(model.model)
    if limit is None:
        cfg = model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        limit = getattr(cfg, "max_position_embeddings", None)
        if not isinstance(limit, int) or isinstance(limit, bool):
            return None
    if length >= limit:
        return (f"{length} virtual tokens leave no room for the input in the {limit} positions of "
                f"{type(model.model).__name__}; at most {limit - 1}")
    return None


@dataclass
class PTuningConfig:
    """length: L virtual tokens (default 20; with a template, the template's count).
    encoder: ``lstm`` (BiLSTM + MLP, the paper), ``mlp``, or ``none`` (the L vectors themselves:
    what ``drop_reparameterization`` leaves after training). hidden: the encoder width.
    template: where the virtual tokens sit around the input, as segments: counts of virtual
    tokens and ``input`` once, e.g. ``[3, input, 3]`` (3 before, 3 after), ``[input, 4]`` or
    ``[5, input]`` (the default placement: all in front). The encoder runs over all L tokens in
    template order, so the tokens after the input are conditioned on those before it."""

    length: int | None = field(default=None, metadata={"min": 1})
    encoder: Literal["lstm", "mlp", "none"] = "lstm"
    hidden: int = field(default=512, metadata={"min": 2})
    init_std: float = field(default=1.0, metadata={"min": 0})
    template: list[int | Literal["input"]] | None = None
    default_sites = ("embed",)

    def __post_init__(self):
        self._given_length = self.length
        counts = [x for x in self.template or [] if not isinstance(x, str)]
        if self.length is None:
            self.length = sum(counts) if self.template else 20

    def validate(self):
        if self.template is None:
            return None
        if self.template.count("input") != 1:
            return "template", (f"expected the input exactly once among the segments, e.g. [3, input, 3]; "
                                f"got {excerpt(self.template)}")
        if any(x < 0 for x in self.template if not isinstance(x, str)):
            return "template", f"virtual token counts must be >= 0, got {excerpt(self.template)}"
        total = sum(x for x in self.template if not isinstance(x, str))
        if total == 0:
            return "template", f"the template places no virtual token: {excerpt(self.template)}"
        if self._given_length is not None and self._given_length != total:
            return "length", (f"length {self._given_length} disagrees with the template's {total} virtual tokens "
                              f"({excerpt(self.template)}); leave length out or set it to {total}")
        return None

    def check_site(self, site: ResolvedSite, model: ModelInfo) -> tuple[str, str] | None:
        problem = _check_length(self.length, model)
        if problem is None:
            return None
        # the length is the template's when only the template was written
        return ("template" if self.template is not None and self._given_length is None else "length"), problem

    def split(self) -> tuple[int, int]:
        """(virtual tokens before the input, virtual tokens after it)."""
        if self.template is None:
            return self.length, 0
        i = self.template.index("input")
        return sum(self.template[:i]), sum(self.template[i + 1:])


class PromptBranch(nn.Module):
    """``prompt()`` -> (L, d) virtual token embeddings."""

    reads = "embed"
    mergeable = False

    def __init__(self, length: int, after: int = 0):
        super().__init__()
        self.length = length
        self.after = after  # the last `after` of the L virtual tokens go after the input

    def num_params(self, kept: bool) -> int:
        return sum(p.numel() for p in self.parameters())

    def attach(self, *, model, state, site, entry) -> None:
        attach_embed(model, state, entry)

    def detach_from(self, *, model, state, entry) -> None:
        detach_embed(model, state, entry)


class PromptTuning(PromptBranch):
    def __init__(self, cfg: PromptConfig, embedding: nn.Embedding, model_info):
        super().__init__(cfg.length)
        d = embedding.weight.shape[1]
        with torch.no_grad():
            if cfg.init == "random":
                init = torch.randn(cfg.length, d) * cfg.init_std
            else:
                if cfg.init == "vocab":
                    ids = torch.randint(0, embedding.weight.shape[0], (cfg.length,))
                elif cfg.init == "token_ids":
                    ids = torch.tensor(cfg.token_ids)
                else:
                    ids = torch.tensor(_tokenize(model_info, cfg.init_text))
                if int(ids.max()) >= embedding.weight.shape[0] or int(ids.min()) < 0:
                    bad = [int(i) for i in ids if not 0 <= int(i) < embedding.weight.shape[0]]
                    raise SpecError(f"token ids {bad} are outside the model's vocabulary "
                                    f"(0..{embedding.weight.shape[0] - 1})", path="token_ids")
                ids = ids.repeat((cfg.length + len(ids) - 1) // len(ids))[: cfg.length]
                init = embedding.weight[ids].detach().float().cpu().clone()
        self.embedding = nn.Parameter(init)

    def prompt(self) -> Tensor:
        return self.embedding


class PTuning(PromptBranch):
    def __init__(self, cfg: PTuningConfig, d: int):
        super().__init__(cfg.length, after=cfg.split()[1])
        self.encoder_kind = cfg.encoder
        self.embedding = nn.Parameter(torch.randn(cfg.length, d) * cfg.init_std)
        if cfg.encoder == "lstm":
            self.lstm = nn.LSTM(d, cfg.hidden // 2, num_layers=2, bidirectional=True, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, d))
        elif cfg.encoder == "mlp":
            self.mlp = nn.Sequential(nn.Linear(d, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, d))

    def prompt(self) -> Tensor:
        x = self.embedding
        if self.encoder_kind == "none":
            return x
        if self.encoder_kind == "lstm":
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)
        return self.mlp(x)

    @torch.no_grad()
    def materialize(self) -> dict:
        """Keep only the L produced vectors (the encoder is a training-time reparameterisation)."""
        if self.encoder_kind == "none":
            return {}
        self.embedding = nn.Parameter(self.prompt().detach().clone())
        for name in ("lstm", "mlp"):
            if name in self._modules:
                del self._modules[name]
        self.encoder_kind = "none"
        return {"encoder": "none", "hidden": None}

    def num_params(self, kept: bool) -> int:
        # after training only the L produced vectors need keeping
        return self.length * self.embedding.shape[1] if kept else sum(p.numel() for p in self.parameters())


def _tokenize(model_info, text: str) -> list[int]:
    from transformers import AutoTokenizer

    path = getattr(model_info.config, "_name_or_path", "") or ""
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means: no local tokenizer
        # the first line only: hub errors append several lines of advice about connectivity
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"init: text needs the model's tokenizer in its local directory ({path or 'unknown'}): {first}"
        ) from None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ModelError("init_text tokenizes to nothing")
    return ids


# ------------------------------------------------------------------------------------------
# the call rewrite
# ------------------------------------------------------------------------------------------
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


def attach_embed(model: nn.Module, state, entry) -> None:
    entries = state.__dict__.setdefault("embed_entries", [])
    entries.append(entry)
    if len(entries) > 1:
        return
    signature = inspect.signature(model.forward)
    encoder = not state.info.causal
    ctx = state.ctx
    embed_fn = model.get_input_embeddings()
    limit = _position_limit(model)
    # A decoder's sequence classifier (GPT-2's and transformers' generic one, both named `score`)
    # pools the last token that is not padding, found from input_ids; given inputs_embeds it pools
    # the last position, a pad on right-padded batches. The pre-hook works out the right index
    # from the ids and the score hook moves that token's logits to the last position.
    pool: dict[str, Tensor | None] = {"at": None}
    score = model._modules.get("score") if not encoder else None
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    pad_id = getattr(text_cfg, "pad_token_id", None)

    def pre(module, args, kwargs):
        pool["at"] = None
        active = [e for e in entries if e.adapter in ctx.active]
        if not active:
            return None
        bound = signature.bind_partial(*args, **kwargs)
        call = dict(bound.arguments)
        call.update(call.pop("kwargs", {}) or {})
        ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
        if embeds is None:
            if ids is None:
                return None
            embeds = embed_fn(ids)
        B, T = embeds.shape[:2]
        # template order: every module's tokens before the input, then every module's tokens after it
        prompts = [(e.branch.prompt(), e.branch.length - e.branch.after) for e in active]
        p_before = torch.cat([p[:n] for p, n in prompts], 0).to(embeds.dtype)
        p_after = torch.cat([p[n:] for p, n in prompts], 0).to(embeds.dtype)
        Lb, La = p_before.shape[0], p_after.shape[0]
        L = Lb + La
        past_len = _cache_length(call.get("past_key_values"))
        if past_len == 0 and call.get("past_key_values") is not None:
            _check_cache_room(call["past_key_values"])
        if limit is not None and past_len + T + L > limit:
            # else an index error deep in the embeddings (a device-side assert on CUDA)
            raise ModelError(
                f"{T} tokens{f' after {past_len} cached' if past_len else ''} + {L} virtual tokens exceed the "
                f"{limit} positions of {type(model).__name__}: truncate the input to {limit - L - past_len} tokens"
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
        embeds = layout.insert(embeds, p_before.unsqueeze(0).expand(B, Lb, -1), p_after.unsqueeze(0).expand(B, La, -1))
        tt = call.get("token_type_ids")
        if tt is not None and tt.shape[:2] == (B, T):
            # after the input, the segment of the token they follow (a sentence pair's second segment)
            tt_after = tt[rows, (at - 1).clamp_min(0)][:, None].expand(B, La)
            call["token_type_ids"] = layout.insert(tt, tt.new_zeros(B, Lb), tt_after)
        if score is not None and pad_id is not None and ids is not None and ids.shape == (B, T):
            virtual = ids.new_ones(B, L, dtype=torch.bool)
            real = layout.insert(ids != pad_id, virtual[:, :Lb], virtual[:, Lb:])
            positions = torch.arange(T + L, device=ids.device)
            pool["at"] = (positions * real).argmax(-1)  # the rightmost non-pad token, as transformers finds it
        labels = call.get("labels")
        if labels is not None and labels.dim() == 2 and labels.shape == (B, T):
            call["labels"] = layout.insert(labels, labels.new_full((B, Lb), -100), labels.new_full((B, La), -100))
        call["inputs_embeds"] = embeds
        call.pop("input_ids", None)
        return (), call

    def pooled_last(module, args, out):
        at, pool["at"] = pool["at"], None
        if at is None or not isinstance(out, Tensor) or out.dim() != 3 or out.shape[0] != at.shape[0]:
            return None
        picked = out[torch.arange(out.shape[0], device=out.device), at.to(out.device)]
        return torch.cat([out[:, :-1], picked.unsqueeze(1)], 1)

    # prepend: the rewrite runs before unipelt's own pre-hook reads the attention mask
    state.hooks["embed:root"] = [model.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)]
    if score is not None:
        state.hooks["embed:root"].append(score.register_forward_hook(pooled_last))


def detach_embed(model: nn.Module, state, entry) -> None:
    entries = state.__dict__.get("embed_entries", [])
    if entry in entries:
        entries.remove(entry)
    if not entries:
        for h in state.hooks.pop("embed:root", []):
            h.remove()


METHODS = [
    MethodDef(name="prompt", config=PromptConfig, site_kinds=frozenset({"embed"}),
              summary="prompt tuning: L trainable virtual token embeddings at the input", gateable=False),
    MethodDef(name="p_tuning", config=PTuningConfig, site_kinds=frozenset({"embed"}),
              summary="P-tuning: virtual tokens produced by a prompt encoder (BiLSTM + MLP, or MLP), optionally at template positions",
              gateable=False),
]


@hookimpl
def unipelt_methods():
    return METHODS


@hookimpl
def unipelt_build_branch(method, config, node, site, model, shared):
    if method.name == "prompt":
        return PromptTuning(config, site.module, model)
    if method.name == "p_tuning":
        return PTuning(config, site.module.weight.shape[1])
    return None
