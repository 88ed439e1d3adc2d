"""Gates: G = sigmoid(w·x + b), pooled as the spec says (UniPELT, Mao et al., ACL 2022, §3).

One ``Linear(d, 1)`` per gated module and layer, as in the reference code (``Linear(d, 2)`` for
prefix gates with separate K and V values). Pooling (per token, masked mean, the reference's
unmasked mean, running mean) is done by :func:`unipelt.runtime.pool_gate`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from unipelt.hookspecs import hookimpl
from unipelt.runtime import ForwardContext, pool_gate
from unipelt.spec import GateSpec


class Gate(nn.Module):
    """sigmoid(Linear(d, k)(x)) per token, then pooled: (B, T, k) or (B, 1, k)."""

    def __init__(self, spec: GateSpec, in_features: int, out_features: int = 1):
        super().__init__()
        self.spec = spec
        self.linear = nn.Linear(in_features, out_features)
        with torch.no_grad():
            self.linear.bias.fill_(spec.init_bias)

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        g = torch.sigmoid(self.linear(x))
        if g.dim() == 2:  # (B, d) inputs, e.g. pooled features
            g = g.unsqueeze(1)
        return pool_gate(g, self.spec.pooling, ctx, key=id(self))

    # -- the group protocol (unipelt.types.GroupGate): logits computed with the other readers of x
    @property
    def joint_pooling(self) -> str:
        """This gate is sigmoid(x·wᵀ + b) pooled by ``spec.pooling``: a group may pool it with others."""
        return self.spec.pooling

    def logit_params(self):
        return self.linear.weight, self.linear.bias

    def activate(self, logits: Tensor, ctx: ForwardContext) -> Tensor:
        g = torch.sigmoid(logits + self.linear.bias)
        if g.dim() == 2:
            g = g.unsqueeze(1)
        return pool_gate(g, self.spec.pooling, ctx, key=id(self))


@hookimpl(trylast=True)
def unipelt_build_gate(spec: GateSpec, in_features: int, model):
    # prefix gates with separate K and V values have two outputs (validated by the graph)
    return Gate(spec, in_features, out_features=2 if spec.kv == "separate" else 1)
