"""unipelt: a spec-driven engine for parameter-efficient fine-tuning.

    handle = unipelt.compile(model, "specs/unipelt.yaml")   # adapt in place
    handle.save("out/adapter")                              # adapter.safetensors + unipelt.json
    handle = unipelt.load(fresh_model, "out/adapter")
"""
from __future__ import annotations

from unipelt.errors import (AdapterFileError, DataError, ModelError, OutputError, PluginError, SpecError, UnipeltError,
                            UnipeltWarning)
from unipelt.spec import Spec, parse_spec

__version__ = "0.1.0"


def compile(model, spec, name: str = "default", **kwargs):
    """Adapt ``model`` in place according to ``spec`` (path, dict or Spec); returns the handle."""
    from unipelt.compiler import compile as _compile

    return _compile(model, spec, name, **kwargs)


def load(model, path, name: str | None = None, **kwargs):
    """Attach a saved adapter directory to ``model``; returns the handle. A Hugging Face PEFT
    adapter directory (LoRA, prompt or prefix tuning) is translated on the way in."""
    from unipelt.handle import load as _load

    return _load(model, path, name, **kwargs)


def set_adapter(model, names) -> None:
    """Make the named adapter(s) of ``model`` the active ones."""
    from unipelt.compiler import set_adapter as _set

    _set(model, names)


def merge_adapters(adapters, out, **kwargs):
    """Merge saved LoRA adapters into one adapter directory ``out`` (linear, svd, ties, dare_linear,
    dare_ties, cat, ...: :func:`unipelt.merging.merge_adapters`, PEFT's add_weighted_adapter semantics)."""
    from unipelt.merging import merge_adapters as _merge

    return _merge(adapters, out, **kwargs)
def adapter_names(model, names):
    """``with unipelt.adapter_names(model, names):`` row i of every call (generate() included) is
    served by adapter ``names[i]`` (``"__base__"``: none); one call takes ``adapter_names=`` itself."""
    from unipelt.state import adapter_names as _names

    return _names(model, names)


def pack_mixed(model):
    """Stack the LoRA A and B of each projection of a model's mixed-batch adapters into one trainable
    tensor each; returns them for the optimizer (:func:`unipelt.state.pack_mixed`)."""
    from unipelt.state import pack_mixed as _pack

    return _pack(model)


def unpack_mixed(model):
    """Give the adapters packed by :func:`pack_mixed` independent trainable tensors again
    (:func:`unipelt.state.unpack_mixed`)."""
    from unipelt.state import unpack_mixed as _unpack

    return _unpack(model)


def validate(spec):
    """Parse and validate a spec without a model; returns the parsed Spec or raises SpecError."""
    return parse_spec(spec)


__all__ = [
    "compile", "load", "set_adapter", "adapter_names", "pack_mixed", "unpack_mixed", "validate", "merge_adapters", "parse_spec", "Spec",
    "UnipeltError", "SpecError", "ModelError", "AdapterFileError", "DataError", "PluginError", "OutputError",
    "UnipeltWarning",
]
