"""Switching branches off: gate pruning (for good), AdapterDrop (per layer), collapsed gates.

A branch that is *pruned* or *dropped* keeps its module but is no longer computed: its
:class:`~unipelt.runtime.Entry` carries the flag and :meth:`ModelState.refresh` leaves it out of
every live list (site runtimes, attention providers, group executors), exactly like a merged
branch, so no forward decides anything per call. The spec is the record:

- ``pruned: [<module>.<layer>.<hook point>, ...]``: pruned branches. Their parameters (and those
  of a gate all of whose branches are pruned, and of a shared module all of whose branches are
  pruned) are frozen, not counted against the budget and left out of the saved adapter; a spec
  with ``pruned:`` compiles with those branches off, so a saved pruned adapter loads as such.
- ``collapsed: {<gate key>: [values]}``: gates replaced by a constant (:class:`ConstantGate`).
- ``drop: {layers: ...}``: the layers whose branches are dropped at inference.

The training controllers that decide these live in ``unipelt_plugins.prune``; collapse for
serving in :mod:`unipelt.collapse`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch
from torch import Tensor, nn

from unipelt.errors import SpecError

if TYPE_CHECKING:  # pragma: no cover
    from unipelt.handle import AdapterHandle


class ConstantGate(nn.Module):
    """A gate replaced by its (nearly constant) value on calibration data: ``(B, 1, k)`` of that
    value whatever the input; no parameters. The branch folds it exactly as it folded the gate."""

    def __init__(self, spec, values: list[float]):
        super().__init__()
        self.spec = spec
        self.register_buffer("value", torch.tensor(values, dtype=torch.float32), persistent=False)

    def forward(self, x: Tensor, ctx) -> Tensor:
        return self.cast(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, self.value.shape[0])

    _cast: tuple | None = None

    def cast(self, dtype: torch.dtype) -> Tensor:
        """The value in ``dtype``: cast once, not in every forward (an eager bf16 model would launch a
        cast per gate and call), kept until the value changes (its version, its device). Compiled,
        the cast is a constant of the graph anyway."""
        v = self.value
        if v.dtype == dtype or torch.compiler.is_compiling():
            return v.to(dtype)
        key = (dtype, v.device, v._version, id(v))
        cached = self._cast
        if cached is None or cached[0] != key:
            cached = (key, v.to(dtype))
            self.__dict__["_cast"] = cached  # a plain attribute: not a buffer, never saved
        return cached[1]


# ------------------------------------------------------------------------------------------
# what is off
# ------------------------------------------------------------------------------------------
def gate_is_off(handle: AdapterHandle, gate_key: str, pruned: set[str] | None = None) -> bool:
    """A gate none of whose branches is computed any more (all pruned)."""
    pruned = set(handle.spec.pruned) if pruned is None else pruned
    users = handle.graph.gates[gate_key].users
    return bool(users) and all(u in pruned for u in users)


def shared_is_off(handle: AdapterHandle, node: str, pruned: set[str] | None = None) -> bool:
    pruned = set(handle.spec.pruned) if pruned is None else pruned
    keys = [bp.key for bp in handle.graph.branches if bp.node.name == node]
    return bool(keys) and all(k in pruned for k in keys)


def inactive_keys(handle: AdapterHandle) -> set[str]:
    """Canonical parameter/buffer key prefixes of what pruning removed (left out of the saved
    adapter): ``<branch key>.``, ``gate.<gate key>.``, ``<node>.shared.``."""
    pruned = set(handle.spec.pruned)
    if not pruned:
        return set()
    out = {f"{k}." for k in pruned}
    out |= {f"gate.{g}." for g in handle.graph.gates if gate_is_off(handle, g, pruned)}
    out |= {f"{n}.shared." for n in {bp.node.name for bp in handle.graph.branches} if shared_is_off(handle, n, pruned)}
    return out


def is_inactive(key: str, prefixes: set[str]) -> bool:
    return any(key.startswith(p) for p in prefixes)


# ------------------------------------------------------------------------------------------
# applying the spec at compile
# ------------------------------------------------------------------------------------------
def check_spec(spec, graph) -> None:
    """``pruned:`` and ``collapsed:`` name branches and gates of this model (field paths)."""
    keys = {bp.key for bp in graph.branches}
    for i, k in enumerate(spec.pruned):
        if k not in keys:
            close = sorted(b for b in keys if b.split(".", 1)[0] == k.split(".", 1)[0])[:6]
            raise SpecError(f"no branch {k!r} in this model; branches of that module: {', '.join(close) or '(none)'}",
                            source=spec.source, path=f"pruned[{i}]")
    for k, vals in spec.collapsed.items():
        gp = graph.gates.get(k)
        if gp is None:
            raise SpecError(f"no gate {k!r} in this model; gates: {', '.join(list(graph.gates)[:8])}",
                            source=spec.source, path=f"collapsed.{k}")
        width = 2 if gp.spec.kv == "separate" else 1
        if len(vals) != width:
            raise SpecError(f"gate {k!r} has {width} output(s), got {len(vals)} value(s)", source=spec.source,
                            path=f"collapsed.{k}")
    d = spec.drop
    if d is not None and d.lowest is not None:
        # dropping every layer that has branches leaves training nothing to compute: the first
        # step after the ranking failed inside backward ("element 0 of tensors does not require grad")
        mods = set(d.modules) or None
        layers = {bp.site.layer for bp in graph.branches
                  if bp.site.layer is not None and (mods is None or bp.node.name in mods)}
        if d.lowest >= len(layers):
            raise SpecError(f"{d.lowest} would drop every one of the {len(layers)} layer(s) that have "
                            f"branches{' of ' + ', '.join(sorted(mods)) if mods else ''}; at most "
                            f"{max(len(layers) - 1, 0)} (a layer must keep its branches to be trained)",
                            source=spec.source, path="drop.lowest")


def apply_spec(handle: AdapterHandle) -> None:
    """Called by compile once the entries exist (before the first refresh): the spec's pruned
    branches and fixed AdapterDrop layers are switched off, their parameters frozen."""
    for k in handle.spec.pruned:
        handle.entries[k].pruned = True
    _freeze_inactive(handle)
    d = handle.spec.drop
    if d is not None and d.layers is not None:
        set_dropped(handle, inference_drop_layers(handle), refresh=False)
        if handle.entries and all(e.off for e in handle.entries.values()):
            # the adapter would compute nothing (the base model), and training it died inside
            # backward ("element 0 of tensors does not require grad")
            raise SpecError("drops every branch of the adapter: it would compute nothing (to run the base model, "
                            "deactivate the adapter); keep at least one layer", source=handle.spec.source,
                            path="drop.layers")


def _freeze_inactive(handle: AdapterHandle) -> None:
    prefixes = inactive_keys(handle)
    for key, p in handle.named_parameters().items():
        if is_inactive(key, prefixes):
            p.requires_grad_(False)
            p.grad = None


# ------------------------------------------------------------------------------------------
# pruning
# ------------------------------------------------------------------------------------------
def prune(handle: AdapterHandle, keys: Iterable[str]) -> list[str]:
    """Switch off branches ``keys`` for good: not computed, frozen (``requires_grad`` False and
    no gradient, so the optimizer leaves them), recorded in the spec's ``pruned:``. Returns the
    keys newly pruned."""
    new = [k for k in keys if k not in handle.spec.pruned]
    for k in new:
        if k not in handle.entries:
            raise KeyError(f"no branch {k!r} in adapter {handle.name!r}")
        handle.entries[k].pruned = True
    if not new:
        return []
    handle.spec.pruned = list(handle.spec.pruned) + new
    handle.spec.raw["pruned"] = list(handle.spec.pruned)
    _freeze_inactive(handle)
    _refresh(handle)
    return new


def _refresh(handle: AdapterHandle) -> None:
    from unipelt.state import get_state

    state = get_state(handle.model)
    if state is not None:
        state.refresh()


def active_params(handle: AdapterHandle, count: str = "kept") -> int:
    """Parameters of the adapter that compute (``kept`` after training or ``training``): neither
    pruned nor dropped by AdapterDrop's fixed layers."""
    return handle.summary().active(count)


def budget_limit(handle: AdapterHandle, base_params: int) -> int | None:
    b = handle.spec.budget
    if b is None:
        return None
    return b.max_params if b.max_params is not None else int(b.fraction * base_params)


# ------------------------------------------------------------------------------------------
# AdapterDrop
# ------------------------------------------------------------------------------------------
def drop_candidates(handle: AdapterHandle) -> dict[int, list[str]]:
    """layer -> branch keys that AdapterDrop switches off (the ``drop.modules``, default all;
    global branches, with no layer, are never dropped)."""
    d = handle.spec.drop
    mods = set(d.modules) if d is not None and d.modules else None
    out: dict[int, list[str]] = {}
    for bp in handle.graph.branches:
        if bp.site.layer is None or (mods is not None and bp.node.name not in mods):
            continue
        out.setdefault(bp.site.layer, []).append(bp.key)
    return out


def inference_drop_layers(handle: AdapterHandle) -> set[int]:
    d = handle.spec.drop
    if d is None or d.layers is None:
        return set()
    return set(d.layers.resolve(handle.info.num_layers, source=handle.spec.source))


def fixed_dropped_keys(handle: AdapterHandle) -> set[str]:
    """Branch keys that AdapterDrop's fixed layers (``drop.layers``: the inference choice, and
    training's too unless ``random``) switch off. Without ``random`` they compute nothing in the
    adapter as used, so they are not active parameters (what a budget holds on); a random drop's
    train in the steps that do not draw them, and stay active (``Summary.is_active``)."""
    layers = inference_drop_layers(handle)
    if not layers:
        return set()
    return {k for layer, keys in drop_candidates(handle).items() if layer in layers for k in keys}


def set_dropped(handle: AdapterHandle, layers: set[int], *, refresh: bool = True) -> bool:
    """Drop the candidate branches of ``layers`` (and un-drop the others); refresh only when
    something changed. Returns whether it did."""
    changed = False
    for layer, keys in drop_candidates(handle).items():
        off = layer in layers
        for k in keys:
            e = handle.entries[k]
            if e.dropped != off:
                e.dropped = off
                changed = True
    if changed and refresh:
        _refresh(handle)
    return changed
