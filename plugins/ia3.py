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

**PEFT's IA3 in** (hook ``unipelt_import_peft``, peft_type ``IA3``): each
``<module>.ia3_l`` becomes the vector of the hook point on that module; a module PEFT treats as
feedforward (``feedforward_modules``: a regex full-matched against the module name, or names the
module name ends with, as PEFT decides) scales the input, shape (1, d_in), any other the output,
bias included, shape (d_out, 1). The side is written ``auto`` where that is what ``auto`` gives
(so specs/ia3.yaml exported and imported back is the same spec), else explicitly. GPT-2's fused
``c_attn`` (output side) gives each of its q, k, v slices its part of the vector; its input side
cannot be split per slice and is refused. The head under ``modules_to_save`` becomes ``train``
at ``head``.
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

    # merge: the weight the vector rescales is the one the base computes with, which other input
    # scalings of the projection may have rescaled already (runtime.merge_branches passes it)
    delta_from_base = True

    def delta_weight(self, base: Tensor | None = None) -> Tensor:
        w = base_weight(self._host, self.out_slice) if base is None else base
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


# ------------------------------------------------------------------------------------------
# PEFT's IA3 adapters in (unipelt.peft_import)
# ------------------------------------------------------------------------------------------
def _peft_feedforward(config: dict, path: str) -> bool:
    """PEFT's IA3Model._check_target_module_feedforward: a string is a regex full-matched
    against the module name; a list, names the module name ends with."""
    import re

    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, path) is not None
    return any(path.endswith(name) for name in ff)


@hookimpl
def unipelt_import_peft(peft_type, config, tensors, context):
    if peft_type != "IA3":
        return None
    import re

    from unipelt.peft_import import PREFIX, add_head, group_nodes, head_module_path

    ctx = context
    ff = config.get("feedforward_modules")
    if ff is not None and not isinstance(ff, (str, list)):
        raise ctx.error("feedforward_modules", f"{type(ff).__name__}: expected a regex string or a list of names")
    if config.get("target_parameters"):
        raise ctx.error("target_parameters", "IA3 on bare parameters has no unipelt hook point")
    head_path = head_module_path(config, ctx)
    sites = ctx.linear_sites()
    items: dict[tuple[int, str], dict] = {}
    vectors: dict[tuple[int, str], Tensor] = {}
    head: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise ctx.error(key, f"does not start with {PREFIX!r} (not a PEFT adapter file)", weights=True)
        rest = key[len(PREFIX):]
        m = re.fullmatch(r"(.+)\.ia3_l", rest)
        if m is None:
            if head_path is not None and rest.startswith(head_path + "."):
                head[rest[len(head_path) + 1:]] = t
                continue
            raise ctx.error(key, "not an IA3 vector (<module>.ia3_l), and not under modules_to_save", weights=True)
        path = m.group(1)
        targets = sites.get(path)
        if not targets:
            raise ctx.error(key, f"module {path!r} is not a linear hook point of this {ctx.info.arch.name} model "
                                 f"(target_modules: {config.get('target_modules')})", weights=True)
        feedforward = _peft_feedforward(config, path)
        d_in = targets[0].in_features
        d_out = max((s.out_slice[1] if s.out_slice else s.out_features) for s in targets)
        want = (1, d_in) if feedforward else (d_out, 1)
        if tuple(t.shape) != want:
            side = "input (feedforward_modules)" if feedforward else "output"
            raise ctx.error(key, f"shape {tuple(t.shape)} is not {want}, the {side} side of {path} "
                                 f"({d_in} -> {d_out})", weights=True)
        if not t.is_floating_point():
            raise ctx.error(key, f"dtype {t.dtype}: an IA3 vector is floating point", weights=True)
        v = t.reshape(-1)
        side = "input" if feedforward else "output"
        for site in targets:
            if side == "input" and site.out_slice is not None:
                raise ctx.error("feedforward_modules", f"{path} is the fused projection of {site.site} and its "
                                                       "sibling slices: its input is shared by them and cannot be "
                                                       "imported as one slice's input scaling")
            default = "input" if site.site in INPUT_SIDE_SITES else "output"
            items[(site.layer, site.site)] = {"side": "auto" if side == default else side}
            o0, o1 = site.out_slice or (0, site.out_features)
            vectors[(site.layer, site.site)] = v if side == "input" else v[o0:o1]
    if not vectors:
        raise ctx.error("target_modules", "the file holds no IA3 vectors (<module>.ia3_l)")
    modules, node_of = group_nodes("ia3", items, "ia3")
    out: dict[str, Tensor] = {}
    for (layer, site), v in vectors.items():
        out[f"{node_of[(layer, site)]}.{layer}.{site}.ia3_l"] = v.contiguous()
    add_head(modules, out, head)
    return {"modules": modules}, out
