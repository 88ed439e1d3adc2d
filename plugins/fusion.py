"""AdapterFusion (Pfeiffer et al., EACL 2021, arXiv 2005.00247): per layer, attention over the
outputs of N trained adapters, which stay frozen; only the fusion layer trains.

Declared under ``combine`` of a spec compiled onto a model that already carries the adapters by
name (``unipelt.load(model, path, name="a")``)::

    combine:
      ffn.out: {mode: fusion, adapters: [a, b, c]}

At layer l, with q the tensor the fused adapters read at the hook point (the sublayer output h
for Houlsby's ``ffn.out``, a = N(h + x) at Pfeiffer's ``ffn.res``, the FFN input at ``ffn``) and
Δ_i the delta adapter i would add there (its gate included, if it has one):

    s_i = (W_Q q + b_Q) · (W_K Δ_i + b_K)          (one score per token and adapter)
    p   = softmax_i(dropout(s) / T)
    Δ   = Σ_i p_i · W_V Δ_i                         (W_V without bias)

and the hook point adds Δ where it would have added Σ_i Δ_i: the residual is the hook point's own
(``y + Δ`` at an output, ``N(s + Δ)`` at a renorm site). This is AdapterHub ``adapters``' BertFusion
with its "dynamic" configuration (query, key and value projections; ``value_before_softmax``;
``residual_before: False``, so the residual is added after the attention and not to each value;
``query_before_ln: False``, so the query is what the adapters read; W_Q, W_K ~ N(0, 0.02) with zero
biases; W_V the identity with 1e-6 off the diagonal) and its regulariser
λ·Σ_layers ‖I − W_V‖² (λ = 0.01), added to the training loss by a training controller.
Differences, all options: ``value: false`` is its "static" configuration (no W_V, no regulariser);
``temperature`` is a fixed T (AdapterHub's ``temperature: True`` anneals T from 50 to 1 inside the
forward, a hidden state we do not keep); ``dropout`` on the scores defaults to 0 (AdapterHub uses
the model's attention dropout). AdapterHub fuses an adapter's output before its gate; here the
adapter's delta as it would be added, gate included (the two agree on ungated adapters).

A saved fusion records what identifies each fused adapter (``fusion.members`` in ``unipelt.json``:
a sha256 over the adapter's tensors as it saves them, and its modules' methods); loading it onto a
model where another adapter is attached under one of those names is refused (the attention would
run over the wrong adapter). A fusion saved before the record loads with a warning.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from unipelt.errors import AdapterFileError, ModelError, SpecError, UnipeltWarning
from unipelt.hookspecs import hookimpl
from unipelt.registry import MethodDef


@dataclass
class FusionConfig:
    """adapters: the attached adapters fused (two or more). value: learn W_V (AdapterHub's dynamic
    fusion) or not (static). value_init: ``identity`` (W_V = I, 1e-6 elsewhere) or ``bert`` (N(0, 0.02)).
    temperature: T of the softmax. dropout: on the attention scores. regularization: λ of
    λ·‖I − W_V‖² added to the training loss (ignored without W_V)."""

    adapters: list[str] = field(default_factory=list)
    value: bool = True
    value_init: str = "identity"
    temperature: float = field(default=1.0, metadata={"min": 1e-6})
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.99})
    regularization: float = field(default=0.01, metadata={"min": 0.0})

    def validate(self) -> tuple[str, str] | None:
        if self.value_init not in ("identity", "bert"):
            return "value_init", f"expected 'identity' or 'bert', got {self.value_init!r}"
        return None


def _bert_init(linear: nn.Linear) -> None:
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.02)
        if linear.bias is not None:
            linear.bias.zero_()


class FusionBranch(nn.Module):
    """The fusion layer of one hook point of one layer. It does not run as a branch of its own:
    the hook point's runtime (:class:`unipelt.runtime.SiteRuntime`) computes the fused adapters'
    deltas and calls :meth:`fuse` where it would have summed them."""

    mergeable = False

    def __init__(self, cfg: FusionConfig, d: int, reads: str):
        super().__init__()
        self.reads = reads
        self.fuses: tuple[str, ...] = tuple(cfg.adapters)
        self.temperature = float(cfg.temperature)
        self.regularization = float(cfg.regularization)
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        _bert_init(self.query)
        _bert_init(self.key)
        self.value = nn.Linear(d, d, bias=False) if cfg.value else None
        if self.value is not None:
            with torch.no_grad():
                if cfg.value_init == "identity":
                    self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
                else:
                    _bert_init(self.value)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        raise RuntimeError("a fusion layer combines the deltas of other adapters: SiteRuntime calls fuse()")

    def fuse(self, query: Tensor, deltas: Tensor) -> Tensor:
        """query (..., d), deltas (..., N, d) -> the fused delta (..., d)."""
        q = self.query(query).unsqueeze(-1)  # (..., d, 1)
        k = self.key(deltas)  # (..., N, d)
        scores = torch.matmul(k, q).squeeze(-1)  # (..., N)
        probs = torch.softmax(self.dropout(scores) / self.temperature, dim=-1)
        v = self.value(deltas) if self.value is not None else deltas
        return torch.matmul(probs.unsqueeze(-2), v).squeeze(-2)

    def regularizer(self) -> Tensor | None:
        """λ·‖I − W_V‖² (AdapterHub's fusion regularisation), or None without W_V."""
        if self.value is None or self.regularization == 0:
            return None
        w = self.value.weight
        eye = torch.eye(w.shape[0], device=w.device, dtype=w.dtype)
        return self.regularization * (eye - w).pow(2).sum()


METHOD = MethodDef(
    name="fusion", config=FusionConfig, site_kinds=frozenset({"output", "io", "renorm"}),
    summary="AdapterFusion: attention over attached adapters' outputs (declared as combine: {site: {mode: fusion, adapters: [...]}})",
)


@hookimpl
def unipelt_methods():
    return [METHOD]


@hookimpl
def unipelt_build_branch(method, config, node, site, model):
    if method.name != "fusion":
        return None
    return FusionBranch(config, site.out_features, reads="input" if site.kind == "io" else "output")


@hookimpl(tryfirst=True)
def unipelt_attach_branch(model, state, site, entry, graph, registry):
    """Check the fused adapters against the model and freeze them; the core then attaches the
    entry at the hook point like any other (returns None)."""
    fuses = getattr(entry.branch, "fuses", None)
    if not isinstance(entry.branch, FusionBranch) or not fuses:
        return None
    path = f"combine.{site.site}.adapters"
    source = getattr(graph, "source", None)
    host = state.hosts.get(site.path)
    rt = host.runtimes.get(site.key) if host is not None else None
    here = {e.adapter for e in rt.entries} if rt is not None else set()
    for i, name in enumerate(fuses):
        handle = state.handles.get(name)
        if handle is None:
            attached = ", ".join(n for n in state.handles) or "(none)"
            raise SpecError(f"no adapter named {name!r} is attached to fuse (attached: {attached}); load the "
                            f"adapters first: unipelt.load(model, path, name={name!r})", source=source, path=f"{path}[{i}]")
        if any(isinstance(e.branch, FusionBranch) for e in handle.entries.values()):
            raise SpecError(f"{name!r} is itself a fusion; fusing fusions is not supported", source=source,
                            path=f"{path}[{i}]")
        if name not in here:
            raise SpecError(f"adapter {name!r} has no branch at {site.site} of layer {site.layer}; fuse it where "
                            "it has one (`layers:` of the fusion)", source=source, path=f"{path}[{i}]")
        if name in state.ctx.packed:
            # its LoRA trains through the stacked tensors it shares with the other packed adapters,
            # which freezing its own (views) cannot stop; and unpacking under the fusion gave it its
            # pre-fusion flags back, trainable while fused
            raise ModelError(f"{path}[{i}]: adapter {name!r} is packed for mixed batches (unipelt.pack_mixed): its "
                             "LoRA trains through the stacked parameters, which a fusion cannot freeze; call "
                             "unipelt.unpack_mixed(model) before fusing it")
    # only the fusion layer trains: the fused adapters are frozen while it is attached (each
    # entry records what it froze itself, so the flags come back whatever the detach order).
    # Base tensors the fusion's own spec trains in place (its `train` at `head`, which `unipelt
    # train` adds for classification) stay trainable although a fused adapter trained the same
    # tensor: the target task's head trains with the fusion, as in the paper; freezing it here
    # (the head attaches before the fusion layers) left the added head silently untrained.
    from unipelt_plugins.params import in_place_parameters

    own = {id(p) for bp in graph.branches for p in in_place_parameters(bp.method.name, bp.site)}
    saved = []
    for name in fuses:
        for p in state.handles[name].parameters():
            if p.requires_grad and id(p) not in own:
                saved.append(p)
                p.requires_grad_(False)
    entry.saved = saved
    return None


@hookimpl(tryfirst=True)
def unipelt_detach_branch(model, state, site, entry):
    if isinstance(entry.branch, FusionBranch) and isinstance(entry.saved, list):
        for p in entry.saved:
            p.requires_grad_(True)
        entry.saved = None
    return None


# ------------------------------------------------------------------------------------------
# what a saved fusion records of the adapters it fuses
# ------------------------------------------------------------------------------------------
def fused_names(handle) -> list[str]:
    """The adapters ``handle``'s fusion layers fuse, in spec order (none when it is no fusion)."""
    names: dict[str, None] = {}
    for mod in handle.branch_modules.values():
        if isinstance(mod, FusionBranch):
            names.update(dict.fromkeys(mod.fuses))
    return list(names)


def member_record(member) -> dict:
    """What identifies a fused adapter: a sha256 over the tensors it saves (``state_dict``: keys,
    shapes and values, floating ones as float64, so that an exact cast such as bf16 -> fp32 keeps
    it), their number, and the method of each of its modules. A save/load round trip of the
    adapter gives the same record; another adapter under its name does not."""
    from unipelt.io import tensor_sha256

    tensors = member.state_dict()
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach()
        if t.is_floating_point():
            t = t.to(torch.float64)
        h.update(f"{key}:{tuple(t.shape)}:{tensor_sha256(t)};".encode())
    return {"sha256": h.hexdigest(), "tensors": len(tensors),
            "modules": {name: node.method for name, node in member.spec.modules.items()}}


def _difference(saved: dict, now: dict) -> str:
    modules = saved.get("modules")
    if isinstance(modules, dict) and modules != now["modules"]:
        names = sorted(set(modules) | set(now["modules"]))
        parts = [f"{n}: {modules.get(n, 'none')} saved, {now['modules'].get(n, 'none')} attached"
                 for n in names if modules.get(n) != now["modules"].get(n)]
        return "modules " + "; ".join(parts)
    if saved.get("tensors") != now["tensors"]:
        return f"{saved.get('tensors')} tensors saved, {now['tensors']} attached"
    return f"other tensor values: sha256 {str(saved['sha256'])[:12]}... saved, {now['sha256'][:12]}... attached"


@hookimpl
def unipelt_adapter_saved(handle, path, metadata):
    names = fused_names(handle)
    if not names:
        return
    from unipelt.state import get_state

    handles = get_state(handle.model).handles
    missing = [n for n in names if n not in handles]
    if missing:
        # (the saved file would name an adapter it cannot identify; nothing is written)
        raise ModelError(f"fusion {handle.name!r} cannot be saved: fused adapter(s) no longer attached: "
                         f"{', '.join(map(repr, missing))}; the saved fusion records what it fuses, so attach them "
                         "again under those names first")
    metadata["fusion"] = {"members": {n: member_record(handles[n]) for n in names}}


@hookimpl
def unipelt_adapter_loaded(handle, path, metadata):
    """A fusion loads only onto the adapters it was saved with (by the record ``fusion.members``)."""
    names = fused_names(handle)
    if not names:
        return
    from unipelt.io import META_FILE
    from unipelt.state import get_state

    source = Path(path) / META_FILE
    record = metadata.get("fusion")
    if record is None:
        warnings.warn(f"{source}: fusion {handle.name!r} records no fingerprint of the adapters it fuses (saved before "
                      f"unipelt recorded them): the adapters attached as {', '.join(names)} are not checked to be the "
                      "ones it was trained with; save it again to add the record", UnipeltWarning, stacklevel=2)
        return
    members = record.get("members") if isinstance(record, dict) else None
    if not isinstance(members, dict):
        raise AdapterFileError(f"{source}: field 'fusion.members': missing or not a mapping")
    handles = get_state(handle.model).handles
    for n in names:
        saved = members.get(n)
        if not isinstance(saved, dict) or not isinstance(saved.get("sha256"), str):
            raise AdapterFileError(f"{source}: field 'fusion.members.{n}': missing, or without its sha256")
        now = member_record(handles[n])
        if now["sha256"] != saved["sha256"]:
            raise AdapterFileError(
                f"{source}: fusion {handle.name!r}: the adapter attached as {n!r} is not the one it was saved with "
                f"({_difference(saved, now)}); its attention would run over another adapter. Load the adapter it "
                f"fused under the name {n!r} first")


@hookimpl
def unipelt_parameters_replaced(model, state, handle, replaced):
    """A fused adapter's reparameterisation dropped while the fusion is attached: the fusion holds
    the new parameters frozen and gives them their flags back on detach (it held the old ones, and
    gave the flags back to a prefix MLP no longer in the model, leaving the new P frozen)."""
    for other in state.handles.values():
        for e in other.entries.values():
            if not isinstance(e.branch, FusionBranch) or not isinstance(e.saved, list) or handle.name not in e.branch.fuses:
                continue
            held = {id(p) for p in e.saved}  # before any is moved: branches may share their old MLP
            for before, after in replaced:
                if not any(id(p) in held for p in before):
                    continue  # frozen before the fusion (pruned): stays so
                gone = {id(p) for p in before}
                e.saved = [p for p in e.saved if id(p) not in gone]
                for p in after:
                    p.requires_grad_(False)
                    e.saved.append(p)


class FusionRegularizer:
    """Adds λ·Σ‖I − W_V‖² over the adapter's fusion layers to every micro-batch's loss."""

    name = "fusion"

    def __init__(self, branches: list[FusionBranch]):
        self.branches = branches

    def regularizer(self) -> Tensor:
        terms = [t for t in (b.regularizer() for b in self.branches) if t is not None]
        return torch.stack(terms).sum()


@hookimpl
def unipelt_training_controllers(handle):
    branches = [m for m in handle.branch_modules.values() if isinstance(m, FusionBranch)]
    if not branches or not any(b.value is not None and b.regularization > 0 for b in branches):
        return []
    return [FusionRegularizer(branches)]


