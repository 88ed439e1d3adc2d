"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv 2402.09353).

W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖, the norm taken per output row of the weight as stored
(one value per output feature), m ∈ R^{d_out} initialised to the row norms of W0, A and B as in
LoRA (B = 0: the layer starts unchanged). With g = m / ‖W0 + s·B·A‖ the output is

    y' = g ⊙ (W0·x + s·B·A·x) + b = y + (g - 1) ⊙ (y - b) + g ⊙ (s·B·A·x),

y = W0·x + b the base output, which the branch reads (``reads_base``) instead of computing
W0·x again; the same expression as PEFT's ``DoraLinearLayer.forward``. ``detach_norm`` (the
paper's §4.3, PEFT's only behaviour) treats the norm as a constant in the backward pass.
Mergeable: W0 <- g ⊙ (W0 + s·B·A) (the bias is not rescaled).

The norm is never materialised as W0 + s·B·A: per row i,
    ‖W0_i + s·(BA)_i‖² = ‖W0_i‖² + 2s·B_i·(W0·Aᵀ)_i + s²·B_i·(A·Aᵀ)·B_iᵀ,
W0·Aᵀ (d_out × r) being the only product with W0 (d_out·d_in·r multiply-adds, the cost of r
tokens through the layer) and A·Aᵀ r × r; the terms are summed in float32, or in the weight's
dtype where it is wider (float64: a float32 norm put 2e-6 relative error into a 30-layer
model's logits, against PEFT's norm in float64). The sum is exact
algebra; what it could lose is the cancellation of a row whose W0_i + s·(BA)_i is nearly zero
(the update erasing the row), which training never approaches; it is clamped above 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from unipelt.hookspecs import hookimpl
from unipelt.registry import MethodDef
from unipelt_plugins.ia3 import base_bias, base_weight
from unipelt_plugins.lora import LoraConfig

# the inits this branch implements (LoraConfig may offer more, for LoRA itself)
INITS = ("kaiming", "gaussian")


@dataclass
class DoraConfig(LoraConfig):
    """LoRA's fields (r, alpha, rslora, dropout, init, lr_ratio) and detach_norm: treat
    ‖W0 + s·B·A‖ as a constant in the backward pass (the paper's §4.3; PEFT always does)."""

    detach_norm: bool = True

    def validate(self) -> tuple[str, str] | None:
        parent = getattr(super(), "validate", None)
        problem = parent() if parent is not None else None
        if problem:
            return problem
        if self.init not in INITS:
            return "init", f"DoRA initialises A with one of {', '.join(INITS)}, not {self.init!r}"
        return None


def _row_sq(W: Tensor) -> Tensor:
    """‖W_i‖² per row, summed and returned in float32 or W's dtype where wider (:func:`_norm_dtype`)."""
    return torch.linalg.vector_norm(W, dim=1, dtype=_norm_dtype(W)).square()


def _norm_dtype(W: Tensor) -> torch.dtype:
    """float32 for 16-bit weights (more precise than the weight), the weight's dtype when wider."""
    return torch.promote_types(W.dtype, torch.float32)


class DoraBranch(nn.Module):
    """The DoRA delta at one projection: (g - 1) ⊙ (y - b) + g ⊙ s·B·A·x, g = m / ‖W0 + s·B·A‖."""

    reads = "input"
    reads_base = True
    mergeable = True

    def __init__(self, cfg: DoraConfig, in_features: int, out_features: int, host: nn.Module,
                 out_slice: tuple[int, int] | None):
        super().__init__()
        self.in_features, self.out_features, self.r = in_features, out_features, cfg.r
        self.scale = cfg.scale
        self.lr_ratio = cfg.lr_ratio
        self.detach_norm = cfg.detach_norm
        self.lora_A = nn.Parameter(torch.empty(cfg.r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, cfg.r))
        if cfg.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1.0 / cfg.r)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        # the base projection, not a submodule: its weights belong to the base model
        self.__dict__["_host"] = host
        self.out_slice = out_slice
        w = self._weight()
        if self.lora_A.is_meta or w.is_meta:  # counted on the meta device, or a meta base: no values
            m = torch.empty(out_features, device=self.lora_A.device)
        else:
            # ‖W0_i‖ by the same arithmetic as the forward's norm (B = 0 there): g is exactly 1 at
            # init, so the layer starts exactly unchanged. Computed where W0 is; kept with A.
            with torch.no_grad():
                m = self._norm(self.lora_A.to(w.device), self.lora_B.to(w.device))
            m = m.to(device=self.lora_A.device, dtype=self.lora_A.dtype)
        self.magnitude = nn.Parameter(m)

    def _weight(self) -> Tensor:
        return base_weight(self._host, self.out_slice)

    def _norm(self, A: Tensor, B: Tensor) -> Tensor:
        """‖W0_i + s·(B·A)_i‖ per output row, in float32 or wider, from W0·Aᵀ and A·Aᵀ (never
        W0 + s·B·A)."""
        W = self._weight()
        s = self.scale
        w2 = self._w0_sq(W)
        ct = _norm_dtype(W)
        Af, Bf = A.to(ct), B.to(ct)
        wa = F.linear(W, A.to(W.dtype)).to(ct)  # (d_out, r) = W0·Aᵀ
        cross = (Bf * wa).sum(1)  # B_i·(W0·Aᵀ)_i = <W0_i, (BA)_i>
        ba2 = ((Bf @ (Af @ Af.T)) * Bf).sum(1)  # ‖(BA)_i‖²
        return (w2 + (2 * s) * cross + (s * s) * ba2).clamp_min(1e-30).sqrt()

    # ‖W0_i‖² per row (float32), cached: W0 is frozen, so the one pass over the whole weight it
    # costs is not paid at every forward. Valid while the stored weight is the same tensor at the
    # same version (eager: in-place writes bump it) and the leaf's ``weight_version`` (bumped by
    # merge and unmerge, which a compiled graph guards on) is unchanged; else computed again.
    _w0_cache: tuple | None = None

    def _w0_sq(self, W: Tensor) -> Tensor:
        host = self._host
        version = getattr(host, "weight_version", 0)
        cached = self._w0_cache
        if torch.compiler.is_compiling():
            # tensor versions are not traceable: the leaf's counter (a guarded int) decides
            if cached is not None and cached[0][2:] == (version, W.device, W.dtype, W.shape):
                return cached[1]
            return _row_sq(W)
        stored = getattr(getattr(host, "base_layer", host), "weight", None)
        key = (id(stored), getattr(stored, "_version", None), version, W.device, W.dtype, W.shape)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, _row_sq(W.detach()))
            self._w0_cache = cached
        return cached[1]

    def _apply(self, fn, *args, **kwargs):
        # model.to(device / dtype): the base (registered before the adapter container) is already
        # converted; the cache is made again from it here, in eager, so that a graph compiled
        # later finds it on the weight's device instead of recomputing it at every step
        out = super()._apply(fn, *args, **kwargs)
        self._w0_cache = None
        W = self._weight()
        if not W.is_meta:
            self._w0_sq(W)
        return out

    def weight_norm(self) -> Tensor:
        A, B = self.lora_A, self.lora_B
        if self.detach_norm:
            A, B = A.detach(), B.detach()
        return self._norm(A, B)

    def factor(self) -> Tensor:
        """g = m / ‖W0 + s·B·A‖ (d_out,)."""
        n = self.weight_norm()
        return self.magnitude / n.to(self.magnitude.dtype)

    def _combine(self, lora: Tensor, base: Tensor, dtype) -> Tensor:
        g = self.factor().to(dtype)
        b = base_bias(self._host, self.out_slice)
        if b is not None:
            base = base - b.to(dtype)
        return (g - 1) * base + g * (lora * self.scale)

    def forward(self, x: Tensor, gate: Tensor | None = None, base: Tensor | None = None) -> Tensor:
        if base is None or (isinstance(self.dropout, nn.Dropout) and self.training):
            # dropout acts on the input of both terms (as PEFT: base_result=None): W0·dropout(x)
            # is computed here; so is W0·x when the caller has no base output
            x = self.dropout(x)
            w = self._weight()
            base = F.linear(x, w.to(x.dtype))
            b = base_bias(self._host, self.out_slice)
            if b is not None:
                base = base + b.to(x.dtype)
        lora = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return self._combine(lora, base, x.dtype)

    # -- the group protocol (unipelt.types.Shrinkable): x·Aᵀ computed with the other readers of x
    def shrink_params(self):
        return None if isinstance(self.dropout, nn.Dropout) else (self.lora_A, None)

    def expand(self, u: Tensor, gate: Tensor | None = None, base: Tensor | None = None) -> Tensor:
        if base is None:
            raise RuntimeError("DoRA's expand needs the base output (the runtime passes base=)")
        return self._combine(F.linear(u, self.lora_B.to(u.dtype)), base, u.dtype)

    def expand_into(self, out: Tensor, u: Tensor, gate: Tensor | None = None, base: Tensor | None = None) -> Tensor:
        """``out + expand(u, gate, base)``. Eager, when ``out`` is the base output itself (the
        branch is the site's only one), as g ⊙ (y - b + s·B·u) + b: the addition inside the
        matrix product (addmm) and one pass for the rescale, instead of five pointwise passes;
        compiled, the plain sum, which inductor fuses."""
        if torch.compiler.is_compiling() or out is not base or out.dim() < 2 or not out.is_contiguous():
            return out + self.expand(u, gate, base=base)
        dtype = out.dtype
        g = self.factor().to(dtype)
        t = torch.addmm(out.reshape(-1, out.shape[-1]), (u * self.scale).reshape(-1, u.shape[-1]),
                        self.lora_B.to(dtype).t()).view(out.shape)  # y + s·B·u
        b = base_bias(self._host, self.out_slice)
        if b is None:
            return t * g
        return torch.addcmul((1 - g) * b.to(dtype), t, g)  # g ⊙ (t - b) + b

    # merge: (g - 1) rescales the base output as computed, W0·diag(l) under an input scaling of
    # the projection (IA3 at ffn.down; runtime.merge_branches passes it); g's norm is W0's, as live
    delta_from_base = True

    def delta_weight(self, base: Tensor | None = None) -> Tensor:
        """g ⊙ (W0 + s·B·A) - W0 = (g - 1) ⊙ W0 + g ⊙ s·B·A, rows scaled; with ``base`` (the
        weight the base output is computed with) (g - 1) ⊙ base + g ⊙ s·B·A."""
        w = self._weight()
        with torch.no_grad():
            g = self.factor().to(w.dtype)[:, None]
            return (g - 1) * (w if base is None else base.to(w.dtype)) + g * ((self.lora_B @ self.lora_A).to(w.dtype) * self.scale)

    def param_roles(self) -> dict[str, str]:
        return {"lora_A": "lora_A", "lora_B": "lora_B"}


METHOD = MethodDef(
    name="dora", config=DoraConfig, site_kinds=frozenset({"linear"}),
    summary="DoRA: m ⊙ (W0 + s·B·A)/‖W0 + s·B·A‖ per output row on any linear hook point; mergeable",
    gateable=False,
)


@hookimpl
def unipelt_methods():
    return [METHOD]


@hookimpl
def unipelt_build_branch(method, config, node, site, model):
    if method.name != "dora":
        return None
    return DoraBranch(config, site.in_features, site.out_features, site.module, site.out_slice)


# ------------------------------------------------------------------------------------------
# PEFT's DoRA in (unipelt.peft_import): a LORA adapter with use_dora
# ------------------------------------------------------------------------------------------
MAGNITUDE = ".lora_magnitude_vector"


@hookimpl
def unipelt_import_peft(peft_type, config, tensors, context):
    """PEFT's DoRA (``peft_type`` LORA, ``use_dora``): the LoRA factors read as the built-in LoRA
    translator reads them (rank_pattern, alpha_pattern, rsLoRA, GPT-2's fused ``c_attn`` split into
    its slices, the head), each ``<module>.lora_magnitude_vector`` (d_out,) becoming the magnitude
    of the hook point on that module: a slice of a fused projection takes its rows, which is exact
    since the norm is per output row."""
    if peft_type != "LORA" or not config.get("use_dora"):
        return None
    from unipelt.peft_import import PREFIX, _lora

    ctx = context
    magnitudes: dict[str, Tensor] = {}
    factors: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if key.startswith(PREFIX) and key.endswith(MAGNITUDE):
            magnitudes[key[len(PREFIX):-len(MAGNITUDE)]] = t
        else:
            factors[key] = t
    spec, out = _lora({**config, "use_dora": False}, factors, ctx)
    paths_of: dict[tuple[int, str], object] = {}
    for path, sites in ctx.linear_sites().items():
        for rs in sites:
            paths_of[(rs.layer, rs.site)] = rs
    used: set[str] = set()
    for key in [k for k in out if k.endswith(".lora_A")]:
        branch = key[: -len(".lora_A")]
        node, layer, site = branch.split(".", 2)
        rs = paths_of[(int(layer), site)]
        m = magnitudes.get(rs.path)
        if m is None:
            raise ctx.error("use_dora", f"true, but {ctx.weights_file.name} holds no magnitude for {rs.path} "
                                        f"({PREFIX}{rs.path}{MAGNITUDE}); every DoRA module needs one")
        full = max((s.out_slice[1] if s.out_slice else s.out_features) for s in ctx.linear_sites()[rs.path])
        if m.dim() != 1 or m.shape[0] != full or not m.is_floating_point():
            raise ctx.error(f"{PREFIX}{rs.path}{MAGNITUDE}",
                            f"shape {tuple(m.shape)} ({m.dtype}) is not the ({full},) floating-point magnitude of "
                            f"{rs.path}", weights=True)
        o0, o1 = rs.out_slice or (0, rs.out_features)
        out[f"{branch}.magnitude"] = m[o0:o1].contiguous()
        used.add(rs.path)
    extra = sorted(set(magnitudes) - used)
    if extra:
        raise ctx.error(f"{PREFIX}{extra[0]}{MAGNITUDE}", "a DoRA magnitude without its LoRA factors", weights=True)
    # the LoRA translator's nodes ("lora", "lora_<site>_<i>") become DoRA nodes named "dora...",
    # so that a unipelt DoRA exported to PEFT reads back under its own names
    renamed: dict[str, str] = {}
    modules = {}
    for name, node in spec["modules"].items():
        if node["method"] == "lora":
            renamed[name] = "dora" + name[len("lora"):]
            node = {**node, "method": "dora"}
        modules[renamed.get(name, name)] = node
    tensors_out = {}
    for key, t in out.items():
        node, _, rest = key.partition(".")
        tensors_out[f"{renamed.get(node, node)}.{rest}"] = t
    return {**spec, "modules": modules}, tensors_out
