"""The handle returned by ``unipelt.compile``: save, load, merge, detach, summary, gate values."""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unipelt.arch import ModelInfo
from unipelt.errors import AdapterFileError, ModelError, SpecError
from unipelt.graph import CompiledGraph
from unipelt.registry import Registry
from unipelt.runtime import Entry, merge_branches
from unipelt.spec import Spec
from unipelt.state import (CONTAINER, base_param_count, get_state, memory_bytes, module_param_count, release_packed,
                           restore_model)

# the file format moved to unipelt.io; these names stay importable from here
from unipelt.io import FILE_FORMAT, FILE_FORMAT_VERSION, META_FILE, WEIGHTS_FILE, read_adapter_meta, swap_in_dir  # noqa: F401


def _fmt(n: int) -> str:
    return f"{n:,}"


@dataclass
class Summary:
    """Parameter counts of one adapter: per module, per layer, and in total."""

    adapter: str
    base_params: int
    rows: list[dict] = field(default_factory=list)  # module, method, layer, site, kept, training
    gates: list[dict] = field(default_factory=list)  # gate, layer, params
    memory: dict[str, int] | None = None  # bytes: {"base": ..., "adapter": ...} (state.memory_bytes)
    # AdapterDrop's fixed layers (``dropped: true``) train in the steps that do not draw them: a
    # random drop (``drop.random``), whose fixed layers are its inference choice only
    dropped_trains: bool = False

    # rows and gates switched off by pruning (``pruned: true``) count in neither total: the budget
    # holds on the active parameters, and the saved adapter leaves the pruned ones out
    @property
    def kept(self) -> int:
        return sum(r["kept"] for r in self.rows if not r.get("pruned")) + sum(g["params"] for g in self.gates if not g.get("pruned"))

    @property
    def training(self) -> int:
        return sum(r["training"] for r in self.rows if not r.get("pruned")) + sum(g["params"] for g in self.gates if not g.get("pruned"))

    @property
    def pruned(self) -> int:
        """Parameters (kept) of what pruning switched off."""
        return sum(r["kept"] for r in self.rows if r.get("pruned")) + sum(g["params"] for g in self.gates if g.get("pruned"))

    def is_active(self, row: dict) -> bool:
        """Whether a row (or gate) computes and trains: not pruned, and not in AdapterDrop's fixed
        layers unless those train in some steps (a random drop's inference layers)."""
        return not row.get("pruned") and (self.dropped_trains or not row.get("dropped"))

    def active(self, count: str = "kept") -> int:
        """Parameters that compute and train (``count``: ``kept`` or ``training``): neither pruned
        nor dropped by AdapterDrop's fixed layers (``dropped: true``: still saved, so in ``kept``),
        except where a random drop trains those in the steps that do not draw them. What a budget
        holds on."""
        rows = sum(r[count] for r in self.rows if self.is_active(r))
        return rows + sum(g["params"] for g in self.gates if self.is_active(g))

    @property
    def dropped(self) -> int:
        """Parameters (kept) of what AdapterDrop's fixed layers switch off (saved, not computed;
        with a random drop, at inference only)."""
        return (sum(r["kept"] for r in self.rows if r.get("dropped") and not r.get("pruned"))
                + sum(g["params"] for g in self.gates if g.get("dropped") and not g.get("pruned")))

    def per_module(self, active: bool = False) -> dict[str, dict[str, int]]:
        """Parameters per module (and gate), not pruned; ``active``: not dropped by AdapterDrop's
        fixed layers either (the shares of :meth:`active`)."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: {"kept": 0, "training": 0})
        for r in self.rows:
            if r.get("pruned") or (active and not self.is_active(r)):
                continue
            out[r["module"]]["kept"] += r["kept"]
            out[r["module"]]["training"] += r["training"]
        for g in self.gates:
            if g.get("pruned") or (active and not self.is_active(g)):
                continue
            out[f"gate:{g['gate']}"]["kept"] += g["params"]
            out[f"gate:{g['gate']}"]["training"] += g["params"]
        return dict(out)

    def to_dict(self) -> dict:
        return {
            "adapter": self.adapter, "base_params": self.base_params, "kept": self.kept,
            "training": self.training, "pruned": self.pruned, "percent_of_base": 100.0 * self.kept / max(self.base_params, 1),
            "modules": self.per_module(), "rows": self.rows, "gates": self.gates, "memory": self.memory,
        }

    def __str__(self) -> str:
        lines = [f"adapter {self.adapter!r}: parameters per module (kept after training / used in training)"]
        w = max([len(k) for k in self.per_module()] + [6])
        lines.append(f"  {'module':<{w}}  {'kept':>12}  {'training':>12}  {'% of base':>9}")
        for name, c in self.per_module().items():
            pct = 100.0 * c["kept"] / max(self.base_params, 1)
            lines.append(f"  {name:<{w}}  {_fmt(c['kept']):>12}  {_fmt(c['training']):>12}  {pct:>8.3f}%")
        pct = 100.0 * self.kept / max(self.base_params, 1)
        lines.append(f"  {'total':<{w}}  {_fmt(self.kept):>12}  {_fmt(self.training):>12}  {pct:>8.3f}%")
        if self.pruned:
            lines.append(f"  pruned (left out): {_fmt(self.pruned)} parameters")
        if self.dropped:
            when = " at inference; trained in the steps that do not draw them" if self.dropped_trains else ""
            lines.append(f"  dropped by AdapterDrop (saved, not computed{when}): {_fmt(self.dropped)} parameters")
        lines.append(f"  base model: {_fmt(self.base_params)} parameters")
        if self.memory:
            lines.append(f"  memory: base {self.memory['base'] / 2**20:,.1f} MiB, adapter {self.memory['adapter'] / 2**20:,.2f} MiB")
        by_layer: dict[Any, int] = defaultdict(int)
        for r in self.rows:
            if not r.get("pruned"):
                by_layer[r["layer"]] += r["kept"]
        for g in self.gates:
            if not g.get("pruned"):
                by_layer[g["layer"]] += g["params"]
        layers = sorted(by_layer, key=lambda x: (x is None, x if x is not None else 0))
        lines.append("  per layer: " + ", ".join(f"{'global' if l is None else 'L' + str(l)}={_fmt(by_layer[l])}" for l in layers))
        return "\n".join(lines)


@dataclass
class GateReport:
    """Gate values over a batch: ``values[(module, layer)]`` is a (batch,) tensor (per-token
    gates averaged over the real tokens of each example)."""

    values: dict[tuple[str, int], Tensor]

    def table(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = defaultdict(dict)
        for (node, layer), v in sorted(self.values.items()):
            out[node][layer] = float(v.float().mean())
        return dict(out)

    def __str__(self) -> str:
        t = self.table()
        layers = sorted({l for d in t.values() for l in d})
        w = max([len(n) for n in t] + [6])
        lines = [f"{'module':<{w}}  " + " ".join(f"{('L' + str(l)) if l >= 0 else 'global':>6}" for l in layers)]
        for node, d in t.items():
            lines.append(f"{node:<{w}}  " + " ".join(f"{d[l]:>6.3f}" if l in d else f"{'':>6}" for l in layers))
        return "\n".join(lines)


class AdapterHandle:
    """One named adapter attached to a model."""

    def __init__(self, *, name: str, model: nn.Module, spec: Spec, info: ModelInfo, graph: CompiledGraph,
                 container: nn.Module, branch_modules: dict[str, nn.Module], gate_modules: dict[str, nn.Module],
                 registry: Registry, shared_modules: dict[str, nn.Module] | None = None):
        self.name = name
        self.model = model
        self.spec = spec
        self.info = info
        self.graph = graph
        self.container = container
        self.branch_modules = branch_modules
        self.gate_modules = gate_modules
        self.shared_modules = shared_modules or {}
        self.registry = registry
        self.entries: dict[str, Entry] = {}
        self._attached = False
        # Parameters are recorded by identity as the modules are created: the canonical key of
        # each is "<node>.<layer>.<site>.<param>" or "gate.<gate>.<layer>.<param>", never found by
        # matching names in the model.
        # Two nodes may select the same base parameter (BitFit and LN tuning both take the LN
        # biases): the first key wins, so each tensor is trained, saved and loaded once.
        self._params: dict[str, nn.Parameter] = {}
        seen: set[int] = set()
        for node, mod in self.shared_modules.items():
            for pname, p in mod.named_parameters():
                seen.add(id(p))
                self._params[f"{node}.shared.{pname}"] = p
        for key, mod in branch_modules.items():
            for pname, p in self._branch_params(mod):
                if id(p) not in seen:
                    seen.add(id(p))
                    self._params[f"{key}.{pname}"] = p
        for key, mod in gate_modules.items():
            for pname, p in mod.named_parameters():
                self._params[f"gate.{key}.{pname}"] = p

    # -- copies (copy.deepcopy, pickle, torch.save of the adapted model) ---------------------
    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        # the plugin registry holds the plugin modules (not picklable); a copy uses the process's
        d["registry"] = None
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        if self.registry is None:
            from unipelt.registry import get_registry

            self.registry = get_registry()

    @staticmethod
    def _branch_params(mod: nn.Module):
        extra = getattr(mod, "external_parameters", None)
        yield from mod.named_parameters()
        if extra is not None:
            yield from extra()

    # -- parameters ------------------------------------------------------------------------
    def named_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable parameters of this adapter by canonical key."""
        return dict(self._params)

    def parameters(self) -> list[nn.Parameter]:
        return list(self._params.values())

    def lr_scales(self) -> dict[int, float]:
        """``id(parameter) -> lr_scale`` for the parameters of nodes whose spec sets ``lr_scale``
        (branches and their shared modules, such as a prefix MLP; gates are not included)."""
        out: dict[int, float] = {}
        for bp in self.graph.branches:
            if bp.node.lr_scale != 1.0:
                for _, p in self._branch_params(self.branch_modules[bp.key]):
                    out[id(p)] = bp.node.lr_scale
        for node, mod in self.shared_modules.items():
            scale = self.spec.modules[node].lr_scale
            if scale != 1.0:
                for p in mod.parameters():
                    out[id(p)] = scale
        return out

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters grouped by role (``lora_A``, ``lora_B``, ``gate``, ``other``), as
        branch modules label them through an optional ``param_roles()``; trainers use this for
        per-group learning rates (LoRA+)."""
        roles: dict[int, str] = {}
        for mod in self.branch_modules.values():
            for pname, role in getattr(mod, "param_roles", lambda: {})().items():
                roles[id(getattr(mod, pname))] = role
        for mod in self.gate_modules.values():
            for p in mod.parameters():
                roles[id(p)] = "gate"
        groups: dict[str, list[nn.Parameter]] = defaultdict(list)
        for p in self._params.values():
            groups[roles.get(id(p), "other")].append(p)
        return dict(groups)

    def state_dict(self) -> dict[str, Tensor]:
        """The adapter's tensors under canonical keys, for training-time (all) parameters; what
        pruning switched off (the spec's ``pruned:``) is left out."""
        from unipelt.pruning import inactive_keys, is_inactive

        off = inactive_keys(self)
        # a tensor trained in place that another adapter holds now: this adapter's values are
        # the ones kept aside (and load_state_dict copies into those)
        aside = {id(p): h for e in self.entries.values() if e.held is not None and e.saved is not None
                 for (p, _), h in zip(e.saved, e.held) if h is not None}
        out: dict[str, Tensor] = {k: aside.get(id(p), p).detach() for k, p in self._params.items() if not is_inactive(k, off)}
        for key, mod in self.branch_modules.items():
            for bname, b in mod.named_buffers():
                if getattr(mod, "persistent_buffers", True) and bname not in getattr(mod, "_non_persistent_buffers_set", set()):
                    if not is_inactive(f"{key}.{bname}", off):
                        out[f"{key}.{bname}"] = b.detach()
        # a shared module's persistent buffers (VeRA's frozen projections, when saved)
        for node, mod in self.shared_modules.items():
            for mname, m in mod.named_modules():
                for bname, b in m.named_buffers(recurse=False):
                    if bname not in m._non_persistent_buffers_set:
                        out[f"{node}.shared.{mname + '.' if mname else ''}{bname}"] = b.detach()
        return out

    def load_state_dict(self, tensors: dict[str, Tensor], *, source: str = "<state dict>") -> None:
        """Copy tensors into the adapter; missing, unexpected or misshaped keys, integer or boolean
        tensors for floating-point parameters, and non-finite values are errors, and nothing is
        copied unless everything fits."""
        from unipelt.io import key_mismatch

        own = self.state_dict()
        mismatch = key_mismatch(own, tensors)
        if mismatch:
            raise AdapterFileError(f"{source}: the adapter does not match its spec ({mismatch})")
        for k, t in tensors.items():
            if tuple(own[k].shape) != tuple(t.shape):
                raise AdapterFileError(f"{source}: tensor {k!r} has shape {tuple(t.shape)}, expected {tuple(own[k].shape)}")
        # no silent cast of an int/bool tensor, and no NaN or infinity copied into the model
        from unipelt.io import check_values

        check_values(tensors, own, source=source)
        with torch.no_grad():
            for k, t in tensors.items():
                own[k].copy_(t.to(device=own[k].device, dtype=own[k].dtype))

    # -- budget and summary ----------------------------------------------------------------
    def summary(self, base_params: int | None = None) -> Summary:

        from unipelt.pruning import fixed_dropped_keys, gate_is_off, shared_is_off

        s = Summary(adapter=self.name, base_params=base_params if base_params is not None else base_param_count(self.model),
                    dropped_trains=self.spec.drop is not None and self.spec.drop.random is not False)
        if get_state(self.model) is not None:  # attached: the model holds the adapter's tensors
            own = sum(p.numel() * p.element_size() for p in self.named_parameters().values())
            s.memory = {"base": memory_bytes(self.model)["base"], "adapter": own}
        pruned = set(self.spec.pruned)
        # dropped: AdapterDrop's fixed layers (what no branch computes; a gate or shared module
        # all of whose branches are pruned or dropped too), saved but not active
        off = pruned | fixed_dropped_keys(self)
        for bp in self.graph.branches:
            mod = self.branch_modules[bp.key]
            s.rows.append({
                "module": bp.node.name, "method": bp.method.name, "layer": bp.site.layer, "site": bp.site.site,
                "kept": module_param_count(mod, kept=True), "training": module_param_count(mod, kept=False),
                "pruned": bp.key in pruned, "dropped": bp.key in off and bp.key not in pruned,
            })
        for node, mod in self.shared_modules.items():
            gone = bool(pruned) and shared_is_off(self, node, pruned)
            s.rows.append({
                "module": node, "method": self.spec.modules[node].method, "layer": None, "site": "shared",
                "kept": module_param_count(mod, kept=True), "training": module_param_count(mod, kept=False),
                "pruned": gone, "dropped": not gone and off != pruned and shared_is_off(self, node, off),
            })
        for key, gp in self.graph.gates.items():
            # a collapsed gate is a constant: no parameters
            n = 0 if key in self.spec.collapsed else sum(p.numel() for p in self.gate_modules[key].parameters())
            gone = bool(pruned) and gate_is_off(self, key, pruned)
            s.gates.append({"gate": gp.gate_id, "layer": gp.layer, "params": n, "pruned": gone,
                            "dropped": not gone and off != pruned and gate_is_off(self, key, off)})
        return s

    def check_budget(self, base_params: int) -> None:
        b = self.spec.budget
        if b is None:
            return
        s = self.summary(base_params)
        used = self._budget_used(s)
        limit = b.max_params if b.max_params is not None else int(b.fraction * base_params)
        needs = f"the spec needs {_fmt(used)} parameters ({b.count})"
        if used > limit and self._prunes_to_budget():
            # training prunes gated branches toward the budget: what it cannot remove must fit
            floor = self._unprunable(s, b.count)
            if floor <= limit:
                return
            needs = (f"the spec needs {_fmt(floor)} parameters ({b.count}) that pruning cannot remove (ungated "
                     f"branches, shared modules, parameters trained in place; of {_fmt(used)} in all)")
            used = floor
        if used > limit:
            what = f"max_params {_fmt(limit)}" if b.max_params is not None else f"fraction {b.fraction} of {_fmt(base_params)} = {_fmt(limit)}"
            # one paragraph: the total, the limit, and each module's share of it, largest first
            shares = sorted(((c[b.count], name) for name, c in s.per_module(active=True).items()), reverse=True)
            parts = ", ".join(f"{name} {_fmt(n)}" for n, name in shares)
            raise SpecError(
                f"{needs}, over the budget ({what}); per module: {parts}. "
                "Shrink the largest modules or raise the budget",
                source=self.spec.source, path="budget",
            )

    def _budget_used(self, s: Summary) -> int:
        """The parameters the budget counts (its ``count``): the active ones, which compute and
        train (not pruned, not in AdapterDrop's fixed layers), with or without pruning toward the
        budget (``to_budget``), as that pruning and its progress output count them."""
        return s.active(self.spec.budget.count)

    def _prunes_to_budget(self) -> bool:
        return any(p is not None and p is not False and p.to_budget
                   for p in [self.spec.prune] + [m.prune for m in self.spec.modules.values()])

    def _unprunable(self, s: Summary, count: str) -> int:
        """Active parameters that budget pruning cannot remove: branches without a gate (or whose
        module does not prune to the budget), shared modules, and gates of such branches; not
        those AdapterDrop's fixed layers switch off (they compute nothing)."""
        prunable_nodes = {n for n in self.spec.modules if (p := self.spec.prune_for(n)) is not None and p.to_budget}
        gated = {bp.key for bp in self.graph.branches if bp.gate_key and bp.node.name in prunable_nodes}
        total = 0
        for bp, r in zip(self.graph.branches, s.rows):
            if s.is_active(r) and bp.key not in gated:
                total += r[count]
        total += sum(r[count] for r in s.rows[len(self.graph.branches):] if s.is_active(r))
        for (key, gp), g in zip(self.graph.gates.items(), s.gates):
            if s.is_active(g) and not all(u in gated for u in gp.users):
                total += g["params"]
        return total

    # -- gates -----------------------------------------------------------------------------
    @torch.no_grad()
    def gates(self, batch: dict[str, Tensor] | Tensor) -> GateReport:
        """Run one forward on ``batch`` and return each gated module's gate values per layer."""
        self.require_active("its gates are read off the forward it runs in")
        state = get_state(self.model)
        ctx = state.ctx
        ctx.record = {}
        try:
            if isinstance(batch, Tensor):
                self.model(batch)
            else:
                self.model(**batch)
            rec = ctx.record
            # the mask the model saw: a prompt's rewrite extends the caller's by its virtual tokens
            mask = ctx.attention_mask
        finally:
            ctx.record = None
        values: dict[tuple[str, int], Tensor] = {}
        for (adapter, node, layer), gs in rec.items():
            if adapter != self.name:
                continue
            g = gs[-1].float()  # shape (B, T or 1, k)
            # separate K/V prefix gates (k = 2) are two gates: one row each
            names = [f"{node}[k]", f"{node}[v]"] if g.shape[-1] == 2 else [node]
            for i, name in enumerate(names):
                gi = g[..., i] if len(names) > 1 else g.mean(-1)
                if gi.shape[1] > 1 and mask is not None and mask.dim() == 2 and mask.shape[1] >= gi.shape[1]:
                    m = mask[:, -gi.shape[1]:].to(gi.device, gi.dtype)
                    v = (gi * m).sum(1) / m.sum(1).clamp_min(1)
                else:
                    v = gi.mean(1)
                values[(name, layer)] = v
        return GateReport(values)

    def require_active(self, why: str) -> None:
        """A ModelError unless this adapter runs: active, or fused by an active AdapterFusion (an
        adapter that does not run cannot be measured)."""
        state = get_state(self.model)
        active = state.ctx.active
        if self.name not in state.running(set(active)):
            raise ModelError(f"adapter {self.name!r} is not active (active: {', '.join(sorted(active)) or 'none'}); "
                             f"{why}: unipelt.set_adapter(model, {self.name!r}) first")

    # -- after training ---------------------------------------------------------------------
    def drop_reparameterization(self) -> int:
        """Keep only what inference needs: branches with a training-time reparameterisation
        (the prefix MLP, P-tuning's prompt encoder) compute their final tensors once and drop
        the rest (``materialize()``, which returns the spec fields that now describe the
        branch). The stored spec is updated (``reparam: none``, ``encoder: none``), so the saved
        adapter reloads as it is. Returns the number of parameters dropped."""
        from unipelt.pruning import inactive_keys, is_inactive

        before = sum(p.numel() for p in self._params.values())
        changed: dict[str, dict] = {}
        materialized: list[str] = []
        # whether each materialized branch trains now: not if pruned (frozen for good), nor if what
        # computed it was frozen (its own parameters, else its module's shared ones: a fused member)
        inactive = inactive_keys(self)
        trains: dict[str, bool] = {}
        before_params: dict[str, list[nn.Parameter]] = {}
        for key, mod in self.branch_modules.items():
            if hasattr(mod, "materialize"):
                node = key.split(".", 1)[0]
                params = list(mod.parameters()) or (list(self.shared_modules[node].parameters())
                                                    if node in self.shared_modules else [])
                before_params[key] = params
                trains[key] = not is_inactive(f"{key}.", inactive) and (not params or any(p.requires_grad for p in params))
                # the branch says which spec fields now describe it ({field: value, or None: drop it})
                changed[key.split(".", 1)[0]] = mod.materialize() or {}
                materialized.append(key)
        for node in list(self.shared_modules):
            if getattr(self.shared_modules[node], "inference", False):
                continue  # used at inference too (VeRA's shared projections): kept
            del self.container.shared[node]
            del self.shared_modules[node]
        for node, fields in changed.items():
            raw = self.spec.raw.get("modules", {}).get(node)
            config = self.spec.modules[node].config
            for name, value in fields.items():
                if isinstance(raw, dict):
                    if value is None:
                        raw.pop(name, None)
                    else:
                        raw[name] = value
                if value is not None:
                    setattr(config, name, value)
        self._params = {k: p for k, p in self._params.items() if ".shared." not in k}
        # a materialized branch's parameters are new objects, and its own reparameterisation (a
        # per-layer prefix MLP, P-tuning's encoder) is gone: track exactly what it holds now
        self._params = {k: p for k, p in self._params.items() if not any(k.startswith(f"{m}.") for m in materialized)}
        for key in materialized:
            for pname, p in self.branch_modules[key].named_parameters():
                self._params[f"{key}.{pname}"] = p
                p.requires_grad_(trains[key])
        state = get_state(self.model)
        live = [k for k in materialized if not is_inactive(f"{k}.", inactive)]  # pruned: frozen for good
        if state is not None and self._attached and live:
            # what holds the old objects follows (a fusion over this adapter gives the new ones
            # their flags back on detach, not the dropped MLP's)
            self.registry.hook.unipelt_parameters_replaced(
                model=self.model, state=state, handle=self,
                replaced=[(before_params[k], list(self.branch_modules[k].parameters())) for k in live])
        return before - sum(p.numel() for p in self._params.values())

    # -- collapse for serving ----------------------------------------------------------------
    def collapse(self, calibration_batches, *, closed: float = 0.01, spread: float = 0.02,
                 tolerance: float | None = None, merge: bool = True):
        """Collapse this gated adapter for serving on calibration data (:mod:`unipelt.collapse`):
        branches of closed gates pruned, nearly constant gates replaced by their value, the prefix
        without its MLP, LoRA with a constant gate merged. Returns a
        :class:`~unipelt.collapse.CollapseReport` (the measured output difference, parameters
        before and after); beyond ``tolerance`` raises :class:`~unipelt.collapse.CollapseError`
        and leaves the model as it was. ``save()`` afterwards writes the collapsed adapter."""
        from unipelt.collapse import collapse

        return collapse(self, calibration_batches, closed=closed, spread=spread, tolerance=tolerance, merge=merge)

    # -- merge / detach --------------------------------------------------------------------
    def merge(self) -> dict[str, list[str]]:
        """Fold every mergeable branch into the base weights; returns which were merged and
        which stay live (gated or non-linear branches cannot be merged), and ``dequantized``:
        the quantized layers (4-bit, 8-bit) that merging replaced by a dequantized float copy
        (a packed weight cannot take the delta; unmerge puts the quantized layer back). A
        warning says so when there are any."""
        from unipelt.collapse import constant_delta_weight
        from unipelt.pruning import ConstantGate

        _refuse_sharded(self.model, [bp.site.path for bp in self.graph.branches])
        merged, live, todo = [], [], []
        was_dense = {bp.site.path for bp in self.graph.branches
                     if not getattr(self.model.get_submodule(bp.site.path), "merged_dequantized", False)}
        for bp in self.graph.branches:
            e = self.entries[bp.key]
            mod = e.branch
            host_module = self.model.get_submodule(bp.site.path)
            # An averaged hook point divides the sum of its live branches by their number: folding
            # one branch's full delta into the weight would change that average, so it stays live.
            averaged = self.graph.combine.get(bp.site.key, "parallel") == "average"
            # a gate collapsed to a constant (unipelt.collapse) folds into the merged weight
            can = (
                (e.gate is None or isinstance(e.gate, ConstantGate)) and not e.off and not averaged
                and getattr(mod, "mergeable", False) and hasattr(host_module, "merge_delta")
            )
            if e.merged:
                merged.append(bp.key)
            elif e.off:
                continue
            elif can:
                # under a constant gate (collapse) the gate is folded into the delta
                todo.append((host_module, mod, bp.site.out_slice,
                             constant_delta_weight(e) if e.gate is not None else None))
                e.merged = True
                merged.append(bp.key)
            else:
                live.append(bp.key)
        merge_branches(todo)
        get_state(self.model).refresh()
        dequantized = sorted({bp.site.path for bp in self.graph.branches if bp.site.path in was_dense
                              and getattr(self.model.get_submodule(bp.site.path), "merged_dequantized", False)})
        if dequantized:
            import warnings

            dtype = self.model.get_submodule(dequantized[0]).base_layer.weight.dtype
            warnings.warn(f"adapter {self.name!r}: merged into dequantized {str(dtype).removeprefix('torch.')} copies of "
                          f"{len(dequantized)} quantized layer(s) (their memory grows to 16/32 bits; unmerge() "
                          "restores the quantized layers)", stacklevel=2)
        return {"merged": merged, "live": live, "dequantized": dequantized}

    def unmerge(self) -> None:
        """Undo ``merge`` exactly (the original weights were kept)."""
        state = get_state(self.model)
        paths = {bp.site.path for bp in self.graph.branches if self.entries[bp.key].merged}
        for path in paths:
            self.model.get_submodule(path).restore_weight()
        for e in self.entries.values():
            e.merged = False
        # another adapter's merges on the same weights were undone too: re-apply them
        for other in state.handles.values():
            if other is not self:
                from unipelt.collapse import constant_delta_weight

                merge_branches([
                    (self.model.get_submodule(bp.site.path), other.entries[bp.key].branch, bp.site.out_slice,
                     constant_delta_weight(other.entries[bp.key]) if other.entries[bp.key].gate is not None else None)
                    for bp in other.graph.branches
                    if other.entries[bp.key].merged and bp.site.path in paths
                ])
        state.refresh()

    def detach(self) -> None:
        """Remove this adapter; when it was the last one, restore the exact original modules."""
        state = get_state(self.model)
        if state is None or not self._attached:
            return
        if any(e.merged for e in self.entries.values()):
            self.unmerge()
        # packed for mixed batches: its LoRA tensors are views into stacks the other adapters
        # keep training; they become its own first
        release_packed(self.model, self.name)
        for bp in self.graph.branches:
            e = self.entries.get(bp.key)
            if e is not None:
                self.registry.hook.unipelt_detach_branch(model=self.model, state=state, site=bp.site, entry=e)
        container = self.model._modules.get(CONTAINER)
        if container is not None and self.name in container:
            del container[self.name]
        state.handles.pop(self.name, None)
        for key in [k for k, g in state.ctx.groups.items() if g.adapter == self.name]:
            del state.ctx.groups[key]
        self._attached = False
        if not state.handles:
            restore_model(self.model, state)
        else:
            state.set_active(state.ctx.active - {self.name})

    # -- save / load (the file format lives in unipelt.io) ------------------------------------
    def metadata(self) -> dict:
        from unipelt import io

        return io.metadata(self)

    def fingerprint(self) -> dict:
        """Architecture and the shapes of every hook point this adapter attaches to."""
        from unipelt import io

        return io.fingerprint(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``adapter.safetensors`` and ``unipelt.json`` atomically into directory ``path``
        (:func:`unipelt.io.save_adapter`): an existing adapter there is never half-overwritten, and
        anything else there (a file, a non-empty directory that is not an adapter) is refused with
        :class:`~unipelt.errors.OutputError`. ``unipelt.json`` records every tensor's dtype, shape
        and sha256."""
        from unipelt import io

        return io.save_adapter(self, path)

    def __repr__(self) -> str:
        return f"AdapterHandle(name={self.name!r}, architecture={self.info.arch.name!r}, modules={list(self.spec.modules)})"




def _refuse_sharded(model: nn.Module, paths: list[str]) -> None:
    """Merging adds a full delta to each base weight; one that FSDP2 sharded (a DTensor) holds
    only this process's rows, so the merge is refused (``--distributed fsdp2``)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return
    for path in dict.fromkeys(paths):
        w = getattr(model.get_submodule(path), "weight", None)
        if isinstance(w, DTensor):
            raise ModelError(f"{path}.weight is sharded by FSDP2 (--distributed fsdp2): an adapter cannot be merged "
                             "into a sharded base; save the adapter and merge it into the unsharded base "
                             "(unipelt merge ADAPTER MODEL --out DIR)")


def load(model: nn.Module, path: str | os.PathLike, name: str | None = None, *, registry: Registry | None = None) -> AdapterHandle:
    """Attach a saved adapter to ``model`` and load its verified weights (:func:`unipelt.io.load_adapter`).

    A base model the adapter was not made for, a corrupt file (bytes that do not match their
    checksum, NaN values, unexpected dtypes) or missing/unexpected tensors raise
    :class:`AdapterFileError` naming the file and the field; a name already attached raises
    :class:`ModelError`. The model is left as it was.

    A Hugging Face PEFT adapter directory (``adapter_config.json``, no ``unipelt.json``) is
    translated on the way in (:func:`unipelt.peft_import.load_peft`).
    """
    from unipelt import io
    from unipelt.peft_import import is_peft_dir, load_peft

    if is_peft_dir(path) and not (Path(path) / io.META_FILE).exists():
        return load_peft(model, path, name, registry=registry)
    return io.load_adapter(model, path, name, registry=registry)
