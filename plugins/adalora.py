"""AdaLoRA: a LoRA in SVD form whose rank budget moves to the matrices that matter (Zhang et al.,
2023, arXiv 2303.10512), as HF PEFT 0.21 computes it (``tuners/adalora``).

Layer: h = W0·x + (alpha / (r0 + 1e-5))·B·(A ⊙ E)·x, i.e. ΔW = P·Λ·Q with P = B (d_out×r0),
Λ = diag(E) (r0 triplets), Q = A (r0×d_in); E = 0 at init, A and B ~ N(0, 0.02); r0 = ``init_r``
stays the divisor (PEFT's ``ranknum``) when triplets are pruned, which zeroes their λ.

Controller (one for all AdaLoRA matrices of an adapter), after every optimizer step t (0-based,
as PEFT's ``update_and_allocate(global_step)``), with the step's gradients:
- sensitivity I = |p·∂L/∂p| of every entry of A, E and B; smoothed Ī ← β1·Ī + (1−β1)·I, uncertainty
  Ū ← β2·Ū + (1−β2)·|I − Ī|; score s = Ī·Ū. Triplet i's importance: s(λ_i) + mean_j s(A_ij) +
  mean_j s(B_ji).
- budget b(t): the total initial rank B0 = Σ r0 while t ≤ tinit; B_T = target_r × matrices once
  t > T − tfinal; between, B_T + (B0 − B_T)·(1 − (t − tinit)/(T − tfinal − tinit))³ (cubic decay),
  applied every deltaT steps: every λ whose importance is ≤ the (B0 − b)-th smallest is set to 0.
- at t = T − tfinal the final mask is fixed (and the averages reset); after it, re-applied each step.
- the orthogonality penalty orth_reg_weight·mean over matrices of ‖A·Aᵀ − I‖_F and ‖Bᵀ·B − I‖_F
  (PEFT's Frobenius norm, not squared), added to every micro-batch's loss.
The ranks kept per matrix go into report.json (``controllers.AdaLoRA``), with a layers × matrices
table; ``unipelt adalora-ranks RUN --plot ranks.png`` draws it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from unipelt.arch import ModelInfo, ResolvedSite
from unipelt.hookspecs import hookimpl
from unipelt.registry import MethodDef

EPS = 1e-5  # PEFT's ranknum + 1e-5


@dataclass
class AdaLoraConfig:
    """init_r: r0, each matrix's starting rank. target_r: the average rank left at the end.
    alpha: the scale numerator (PEFT's lora_alpha; 0 means r0). dropout: on x before A.
    total_step: T, the optimizer steps of the run (required to train, as in PEFT). tinit / tfinal: warm-up
    and final steps without pruning; deltaT: steps between two allocations. beta1 / beta2: the
    EMA of the sensitivity and of its uncertainty. orth_reg_weight: the orthogonality penalty."""

    init_r: int = field(default=12, metadata={"min": 1})
    target_r: int = field(default=8, metadata={"min": 1})
    alpha: float = field(default=8.0, metadata={"min": 0})
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.99})
    total_step: int | None = field(default=None, metadata={"min": 1})
    tinit: int = field(default=0, metadata={"min": 0})
    tfinal: int = field(default=0, metadata={"min": 0})
    deltaT: int = field(default=1, metadata={"min": 1})
    beta1: float = field(default=0.85, metadata={"min": 0.0, "max": 1.0})
    beta2: float = field(default=0.85, metadata={"min": 0.0, "max": 1.0})
    orth_reg_weight: float = field(default=0.5, metadata={"min": 0.0})

    def validate(self) -> tuple[str, str] | None:
        # total_step may be absent from a spec that only loads or runs the layer; training without
        # it is refused when the controller is made (unipelt_training_controllers)
        if self.target_r > self.init_r:
            return "target_r", f"target_r {self.target_r} is more than init_r {self.init_r}: the budget only shrinks"
        if self.total_step is not None and self.tinit >= self.total_step - self.tfinal:
            return "tinit", (f"tinit {self.tinit} leaves no budgeting phase before total_step - tfinal = "
                             f"{self.total_step - self.tfinal}")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                return name, f"{name} {getattr(self, name)} must lie strictly between 0 and 1"
        return None

    def check_site(self, site: ResolvedSite, model: ModelInfo) -> tuple[str, str] | None:
        limit = min(site.in_features, site.out_features)
        if self.init_r > limit:
            where = site.site if site.layer is None else f"{site.site} of layer {site.layer}"
            return "init_r", f"init_r {self.init_r} is more than min(d_in, d_out) = {limit} of {where}"
        return None

    @property
    def scaling(self) -> float:
        return self.alpha if self.alpha > 0 else float(self.init_r)

    def schedule_key(self) -> tuple:
        return (self.target_r, self.total_step, self.tinit, self.tfinal, self.deltaT, self.beta1, self.beta2,
                self.orth_reg_weight)


class AdaLoraBranch(nn.Module):
    """Delta (alpha/(r0 + 1e-5))·B·((A ⊙ E)·dropout(x)): x (..., d_in) -> (..., d_out)."""

    reads = "input"
    mergeable = True

    def __init__(self, cfg: AdaLoraConfig, in_features: int, out_features: int):
        super().__init__()
        r = cfg.init_r
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.lora_A = nn.Parameter(torch.randn(r, in_features) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, 1))
        self.lora_B = nn.Parameter(torch.randn(out_features, r) * 0.02)
        self.register_buffer("ranknum", torch.tensor(float(r)))
        self.scaling = cfg.scaling
        self.gate_scale: Literal["replace", "multiply"] = "replace"
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    @property
    def scale(self) -> Tensor:
        return self.scaling / (self.ranknum + EPS)

    def configure_gate(self, spec) -> None:
        self.gate_scale = spec.lora_scale

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        h = F.linear(F.linear(self.dropout(x), self.lora_A * self.lora_E), self.lora_B)
        if gate is None:
            return h * self.scale
        return h * gate if self.gate_scale == "replace" else h * (gate * self.scale)

    # the group protocol (unipelt.types.Shrinkable): u = x·(A ⊙ E)ᵀ is computed with the other
    # readers of x; the pruned triplets are zero rows of A ⊙ E
    def shrink_params(self):
        return None if isinstance(self.dropout, nn.Dropout) else (self.lora_A * self.lora_E, None)

    def expand(self, u: Tensor, gate: Tensor | None = None) -> Tensor:
        h = F.linear(u, self.lora_B)
        if gate is None:
            return h * self.scale
        return h * gate if self.gate_scale == "replace" else h * (gate * self.scale)

    def delta_weight(self) -> Tensor:
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scale

    def kept_rank(self) -> int:
        return int((self.lora_E.detach() != 0).sum())

    def param_roles(self) -> dict[str, str]:
        return {"lora_A": "lora_A", "lora_B": "lora_B"}


# ------------------------------------------------------------------------------------------
# the controller: importance, budget, mask, orthogonality
# ------------------------------------------------------------------------------------------
class AdaLoraController:
    """The rank allocator of all AdaLoRA matrices of one adapter (:class:`unipelt.types.TrainingController`)."""

    name = "AdaLoRA"

    def __init__(self, branches: dict[str, AdaLoraBranch], cfg: AdaLoraConfig, sites: dict[str, tuple[int, str]]):
        self.branches = dict(sorted(branches.items()))  # a fixed order: the kthvalue ties break the same way
        self.cfg = cfg
        self.sites = sites  # branch key -> (layer, site), for the table
        self.init_bgt = sum(b.r for b in self.branches.values())
        self.target_bgt = cfg.target_r * len(self.branches)
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.budget = self.init_bgt
        self._events: list[dict] = []
        self._last_kept: int | None = None  # the kept total at the last allocation, for the events
        self.reset_ipt()

    # -- importance ---------------------------------------------------------------------------
    def reset_ipt(self) -> None:
        self.ipt: dict[str, Tensor] = {}
        self.exp_avg_ipt: dict[str, Tensor] = {}
        self.exp_avg_unc: dict[str, Tensor] = {}

    def _params(self):
        for key, b in self.branches.items():
            for pname in ("lora_A", "lora_E", "lora_B"):
                yield f"{key}.{pname}", getattr(b, pname)

    @torch.no_grad()
    def update_ipt(self) -> None:
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for n, p in self._params():
            if n not in self.ipt:
                self.ipt[n] = torch.zeros_like(p)
                self.exp_avg_ipt[n] = torch.zeros_like(p)
                self.exp_avg_unc[n] = torch.zeros_like(p)
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            self.ipt[n] = (p * grad).abs()
            self.exp_avg_ipt[n] = b1 * self.exp_avg_ipt[n] + (1 - b1) * self.ipt[n]
            self.exp_avg_unc[n] = b2 * self.exp_avg_unc[n] + (1 - b2) * (self.ipt[n] - self.exp_avg_ipt[n]).abs()

    def triplet_scores(self) -> dict[str, Tensor]:
        """Per matrix, the (r0,) importance of each triplet: s(λ) + mean s(A row) + mean s(B column)."""
        out = {}
        for key in self.branches:
            s = {p: self.exp_avg_ipt[f"{key}.{p}"] * self.exp_avg_unc[f"{key}.{p}"] for p in ("lora_A", "lora_E", "lora_B")}
            out[key] = s["lora_E"].view(-1) + s["lora_A"].mean(1) + s["lora_B"].mean(0)
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero every λ whose importance is at or below the (B0 − budget)-th smallest of all."""
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        pattern = {}
        if k <= 0:  # nothing to prune (the budget is the whole rank)
            return {key: [True] * b.r for key, b in self.branches.items()}
        threshold = torch.kthvalue(torch.cat([s.float() for s in scores.values()]), k=k).values.item()
        for key, b in self.branches.items():
            drop = scores[key] <= threshold
            b.lora_E.masked_fill_(drop.view(-1, 1), 0.0)
            pattern[key] = (~drop).tolist()
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self) -> None:
        for key, b in self.branches.items():
            keep = torch.tensor(self.rank_pattern[key], device=b.lora_E.device).view(-1, 1)
            b.lora_E.masked_fill_(~keep, 0.0)

    def budget_schedule(self, t: int) -> tuple[int, bool]:
        c = self.cfg
        T = c.total_step
        if t <= c.tinit:
            return self.init_bgt, False
        if t > T - c.tfinal:
            return self.target_bgt, True
        mul = 1 - (t - c.tinit) / (T - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * (mul ** 3) + self.target_bgt), t % c.deltaT == 0

    def update_and_allocate(self, t: int) -> None:
        """PEFT's ``AdaLoraModel.update_and_allocate(global_step=t)``."""
        final = self.cfg.total_step - self.cfg.tfinal
        if t < final:
            self.update_ipt()
            budget, mask_now = self.budget_schedule(t)
            if mask_now:
                self.rank_pattern = self.mask_to_budget(budget)
                self._event(t, "allocate", budget)
            self.budget = budget
        elif t == final:
            budget, _ = self.budget_schedule(t)
            self.rank_pattern = self.mask_to_budget(budget)
            self.budget = budget
            self.reset_ipt()
            self._event(t, "final", budget)
        elif self.rank_pattern is not None:
            self.mask_using_rank_pattern()

    def _event(self, t: int, what: str, budget: int) -> None:
        kept = sum(sum(v) for v in self.rank_pattern.values())
        # an event per allocation that changes the kept total, and the final one: not one per step
        if what == "final" or kept != self._last_kept:
            self._events.append({"step": t + 1, "event": what, "budget": budget, "kept": kept})
        self._last_kept = kept

    # -- the TrainingController protocol ------------------------------------------------------
    def regularizer(self) -> Tensor:
        w = self.cfg.orth_reg_weight
        terms = []
        for b in self.branches.values():
            for p, cov in ((b.lora_A, b.lora_A @ b.lora_A.T), (b.lora_B, b.lora_B.T @ b.lora_B)):
                eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
                terms.append(torch.linalg.matrix_norm(cov - eye, ord="fro"))
        if not terms or w == 0:
            p = next(iter(self.branches.values())).lora_A
            return p.new_zeros(())
        return w * torch.stack(terms).mean()

    def on_step(self, step: int, loss: float) -> None:
        # ``step`` counts the steps taken (1-based); PEFT's global_step is the 0-based index
        self.update_and_allocate(step - 1)

    def events(self) -> list[dict]:
        out, self._events = self._events, []
        return out

    def ranks(self) -> dict[str, int]:
        return {key: b.kept_rank() for key, b in self.branches.items()}

    def report(self) -> dict:
        ranks = self.ranks()
        return {"init_budget": self.init_bgt, "target_budget": self.target_bgt, "budget": self.budget,
                "kept": sum(ranks.values()), "ranks": ranks, "table": rank_table(ranks, self.sites)}

    def state_dict(self) -> dict:
        def lists(d):
            return {k: v.detach().cpu().tolist() for k, v in d.items()}

        return {"ipt": lists(self.ipt), "exp_avg_ipt": lists(self.exp_avg_ipt), "exp_avg_unc": lists(self.exp_avg_unc),
                "rank_pattern": self.rank_pattern, "budget": self.budget, "last_kept": self._last_kept}

    def load_state_dict(self, d: dict) -> None:
        params = dict(self._params())
        for name in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(self, name, {k: torch.tensor(v, dtype=params[k].dtype, device=params[k].device)
                                 for k, v in (d.get(name) or {}).items() if k in params})
        self.rank_pattern = d.get("rank_pattern")
        self.budget = int(d.get("budget", self.init_bgt))
        self._last_kept = d.get("last_kept")


def rank_table(ranks: dict[str, int], sites: dict[str, tuple[int, str]]) -> dict[str, dict[str, int]]:
    """``{site: {layer: kept rank}}`` (layers × matrices), from branch keys."""
    table: dict[str, dict[str, int]] = {}
    for key, r in ranks.items():
        layer, site = sites[key]
        table.setdefault(site, {})[str(layer)] = r
    return table


def format_rank_table(table: dict[str, dict[str, int]]) -> str:
    sites = list(table)
    layers = sorted({int(l) for d in table.values() for l in d})
    w = max([len(s) for s in sites] + [6])
    lines = [f"{'layer':<6} " + " ".join(f"{s:>{w}}" for s in sites)]
    for l in layers:
        lines.append(f"{l:<6} " + " ".join(f"{table[s].get(str(l), ''):>{w}}" for s in sites))
    return "\n".join(lines)


def plot_rank_table(table: dict[str, dict[str, int]], path: str | os.PathLike, init_r: int | None = None) -> Path:
    """Layers × matrices heat map of the kept ranks, into a PNG (atomically)."""
    from unipelt.errors import UnipeltError
    from unipelt.io import atomic_output, is_png

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is an optional extra
        raise UnipeltError("plotting needs matplotlib: pip install 'unipelt[plot]' (the table is in report.json)") from e
    sites = list(table)
    layers = sorted({int(l) for d in table.values() for l in d})
    data = [[table[s].get(str(l), float("nan")) for s in sites] for l in layers]
    vmax = init_r or max((v for row in data for v in row if v == v), default=1)
    fig = Figure(figsize=(1.6 + 1.2 * len(sites), 1.2 + 0.4 * len(layers)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(data, vmin=0, vmax=vmax, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(sites)), labels=sites)
    ax.set_yticks(range(len(layers)), labels=[f"layer {l}" for l in layers])
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            if v == v:
                ax.text(j, i, str(int(v)), ha="center", va="center", color="white" if v < 0.6 * vmax else "black")
    fig.colorbar(im, ax=ax, label="kept rank")
    ax.set_title("AdaLoRA: ranks kept per matrix")
    fig.tight_layout()
    with atomic_output(path, kind="file", what="PNG", replaces=is_png) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


# ------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------
METHOD = MethodDef(
    name="adalora", config=AdaLoraConfig, site_kinds=frozenset({"linear"}),
    summary="AdaLoRA: W0x + s·B·(A⊙E)·x with the rank budget reallocated by importance while training",
    default_gate_input="layer",
)


@hookimpl
def unipelt_methods():
    return [METHOD]


@hookimpl
def unipelt_build_branch(method, config, node, site, model):
    if method.name != "adalora":
        return None
    return AdaLoraBranch(config, site.in_features, site.out_features)


@hookimpl
def unipelt_training_controllers(handle):
    from unipelt.errors import SpecError

    branches, sites, cfg = {}, {}, None
    for bp in handle.graph.branches:
        if bp.node.method != "adalora":
            continue
        if cfg is not None and bp.node.config.schedule_key() != cfg.schedule_key():
            raise SpecError("every adalora module of an adapter shares one budget: target_r, total_step, tinit, "
                            "tfinal, deltaT, beta1, beta2 and orth_reg_weight must agree",
                            source=handle.spec.source, path=f"modules.{bp.node.name}")
        if bp.node.config.total_step is None:
            raise SpecError("training AdaLoRA needs total_step (the optimizer steps of the run) for its budget "
                            "schedule", source=handle.spec.source, path=f"modules.{bp.node.name}.total_step")
        cfg = cfg or bp.node.config
        branches[bp.key] = handle.branch_modules[bp.key]
        sites[bp.key] = (bp.site.layer, bp.site.site)
    return [AdaLoraController(branches, cfg, sites)] if branches else []


def cmd_adalora_ranks(args) -> int:
    import json

    from unipelt.errors import UnipeltError

    run = Path(args.run)
    report = run / "report.json" if run.is_dir() else run
    try:
        data = json.loads(report.read_text(encoding="utf-8"))
        rep = data["controllers"]["AdaLoRA"]
        table = rep["table"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UnipeltError(f"{report}: no AdaLoRA rank table (controllers.AdaLoRA.table): {e}") from None
    print(format_rank_table(table))
    if args.plot:
        plot_rank_table(table, args.plot)
        print(f"plot written to {args.plot}")
    return 0


@hookimpl
def unipelt_add_commands(subparsers):
    p = subparsers.add_parser("adalora-ranks", help="the ranks AdaLoRA kept per matrix in a training run",
                              description="Print (and --plot as a PNG) the layers x matrices table of kept ranks "
                                          "from a run's report.json.")
    p.add_argument("run", help="run directory (or its report.json)")
    p.add_argument("--plot", metavar="PNG", help="write a heat map of the kept ranks")
    p.set_defaults(func=cmd_adalora_ranks)
