"""The default leaf wrapper: plain ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2).

Registered ``trylast`` so that a plugin for quantized bases (``tryfirst``) takes its layers first.
"""
from __future__ import annotations

from torch import nn

from unipelt.hookspecs import hookimpl
from unipelt.runtime import LeafWrapper


@hookimpl(trylast=True)
def unipelt_wrap_leaf(module: nn.Module, site):
    if isinstance(module, LeafWrapper):
        return None  # already wrapped by an earlier adapter: the compiler reuses its host
    if isinstance(module, nn.Linear):
        return LeafWrapper(module, host=None)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return LeafWrapper(module, host=None, transposed=True)
    return None
