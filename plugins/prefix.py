"""Prefix tuning (Li & Liang, 2021, arXiv 2101.00190) and P-tuning v2 (Liu et al., 2022,
arXiv 2110.07602): learned keys and values prepended inside attention at every layer.

Per layer, L key and L value vectors per key-value head, P_k, P_v ∈ R^{H_kv×L×D}, are
concatenated to K and V inside attention (after RoPE, never written to the KV cache): every
query attends to them, they attend to nothing. Training-time reparameterisation (prefix
tuning): P = MLP(E), E ∈ R^{L×d}, MLP = Linear(d, h)–tanh–Linear(h, layers·2·H_kv·D), shared by
all layers (the reference) or one per layer; after training only P is kept
(``AdapterHandle.drop_reparameterization``). P-tuning v2 is the same without reparameterisation.
Gated (UniPELT): G_P multiplies P_k and P_v (one shared gate, or one each).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from unipelt.arch import ModelInfo, ResolvedSite
from unipelt.hookspecs import hookimpl
from unipelt.registry import MethodDef


@dataclass
class PrefixConfig:
    """length: L virtual key/value positions per layer. reparam: ``mlp`` (train P = MLP(E)) or
    ``none`` (train P directly). reparam_hidden: h, the MLP width (reference: 512; MAM: 800).
    reparam_shared: one MLP for all layers (the reference) or one per layer. init_std: std of
    E (mlp) or of P (none); 1.0 matches the references' ``nn.Embedding`` init.
    dropout: on the prefix vectors while training."""

    length: int = field(default=10, metadata={"min": 1})
    reparam: Literal["mlp", "none"] = "mlp"
    reparam_hidden: int = field(default=512, metadata={"min": 1})
    reparam_shared: bool = True
    init_std: float = field(default=1.0, metadata={"min": 0})
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.99})
    default_sites = ("attn.kv",)

    def check_site(self, site: ResolvedSite, model: ModelInfo) -> tuple[str, str] | None:
        # The prefix takes no position, but every query attends to its L keys: the published
        # lengths are 10-200, and one longer than the model's context is a typo that would
        # allocate L x d per layer and L more keys for every query
        context = context_length(model)
        if context is not None and self.length > context:
            return "length", (f"length {self.length} is longer than the {context} positions of the model's context; "
                              f"at most {context}")
        return None


def context_length(model: ModelInfo) -> int | None:
    """The context the model was trained for (``max_position_embeddings``, GPT-2's ``n_positions``)."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for name in ("max_position_embeddings", "n_positions"):
        v = getattr(text, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


@dataclass
class PTuningV2Config(PrefixConfig):
    """P-tuning v2: deep prompts at every layer, no reparameterisation (its defaults)."""

    length: int = field(default=20, metadata={"min": 1})
    reparam: Literal["mlp", "none"] = "none"
    default_sites = ("attn.kv",)


def kv_heads(model) -> tuple[int, int]:
    """(number of key-value heads, head dimension) of the model's attention."""
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or model.hidden_size // heads
    return int(kv), int(head_dim)


class PrefixMLP(nn.Module):
    """E ∈ R^{L×d} and Linear(d, h)–tanh–Linear(h, n·2·H_kv·D): the training-time reparameterisation."""

    def __init__(self, length: int, d: int, hidden: int, n_layers: int, kv_width: int, init_std: float):
        super().__init__()
        self.length, self.n_layers, self.kv_width = length, n_layers, kv_width
        self.embedding = nn.Parameter(torch.randn(length, d) * init_std)
        self.up = nn.Linear(d, hidden)
        self.out = nn.Linear(hidden, n_layers * 2 * kv_width)

    def layer_prefix(self, pos: int) -> Tensor:
        """(L, 2·H_kv·D) for the pos-th layer of the node: only that layer's rows of the output
        projection are computed, so no tensor is shared between layers (gradient checkpointing
        recomputes each layer on its own)."""
        h = torch.tanh(self.up(self.embedding))
        w = 2 * self.kv_width
        return nn.functional.linear(h, self.out.weight[pos * w:(pos + 1) * w], self.out.bias[pos * w:(pos + 1) * w])

    def num_params(self, kept: bool) -> int:
        return 0 if kept else sum(p.numel() for p in self.parameters())


class PrefixBranch(nn.Module):
    """The prefix of one layer: ``prefix()`` -> (P_k, P_v), each (H_kv, L, D)."""

    reads = "kv"
    mergeable = False

    def __init__(self, cfg: PrefixConfig, kv: int, head_dim: int, d: int, pos: int, shared: PrefixMLP | None):
        super().__init__()
        self.length, self.kv, self.head_dim, self.pos = cfg.length, kv, head_dim, pos
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.__dict__["shared"] = shared  # owned by the adapter, not by this layer
        self.own_mlp = None
        self.prefix_kv = None
        if cfg.reparam == "none":
            self.prefix_kv = nn.Parameter(torch.randn(2, kv, cfg.length, head_dim) * cfg.init_std)
        elif shared is None:
            self.own_mlp = PrefixMLP(cfg.length, d, cfg.reparam_hidden, 1, kv * head_dim, cfg.init_std)

    def prefix(self) -> tuple[Tensor, Tensor]:
        if self.prefix_kv is not None:
            p = self.prefix_kv
        else:
            mlp = self.own_mlp if self.own_mlp is not None else self.shared
            flat = mlp.layer_prefix(0 if self.own_mlp is not None else self.pos)  # (L, 2·H·D)
            p = flat.view(self.length, 2, self.kv, self.head_dim).permute(1, 2, 0, 3)
        p = self.dropout(p)
        return p[0], p[1]

    def num_params(self, kept: bool) -> int:
        if kept:
            return 2 * self.kv * self.length * self.head_dim
        return sum(p.numel() for p in self.parameters())

    # -- after training: keep only P ---------------------------------------------------------
    @torch.no_grad()
    def materialize(self) -> dict:
        """Keep only P; returns the spec fields that describe the branch from now on."""
        was_training = self.training
        self.eval()  # prefix dropout must not be baked into the kept prefix
        pk, pv = self.prefix()
        self.train(was_training)
        self.prefix_kv = nn.Parameter(torch.stack([pk, pv]).detach().clone())
        self.own_mlp = None
        self.__dict__["shared"] = None
        return {"reparam": "none", "reparam_hidden": None, "reparam_shared": None}

    # -- attention-level injection (attached by the core: unipelt.sites, kind kv) ----------
    def kv_prefix(self, *, ctx, entry, batch: int, site_key: str, dtype):
        from unipelt.attention import KVPrefix
        from unipelt.runtime import gate_value

        folded = self._folded(ctx, entry, dtype)
        if folded is not None:
            return KVPrefix(key=folded[0], value=folded[1])
        pk, pv = self.prefix()
        pk, pv = pk.to(dtype).unsqueeze(0), pv.to(dtype).unsqueeze(0)  # (1, H_kv, L, D)
        query_gate = value_gate = None
        if entry.gate is not None:
            # from the layer's group executor when one computes it (with LoRA's x·A on attn.in)
            src = ctx.stash.get(site_key)
            if ctx.seg is not None and src is not None:  # a mixed batch's segment: its rows only
                src = ctx.rows_of(src, ctx.seg)
            g = gate_value(entry, src, ctx).to(dtype)  # (B, T or 1, k)
            if g.shape[1] == 1:  # one value per example: scale P_k and P_v directly
                gk = g[:, 0, 0].view(-1, 1, 1, 1)
                gv = g[:, 0, -1].view(-1, 1, 1, 1)  # == gk for a shared K/V gate
                pk, pv = pk * gk, pv * gv
            else:  # per token (causal-safe): each query sees the prefix scaled by its own gate
                query_gate = g[..., :1].unsqueeze(1)  # (B, 1, T, 1)
                if g.shape[-1] > 1:  # separate K/V gates: the second output scales P_v
                    value_gate = g[..., -1:].unsqueeze(1)
        return KVPrefix(key=pk, value=pv, query_gate=query_gate, value_gate=value_gate)


    _fold_cache: tuple | None = None

    def _folded(self, ctx, entry, dtype) -> tuple[Tensor, Tensor] | None:
        """g·P_k and g·P_v under a constant gate (a collapsed adapter, ``unipelt.collapse``) for an
        eager inference call: computed once and kept until P, the gate or the dtype changes (their
        tensor versions are the key), so a collapsed layer's prefix costs no per-forward scaling.
        The products are the per-call ones, bit for bit (same dtype, same operands). Not used where
        the per-call path does more than scale: training or gradients into P (the products must be
        in the graph), a mixed batch (the prefix is laid out per segment), recorded or logged gates
        (``AdapterHandle.gates``, the pruning controllers read the constant too), and under
        torch.compile, where the scaling fuses into the key/value concatenation anyway."""
        from unipelt.pruning import ConstantGate

        gate, p = entry.gate, self.prefix_kv
        if (not isinstance(gate, ConstantGate) or p is None or self.training or torch.compiler.is_compiling()
                or (torch.is_grad_enabled() and p.requires_grad) or ctx.rows is not None
                or ctx.record is not None or ctx.gate_log is not None):
            return None
        key = (id(p), p._version, id(gate.value), gate.value._version, p.device, dtype)
        cached = self._fold_cache
        if cached is None or cached[0] != key:
            g = gate.value.to(device=p.device, dtype=dtype)  # ConstantGate.forward's cast, then gate_value's
            # (1, H_kv, L, D) each, as the per-call path's pk * gk with gk = g[0], gv = g[-1]
            pk = p[0].detach().to(dtype).unsqueeze(0) * g[0]
            pv = p[1].detach().to(dtype).unsqueeze(0) * g[-1]
            cached = (key, pk, pv)
            self.__dict__["_fold_cache"] = cached  # a plain attribute: not a buffer, never saved
        return cached[1], cached[2]


METHODS = [
    MethodDef(name="prefix", config=PrefixConfig, site_kinds=frozenset({"kv"}),
              summary="prefix tuning: L learned keys/values per layer inside attention, MLP-reparameterised while training",
              default_gate_input="layer"),
    MethodDef(name="p_tuning_v2", config=PTuningV2Config, site_kinds=frozenset({"kv"}),
              summary="P-tuning v2: deep prompts (prefix keys/values) at every layer, no reparameterisation",
              default_gate_input="layer"),
]


@hookimpl
def unipelt_methods():
    return METHODS


def _layers_of(node, model) -> list[int]:
    return node.layers.resolve(model.num_layers, source=None)


@hookimpl
def unipelt_build_shared(method, config, node, model):
    if method.name not in ("prefix", "p_tuning_v2") or config.reparam != "mlp" or not config.reparam_shared:
        return None
    kv, hd = kv_heads(model)
    return PrefixMLP(config.length, model.hidden_size, config.reparam_hidden, len(_layers_of(node, model)), kv * hd, config.init_std)


@hookimpl
def unipelt_build_branch(method, config, node, site, model, shared):
    if method.name not in ("prefix", "p_tuning_v2"):
        return None
    kv, hd = kv_heads(model)
    pos = _layers_of(node, model).index(site.layer)
    return PrefixBranch(config, kv, hd, model.hidden_size, pos, shared)
