"""Bottleneck adapters (Houlsby et al., 2019, arXiv 1902.00751; Pfeiffer et al., 2021,
arXiv 2005.00247; parallel: He et al., 2022, arXiv 2110.04366).

Delta = s · W_up·f(W_down·x + b_down) + b_up, m ≪ d. Serial, Houlsby (``attn.out``, ``ffn.out``):
the branch reads the sublayer's output projection h and the sublayer computes N(x + h + Delta(h)).
Serial, Pfeiffer (``ffn.res``, ``attn.res``): the branch reads a = N(h + x) and the sublayer
computes N(h + x + Delta(a)) (N: the post-LN sublayer's LayerNorm, the identity on pre-LN blocks).
Parallel (``ffn``): the branch reads the FFN input x and the result is FFN(x) + s·Delta(x) (scaled
PA: s = 4, or a learned s).
W_up = 0 and b_up = 0 at init (``near_identity``), so the block starts as the identity.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from unipelt.arch import ModelInfo, ResolvedSite
from unipelt.hookspecs import hookimpl
from unipelt.registry import MethodDef

ACTIVATIONS = {
    "relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity,
}


@dataclass
class AdapterConfig:
    """reduction_factor: m = d // reduction_factor (Pfeiffer/UniPELT: 16). width: m directly
    (overrides reduction_factor). activation: f. scale: s (1 for serial; scaled PA uses 4).
    learned_scale: train s, starting from ``scale``. init: ``near_identity`` (W_down as nn.Linear,
    W_up and biases zero: exact identity at init) or ``bert`` (N(0, init_std) weights, zero
    biases: near identity). dropout: on the adapter's input."""

    reduction_factor: float | None = field(default=16.0, metadata={"min": 1})
    width: int | None = field(default=None, metadata={"min": 1})
    activation: Literal["relu", "gelu", "swish", "silu", "tanh", "identity"] = "relu"
    scale: float = 1.0
    learned_scale: bool = False
    init: Literal["near_identity", "bert"] = "near_identity"
    init_std: float = field(default=0.01, metadata={"min": 0})
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.99})

    def validate(self) -> tuple[str, str] | None:
        if self.width is None and self.reduction_factor is None:  # null for both: no width at all
            return "reduction_factor", "give reduction_factor (m = d // reduction_factor) or width (m itself)"
        return None

    def check_site(self, site: ResolvedSite, model: ModelInfo) -> tuple[str, str] | None:
        # a bottleneck is narrower than the d-wide tensor it reads; m < 1 used to be clamped to 1
        # without a word (reduction_factor 64 on a 32-wide model)
        d = site.out_features
        where = site.site if site.layer is None else f"{site.site} of layer {site.layer}"
        if self.width is not None:
            if self.width > d:
                return "width", f"width {self.width} is wider than the {d}-wide {where}; a bottleneck is at most {d}"
        elif int(d // self.reduction_factor) < 1:
            return "reduction_factor", (f"reduction_factor {self.reduction_factor:g} leaves no width on the {d}-wide "
                                        f"{where} (m = d // reduction_factor = 0); at most {d}")
        return None

    def bottleneck(self, d: int) -> int:
        return self.width if self.width is not None else max(1, int(d // self.reduction_factor))


class AdapterBranch(nn.Module):
    """Delta(x) = s · up(f(down(dropout(x)))): x (..., d) -> (..., d)."""

    def __init__(self, cfg: AdapterConfig, d: int, reads: str):
        super().__init__()
        self.reads = reads
        m = cfg.bottleneck(d)
        self.in_features = self.out_features = d
        self.down = nn.Linear(d, m)
        self.act = ACTIVATIONS[cfg.activation]()
        self.up = nn.Linear(m, d)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        if cfg.learned_scale:
            self.scale = nn.Parameter(torch.tensor(float(cfg.scale)))
        else:
            self.scale = cfg.scale
        with torch.no_grad():
            if cfg.init == "near_identity":
                nn.init.zeros_(self.up.weight)
            else:
                nn.init.normal_(self.down.weight, std=cfg.init_std)
                nn.init.normal_(self.up.weight, std=cfg.init_std)
                nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        d = self.up(self.act(self.down(self.dropout(x))))
        d = d * self.scale
        return d if gate is None else d * gate

    # -- the group protocol (unipelt.types.Shrinkable): the down-projection is computed with
    # the other readers of the adapter's input (its gate), its bias added here
    def shrink_params(self):
        return None if isinstance(self.dropout, nn.Dropout) else (self.down.weight, None)

    def expand(self, u: Tensor, gate: Tensor | None = None) -> Tensor:
        d = self.up(self.act(u + self.down.bias)) * self.scale
        return d if gate is None else d * gate

    mergeable = False


METHOD = MethodDef(
    name="adapter", config=AdapterConfig, site_kinds=frozenset({"output", "io", "renorm"}),
    summary="bottleneck adapter: serial at attn.out/ffn.out (Houlsby) or ffn.res (Pfeiffer), parallel at ffn (PA, scaled PA)",
    default_gate_input="site",
)


@hookimpl
def unipelt_methods():
    return [METHOD]


@hookimpl
def unipelt_build_branch(method, config, node, site, model):
    if method.name != "adapter":
        return None
    return AdapterBranch(config, site.out_features, reads="input" if site.kind == "io" else "output")
