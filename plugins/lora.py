"""LoRA: low-rank updates of a frozen projection (Hu et al., 2021, arXiv 2106.09685).

h = W0·x + s·B·A·x with A ∈ R^{r×d_in}, B ∈ R^{d_out×r} (B = 0 at init), s = alpha/r
(rsLoRA: alpha/sqrt(r)). Dropout acts on x before A. Mergeable: W0 <- W0 + s·B·A.
Gated (UniPELT): the gate replaces s (the reference) or multiplies it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from unipelt.arch import ModelInfo, ResolvedSite
from unipelt.hookspecs import hookimpl
from unipelt.registry import MethodDef


@dataclass
class LoraConfig:
    """r: rank. alpha: scale numerator (default 2r, so s = 2). rslora: s = alpha/sqrt(r).
    dropout: on the input of A. init: A's initialisation (``kaiming``: Kaiming-uniform as in
    the reference; ``gaussian``: N(0, 1/r)); B starts at zero so the layer starts unchanged.
    lr_ratio: LoRA+ learning-rate ratio of B over A (a trainer rule; None = same rate)."""

    r: int = field(default=8, metadata={"min": 1})
    alpha: float | None = field(default=None, metadata={"min": 0})
    rslora: bool = False
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.99})
    init: Literal["kaiming", "gaussian"] = "kaiming"
    lr_ratio: float | None = field(default=None, metadata={"min": 0})

    def check_site(self, site: ResolvedSite, model: ModelInfo) -> tuple[str, str] | None:
        # rank(B·A) <= min(d_in, d_out): a larger r adds parameters and no capacity, and an
        # unchecked r (a typo, an edited unipelt.json) once allocated until the machine ran out
        limit = min(site.in_features, site.out_features)
        if self.r > limit:
            where = site.site if site.layer is None else f"{site.site} of layer {site.layer}"
            return "r", (f"rank {self.r} is more than min(d_in, d_out) = {limit} of {where} "
                         f"({site.in_features} -> {site.out_features}); at most {limit}")
        return None

    @property
    def scale(self) -> float:
        alpha = self.alpha if self.alpha is not None else 2.0 * self.r
        return alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoraBranch(nn.Module):
    """Delta s·B·A·dropout(x): x (..., d_in) -> (..., d_out)."""

    reads = "input"

    def __init__(self, cfg: LoraConfig, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features, self.r = in_features, out_features, cfg.r
        self.scale = cfg.scale
        self.lr_ratio = cfg.lr_ratio
        self.gate_scale: Literal["replace", "multiply"] = "replace"
        self.lora_A = nn.Parameter(torch.empty(cfg.r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, cfg.r))
        if cfg.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1.0 / cfg.r)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def configure_gate(self, spec) -> None:
        self.gate_scale = spec.lora_scale

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        h = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        if gate is None:
            return h * self.scale
        return h * gate if self.gate_scale == "replace" else h * (gate * self.scale)

    # -- the group protocol (unipelt.types.Shrinkable): a group executor computes x·Aᵀ together
    # with the other readers of x; the gate or scale multiplies the r-wide u, not the d_out-wide h
    def shrink_params(self):
        return None if isinstance(self.dropout, nn.Dropout) else (self.lora_A, None)

    def expand(self, u: Tensor, gate: Tensor | None = None) -> Tensor:
        if torch.compiler.is_compiling():
            # compiled: scale the output as the reference does, so inductor fuses it with the
            # addition into the base output (and whatever pointwise op follows) in one kernel
            h = F.linear(u, self.lora_B)
            if gate is None:
                return h * self.scale
            return h * gate if self.gate_scale == "replace" else h * (gate * self.scale)
        if gate is None:
            u = u * self.scale
        else:
            u = u * gate if self.gate_scale == "replace" else u * (gate * self.scale)
        return F.linear(u, self.lora_B)

    def expand_into(self, out: Tensor, u: Tensor, gate: Tensor | None = None) -> Tensor:
        """``out + expand(u, gate)`` with the addition inside the matrix product (addmm) in eager
        mode, where every kernel costs a launch; compiled, the plain sum (inductor fuses it with
        the following pointwise ops, which an addmm output would prevent)."""
        if torch.compiler.is_compiling():
            return out + self.expand(u, gate)
        if gate is None:
            u = u * self.scale
        else:
            u = u * gate if self.gate_scale == "replace" else u * (gate * self.scale)
        if out.dim() < 2 or not out.is_contiguous():
            return out + F.linear(u, self.lora_B)
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), u.reshape(-1, u.shape[-1]), self.lora_B.t())
        return flat.view(out.shape)

    def segment_params(self) -> tuple[Tensor, float]:
        """(W_up, scale) with ``expand(u, None) == F.linear(u * scale, W_up)``: a batch whose rows
        are served by different LoRAs runs as one product with their Bs side by side
        (unipelt.runtime.SiteRuntime.apply_stacked)."""
        return self.lora_B, self.scale

    mergeable = True

    def delta_weight(self) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def param_roles(self) -> dict[str, str]:
        return {"lora_A": "lora_A", "lora_B": "lora_B"}


METHOD = MethodDef(
    name="lora", config=LoraConfig, site_kinds=frozenset({"linear"}),
    summary="LoRA: W0x + (alpha/r)·B·A·x on any linear hook point; mergeable",
    default_gate_input="layer",
)


@hookimpl
def unipelt_methods():
    return [METHOD]


@hookimpl
def unipelt_build_branch(method, config, node, site, model):
    if method.name != "lora":
        return None
    return LoraBranch(config, site.in_features, site.out_features)
