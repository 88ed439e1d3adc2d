"""Prompt tuning (Lester et al., 2021, arXiv 2104.08691) and P-tuning (Liu et al., 2021,
arXiv 2103.10385): L virtual tokens at the input embeddings.

Prompt tuning trains the L embeddings directly (random init, or the embeddings of given words /
token ids). P-tuning produces them with a prompt encoder: BiLSTM + MLP (the paper) or an MLP.

The virtual tokens are inserted by one forward pre-hook on the model, which rewrites the call:
``input_ids`` become ``inputs_embeds`` with the prompt inserted, and ``attention_mask``,
``token_type_ids``, ``position_ids``, ``cache_position`` and ``labels`` are extended to match.
Decoders get the prompt in front; encoders right after their first token, so the pooled token of
a classifier stays the model's own ``[CLS]``. During cached generation only the mask and
positions are extended: the prompt sits in the cache from the first step.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from unipelt.errors import ModelError
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
        return None


@dataclass
class PTuningConfig:
    """length: L virtual tokens. encoder: ``lstm`` (BiLSTM + MLP, the paper) or ``mlp``.
    hidden: the encoder width."""

    length: int = field(default=20, metadata={"min": 1})
    encoder: Literal["lstm", "mlp"] = "lstm"
    hidden: int = field(default=512, metadata={"min": 2})
    init_std: float = field(default=1.0, metadata={"min": 0})
    default_sites = ("embed",)


class PromptBranch(nn.Module):
    """``prompt()`` -> (L, d) virtual token embeddings."""

    reads = "embed"
    mergeable = False

    def __init__(self, length: int):
        super().__init__()
        self.length = length

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
                    raise ModelError(f"prompt init token ids out of the vocabulary (size {embedding.weight.shape[0]})")
                ids = ids.repeat((cfg.length + len(ids) - 1) // len(ids))[: cfg.length]
                init = embedding.weight[ids].detach().float().cpu().clone()
        self.embedding = nn.Parameter(init)

    def prompt(self) -> Tensor:
        return self.embedding


class PTuning(PromptBranch):
    def __init__(self, cfg: PTuningConfig, d: int):
        super().__init__(cfg.length)
        self.encoder_kind = cfg.encoder
        self.embedding = nn.Parameter(torch.randn(cfg.length, d) * cfg.init_std)
        if cfg.encoder == "lstm":
            self.lstm = nn.LSTM(d, cfg.hidden // 2, num_layers=2, bidirectional=True, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, d))
        else:
            self.mlp = nn.Sequential(nn.Linear(d, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, d))

    def prompt(self) -> Tensor:
        x = self.embedding
        if self.encoder_kind == "lstm":
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)
        return self.mlp(x)

    def num_params(self, kept: bool) -> int:
        # after training only the L produced vectors need keeping
        return self.length * self.embedding.shape[1] if kept else sum(p.numel() for p in self.parameters())


def _tokenize(model_info, text: str) -> list[int]:
    from transformers import AutoTokenizer

    path = getattr(model_info.config, "_name_or_path", "") or ""
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means: no local tokenizer
        raise ModelError(f"init: text needs the model's tokenizer in its local directory ({path or 'unknown'}): {e}") from None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ModelError("init_text tokenizes to nothing")
    return ids


# ------------------------------------------------------------------------------------------
# the call rewrite
# ------------------------------------------------------------------------------------------
def _cache_length(past) -> int:
    if past is None:
        return 0
    try:
        return int(past.get_seq_length())
    except (AttributeError, TypeError):
        return 0


def attach_embed(model: nn.Module, state, entry) -> None:
    entries = state.__dict__.setdefault("embed_entries", [])
    entries.append(entry)
    if len(entries) > 1:
        return
    signature = inspect.signature(model.forward)
    encoder = not state.info.causal
    ctx = state.ctx
    embed_fn = model.get_input_embeddings()

    def pre(module, args, kwargs):
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
        prompt = torch.cat([e.branch.prompt() for e in active], dim=0).to(embeds.dtype)
        L = prompt.shape[0]
        past_len = _cache_length(call.get("past_key_values"))
        at = 1 if encoder else 0  # encoders keep their first ([CLS]) token first
        mask = call.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            ones = mask.new_ones(B, L)
            # in a cached step the mask covers past tokens: the prompt sits in front of them
            call["attention_mask"] = torch.cat([mask[:, :at], ones, mask[:, at:]], 1) if past_len == 0 else torch.cat([ones, mask], 1)
        if call.get("cache_position") is not None:
            cp = call["cache_position"]
            call["cache_position"] = torch.cat([torch.arange(L, device=cp.device, dtype=cp.dtype), cp + L]) if past_len == 0 else cp + L
        if call.get("position_ids") is not None:
            pid = call["position_ids"]
            if past_len == 0:
                head = torch.arange(L, device=pid.device, dtype=pid.dtype).expand(pid.shape[0], L)
                call["position_ids"] = torch.cat([pid[:, :at], head + (pid[:, :at].max() + 1 if at else 0), pid[:, at:] + L], 1)
            else:
                call["position_ids"] = pid + L
        if past_len == 0:
            p = prompt.unsqueeze(0).expand(B, L, -1)
            embeds = torch.cat([embeds[:, :at], p, embeds[:, at:]], 1)
            if call.get("token_type_ids") is not None:
                tt = call["token_type_ids"]
                call["token_type_ids"] = torch.cat([tt[:, :at], tt.new_zeros(B, L), tt[:, at:]], 1)
            labels = call.get("labels")
            if labels is not None and labels.dim() == 2 and labels.shape[1] == T:
                call["labels"] = torch.cat([labels[:, :at], labels.new_full((B, L), -100), labels[:, at:]], 1)
        call["inputs_embeds"] = embeds
        call.pop("input_ids", None)
        return (), call

    # prepend: the rewrite runs before unipelt's own pre-hook reads the attention mask
    state.hooks["embed:root"] = [model.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)]


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
              summary="P-tuning: virtual tokens produced by a prompt encoder (BiLSTM + MLP, or MLP)", gateable=False),
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
