"""Training controllers for gate pruning and AdapterDrop (``unipelt.types.TrainingController``).

Gate pruning (the seed documents' rule, METHODS.md): every gate evaluation of the training
forward appends a detached per-output mean to ``ForwardContext.gate_log`` (no host sync); once per
optimizer step :class:`GatePruning` reads them all with one transfer. A gated branch whose gate
mean stays below ``epsilon`` for ``patience`` consecutive steps (from ``min_step`` on) is pruned
(:func:`unipelt.pruning.prune`: not computed, frozen, recorded in the spec's ``pruned:``, left out
of the saved adapter). With ``to_budget``, while the active parameters exceed ``budget:``, the
branch with the lowest gate mean over the last ``patience`` steps is pruned too (``per_step`` a
step). All users of one gate are pruned together (they share its value).

AdapterDrop (Rücklé et al., 2021): :class:`AdapterDrop` switches the chosen layers' branches off
through ``refresh`` (never per call): per step at random while training (``drop.random``), and
back to the inference choice (``drop.layers``) after each step, so evaluation and the saved
adapter see the fixed choice; or, with ``drop.lowest: n``, it ranks layers by the gradient norm
g_l = ||dL/dTheta_l|| over the first ``rank_steps`` steps and then drops the n lowest for good.
"""
from __future__ import annotations

import random
from collections import defaultdict

import torch

from unipelt.hookspecs import hookimpl
from unipelt.pruning import (budget_limit, drop_candidates, gate_is_off, inference_drop_layers, prune,
                             set_dropped)
from unipelt.state import base_param_count, get_state


class GatePruning:
    """Prunes gated branches whose gate stays closed (and toward the budget when asked)."""

    name = "prune"

    def __init__(self, handle):
        self.handle = handle
        self.ctx = get_state(handle.model).ctx
        spec = handle.spec
        # gate key -> its pruning rule (the first user's module's), for the gates a rule covers
        self.rules = {}
        for key, gp in handle.graph.gates.items():
            node = gp.users[0].split(".", 1)[0] if gp.users else None
            rule = spec.prune_for(node) if node else None
            # a gate shared with a module exempt from pruning (`prune: false`) is never pruned:
            # its branches go together, and the exempt module's would go with them
            nodes = {u.split(".", 1)[0] for u in gp.users}
            if any(spec.modules[n].prune is False for n in nodes if n in spec.modules):
                continue
            if rule is not None and key not in spec.collapsed:
                self.rules[key] = rule
        self.below: dict[str, int] = {}
        self.window: dict[str, list[float]] = {}
        self.pending: list[dict] = []
        self.kept_last: set[str] = set()  # gates kept because their branches are the last to train
        self.limit = budget_limit(handle, base_param_count(handle.model))
        self.count = spec.budget.count if spec.budget is not None else "kept"

    # -- the protocol ---------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        self.ctx.gate_log = []

    def on_step(self, step: int, loss) -> None:
        log, self.ctx.gate_log = self.ctx.gate_log, None
        means = self._step_means(log or [])
        for key, m in means.items():
            rule = self.rules[key]
            w = self.window.setdefault(key, [])
            w.append(m)
            del w[:-rule.patience]
            # the closed steps are counted from min_step on: a warm-up's gates are not evidence
            # (counted before it, a gate closed during warm-up was pruned at min_step itself)
            counted = m < rule.epsilon and step >= rule.min_step
            self.below[key] = self.below.get(key, 0) + 1 if counted else 0
        closed = [k for k, rule in self.rules.items() if self._live(k) and step >= rule.min_step
                  and self.below.get(k, 0) >= rule.patience]
        for key in closed:
            self._prune(key, step, means.get(key), "gate below epsilon")
        self._toward_budget(step)

    def events(self) -> list[dict]:
        out, self.pending = self.pending, []
        return out

    def report(self) -> dict:
        s = self.handle.summary()
        return {"pruned": list(self.handle.spec.pruned), "active_params": s.kept if self.count == "kept" else s.training,
                "pruned_params": s.pruned, "budget": self.limit}

    def state_dict(self) -> dict:
        return {"below": dict(self.below), "window": {k: list(v) for k, v in self.window.items()},
                "pruned": list(self.handle.spec.pruned)}

    def load_state_dict(self, d: dict) -> None:
        self.below = {k: int(v) for k, v in (d.get("below") or {}).items()}
        self.window = {k: [float(x) for x in v] for k, v in (d.get("window") or {}).items()}
        prune(self.handle, [k for k in d.get("pruned") or [] if k in self.handle.entries])

    # -- internals ------------------------------------------------------------------------------
    def _live(self, key: str) -> bool:
        return not gate_is_off(self.handle, key)

    def _step_means(self, log: list) -> dict[str, float]:
        """Mean gate value of this step per gate key (the largest of a K/V gate's two): one sync."""
        by_key: dict[str, list] = defaultdict(list)
        for adapter, key, m in log:
            if adapter == self.handle.name and key in self.rules:
                by_key[key].append(m)
        if not by_key:
            return {}
        keys = list(by_key)
        stacked = torch.stack([torch.stack(by_key[k]).mean(0).max() for k in keys])
        return dict(zip(keys, stacked.tolist()))

    def _active(self) -> int:
        s = self.handle.summary()
        return s.kept if self.count == "kept" else s.training

    def _toward_budget(self, step: int) -> None:
        if self.limit is None:
            return
        todo = [k for k, r in self.rules.items() if r.to_budget and step >= r.min_step and self._live(k)
                and len(self.window.get(k, [])) >= r.patience]
        if not todo:
            return
        per_step = max(self.rules[k].per_step for k in todo)
        todo.sort(key=lambda k: sum(self.window[k]) / len(self.window[k]))
        for key in todo[:per_step]:
            if self._active() <= self.limit:
                break
            w = self.window[key]
            self._prune(key, step, sum(w) / len(w), "over budget")

    def _leaves_nothing_to_train(self, users: list[str]) -> bool:
        """Whether pruning ``users`` leaves no branch of the adapter with a parameter to train
        (every gate closed, or a budget below the cheapest branch): the next backward then had no
        graph and training died with a traceback ("element 0 of tensors does not require grad")."""
        gone = set(users)
        for k, e in self.handle.entries.items():
            if k in gone or e.pruned:
                continue
            params = ([p for _, p in e.branch.external_parameters()] if hasattr(e.branch, "external_parameters")
                      else list(e.branch.parameters()))
            if e.gate is not None:
                params += list(e.gate.parameters())
            if any(p.requires_grad for p in params):
                return False
        return True

    def _prune(self, key: str, step: int, mean: float | None, reason: str) -> None:
        users = [u for u in self.handle.graph.gates[key].users if u not in self.handle.spec.pruned]
        if users and self._leaves_nothing_to_train(users):
            if key not in self.kept_last:
                # said once: the rule would fire again every step
                self.kept_last.add(key)
                bp = next(b for b in self.handle.graph.branches if b.key == users[0])
                self.pending.append({"step": step, "event": "kept", "module": bp.node.name, "layer": bp.site.layer,
                                     "site": bp.site.site, "branch": ", ".join(users),
                                     "gate_mean": None if mean is None else round(float(mean), 6),
                                     "reason": f"{reason}, but the last branch left to train: kept"
                                               + (f" (budget {self.limit:,} not reachable)" if reason == "over budget"
                                                  else ""),
                                     "active_params": self._active()})
            return
        for k in prune(self.handle, users):
            bp = next(b for b in self.handle.graph.branches if b.key == k)
            self.pending.append({"step": step, "event": "pruned", "module": bp.node.name, "layer": bp.site.layer,
                                 "site": bp.site.site, "branch": k,
                                 "gate_mean": None if mean is None else round(float(mean), 6), "reason": reason,
                                 "active_params": self._active()})


class AdapterDrop:
    """Drops the chosen layers' branches: at random per training step, or the lowest by gradient norm."""

    name = "adapterdrop"

    def __init__(self, handle):
        self.handle = handle
        self.spec = handle.spec.drop
        self.candidates = drop_candidates(handle)
        self.layers = sorted(self.candidates)
        # the run's seed (train() seeds torch before compiling): the choice of step s depends on
        # the seed and s alone, so a resumed run drops what the uninterrupted one did
        self.seed = int(torch.initial_seed())
        self.ranking: list[float] | None = None  # summed per-layer gradient norms (lowest)
        self.ranked_steps = 0
        self.pending: list[dict] = []
        self.dropped_now: list[int] = []

    def before_step(self, step: int) -> None:
        if self.spec.random is False:
            return
        rng = random.Random(f"{self.seed}:{step}")
        if self.spec.random is True:
            # the paper's robust training (12 layers, n in 0..11): the first n layers, n uniform in
            # 0..L-1, so the last layer always trains
            n = rng.randint(0, len(self.layers) - 1)
            chosen = set(self.layers[:n])
        else:
            chosen = {layer for layer in self.layers if rng.random() < self.spec.random}
            if self.layers and len(chosen) == len(self.layers):
                chosen.discard(self.layers[-1])  # a step trains something (else backward has no graph)
        self.dropped_now = sorted(chosen)
        set_dropped(self.handle, chosen)

    def on_step(self, step: int, loss) -> None:
        if self.spec.random is not False:
            set_dropped(self.handle, inference_drop_layers(self.handle))  # evaluation sees the fixed choice
            return
        if self.spec.lowest is None or self.ranked_steps >= self.spec.rank_steps:
            return
        # g_l = ||dL/dTheta_l|| of this step, on the device; one transfer when the ranking is done
        device = next(self.handle.model.parameters()).device
        norms = []
        for layer in self.layers:
            sq = [p.grad.detach().float().pow(2).sum() for k in self.candidates[layer]
                  for p in self.handle.branch_modules[k].parameters() if p.grad is not None]
            norms.append(torch.stack(sq).sum().sqrt() if sq else torch.zeros((), device=device))
        step_norms = torch.stack([n.to(device) for n in norms])
        acc = getattr(self, "_acc", None)
        self._acc = step_norms if acc is None else acc.to(device) + step_norms
        self.ranked_steps += 1
        if self.ranked_steps >= self.spec.rank_steps:
            self._choose(step, self._acc.tolist())

    def _choose(self, step: int, ranking: list[float]) -> None:
        from unipelt.spec import LayerSel

        self.ranking = ranking
        order = sorted(range(len(self.layers)), key=lambda i: ranking[i])
        chosen = sorted(self.layers[i] for i in order[:self.spec.lowest])
        spec = self.handle.spec
        spec.drop.layers = LayerSel(tuple(chosen), "drop.layers")
        spec.drop.lowest = None
        raw = {"layers": chosen}
        if spec.drop.modules:
            raw["modules"] = list(spec.drop.modules)
        spec.raw["drop"] = raw
        set_dropped(self.handle, set(chosen))
        self.pending.append({"step": step, "event": "dropped", "layers": chosen,
                             "grad_norm": {str(layer): round(ranking[i] / self.ranked_steps, 6)
                                           for i, layer in enumerate(self.layers)}})

    def events(self) -> list[dict]:
        out, self.pending = self.pending, []
        return out

    def report(self) -> dict:
        return {"inference_layers": sorted(inference_drop_layers(self.handle)),
                "random": self.spec.random, "ranking": None if self.ranking is None else
                {str(layer): self.ranking[i] / max(self.ranked_steps, 1) for i, layer in enumerate(self.layers)}}

    def state_dict(self) -> dict:
        acc = getattr(self, "_acc", None)
        return {"seed": self.seed, "ranked_steps": self.ranked_steps,
                "acc": None if acc is None else acc.tolist(), "ranking": self.ranking}

    def load_state_dict(self, d: dict) -> None:
        self.seed = int(d.get("seed", self.seed))
        self.ranked_steps = int(d.get("ranked_steps", 0))
        self._acc = None if d.get("acc") is None else torch.tensor(d["acc"], dtype=torch.float32)
        if d.get("ranking") is not None and self.spec.lowest is not None:
            self._choose_silently(d["ranking"])

    def _choose_silently(self, ranking: list[float]) -> None:
        self._choose(0, ranking)
        self.pending.clear()  # the event is already in the checkpoint's history


@hookimpl
def unipelt_training_controllers(handle):
    spec = handle.spec
    out = []
    if spec.prune is not None or any(m.prune not in (None, False) for m in spec.modules.values()):
        out.append(GatePruning(handle))
    d = spec.drop
    if d is not None and (d.random is not False or d.lowest is not None):
        out.append(AdapterDrop(handle))
    return out
