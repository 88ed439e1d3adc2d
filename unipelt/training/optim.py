"""The optimiser of a run: parameter groups with per-group learning rates (gates, LoRA+,
``lr_scale``), the plugins' training controllers, AdamW and the learning-rate schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


def param_groups(handle, lr: float, *, gate_lr: float | None = None, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups for an adapter.

    Gates learn at ``gate_lr`` (default ``lr``). LoRA+: the ``lora_B`` of every branch whose
    node sets ``lr_ratio`` learns at ``lr_ratio × lr`` (its ``lora_A`` at ``lr``). Everything else
    at ``lr``. A node's ``lr_scale`` multiplies the rate of its non-gate parameters. Each group
    carries a ``name`` (``default``, ``gate``, ``lora_B x16``, ``lr_scale x0.1``); parameters
    keep the adapter's canonical order within a group, so an optimizer state dict reloads.
    """
    groups_by_role = handle.parameter_groups()
    gate_ids = {id(p) for p in groups_by_role.get("gate", [])}
    b_ratio: dict[int, float] = {}
    for mod in handle.branch_modules.values():
        ratio = getattr(mod, "lr_ratio", None)
        if not ratio:
            continue
        roles = getattr(mod, "param_roles", lambda: {})()
        for pname, role in roles.items():
            if role == "lora_B":
                b_ratio[id(getattr(mod, pname))] = float(ratio)
    scales = handle.lr_scales()
    groups: dict[str, dict] = {}
    for p in handle.parameters():
        if not p.requires_grad:
            continue
        if id(p) in gate_ids:
            name, plr = "gate", gate_lr if gate_lr is not None else lr
        elif id(p) in b_ratio:
            name, plr = f"lora_B x{b_ratio[id(p)]:g}", lr * b_ratio[id(p)]
        else:
            name, plr = "default", lr
        if id(p) in scales and name != "gate":
            name, plr = ("" if name == "default" else name + " ") + f"lr_scale x{scales[id(p)]:g}", plr * scales[id(p)]
        g = groups.setdefault(name, {"name": name, "params": [], "lr": plr, "weight_decay": weight_decay})
        g["params"].append(p)
    return list(groups.values())


def make_schedule(optimizer, schedule: str, total_steps: int, warmup_steps: int):
    """LambdaLR: linear warm-up from 0 over ``warmup_steps``, then linear decay to 0, cosine decay to
    0, or constant (the formulas of transformers' schedulers)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Optimisation:
    """What :func:`build_optimisation` makes for a run: AdamW, its schedule, the plugins' training
    controllers (extra parameter groups, regularisers, per-step callbacks) and the parameters
    that gradient clipping covers."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    controllers: list = field(default_factory=list)
    trainable: list = field(default_factory=list)

    def regularised(self, loss: torch.Tensor) -> torch.Tensor:
        return controller_loss(self.controllers, loss)

    def before_step(self, step: int) -> None:
        for c in self.controllers:
            if hasattr(c, "before_step"):
                c.before_step(step)
        apply_lr_factors(self.controllers, self.optimizer, self.scheduler, step)

    def on_step(self, step: int, loss: float) -> None:
        """After ``optimizer.step()``, before ``zero_grad``: gradients are still readable."""
        for c in self.controllers:
            if hasattr(c, "on_step"):
                c.on_step(step, loss)

    def events(self) -> list[dict]:
        """The controllers' new events, each tagged with its controller's name."""
        out = []
        for c in self.controllers:
            if hasattr(c, "events"):
                out += [dict(e, controller=controller_name(c)) for e in c.events() or []]
        return out

    def controller_report(self) -> dict:
        return {controller_name(c): (c.report() if hasattr(c, "report") else {}) for c in self.controllers}

    def controller_state(self) -> dict:
        return {controller_name(c): c.state_dict() for c in self.controllers if hasattr(c, "state_dict")}

    def load_controller_state(self, state: dict) -> None:
        for c in self.controllers:
            if hasattr(c, "load_state_dict") and controller_name(c) in state:
                c.load_state_dict(state[controller_name(c)])

    def group_table(self) -> list[dict]:
        """Each optimizer group's name, (initial) learning rate and size, for the report."""
        return [{"name": g.get("name", f"group {i}"), "lr": g["initial_lr"] if "initial_lr" in g else g["lr"],
                 "parameters": sum(p.numel() for p in g["params"])}
                for i, g in enumerate(self.optimizer.param_groups)]


def controller_name(c) -> str:
    return getattr(c, "name", None) or type(c).__name__


def collect_controllers(handle) -> list:
    """The plugins' training controllers for ``handle`` (:class:`unipelt.types.TrainingController`)."""
    return [c for res in handle.registry.hook.unipelt_training_controllers(handle=handle) or []
            for c in (res or [])]


def apply_lr_factors(controllers, optimizer, scheduler, step: int) -> float:
    """Before step ``step`` + 1's forward: every group's rate = its scheduled rate times the product
    of the controllers' ``lr_factor(step, scheduled)`` (gate pruning's re-warm after the cut), with
    ``scheduled`` the schedule's factor now (first group: scheduled rate / initial rate). Set from
    ``scheduler.get_last_lr()`` each time, so a factor never compounds and a resumed run (whose
    optimizer state holds the multiplied rates) gets the same rates. Returns the factor; at 1.0 the
    rates are left as the schedule set them (its step overwrites the previous step's product)."""
    owners = [c for c in controllers if hasattr(c, "lr_factor")]
    if not owners:
        return 1.0
    base = scheduler.get_last_lr()
    first = optimizer.param_groups[0].get("initial_lr") or 0.0
    scheduled = base[0] / first if first else 1.0
    factor = 1.0
    for c in owners:
        factor *= float(c.lr_factor(step, scheduled))
    if factor != 1.0:
        for g, lr in zip(optimizer.param_groups, base):
            g["lr"] = lr * factor
    return factor


def controller_loss(controllers, loss):
    """``loss`` plus every controller's regularizer (for a ``Trainer.compute_loss`` override)."""
    for c in controllers:
        if hasattr(c, "regularizer"):
            loss = loss + c.regularizer()
    return loss


def make_optimizer(groups: list[dict], *, lr: float, weight_decay: float, optim: str = "adamw"):
    """``adamw``: torch's AdamW; ``adamw8bit`` / ``paged_adamw8bit``: bitsandbytes' AdamW with
    8-bit blockwise optimizer state (paged: the state lives in CUDA unified memory, evicted to
    the host under memory pressure; on the CPU bitsandbytes falls back to unpaged)."""
    if optim == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if optim in ("adamw8bit", "paged_adamw8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            from unipelt.training.options import TrainingError

            raise TrainingError(f"optim {optim!r} needs bitsandbytes (pip install 'unipelt[quant]'): {e}") from None
        cls = bnb.optim.AdamW8bit if optim == "adamw8bit" else bnb.optim.PagedAdamW8bit
        return cls(groups, lr=lr, weight_decay=weight_decay)
    from unipelt.training.options import TrainingError

    raise TrainingError(f"unknown optim {optim!r}; expected adamw, adamw8bit or paged_adamw8bit")


def build_optimisation(handle, *, lr: float, gate_lr: float | None, weight_decay: float, schedule: str,
                       total_steps: int, warmup_steps: int, optim: str = "adamw") -> Optimisation:
    """The optimizer (:func:`make_optimizer`) over :func:`param_groups`; a controller's own groups
    (``param_groups(handle, lr)``) take its parameters out of the default ones."""
    groups = param_groups(handle, lr, gate_lr=gate_lr, weight_decay=weight_decay)
    controllers = collect_controllers(handle)
    for c in controllers:
        extra = c.param_groups(handle, lr) if hasattr(c, "param_groups") else None
        if extra:
            taken = {id(p) for g in extra for p in g["params"]}
            groups = [dict(g, params=[p for p in g["params"] if id(p) not in taken]) for g in groups]
            groups = [g for g in groups if g["params"]] + list(extra)
    optimizer = make_optimizer(groups, lr=lr, weight_decay=weight_decay, optim=optim)
    scheduler = make_schedule(optimizer, schedule, total_steps, warmup_steps)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    return Optimisation(optimizer, scheduler, controllers, trainable)
