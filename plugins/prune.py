"""Training controllers for gate pruning and AdapterDrop (``unipelt.types.TrainingController``).

Gate pruning (the seed documents' rule, METHODS.md): every gate evaluation of the training
forward appends a detached per-output mean to ``ForwardContext.gate_log`` (no host sync); once per
optimizer step :class:`GatePruning` reads them all with one transfer. A gated branch whose gate
mean stays below ``epsilon`` for ``patience`` consecutive steps (from ``min_step`` on) is pruned
(:func:`unipelt.pruning.prune`: not computed, frozen, recorded in the spec's ``pruned:``, left out
of the saved adapter). With ``to_budget``, while the active parameters exceed ``budget:``, the
branch with the lowest gate mean over the last ``patience`` steps is pruned too (``per_step`` a
step). All users of one gate are pruned together (they share its value).

Toward the budget, three opt-in refinements (``prune:`` fields, off by default; the cut at once
through gates still half open is a shock the rest of training must repair, RESULTS.md sessions 7-8):

- gradual (``end_step``): the target falls from A, the active count at ``min_step``, to the budget B
  on Zhu & Gupta's (2017) cubic schedule, T(t) = B + (A - B)(1 - (t - min_step)/(end_step -
  min_step))^3 (clamped to B after end_step); a branch is cut whenever the active count is over T(t).
- pressure (``pressure`` lambda, ``pressure_on``, ``pressure_from``): while over the budget (from
  step ``pressure_from`` on), the loss gets
  lambda * sum_{g in S} w_g * gbar_g, gbar_g the mean of gate g's values in that forward (over rows,
  tokens and outputs, not detached: ``ForwardContext.gate_terms``), w_g = n_g / sum_{h in S} n_h with
  n_g the parameters pruning g removes; S is ``cut``: the gates the budget would take now (lowest
  window mean first until the rest fits), or ``all`` prunable gates. A gate pushed toward 0 is a
  branch the model has stopped using by the time it is cut.
- re-warm (``rewarm_steps`` W, ``rewarm_peak`` p): from the step c the budget is met, the scheduled
  learning rate is multiplied by min(1, (t - c)/W) * K, K = max(1, p / s_c) with s_c the schedule's
  factor at c (``lr_factor``; a linear decay to 0 then restarts from p times the initial rate).

AdapterDrop (Rücklé et al., 2021): :class:`AdapterDrop` switches the chosen layers' branches off
through ``refresh`` (never per call): per step at random while training (``drop.random``), and
back to the inference choice (``drop.layers``) after each step, so evaluation and the saved
adapter see the fixed choice; or, with ``drop.lowest: n``, it ranks layers by the gradient norm
g_l = ||dL/dTheta_l|| over the first ``rank_steps`` steps and then drops the n lowest for good.
"""
from __future__ import annotations

import math
import random
from collections import defaultdict

import torch

from unipelt.hookspecs import hookimpl
from unipelt.pruning import (budget_limit, drop_candidates, fixed_dropped_keys, gate_is_off, inference_drop_layers,
                             prune, set_dropped)
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
        # the parameters pruning each gate removes (its branches' and its own): the pressure's weights
        s = handle.summary()
        rows = {bp.key: r for bp, r in zip(handle.graph.branches, s.rows)}
        # (only what is active: AdapterDrop's fixed layers are no part of the active count, unless a
        # random drop trains them in the steps that do not draw them)
        gate_params = {key: g["params"] if s.is_active(g) else 0 for key, g in zip(handle.graph.gates, s.gates)}
        self.sizes = {key: sum(rows[u][self.count] for u in handle.graph.gates[key].users if s.is_active(rows[u]))
                      + gate_params[key] for key in self.rules}
        budget_rules = [r for r in self.rules.values() if r.to_budget]
        # the options are per rule; the ones acting on the whole budget take the first rule that sets them
        self.gradual = next((r for r in budget_rules if r.end_step is not None), None)
        self.press = next((r for r in budget_rules if r.pressure > 0), None)
        self.rewarm = next((r for r in budget_rules if r.rewarm_steps > 0), None)
        self.start_active: int | None = None  # A: the active count when the gradual schedule starts
        self.was_over = False  # the active count was over the budget at a step (so meeting it is a cut)
        self.met_at: int | None = None  # c: the step at which pruning met the budget
        self.rewarm_k: float | None = None  # K of the re-warm (set at the first lr_factor after c)
        self.pressed: dict[str, float] = {}  # this step's pressed gates -> weight w_g

    # -- the protocol ---------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        self.ctx.gate_log = []
        self.pressed = self._pressed(step) if self.press is not None else {}
        self.ctx.gate_terms = [] if self.pressed else None

    def regularizer(self):
        """lambda * sum_g w_g * gbar_g over this forward's pressed gates (0.0 when none press)."""
        terms, self.ctx.gate_terms = self.ctx.gate_terms, ([] if self.pressed else None)
        if not terms:
            return 0.0
        by_key: dict[str, list] = defaultdict(list)
        for adapter, key, m in terms:
            if adapter == self.handle.name and key in self.pressed:
                by_key[key].append(m)
        if not by_key:
            return 0.0
        # a gate read by several branches is logged once per branch: the mean counts it once
        return self.press.pressure * sum(self.pressed[k] * torch.stack(v).mean() for k, v in by_key.items())

    def lr_factor(self, step: int, scheduled: float) -> float:
        """The multiplier on the scheduled learning rate of step ``step`` + 1 (the re-warm after the
        budget is met; 1 otherwise). ``scheduled``: the schedule's factor now (rate / initial rate)."""
        if self.rewarm is None or self.met_at is None:
            return 1.0
        if self.rewarm_k is None:
            self.rewarm_k = max(1.0, self.rewarm.rewarm_peak / scheduled) if scheduled > 0 else 1.0
        # the first step after the cut (step == met_at) trains at 1/W of it, the W-th at all of it
        return min(1.0, (step - self.met_at + 1) / self.rewarm.rewarm_steps) * self.rewarm_k

    def on_step(self, step: int, loss) -> None:
        log, self.ctx.gate_log = self.ctx.gate_log, None
        self.ctx.gate_terms = None
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
        out = {"pruned": list(self.handle.spec.pruned), "active_params": s.active(self.count),
               "pruned_params": s.pruned, "budget": self.limit}
        if self.gradual is not None or self.rewarm is not None:
            out["budget_met_at"] = self.met_at
        return out

    def state_dict(self) -> dict:
        return {"below": dict(self.below), "window": {k: list(v) for k, v in self.window.items()},
                "pruned": list(self.handle.spec.pruned), "start_active": self.start_active,
                "was_over": self.was_over, "met_at": self.met_at, "rewarm_k": self.rewarm_k}

    def load_state_dict(self, d: dict) -> None:
        self.below = {k: int(v) for k, v in (d.get("below") or {}).items()}
        self.window = {k: [float(x) for x in v] for k, v in (d.get("window") or {}).items()}
        prune(self.handle, [k for k in d.get("pruned") or [] if k in self.handle.entries])
        self.start_active = d.get("start_active")
        self.was_over = bool(d.get("was_over", False))
        self.met_at = d.get("met_at")
        self.rewarm_k = d.get("rewarm_k")

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
        """The parameters that compute: not pruned, not in AdapterDrop's fixed layers."""
        return self.handle.summary().active(self.count)

    def target(self, step: int) -> int | None:
        """The active count allowed after step ``step``: the budget, or with ``end_step`` the cubic
        schedule's T(t) (A is taken at the first step it is asked for from min_step on)."""
        if self.limit is None or self.gradual is None:
            return self.limit
        r = self.gradual
        if step < r.min_step:
            return None
        if self.start_active is None:
            self.start_active = self._active()
        frac = min(1.0, (step - r.min_step) / (r.end_step - r.min_step))
        a, b = self.start_active, self.limit
        return b if a <= b else int(math.ceil(b + (a - b) * (1.0 - frac) ** 3))

    def _ranked(self, step: int, from_min_step: bool = True) -> list[str]:
        """Live gates the budget may prune at ``step`` (a full window), lowest window mean first;
        ``from_min_step=False`` ranks them before their ``min_step`` too (the pressure's set)."""
        todo = [k for k, r in self.rules.items() if r.to_budget and (step >= r.min_step or not from_min_step)
                and self._live(k) and len(self.window.get(k, [])) >= r.patience]
        return sorted(todo, key=lambda k: sum(self.window[k]) / len(self.window[k]))

    def _pressed(self, step: int) -> dict[str, float]:
        """The gates the pressure acts on during step ``step`` + 1, with their weights w_g."""
        if self.limit is None or step < self.press.pressure_from:
            return {}
        active = self._active()
        if active <= self.limit:
            return {}
        if self.press.pressure_on == "all":
            keys = [k for k, r in self.rules.items() if r.to_budget and self._live(k)]
        else:
            # the set the cut would take now: lowest window mean first until the rest fits (min_step
            # does not hold this back: the pressure acts before the cut)
            keys = []
            for k in self._ranked(step, from_min_step=False):
                if active <= self.limit:
                    break
                keys.append(k)
                active -= self.sizes[k]
        total = sum(self.sizes[k] for k in keys)
        return {k: self.sizes[k] / total for k in keys} if total else {}

    def _toward_budget(self, step: int) -> None:
        if self.limit is None:
            return
        todo = self._ranked(step)
        target = self.target(step)
        if todo and target is not None:
            per_step = max(self.rules[k].per_step for k in todo)
            reason = "over budget" if target <= self.limit else f"over the scheduled budget ({target:,})"
            for key in todo[:per_step]:
                if self._active() <= target:
                    break
                w = self.window[key]
                self._prune(key, step, sum(w) / len(w), reason)
        if self.met_at is None:
            if self._active() > self.limit:
                self.was_over = True
            elif self.was_over:
                self.met_at = step

    def _leaves_nothing_to_train(self, users: list[str]) -> bool:
        """Whether pruning ``users`` leaves no branch of the adapter with a parameter to train
        (every gate closed, or a budget below the cheapest branch): the next backward then had no
        graph and training died with a traceback ("element 0 of tensors does not require grad")."""
        gone = set(users)
        if self.handle.spec.drop is not None and self.handle.spec.drop.random is False:
            # AdapterDrop's fixed layers compute nothing (their parameters still require grad); a
            # random drop's inference layers train in the steps that draw them
            gone |= fixed_dropped_keys(self.handle)
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
        if self.spec.layers is not None and self.spec.lowest is None:
            # the spec's fixed choice, said once at the start like the ranked choice and the pruning
            # events (a fixed drop printed nothing and left no record in report.json)
            self.pending.append({"step": 0, "event": "dropped", "layers": sorted(inference_drop_layers(handle)),
                                 "reason": "the spec's drop.layers, "
                                           + ("in training and at inference" if self.spec.random is False
                                              else "at inference (training drops at random per step)")})

    @property
    def static(self) -> bool:
        """Nothing changes between steps (a fixed choice only, no random or ranked one): this
        controller only reports, so a captured step may replay it."""
        return self.spec.random is False and self.spec.lowest is None

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
        # the layers training ran without: the fixed (or ranked, once chosen) ones; None when drawn per step
        fixed = sorted(inference_drop_layers(self.handle))
        return {"inference_layers": fixed, "training_layers": None if self.spec.random is not False else fixed,
                "random": self.spec.random, "ranking": None if self.ranking is None else
                {str(layer): self.ranking[i] / max(self.ranked_steps, 1) for i, layer in enumerate(self.layers)}}

    def state_dict(self) -> dict:
        acc = getattr(self, "_acc", None)
        return {"seed": self.seed, "ranked_steps": self.ranked_steps,
                "acc": None if acc is None else acc.tolist(), "ranking": self.ranking, "announced": True}

    def load_state_dict(self, d: dict) -> None:
        if d.get("announced"):
            self.pending.clear()  # the fixed choice's event is already in the checkpoint's history
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
    if spec.drop is not None:  # a fixed choice too: it reports what it drops (static, see AdapterDrop.static)
        out.append(AdapterDrop(handle))
    return out
