"""The hook contract between the unipelt engine and its plugins.

Every adapter method, gate, architecture catalog and CLI subcommand reaches the engine through
these hooks; the in-tree plugins (package ``unipelt_plugins``, folder ``plugins/``) register through
the entry-point group ``unipelt`` exactly as a third-party package would. Read top to bottom, this
file follows the order in which the compiler calls the hooks:

    spec load -> site resolution -> module construction -> attach and gating
    -> state dict and merge -> training controllers -> CLI

Hooks are always called with keyword arguments only, so a spec may gain an argument without
breaking existing implementations.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    import argparse

    from torch import nn

    from unipelt.arch import Architecture, ModelInfo, ResolvedSite
    from unipelt.registry import MethodDef
    from unipelt.spec import GateSpec, ModuleSpec

hookspec = pluggy.HookspecMarker("unipelt")
hookimpl = pluggy.HookimplMarker("unipelt")


# --------------------------------------------------------------------------------------------
# spec load
# --------------------------------------------------------------------------------------------
@hookspec
def unipelt_methods() -> list[MethodDef]:
    """Declare the adapter methods a plugin provides.

    :return: a list of :class:`unipelt.registry.MethodDef`: the method's name (what a spec writes
        in ``method:``), its config dataclass (the spec fields it accepts, validated before the
        model is touched), the hook-point kinds it can attach to, and its documentation line.

    All results are collected. Two plugins declaring the same method name is an error naming both.
    Called once when the plugin manager is built, before any spec is validated.
    """


# --------------------------------------------------------------------------------------------
# site resolution
# --------------------------------------------------------------------------------------------
@hookspec
def unipelt_architectures() -> list[Architecture]:
    """Declare architecture catalogs: how the model-independent hook points map onto a model family.

    :return: a list of :class:`unipelt.arch.Architecture`, each naming the ``config.model_type``
        values it serves, where the transformer blocks are, and for every hook point (``attn.q``,
        ``ffn.out``, ``attn.kv``, ...) the module it resolves to and how a branch attaches there.

    All results are collected; a model type claimed twice is an error naming both plugins.
    Called when the compiler resolves a model, before the spec is checked against it.
    """


# --------------------------------------------------------------------------------------------
# module construction
# --------------------------------------------------------------------------------------------
@hookspec(firstresult=True)
def unipelt_build_shared(method: MethodDef, config: Any, node: ModuleSpec, model: ModelInfo) -> nn.Module | None:
    """Build the part of a spec node shared by all its layers (the prefix MLP shared across layers).

    :param method: the method definition the node names.
    :param config: the node's validated config.
    :param node: the spec node.
    :param model: the resolved model.
    :return: an ``nn.Module`` owned by the adapter and passed as ``shared`` to every
        ``unipelt_build_branch`` call of this node, or None when the method shares nothing.

    The first non-None result wins. Called once per node, before its branches are built.
    Optional ``num_params(kept)`` on the module separates training-only parameters.
    """


@hookspec(firstresult=True)
def unipelt_build_branch(
    method: MethodDef, config: Any, node: ModuleSpec, site: ResolvedSite, model: ModelInfo, shared: nn.Module | None
) -> nn.Module | None:
    """Build the trainable branch module of one spec node at one layer and hook point.

    :param method: the method definition the node names.
    :param config: the node's validated config (an instance of ``method.config``).
    :param node: the spec node (name, sites, layers, gate).
    :param site: the resolved hook point (module, kind, input and output widths).
    :param model: the resolved model (architecture, layers, hidden size, dtype).
    :param shared: what ``unipelt_build_shared`` returned for this node, or None.
    :return: an ``nn.Module`` following :class:`unipelt.types.Branch`, or None if this
        implementation does not build this method.

    A config value that does not fit this model (a token id beyond its vocabulary) raises
    ``SpecError(message, path=<field>)``: the compiler adds the spec file and the node's path.
    The first non-None result wins. Implementations check ``method.name`` and return None for
    methods they do not own; a plugin that handles a special base (4-bit, 8-bit) marks itself
    ``tryfirst``. Called after the spec validated against the model, before anything is attached.
    """


@hookspec(firstresult=True)
def unipelt_build_gate(spec: GateSpec, in_features: int, model: ModelInfo) -> nn.Module | None:
    """Build one gate module (one per layer for every gated node or shared gate).

    :param spec: the validated gate options (input site, pooling, scale mode, ...).
    :param in_features: the width of the tensor the gate reads.
    :param model: the resolved model.
    :return: an ``nn.Module`` following :class:`unipelt.types.GateModule`, or None.

    The first non-None result wins. Called after the branches are built.
    """


# --------------------------------------------------------------------------------------------
# attach and gating
# --------------------------------------------------------------------------------------------
@hookspec(firstresult=True)
def unipelt_wrap_leaf(module: nn.Module, site: ResolvedSite) -> nn.Module | None:
    """Wrap a leaf layer (a Linear, a GPT-2 Conv1D, a quantized linear) so branches can attach.

    :param module: the original leaf module; the wrapper must keep it reachable as ``base_layer``
        and leave the base checkpoint keys unchanged.
    :param site: the hook point being attached.
    :return: a :class:`unipelt.runtime.LeafWrapper` (or subclass), or None if this
        implementation does not handle this kind of layer.

    The first non-None result wins: the plain-linear default is ``trylast``; a plugin handling
    quantized bases is ``tryfirst``. Called once per leaf, the first time a site needs it.
    """


@hookspec(firstresult=True)
def unipelt_attach_branch(
    model: nn.Module, state: Any, site: ResolvedSite, entry: Any, graph: Any, registry: Any
) -> bool | None:
    """Attach one built branch at its resolved hook point.

    :param model: the model being adapted.
    :param state: the model's :class:`unipelt.state.ModelState`; an implementation attaches through
        the functions of :mod:`unipelt.state` (``host_for``, ``attach_kv``, ``attach_embed``, ...),
        never by writing the state's fields or calling the compiler's internals.
    :param site: the resolved hook point (its ``kind`` says which mechanism serves it).
    :param entry: the :class:`unipelt.runtime.Entry` of the branch (adapter, node, branch module,
        gate, layer).
    :param graph: the adapter's :class:`unipelt.graph.CompiledGraph` (combination mode and order
        at the site).
    :param registry: the registry compiling the adapter (for ``unipelt_wrap_leaf``).
    :return: True when this implementation attached the branch; None to leave it to another.

    The first non-None result wins. The core serves the host kinds (``linear``, ``output``,
    ``io``, ``renorm``: branches run by a leaf wrapper or an output hook) ``trylast``; a plugin
    owning a kind with a mechanism of its own (``kv`` prefixes, ``embed`` virtual tokens,
    ``params`` trained in place) implements it for that kind. Called once per branch after every
    module was built and the budget checked; if any call fails, everything attached is undone.
    """


@hookspec(firstresult=True)
def unipelt_detach_branch(model: nn.Module, state: Any, site: ResolvedSite, entry: Any) -> bool | None:
    """Undo :func:`unipelt_attach_branch` for one branch.

    :return: True when this implementation detached it; None to leave it to another.

    The first non-None result wins; the same implementation that attached a kind detaches it.
    Called by ``AdapterHandle.detach`` (after an unmerge) for every branch of the adapter, before
    the model's original modules are restored.
    """


@hookspec
def unipelt_parameters_replaced(model: nn.Module, state: Any, handle: Any,
                                replaced: list[tuple[list[nn.Parameter], list[nn.Parameter]]]) -> None:
    """Follow an attached adapter whose branches now hold new parameter objects.

    :param model: the adapted model.
    :param state: the model's :class:`unipelt.state.ModelState`.
    :param handle: the :class:`unipelt.handle.AdapterHandle` whose branches changed form.
    :param replaced: per changed branch that is not pruned (a pruned one stays frozen for good),
        ``(before, after)``: the parameters that computed it before (its own, or its module's
        shared ones, such as a prefix MLP) and its parameters now.

    All implementations are called, by ``AdapterHandle.drop_reparameterization`` once the branches
    are materialized and their ``requires_grad`` flags set. What an attach recorded of the old
    objects moves to the new ones here (an AdapterFusion freezes the adapters it fuses and gives
    their flags back on detach: the new parameters take the old ones' place).
    """


# --------------------------------------------------------------------------------------------
# state dict and merge
# --------------------------------------------------------------------------------------------
@hookspec
def unipelt_adapter_saved(handle: Any, path: str, metadata: dict) -> None:
    """Observe (and extend) the metadata written to ``unipelt.json`` when an adapter is saved.

    :param handle: the :class:`unipelt.handle.AdapterHandle` being saved.
    :param path: the destination directory.
    :param metadata: the JSON-able dict about to be written; implementations may add keys
        under their own plugin name.

    All implementations are called, before the directory is committed atomically.
    """


@hookspec
def unipelt_adapter_loaded(handle: Any, path: str, metadata: dict) -> None:
    """Check an adapter compiled from a saved directory against what its ``unipelt.json`` records.

    :param handle: the :class:`unipelt.handle.AdapterHandle` just compiled from the stored spec
        (attached, its tensors not loaded yet).
    :param path: the adapter directory.
    :param metadata: the parsed ``unipelt.json`` (what :func:`unipelt_adapter_saved` wrote, read
        back); implementations read the keys under their own plugin name.

    All implementations are called, by ``unipelt.load`` after the base fingerprint is checked and
    before the tensors are copied in. Raise :class:`~unipelt.errors.AdapterFileError` naming the
    file and the field to refuse the adapter: it is then detached, and the model is left as it was.
    """


@hookspec(firstresult=True)
def unipelt_import_peft(peft_type: str, config: dict, tensors: dict, context: Any) -> tuple[dict, dict] | None:
    """Translate a Hugging Face PEFT adapter of one ``peft_type`` into a unipelt spec and tensors.

    :param peft_type: the adapter's ``peft_type`` (``LORA``, ``IA3``, ``PROMPT_TUNING``, ...).
    :param config: the parsed ``adapter_config.json``.
    :param tensors: the tensors of ``adapter_model.safetensors`` under PEFT's keys
        (``base_model.model.<module path>.<name>``).
    :param context: a :class:`unipelt.peft_import.ImportContext`: the resolved model, its linear
        hook points by module path (``linear_sites()``), and ``error(field, message)``, which
        builds the :class:`~unipelt.errors.AdapterFileError` naming the file and the field.
    :return: ``(spec, tensors)``: a spec mapping (``{"modules": ...}``) and its tensors under
        canonical keys (``<node>.<layer>.<site>.<param>``) with the same outputs as PEFT, or None
        when this implementation does not translate this type.

    The first non-None result wins; the built-in LoRA, prompt-tuning and prefix-tuning translators
    of :mod:`unipelt.peft_import` answer only when no plugin did. Called by ``unipelt.load`` on a
    PEFT directory and by ``unipelt import-peft``, before anything is attached.
    """


# --------------------------------------------------------------------------------------------
# training controllers
# --------------------------------------------------------------------------------------------
@hookspec
def unipelt_training_controllers(handle: Any) -> list[Any]:
    """Contribute training-time controllers for an adapted model (AdaLoRA budgets, gate pruning).

    :param handle: the adapter handle being trained.
    :return: a list of objects with optional ``param_groups(handle, lr)``, ``on_step(step, loss)``
        and ``regularizer() -> Tensor`` members, or an empty list.

    All results are collected. Called by the trainer after the optimizer's parameters are known.
    """


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
@hookspec
def unipelt_add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add subcommands to the ``unipelt`` command line.

    :param subparsers: the argparse subparsers object; an implementation adds its parsers and
        sets ``func`` on them (``parser.set_defaults(func=...)``). The function receives the
        parsed namespace and returns the exit code.

    All implementations are called, in registration order, when the CLI starts.
    """
