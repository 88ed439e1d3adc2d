"""Collapse a trained gated adapter for serving (``AdapterHandle.collapse``, ``unipelt collapse``).

On calibration data every gate's values are measured over the real tokens (per-token gates) or
the examples (pooled gates); then

1. a gate whose largest value is at most ``closed`` is *closed*: its branches are pruned (not
   computed, left out of the saved adapter: :func:`unipelt.pruning.prune`), except key/value
   prefixes: g·P_k -> 0 gives attention logits 0, not -inf, so a closed prefix still takes
   attention mass; its gate becomes a constant instead;
2. a gate whose values vary by at most ``spread`` (max - min) is replaced by the constant of its
   mean (:class:`unipelt.pruning.ConstantGate`, recorded in the spec's ``collapsed:``), which
   the branch folds exactly as it folded the gate;
3. the prefix keeps its final tensors without its training MLP (``drop_reparameterization``);
4. with ``merge``, every mergeable branch whose gate is now a constant (or absent) is folded into
   the base weight: its delta ΔW is read off the branch itself, ``forward(I, gate=c)`` — exact
   for the linear branches that declare ``mergeable`` (LoRA), whatever their scaling rule.

The measured output difference (gated vs collapsed, max |Δ| over the calibration outputs) is the
check: beyond ``tolerance`` :class:`CollapseError` is raised and the model is left as it was
(the collapse is tried on a copy first when a tolerance is given).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import Tensor, nn

from unipelt.errors import UnipeltError
from unipelt.pruning import ConstantGate, gate_is_off, prune


class CollapseError(UnipeltError):
    """The collapsed model's outputs differ from the gated one's beyond the tolerance.

    ``what``: the finding without the advice. The message advises on ``handle.collapse``'s
    keyword arguments, or with ``cli=True`` on the ``unipelt collapse`` flags (the command
    rewords the API's error with it)."""

    def __init__(self, what: str, *, cli: bool = False):
        self.what = what
        advice = ("Lower --spread or --closed, or raise --tolerance" if cli
                  else "Lower spread= or closed=, or raise tolerance= (keyword arguments of collapse)")
        super().__init__(f"{what}. {advice}")


@dataclass
class GateStats:
    low: list[float]
    high: list[float]
    mean: list[float]

    @property
    def spread(self) -> float:
        return max(h - l for l, h in zip(self.low, self.high))


@dataclass
class CollapseReport:
    """What collapse did and measured."""

    pruned: list[str] = field(default_factory=list)  # branch keys (closed gates)
    constant: dict[str, list[float]] = field(default_factory=dict)  # gate key -> value
    merged: list[str] = field(default_factory=list)  # branch keys folded into base weights
    kept_gates: list[str] = field(default_factory=list)  # gates still computed
    params_before: int = 0
    params_after: int = 0
    merged_params: int = 0  # of params_after: the merged branches' (saved unmerged, no inference cost)
    max_abs_diff: float = 0.0
    ref_max_abs: float = 0.0
    dropped_reparameterization: int = 0
    stats: dict[str, GateStats] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"pruned": self.pruned, "constant": self.constant, "merged": self.merged,
                "kept_gates": self.kept_gates, "params_before": self.params_before, "params_after": self.params_after,
                "merged_params": self.merged_params,
                "max_abs_diff": self.max_abs_diff, "ref_max_abs": self.ref_max_abs,
                "dropped_reparameterization": self.dropped_reparameterization,
                "gates": {k: {"min": s.low, "max": s.high, "mean": s.mean} for k, s in self.stats.items()}}


def _output(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is not None:
        return logits
    return out[0]


def _call(model: nn.Module, batch) -> Tensor:
    return _output(model(batch) if isinstance(batch, Tensor) else model(**batch))


@torch.no_grad()
def outputs(model: nn.Module, batches: list) -> list[Tensor]:
    return [_call(model, b).float().cpu() for b in batches]


def output_difference(a: list[Tensor], b: list[Tensor], batches: list) -> float:
    """max |a - b| over real positions (padding masked out where the batch has a mask)."""
    worst = 0.0
    for x, y, batch in zip(a, b, batches):
        d = (x - y).abs()
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        if mask is not None and d.dim() >= 2 and d.shape[:2] == tuple(mask.shape):
            d = d * mask.to(d.device, d.dtype).view(*mask.shape, *([1] * (d.dim() - 2)))
        worst = max(worst, float(d.max()) if d.numel() else 0.0)
    return worst


# ------------------------------------------------------------------------------------------
# measuring gates
# ------------------------------------------------------------------------------------------
class _GateRecorder:
    """Forward hook on a gate module (the reference executor calls every gate's forward)."""

    def __init__(self, ctx, key: str, acc: dict):
        self.ctx, self.key, self.acc = ctx, key, acc

    def __call__(self, module, args, out):
        g = out.detach().float()  # (B, T or 1, k)
        B, T, k = g.shape
        mask = self.ctx.token_mask(B, T, g.device, g.dtype) if T > 1 else None
        flat = g.reshape(-1, k)
        if mask is not None:
            flat = flat[mask.reshape(-1) > 0]
        if not flat.shape[0]:
            return
        lo, hi, s, n = self.acc.get(self.key, (None, None, 0.0, 0))
        mn, mx = flat.min(0).values, flat.max(0).values
        self.acc[self.key] = (mn if lo is None else torch.minimum(lo, mn), mx if hi is None else torch.maximum(hi, mx),
                              s + flat.sum(0), n + flat.shape[0])


@torch.no_grad()
def gate_stats(handle, batches: list) -> dict[str, GateStats]:
    """min / max / mean of every computed gate of ``handle`` over the calibration batches."""
    from unipelt.compiler import set_executor
    from unipelt.state import get_state

    state = get_state(handle.model)
    acc: dict = {}
    hooks = [m.register_forward_hook(_GateRecorder(state.ctx, key, acc)) for key, m in handle.gate_modules.items()
             if not isinstance(m, ConstantGate) and not gate_is_off(handle, key)]
    executor = state.executor
    try:
        set_executor(handle.model, "reference")
        for b in batches:
            _call(handle.model, b)
    finally:
        for h in hooks:
            h.remove()
        set_executor(handle.model, executor)
    return {k: GateStats(lo.tolist(), hi.tolist(), (s / max(n, 1)).tolist()) for k, (lo, hi, s, n) in acc.items()}


# ------------------------------------------------------------------------------------------
# merging a branch whose gate is a constant
# ------------------------------------------------------------------------------------------
def constant_delta_weight(entry) -> Tensor:
    """ΔW (out, in) of a mergeable branch under its gate (None or a :class:`ConstantGate`):
    the branch applied to the identity, so its own scaling rule (LoRA's gate replacing or
    multiplying alpha/r) is what is folded."""
    branch = entry.branch
    if entry.gate is None:
        return branch.delta_weight()
    p = next(branch.parameters())
    n = getattr(branch, "in_features", None) or p.shape[-1]
    eye = torch.eye(n, device=p.device, dtype=p.dtype).unsqueeze(0)  # (1, d_in, d_in): one "token" per column
    g = entry.gate.value.to(device=p.device, dtype=p.dtype).view(1, 1, -1)
    was = branch.training
    branch.eval()  # dropout off: the merged weight is the inference branch
    try:
        return branch(eye, gate=g)[0].T.contiguous()
    finally:
        branch.train(was)


def _mergeable(handle, bp, entry) -> bool:
    host = handle.model.get_submodule(bp.site.path)
    return (entry.gate is None or isinstance(entry.gate, ConstantGate)) and not entry.off \
        and handle.graph.combine.get(bp.site.key, "parallel") != "average" \
        and getattr(entry.branch, "mergeable", False) and hasattr(host, "merge_delta")


# ------------------------------------------------------------------------------------------
# collapse
# ------------------------------------------------------------------------------------------
def collapse(handle, calibration_batches: Iterable, *, closed: float = 0.01, spread: float = 0.02,
             tolerance: float | None = None, merge: bool = True) -> CollapseReport:
    """See the module docstring. ``calibration_batches``: model inputs (dicts of tensors, or id
    tensors). Returns a :class:`CollapseReport`; raises :class:`CollapseError` beyond ``tolerance``."""
    for name, value, top in (("closed", closed, 1.0), ("spread", spread, 1.0), ("tolerance", tolerance, float("inf"))):
        if value is not None and not 0.0 <= value <= top:  # NaN fails too
            raise ValueError(f"collapse: {name} must be in [0, {top:g}], got {value!r}")
    # an inactive adapter does not run: its gates would measure as nothing, and it would "collapse"
    # to itself with a difference of 0
    handle.require_active("its gates are measured on the forward it runs in")
    batches = list(calibration_batches)
    if not batches:
        raise ValueError("collapse needs at least one calibration batch")
    if tolerance is not None:
        # try on a copy: beyond the tolerance the caller's model stays gated and whole
        trial_model = copy.deepcopy(handle.model)
        from unipelt.state import get_state

        trial = get_state(trial_model).handles[handle.name]
        rep = collapse(trial, batches, closed=closed, spread=spread, merge=merge)
        if rep.max_abs_diff > tolerance:
            raise CollapseError(
                f"collapsing adapter {handle.name!r} changes the outputs by up to {rep.max_abs_diff:.3g} on the "
                f"calibration data, over the tolerance {tolerance:g} (outputs up to {rep.ref_max_abs:.3g}); "
                f"{len(rep.pruned)} branch(es) pruned, {len(rep.constant)} gate(s) made constant")
        del trial_model, trial
    model = handle.model
    was = model.training
    model.eval()
    try:
        return _collapse(handle, batches, closed=closed, spread=spread, merge=merge)
    finally:
        model.train(was)


def _collapse(handle, batches: list, *, closed: float, spread: float, merge: bool) -> CollapseReport:
    from unipelt.state import AdapterSet, get_state

    rep = CollapseReport(params_before=handle.summary().kept)
    before = outputs(handle.model, batches)
    rep.stats = gate_stats(handle, batches)
    # a closed gate removes its branch only where the gated output vanishes with the gate: not for
    # a key/value prefix (g·P_k gives logits 0, not -inf: the prefix still takes attention mass),
    # whose closed gate is folded as a constant instead
    closed_keys = [k for k, s in rep.stats.items() if max(s.high) <= closed
                   and all(handle.entries[u].branch.reads != "kv" for u in handle.graph.gates[k].users)]
    closed_kv = {k for k, s in rep.stats.items() if max(s.high) <= closed and k not in closed_keys}
    for key in closed_keys:
        rep.pruned += prune(handle, handle.graph.gates[key].users)
    state = get_state(handle.model)
    for key, s in rep.stats.items():
        if key in closed_keys or (s.spread > spread and key not in closed_kv):
            continue
        gate = ConstantGate(handle.gate_modules[key].spec, [float(v) for v in torch.tensor(s.mean).tolist()])
        gate.to(next(handle.container.parameters(), torch.empty(0)).device)
        handle.gate_modules[key] = gate
        handle.container.gates[AdapterSet.slot(key)] = gate
        for e in handle.entries.values():
            if e.gate_key == key:
                e.gate, e.gate_group = gate, None
        for group in state.ctx.groups.values():
            group.gate_modules.pop(key, None)
        handle._params = {k: p for k, p in handle._params.items() if not k.startswith(f"gate.{key}.")}
        handle.spec.collapsed[key] = list(gate.value.tolist())
        rep.constant[key] = handle.spec.collapsed[key]
    if rep.constant:
        handle.spec.raw["collapsed"] = {k: list(v) for k, v in handle.spec.collapsed.items()}
    rep.dropped_reparameterization = handle.drop_reparameterization()
    state.refresh()
    if merge:
        rep.merged = handle.merge()["merged"]
    # a gate is still computed if a branch it gates is: not one whose branches are all pruned or
    # dropped (AdapterDrop's fixed layers), which the command counted as "still gated"
    rep.kept_gates = [k for k, gp in handle.graph.gates.items() if k not in handle.spec.collapsed
                      and any(not handle.entries[u].off for u in gp.users)]
    after = outputs(handle.model, batches)
    rep.max_abs_diff = output_difference(before, after, batches)
    rep.ref_max_abs = max(float(x.abs().max()) for x in before)
    rep.params_after = handle.summary().kept
    rep.merged_params = sum(p.numel() for k in rep.merged for p in handle.branch_modules[k].parameters())
    return rep


@torch.no_grad()
def forward_time(model: nn.Module, batches: list, repeats: int = 3) -> float:
    """Median seconds of one pass over ``batches`` (after one warm-up pass)."""
    return forward_times(model, batches, {"model": lambda: None}, repeats=repeats)["model"]


@torch.no_grad()
def forward_times(model: nn.Module, batches: list, setups: dict, repeats: int = 3) -> dict[str, float]:
    """Median seconds of one pass over ``batches`` per setup (name -> a callable that puts the
    model in that state), the setups interleaved round by round after one warm-up round: timed
    one after the other, a slower stretch of a shared machine (or the first calls' warm-up) lands
    on one variant and the ratio means nothing (the command once printed the base model slower
    than the gated one)."""
    times: dict[str, list[float]] = {name: [] for name in setups}
    for i in range(repeats + 1):
        for name, setup in setups.items():
            setup()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for b in batches:
                _call(model, b)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i:
                times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}
