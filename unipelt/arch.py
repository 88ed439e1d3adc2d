"""Architecture catalogs: the model-independent hook points mapped onto each model family.

A catalog (:class:`Architecture`) is data, contributed by plugins through
``unipelt_architectures``; :func:`resolve_model` matches a model against the catalogs and gives a
:class:`ModelInfo` from which every site of every layer resolves to a :class:`ResolvedSite`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from unipelt.errors import ModelError

from unipelt.types import SiteKind  # noqa: E402  (the one definition of hook-point kinds)


@dataclass(frozen=True)
class SiteTarget:
    """Where one hook point lives inside a transformer block (or in the model, for global sites).

    kind:
      - ``linear``: a leaf projection, wrapped; branches read its input and add to its output.
        ``part=(i, n)`` selects the i-th of n equal output slices of a fused projection
        (GPT-2's ``c_attn`` holds q, k and v).
      - ``output``: the output of ``path`` (first element if it returns a tuple); branches read
        and transform it (serial adapters).
      - ``io``: branches read the input of ``input_path`` (positional argument ``input_arg``, or
        keyword ``input_kwarg``) and add to the output of ``path`` (parallel adapters).
      - ``renorm``: a sublayer's residual sum s = h + x, re-normalised after the branches
        (Pfeiffer's placement, AdapterHub's ``seq_bn``): branches read a = N(s) and the result is
        N(s + Delta(a)), N the sublayer's own norm. On a post-LN block ``path`` is that norm (its
        input is s, its output a; it is applied again to s + Delta). On a pre-LN block there is no
        norm after the residual add (N = identity): ``path`` is the sublayer (output h) and
        ``input_path`` the module whose input is the residual x (the sublayer's input norm), so
        branches read s = h + x and the sublayer returns h + Delta(s); the block adds x.
      - ``kv``: the attention module at ``path``; branches inject key/value vectors inside it.
      - ``embed``: the token embedding at ``path``.
      - ``params``: parameters of the modules under ``path`` selected by ``select``
        (``bias``, ``norm``, ``all``): trained in place (BitFit, LN tuning, the head).
    reads: the name of the tensor this site's branches read, used to find the branches (and
      gates) that share one input: the unit a fused kernel executes in one launch. Names are
      per layer; ``Architecture.aliases`` says when two names are the same tensor.
    """

    kind: SiteKind
    path: str
    part: tuple[int, int] | None = None
    input_path: str | None = None
    input_arg: int = 0
    input_kwarg: str | None = None
    reads: str | None = None
    select: str | None = None
    note: str = ""


@dataclass(frozen=True)
class Architecture:
    """How one model family exposes the hook points.

    layers: suffixes of the ``nn.ModuleList`` path holding the transformer blocks, tried in order
      (``encoder.layer`` matches ``bert.encoder.layer`` and ``encoder.layer``).
    sites: per-layer hook points (paths relative to a block).
    global_sites: hook points outside the blocks (paths relative to the model searched by suffix).
    aliases: tensors that are the same object: on a post-LN encoder the block input *is* the
      attention input, so ``{"layer.in": "attn.in"}``.
    causal: whether attention is causal (decoders): gates must then be causal-safe.
    """

    name: str
    model_types: tuple[str, ...]
    layers: tuple[str, ...]
    sites: dict[str, SiteTarget]
    global_sites: dict[str, SiteTarget] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    causal: bool = False
    description: str = ""
    # The submodule of a block that receives the block's input first (its first positional or
    # ``hidden_states`` argument). The block input is captured there rather than on the block:
    # transformers checkpoints a block's ``forward``, so hooks on the block itself do not run
    # again when gradient checkpointing recomputes it, while hooks on its submodules do.
    layer_input: str = ""
    # Pre-LN blocks (GPT-2, Llama): the block's input norm. Layer-input gates read its output, the
    # normalised block input that attention reads, not the raw residual stream: on a pre-LN model
    # that stream grows to norms in the hundreds or thousands (SmolLM2: ~1,000 by layer 12), so a
    # Linear(d, 1) gate on it starts saturated at random 0s and 1s per layer. On post-LN encoders
    # (BERT) the block input is already a LayerNorm output, as in the paper; leave this empty.
    input_norm: str = ""

    def canonical_tensor(self, name: str) -> str:
        seen = set()
        while name in self.aliases and name not in seen:
            seen.add(name)
            name = self.aliases[name]
        return name


@dataclass
class ResolvedSite:
    """One hook point of one layer of one concrete model."""

    site: str
    layer: int | None  # None for global sites
    kind: SiteKind
    path: str  # absolute module path in the model
    module: nn.Module
    in_features: int
    out_features: int
    part: tuple[int, int] | None = None
    out_slice: tuple[int, int] | None = None
    input_path: str | None = None
    input_arg: int = 0
    input_kwarg: str | None = None
    reads: str | None = None
    select: str | None = None

    @property
    def key(self) -> str:
        return self.site if self.layer is None else f"{self.layer}.{self.site}"


def _linear_dims(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, weight_is_transposed) for a Linear-like leaf."""
    base = getattr(module, "base_layer", module)
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return int(base.in_features), int(base.out_features), False
    # transformers' Conv1D (GPT-2) stores weight as (in, out) and exposes nf (= out).
    if type(base).__name__ == "Conv1D" and hasattr(base, "nf"):
        return int(base.weight.shape[0]), int(base.nf), True
    raise ModelError(f"cannot read the input/output width of {type(base).__name__}")


@dataclass
class ModelInfo:
    """A model matched to its architecture catalog."""

    model: nn.Module
    arch: Architecture
    config: object
    layer_paths: list[str]
    layers: list[nn.Module]
    hidden_size: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def causal(self) -> bool:
        return self.arch.causal

    @property
    def model_type(self) -> str:
        return getattr(self.config, "model_type", "?")

    def available_sites(self) -> list[str]:
        return sorted(set(self.arch.sites) | set(self.arch.global_sites))

    def resolve(self, site: str, layer: int | None) -> ResolvedSite:
        if site in self.arch.global_sites:
            target = self.arch.global_sites[site]
            path = _find_suffix(self.model, target.path)
            if path is None:
                raise ModelError(f"{self.arch.name}: hook point {site!r} ({target.path}) not found in this model")
            return self._resolved(site, None, target, path)
        target = self.arch.sites[site]
        assert layer is not None
        base = self.layer_paths[layer]
        return self._resolved(site, layer, target, f"{base}.{target.path}" if target.path else base)

    def _resolved(self, site: str, layer: int | None, t: SiteTarget, path: str) -> ResolvedSite:
        try:
            module = self.model.get_submodule(path)
        except AttributeError as e:
            raise ModelError(f"{self.arch.name}: hook point {site!r} expects module {path!r}, not found") from e
        d = self.hidden_size
        in_f = out_f = d
        out_slice = None
        if t.kind == "linear":
            in_f, out_f, _ = _linear_dims(module)
            if t.part is not None:
                i, n = t.part
                if out_f % n:
                    raise ModelError(f"{path}: output width {out_f} does not split into {n} parts")
                w = out_f // n
                out_slice = (i * w, (i + 1) * w)
                out_f = w
        elif t.kind == "embed":
            in_f = out_f = int(module.weight.shape[1]) if hasattr(module, "weight") else d
        input_path = None
        if t.input_path is not None:
            lb = self.layer_paths[layer] if layer is not None else ""
            input_path = f"{lb}.{t.input_path}" if lb else t.input_path
        reads = t.reads
        if reads is not None:
            reads = self.arch.canonical_tensor(reads)
        return ResolvedSite(
            site=site, layer=layer, kind=t.kind, path=path, module=module, in_features=in_f,
            out_features=out_f, part=t.part, out_slice=out_slice, input_path=input_path,
            input_arg=t.input_arg, input_kwarg=t.input_kwarg, reads=reads, select=t.select,
        )

    def fingerprint(self) -> dict:
        """Architecture and shapes: what a saved adapter must match to load."""
        shapes: dict[str, list[int]] = {}
        for name, p in self.model.named_parameters():
            if ".unipelt." in f".{name}" or name.startswith("unipelt."):
                continue
            shapes[name.replace(".base_layer.", ".")] = list(p.shape)
        import hashlib
        import json

        digest = hashlib.sha256(json.dumps(sorted(shapes.items())).encode()).hexdigest()[:16]
        return {
            "architecture": self.arch.name,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "shapes_sha256": digest,
        }


def _find_suffix(model: nn.Module, suffixes: str) -> str | None:
    """The first module path ending in one of the ``|``-separated suffixes (in their order)."""
    names = [n for n, _ in model.named_modules()]
    for suffix in suffixes.split("|"):
        for name in names:
            if name == suffix or name.endswith("." + suffix):
                return name
    return None


def _hidden_size(config) -> int:
    for attr in ("hidden_size", "n_embd", "d_model", "dim"):
        v = getattr(config, attr, None)
        if isinstance(v, int):
            return v
    raise ModelError(f"cannot read the hidden size of config {type(config).__name__}")


def resolve_model(model: nn.Module, architectures: dict[str, Architecture]) -> ModelInfo:
    """Match ``model`` against the registered catalogs; a clear ModelError when none fits."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or model_type not in architectures:
        supported = ", ".join(sorted(architectures)) or "(none loaded)"
        got = model_type or type(model).__name__
        raise ModelError(
            f"unsupported model {got!r}: supported model types are {supported}. "
            "To add one, register a plugin implementing the hook `unipelt_architectures` "
            "(see README, 'Writing a plugin')."
        )
    arch = architectures[model_type]
    modules = dict(model.named_modules())
    for suffix in arch.layers:
        for name, mod in modules.items():
            if (name == suffix or name.endswith("." + suffix)) and isinstance(mod, nn.ModuleList):
                layers = list(mod)
                return ModelInfo(
                    model=model, arch=arch, config=config,
                    layer_paths=[f"{name}.{i}" for i in range(len(layers))], layers=layers,
                    hidden_size=_hidden_size(config),
                )
    raise ModelError(
        f"{arch.name}: found no block list ({' or '.join(arch.layers)}) in {type(model).__name__}"
    )
