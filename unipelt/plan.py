"""The execution plan: what the compiler hands to the runtime, and what the report prints.

A :class:`FusionGroup` is every branch and gate of one layer that reads one tensor of the forward
pass (``attn.in``: LoRA on q and v, their gates and the prefix gate). An executor runs a group as
one unit: one skinny matrix product x·[A_q | A_v | w_gates] in forward, one accumulated dX in
backward, each gate once per forward (PERFORMANCE.md, "Where the speed comes from").
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GroupMember:
    """One reader of a group's tensor: a branch (``BranchPlan.key``) or a gate (``GatePlan.key``)."""

    kind: str  # "branch" | "gate"
    key: str
    label: str  # for reports, without the layer: "lora (lora) attn.q", "gate lora L0 (token)"


@dataclass
class FusionGroup:
    """The branches and gates of one layer reading one tensor (two or more of them)."""

    tensor: str  # canonical tensor name (``Architecture.canonical_tensor``)
    layer: int | None
    members: list[GroupMember] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{'global' if self.layer is None else self.layer}:{self.tensor}"

    @property
    def branch_keys(self) -> list[str]:
        return [m.key for m in self.members if m.kind == "branch"]

    @property
    def gate_keys(self) -> list[str]:
        return [m.key for m in self.members if m.kind == "gate"]

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "layer": self.layer,
                "readers": [{"kind": m.kind, "key": m.key, "label": m.label} for m in self.members]}
