"""Methods that train existing parameters in place instead of adding modules.

- ``bitfit`` (Ben Zaken et al., 2022, arXiv 2106.10199): train only the biases, hook point ``bias``.
- ``train``: train selected parameters in full: ``norm`` (LayerNorm / RMSNorm tuning) or ``head``
  (the task head, e.g. a freshly initialised classifier).

The selected parameters are recorded by identity when the branch is built, unfrozen on attach,
saved with the adapter, and restored to their original values and flags on detach.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from unipelt.hookspecs import hookimpl
from unipelt.registry import MethodDef


@dataclass
class BitFitConfig:
    """BitFit has no hyperparameters of its own (the learning rate is the trainer's)."""


@dataclass
class TrainParamsConfig:
    """Train the parameters at the hook point in full (``norm``, ``head``). (Not
    :class:`unipelt.training.TrainConfig`, the options of a training run.)"""


def _select(module: nn.Module, select: str | None) -> list[tuple[str, nn.Parameter]]:
    if select == "bias":
        return [(n, p) for n, p in module.named_parameters() if n == "bias" or n.endswith(".bias")]
    if select == "norm":
        out = []
        for mn, m in module.named_modules():
            if "norm" in type(m).__name__.lower():
                out += [(f"{mn}.{n}" if mn else n, p) for n, p in m.named_parameters(recurse=False)]
        return out
    return list(module.named_parameters())


class ParamSelection(nn.Module):
    """Existing base parameters trained in place (no forward of its own)."""

    reads = "params"
    mergeable = False

    def __init__(self, module: nn.Module, select: str | None):
        super().__init__()
        # plain attributes, not registered: the parameters belong to the base model
        self.__dict__["_selected"] = _select(module, select)

    def external_parameters(self):
        return iter(self._selected)

    def num_params(self, kept: bool) -> int:
        return sum(p.numel() for _, p in self._selected)

    def forward(self, x, gate=None):  # pragma: no cover - never called: the branch has no forward
        raise RuntimeError("a parameter selection has no forward")


METHODS = [
    MethodDef(name="bitfit", config=BitFitConfig, site_kinds=frozenset({"params"}),
              summary="BitFit: train only the biases (hook point `bias`)", gateable=False),
    MethodDef(name="train", config=TrainParamsConfig, site_kinds=frozenset({"params"}),
              summary="train existing parameters in full: `norm` (LN tuning) or `head` (the task head)", gateable=False),
]


@hookimpl
def unipelt_methods():
    return METHODS


def in_place_parameters(method_name: str, site) -> list[nn.Parameter]:
    """The base tensors a ``bitfit`` / ``train`` branch at ``site`` trains in place (empty for any
    other method): AdapterFusion reads them to leave its own head trainable."""
    if method_name not in ("bitfit", "train"):
        return []
    return [p for _, p in _select(site.module, "bias" if method_name == "bitfit" else site.select)]


@hookimpl
def unipelt_build_branch(method, config, node, site, model):
    if method.name not in ("bitfit", "train"):
        return None
    select = "bias" if method.name == "bitfit" else site.select
    return ParamSelection(site.module, select)
