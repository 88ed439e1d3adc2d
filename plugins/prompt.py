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

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from unipelt.arch import ModelInfo, ResolvedSite
from unipelt.errors import ModelError, SpecError, excerpt
from unipelt.hookspecs import hookimpl
from unipelt.inputs import _position_limit
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
            self.__dict__["_lstm_params"] = dict(self.lstm.named_parameters())
            self._lstm_shape = (self.lstm.num_layers, self.lstm.hidden_size)
            self.mlp = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, d))
        elif cfg.encoder == "mlp":
            self.mlp = nn.Sequential(nn.Linear(d, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, d))

    def prompt(self) -> Tensor:
        x = self.embedding
        if self.encoder_kind == "none":
            return x
        if self.encoder_kind == "lstm":
            # torch.compile cannot trace nn.LSTM (a graph break): the same parameters, unrolled
            # (dynamo refuses even to touch an nn.LSTM module: the unrolled path reads its
            # parameters through a plain dict kept beside it)
            if torch.compiler.is_compiling():
                x = _bilstm_unrolled(self.__dict__["_lstm_params"], self._lstm_shape, x)
            else:
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
        self.__dict__.pop("_lstm_params", None)
        self.encoder_kind = "none"
        return {"encoder": "none", "hidden": None}

    def num_params(self, kept: bool) -> int:
        # after training only the L produced vectors need keeping
        return self.length * self.embedding.shape[1] if kept else sum(p.numel() for p in self.parameters())


def _bilstm_unrolled(params: dict[str, Tensor], shape: tuple[int, int], x: Tensor) -> Tensor:
    """``lstm(x[None])[0][0]`` for a bidirectional, batch-first, bias-carrying ``nn.LSTM`` with
    ``params = dict(lstm.named_parameters())`` and ``shape = (num_layers, hidden_size)``, computed
    step by step (gate order i, f, g, o as nn.LSTM documents)."""
    num_layers, hidden = shape
    for layer in range(num_layers):
        outs = []
        for suffix in ("", "_reverse"):
            w_ih = params[f"weight_ih_l{layer}{suffix}"]
            w_hh = params[f"weight_hh_l{layer}{suffix}"]
            b = params[f"bias_ih_l{layer}{suffix}"] + params[f"bias_hh_l{layer}{suffix}"]
            xs = x.flip(0) if suffix else x
            gx = xs @ w_ih.T + b  # (L, 4H)
            h = x.new_zeros(hidden)
            c = x.new_zeros(hidden)
            hs = []
            for t in range(xs.shape[0]):
                i, f, g, o = (gx[t] + w_hh @ h).chunk(4)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                hs.append(h)
            out = torch.stack(hs)
            outs.append(out.flip(0) if suffix else out)
        x = torch.cat(outs, -1)
    return x


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
