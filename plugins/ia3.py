"""IA3: learned vectors rescale keys, values and the FFN intermediate (Liu et al., 2022,
"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning",
arXiv 2205.05638).

k = l_k ⊙ (W_k·x + b_k), v = l_v ⊙ (W_v·x + b_v) (the output of the projection, bias included,
as PEFT's IA3 scales ``base_layer(x)``), and the FFN: W_down·(l_ff ⊙ h) + b_down, h the
intermediate (the input of ``ffn.down``). Every l starts at 1: the model starts unchanged.

At a hook point the vector rescales one side of the base projection (``side``):
- ``output``: the branch reads the projection's output y and adds (l - 1) ⊙ y (= l ⊙ y - y);
  merged, W <- diag(l)·W and b <- l ⊙ b (the weight rows);
- ``input``: the branch rescales the projection's input before the base layer runs (a ``scale``
  branch, :mod:`unipelt.types`): W·(l ⊙ x) + b; merged, W <- W·diag(l) (the weight columns).
``auto`` (the default) is ``input`` at ``ffn.down`` and ``output`` elsewhere, as PEFT's
``feedforward_modules`` for its default targets. The scaling applies to the base projection only:
another adapter's branches at the same hook point add their deltas unscaled, which is what the
merged weight computes too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from unipelt.arch import ModelInfo, ResolvedSite
from unipelt.hookspecs import hookimpl
from unipelt.registry import MethodDef
from unipelt.runtime import projection_bias, projection_weight

# the hook points whose input IA3 scales under ``side: auto`` (the FFN intermediate)
INPUT_SIDE_SITES = frozenset({"ffn.down"})


@dataclass
class IA3Config:
    """side: which side of the projection the vector rescales: ``auto`` (input at ``ffn.down``,
    output elsewhere), ``output`` (the rows of W and the bias) or ``input`` (the columns of W)."""

    side: Literal["auto", "output", "input"] = "auto"

    def side_at(self, site: ResolvedSite) -> str:
        if self.side != "auto":
            return self.side
        return "input" if site.site in INPUT_SIDE_SITES else "output"

    def check_site(self, site: ResolvedSite, model: ModelInfo) -> tuple[str, str] | None:
        if self.side_at(site) == "input" and site.out_slice is not None:
            # the slices of a fused projection (GPT-2's c_attn) share one input: scaling it for
            # one slice would scale the others
            return "side", (f"{site.site} is a slice of the fused projection {site.path}: its input is shared by "
                            "the other slices and cannot be rescaled for one of them; use side: output")
        return None


# the projection's float weight and bias, whatever its storage (the core's weight backend)
base_weight = projection_weight
base_bias = projection_bias


class IA3Branch(nn.Module):
    """One learned vector ``ia3_l`` rescaling one side of a frozen projection."""

    mergeable = True

    def __init__(self, side: str, width: int, host: nn.Module, out_slice: tuple[int, int] | None):
        super().__init__()
        self.side = side
        # the output side adds a delta read off the output; the input side rescales the input
        self.reads = "output" if side == "output" else "scale"
        self.ia3_l = nn.Parameter(torch.ones(width))
        # the base projection (for merging), not a submodule: its weights belong to the base model
        self.__dict__["_host"] = host
        self.out_slice = out_slice

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        l = self.ia3_l.to(x.dtype)
        if self.side == "output":
            return x * (l - 1)  # the delta: y·l - y
        return x * l  # the rescaled input of the base projection

    def delta_weight(self) -> Tensor:
        w = base_weight(self._host, self.out_slice)
        l = self.ia3_l.to(w.dtype)
        if self.side == "output":
            return w * (l - 1)[:, None]
        return w * (l - 1)[None, :]

    def delta_bias(self) -> Tensor | None:
        if self.side != "output":
            return None
        b = base_bias(self._host, self.out_slice)
        return None if b is None else b * (self.ia3_l.to(b.dtype) - 1)


METHOD = MethodDef(
    name="ia3", config=IA3Config, site_kinds=frozenset({"linear"}),
    summary="IA3: learned vectors rescale keys, values (attn.k, attn.v) and the FFN intermediate (ffn.down); mergeable",
    gateable=False,
)


@hookimpl
def unipelt_methods():
    return [METHOD]


@hookimpl
def unipelt_build_branch(method, config, node, site, model):
    if method.name != "ia3":
        return None
    side = config.side_at(site)
    return IA3Branch(side, site.out_features if side == "output" else site.in_features, site.module, site.out_slice)
