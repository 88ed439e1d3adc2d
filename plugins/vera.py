"""VeRA: vector-based random matrix adaptation (Kopiczko et al., 2024, arXiv 2310.11454).

h = W0·x + Λ_b·B·Λ_d·A·x: A ∈ R^{r×d_in} and B ∈ R^{d_out×r} frozen, random and shared by every
layer the node adapts; only d ∈ R^r (Λ_d = diag(d), init ``d_initial`` = 0.1) and b ∈ R^{d_out}
(Λ_b, init 0: the layer starts unchanged) are trained. Mergeable: W0 <- W0 + (b ⊙ B)·(d ⊙ A).

As PEFT's VeRA (``peft.tuners.vera``), one pair (A, B) serves the whole node at the largest
widths among its hook points: A is (r, max d_in) and B (max d_out, r), both Kaiming-uniform
(gain √2, fan-in bound) drawn from a CPU ``torch.Generator`` seeded with ``seed`` (PEFT's
``projection_prng_key``), A first; a projection of widths (d_out, d_in) uses A[:, :d_in] and
B[:d_out, :]. The saved adapter holds the seed (in its spec) and, with ``save_projection``
(the default, as PEFT's), the matrices themselves; without it they are drawn again from the
seed when the adapter is loaded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from unipelt.arch import ModelInfo, ResolvedSite
from unipelt.hookspecs import hookimpl
from unipelt.registry import MethodDef


@dataclass
class VeraConfig:
    """r: rank of the shared projections (PEFT's default 256). d_initial: the initial value of
    every entry of d. seed: the projections' generator seed. save_projection: save A and B with
    the adapter (else only the seed). dropout: on the input of A."""

    r: int = field(default=256, metadata={"min": 1})
    d_initial: float = 0.1
    seed: int = field(default=0, metadata={"min": 0, "max": 2**63 - 1})
    save_projection: bool = True
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.99})

    def check_site(self, site: ResolvedSite, model: ModelInfo) -> tuple[str, str] | None:
        # r may exceed the widths (the paper uses r = 1024 on d = 768), but the frozen projections
        # are buffers, which the meta-device count of parameters does not see: bound them by the
        # base model's size, so a typo (r: 2560000) is refused before it is allocated
        need = self.r * (site.in_features + site.out_features)
        base = sum(p.numel() for p in model.model.parameters())
        if need > base:
            where = site.site if site.layer is None else f"{site.site} of layer {site.layer}"
            return "r", (f"rank {self.r} makes the shared projections at {where} ({site.in_features} -> "
                         f"{site.out_features}) {need:,} values, more than the base model's {base:,} parameters")
        return None


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """U(-bound, bound), bound = √3·√2/√fan_in (fan_in = shape[1]): PEFT's ``_kaiming_init``."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    t = torch.empty(shape, device="cpu", dtype=torch.float32)
    return t.uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The frozen A (r, d_in) and B (d_out, r) of one node, shared by all its branches; buffers
    (saved with the adapter when ``persistent``), kept after training (``inference``)."""

    inference = True

    def __init__(self, r: int, d_in: int, d_out: int, seed: int, persistent: bool):
        super().__init__()
        if torch.empty(0).is_meta:  # counted on the meta device: shapes only
            a, b = torch.empty(r, d_in), torch.empty(d_out, r)
        else:
            g = torch.Generator(device="cpu").manual_seed(seed)
            a = kaiming_uniform((r, d_in), g)
            b = kaiming_uniform((d_out, r), g)
        self.register_buffer("vera_A", a, persistent=persistent)
        self.register_buffer("vera_B", b, persistent=persistent)


class VeraBranch(nn.Module):
    """Delta b ⊙ (B[:d_out]·(d ⊙ (A[:, :d_in]·dropout(x))))."""

    reads = "input"
    mergeable = True

    def __init__(self, cfg: VeraConfig, in_features: int, out_features: int, shared: VeraProjections):
        super().__init__()
        self.in_features, self.out_features, self.r = in_features, out_features, cfg.r
        self.vera_lambda_d = nn.Parameter(torch.full((cfg.r,), float(cfg.d_initial)))
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        # the node's projections, not a submodule: owned (and saved) once, by the adapter's shared set
        self.__dict__["_proj"] = shared

    def A(self) -> Tensor:
        return self._proj.vera_A[:, : self.in_features]

    def B(self) -> Tensor:
        return self._proj.vera_B[: self.out_features, :]

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        return self.expand(F.linear(self.dropout(x), self.A().to(x.dtype)))

    # -- the group protocol (unipelt.types.Shrinkable): x·Aᵀ (the frozen slice) in the group
    def shrink_params(self):
        return None if isinstance(self.dropout, nn.Dropout) else (self.A(), None)

    def expand(self, u: Tensor, gate: Tensor | None = None) -> Tensor:
        return self.vera_lambda_b.to(u.dtype) * F.linear(self.vera_lambda_d.to(u.dtype) * u, self.B().to(u.dtype))

    def delta_weight(self) -> Tensor:
        return (self.vera_lambda_b[:, None] * self.B()) @ (self.vera_lambda_d[:, None] * self.A())


METHOD = MethodDef(
    name="vera", config=VeraConfig, site_kinds=frozenset({"linear"}),
    summary="VeRA: W0x + b ⊙ B·(d ⊙ A·x), A and B frozen, random (seeded) and shared; d, b trained; mergeable",
    gateable=False,
)


def _widths(node, model: ModelInfo) -> tuple[int, int]:
    """The largest (d_in, d_out) among the node's hook points (PEFT's ``_find_dim``)."""
    d_in = d_out = 0
    layers = node.layers.resolve(model.num_layers, source=None)
    for site in node.sites:
        for layer in ([None] if site in model.arch.global_sites else layers):
            rs = model.resolve(site, layer)
            d_in, d_out = max(d_in, rs.in_features), max(d_out, rs.out_features)
    return d_in, d_out


@hookimpl
def unipelt_methods():
    return [METHOD]


@hookimpl
def unipelt_build_shared(method, config, node, model):
    if method.name != "vera":
        return None
    d_in, d_out = _widths(node, model)
    return VeraProjections(config.r, d_in, d_out, config.seed, config.save_projection)


@hookimpl
def unipelt_build_branch(method, config, node, site, model, shared):
    if method.name != "vera":
        return None
    return VeraBranch(config, site.in_features, site.out_features, shared)
