"""LoRA: low-rank updates of a frozen projection (Hu et al., 2021, arXiv 2106.09685).

h = W0·x + s·B·A·x with A ∈ R^{r×d_in}, B ∈ R^{d_out×r} (B = 0 at init), s = alpha/r
(rsLoRA: alpha/sqrt(r)). Dropout acts on x before A. Mergeable: W0 <- W0 + s·B·A.
Gated (UniPELT): the gate replaces s (the reference) or multiplies it.

Initialisations (``init``): ``kaiming`` / ``gaussian`` draw A and set B = 0. ``pissa`` (Meng et al.,
2024, arXiv 2404.02948) starts from the principal part of W0: W0 = U·S·Vᵀ, A0 = √(S_r/s)·V_rᵀ,
B0 = U_r·√(S_r/s) (``niter``: U_r, S_r, V_r from the randomized SVD ``torch.svd_lowrank`` with
that many subspace iterations, PEFT's ``pissa_niter_N``: for large weights, approximate, drawn from
the global generator); ``olora`` (Büyükakyüz, 2024, arXiv 2406.01775) from its QR factors: W0 = Q·R,
A0 = R[:r], B0 = Q[:, :r] (both as PEFT 0.21 computes them). Training then sees the residual
W0 − s·B0·A0 plus s·B·A. Here W0 itself is left untouched and the branch carries the residual's
correction −s·B0·A0 (frozen buffers ``base_A``, ``base_B``): the same function and gradients as
PEFT's rewritten base weight, while detach, a second adapter and a fresh base keep the real W0.
After training (``materialize``) the branch becomes the plain LoRA it equals, of rank 2r:
A' = [A; A0], B' = [B, −B0], alpha' = 2·alpha (rsLoRA: √2·alpha), so the saved adapter loads
onto an unmodified base with no decomposition, as PEFT's ``path_initial_model_for_weight_conversion``.
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
from unipelt.runtime import projection_weight


@dataclass
class LoraConfig:
    """r: rank. alpha: scale numerator (default 2r, so s = 2). rslora: s = alpha/sqrt(r).
    dropout: on the input of A. init: A's initialisation (``kaiming``: Kaiming-uniform as in
    the reference; ``gaussian``: N(0, 1/r)); B starts at zero so the layer starts unchanged;
    ``pissa`` / ``olora``: A and B from W0's SVD / QR (module docstring). niter: PiSSA by the
    randomized SVD with that many subspace iterations (PEFT's ``pissa_niter_N``); None: the exact SVD.
    lr_ratio: LoRA+ learning-rate ratio of B over A (a trainer rule; None = same rate)."""

    r: int = field(default=8, metadata={"min": 1})
    alpha: float | None = field(default=None, metadata={"min": 0})
    rslora: bool = False
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.99})
    init: Literal["kaiming", "gaussian", "pissa", "olora"] = "kaiming"
    niter: int | None = field(default=None, metadata={"min": 0})
    lr_ratio: float | None = field(default=None, metadata={"min": 0})

    def validate(self) -> tuple[str, str] | None:
        if self.niter is not None and self.init != "pissa":
            return "niter", (f"niter (the randomized SVD's iterations) is used only with init: pissa "
                             f"(init is {self.init!r})")
        return None

    def check_site(self, site: ResolvedSite, model: ModelInfo) -> tuple[str, str] | None:
        # rank(B·A) <= min(d_in, d_out): a larger r adds parameters and no capacity, and an
        # unchecked r (a typo, an edited unipelt.json) once allocated until the machine ran out
        limit = min(site.in_features, site.out_features)
        where = site.site if site.layer is None else f"{site.site} of layer {site.layer}"
        if self.r > limit:
            return "r", (f"rank {self.r} is more than min(d_in, d_out) = {limit} of {where} "
                         f"({site.in_features} -> {site.out_features}); at most {limit}")
        if self.init in ("pissa", "olora") and 2 * self.r > limit:
            # the trained branch is saved as the rank-2r LoRA it equals, which must fit too
            return "r", (f"init {self.init}: rank {self.r} is more than half of min(d_in, d_out) = {limit} of "
                         f"{where}; the saved adapter is a LoRA of rank 2r, so r is at most {limit // 2}")
        return None

    @property
    def scale(self) -> float:
        alpha = self.alpha if self.alpha is not None else 2.0 * self.r
        return alpha / (math.sqrt(self.r) if self.rslora else self.r)


class _AddmmInto(torch.autograd.Function):
    """out += u·Wᵀ in ``out``'s storage: one GEMM with beta = 1 reading and writing ``out``.
    ``torch.addmm(out, u, Wᵀ)`` computes the same sum but copies ``out`` into a new tensor first
    (a pass over the whole base output per LoRA: 72 ``memcpy128`` kernels, 0.34 ms of a 9.5-ms
    BERT-base LoRA r16 all-linear train step on the H200, benchmarks/RESULTS.md "Session 10
    (helper bert10)"). The backward is addmm's: the gradient of ``out`` passes through, du = g·W,
    dW = gᵀ·u (the products and layouts autograd's addmm backward computes)."""

    @staticmethod
    def forward(ctx, out: Tensor, u: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(u, weight)
        out.view(-1, out.shape[-1]).addmm_(u, weight.t())  # (grad mode is off here: a plain view)
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        u, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        du = g2.mm(weight) if ctx.needs_input_grad[1] else None
        dw = g2.t().mm(u) if ctx.needs_input_grad[2] else None
        return g, du, dw


def addmm_into(out: Tensor, u: Tensor, weight: Tensor) -> Tensor:
    """``out + u·weightᵀ`` for a contiguous ``out`` (..., d_out), u (n, r) with n = out's rows,
    weight (d_out, r), written into ``out`` (returned; its old value is gone): only for an
    ``out`` nothing else reads and :func:`_may_write` allows."""
    return _AddmmInto.apply(out, u, weight)


def _may_write(out: Tensor) -> bool:
    """Whether autograd lets ``out`` be overwritten at no extra cost: not a leaf that requires
    grad (refused), not a view (autograd would rebase it through copies of its base in the
    backward), and not an inference tensor outside inference mode (refused)."""
    if out.requires_grad and out.grad_fn is None:
        return False
    if out._is_view():
        return False
    return not (out.is_inference() and not torch.is_inference_mode_enabled())


def _writable_rows(out: Tensor) -> Tensor | None:
    """The tensor an in-place product into ``out`` (..., d_out) may write, or None: ``out`` itself
    when it is not a view (``F.linear`` without a bias: matmul's ``_unsafe_view``), else its
    base when that is exactly ``out``'s rows: ``F.linear`` on a contiguous 3-D input with a bias
    returns a view of its 2-D addmm result, which is written (the view is re-made from it) rather
    than the view, which autograd would rebase through copies in the backward."""
    if not out.is_contiguous():
        return None
    base = out._base if out._is_view() else out
    if (base is None or not base.is_contiguous() or base.numel() != out.numel()
            or base.data_ptr() != out.data_ptr() or base.shape[-1] != out.shape[-1]):
        return None
    return base if _may_write(base) else None


class LoraBranch(nn.Module):
    """Delta s·B·A·dropout(x): x (..., d_in) -> (..., d_out)."""

    reads = "input"
    @property
    def kernel_lora(self) -> bool:
        """Whether the delta is exactly scale·B·A·dropout(x), so that the Triton executor may draw
        the dropout mask in its shrink and expand with lora_B (unipelt.executor reads this, not the
        class); not under PiSSA/OLoRA, whose delta carries the residual -s·B0·A0·x too."""
        return self.base_A is None

    def __init__(self, cfg: LoraConfig, in_features: int, out_features: int, base_weight: Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.r = in_features, out_features, cfg.r
        self.scale = cfg.scale
        self.lr_ratio = cfg.lr_ratio
        self.rslora = cfg.rslora
        self.niter = cfg.niter
        self.gate_scale: Literal["replace", "multiply"] = "replace"
        self.lora_A = nn.Parameter(torch.empty(cfg.r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, cfg.r))
        # the residual's correction -s·B0·A0 of PiSSA / OLoRA (None: a plain LoRA)
        self.register_buffer("base_A", None)
        self.register_buffer("base_B", None)
        if cfg.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif cfg.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / cfg.r)
        else:
            self._init_from_weight(cfg.init, base_weight)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def _init_from_weight(self, init: str, weight: Tensor | None) -> None:
        """A0, B0 from W0 (out, in), as PEFT's ``pissa_init`` / ``olora_init`` (in float32)."""
        r = self.r
        a0 = torch.zeros(r, self.in_features)
        b0 = torch.zeros(self.out_features, r)
        if weight is not None and not weight.is_meta and not self.lora_A.is_meta:
            w = weight.detach().to(torch.float32)
            if init == "pissa":
                if self.niter is None:
                    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
                    U, S, Vh = U[:, :r], S[:r], Vh[:r]
                else:  # PEFT's pissa_niter_N: U (d_out, r), S (r,), V (d_in, r)
                    U, S, V = torch.svd_lowrank(w, q=r, niter=self.niter)
                    Vh = V.T
                sr = S / self.scale
                a0 = torch.diag(sr.sqrt()) @ Vh
                b0 = U @ torch.diag(sr.sqrt())
            else:
                Q, R = torch.linalg.qr(w)
                a0, b0 = R[:r], Q[:, :r]
            a0, b0 = a0.cpu(), b0.cpu()
        with torch.no_grad():
            self.lora_A.copy_(a0)
            self.lora_B.copy_(b0)
        self.base_A = a0.clone().to(self.lora_A.device)
        self.base_B = b0.clone().to(self.lora_A.device)

    def _residual(self, x: Tensor) -> Tensor:
        # -s·B0·A0·x: the part of W0 that PiSSA / OLoRA moved into the trainable A and B; it is not
        # gated and sees no dropout, being part of the base weight in the method's formula
        return F.linear(F.linear(x, self.base_A), self.base_B) * (-self.scale)

    gated = False

    def configure_gate(self, spec) -> None:
        self.gate_scale = spec.lora_scale
        self.gated = True

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        h = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        if gate is None:
            h = h * self.scale
        else:
            h = h * gate if self.gate_scale == "replace" else h * (gate * self.scale)
        return h if self.base_A is None else h + self._residual(x)

    # -- the group protocol (unipelt.types.Shrinkable): a group executor computes x·Aᵀ together
    # with the other readers of x; the gate or scale multiplies the r-wide u, not the d_out-wide h
    def shrink_params(self):
        if isinstance(self.dropout, nn.Dropout):
            return None
        if self.base_A is not None:  # u = x·[A; A0]ᵀ: the residual's product joins the group too
            return torch.cat([self.lora_A, self.base_A], 0), None
        return self.lora_A, None

    def _split(self, u: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.base_A is None:
            return u, None
        return u[..., :self.r], F.linear(u[..., self.r:], self.base_B) * (-self.scale)

    def expand(self, u: Tensor, gate: Tensor | None = None) -> Tensor:
        u, residual = self._split(u)
        h = self._expand(u, gate)
        return h if residual is None else h + residual

    def _expand(self, u: Tensor, gate: Tensor | None = None) -> Tensor:
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

    def expand_into(self, out: Tensor, u: Tensor, gate: Tensor | None = None, owned: bool = False) -> Tensor:
        """``out + expand(u, gate)`` with the addition inside the matrix product (addmm) in eager
        mode, where every kernel costs a launch; compiled, the plain sum (inductor fuses it with
        the following pointwise ops, which an addmm output would prevent). ``owned``: nothing else
        reads ``out`` (the caller's fresh base output), so the product accumulates into its
        storage (:func:`addmm_into`): an out-of-place addmm first copies ``out`` whole."""
        if torch.compiler.is_compiling() or self.base_A is not None:
            return out + self.expand(u, gate)
        if gate is None:
            u = u * self.scale
        else:
            u = u * gate if self.gate_scale == "replace" else u * (gate * self.scale)
        if out.dim() < 2 or not out.is_contiguous():
            return out + F.linear(u, self.lora_B)
        if owned and u.dtype == out.dtype == self.lora_B.dtype:  # (autocast: addmm_ casts nothing)
            rows = _writable_rows(out)
            if rows is not None:
                return addmm_into(rows, u.reshape(-1, u.shape[-1]), self.lora_B).view(out.shape)
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), u.reshape(-1, u.shape[-1]), self.lora_B.t())
        return flat.view(out.shape)

    def segment_params(self) -> tuple[Tensor, float] | None:
        """(W_up, scale) with ``expand(u, None) == F.linear(u * scale, W_up)``: a batch whose rows
        are served by different LoRAs runs as one product with their Bs side by side
        (unipelt.runtime.SiteRuntime.apply_stacked). None under PiSSA/OLoRA (u also holds x·A0ᵀ)."""
        if self.base_A is not None:
            return None
        return self.lora_B, self.scale

    mergeable = True

    def delta_weight(self) -> Tensor:
        delta = self.lora_B @ self.lora_A
        if self.base_A is not None:
            delta = delta - self.base_B @ self.base_A
        return delta * self.scale

    def materialize(self) -> dict:
        """PiSSA / OLoRA after training: become the plain LoRA of rank 2r this branch equals,
        A' = [A; A0], B' = [B, −B0] with the same scale (alpha' = 2·alpha, rsLoRA √2·alpha), so
        the saved adapter needs no decomposition of, and no change to, the base weight."""
        if self.base_A is None:
            return {}
        if self.gated:
            # W0·x − s·B0·A0·x + g·(B·A·x): the correction is not gated, and the rank-2r LoRA would
            # put it under the gate (another function): a gated branch keeps A0 and B0, which the
            # adapter saves (a PiSSA checkpoint before conversion loads the same way)
            return {}
        with torch.no_grad():
            a = torch.cat([self.lora_A, self.base_A.to(self.lora_A.dtype)], 0)
            b = torch.cat([self.lora_B, -self.base_B.to(self.lora_B.dtype)], 1)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(b)
        self.base_A = self.base_B = None
        alpha = self.scale * (math.sqrt(self.r) if self.rslora else self.r)
        self.r *= 2
        new_alpha = alpha * (math.sqrt(2.0) if self.rslora else 2.0)
        return {"r": self.r, "alpha": new_alpha, "init": "kaiming", "niter": None}

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
    weight = None
    if config.init in ("pissa", "olora"):
        weight = lora_base_weight(site)
    return LoraBranch(config, site.in_features, site.out_features, weight)


def lora_base_weight(site: ResolvedSite) -> Tensor:
    """The (out, in) base weight W0 of a linear hook point (only its rows of a fused projection),
    as PiSSA/OLoRA decompose it: a packed (quantized) base is refused, not dequantized."""
    leaf = getattr(site.module, "base_layer", site.module)
    if not callable(getattr(site.module, "dense_weight", None)) and not leaf.weight.is_floating_point():
        from unipelt.errors import ModelError

        raise ModelError(f"{site.path}: init pissa/olora decomposes the float base weight, and this base is "
                         f"quantized ({type(leaf).__name__}); initialise on the 16-bit model, or use init: kaiming")
    return projection_weight(site.module, site.out_slice)
