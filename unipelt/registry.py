"""The plugin manager: loads every plugin of the entry-point group ``unipelt`` and indexes what
they declare (methods, architectures)."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, get_args, get_origin, get_type_hints

import pluggy

from unipelt import hookspecs
from unipelt.errors import PluginError, SpecError, excerpt

ENTRY_POINT_GROUP = "unipelt"

# Every hook-point kind a branch can attach to (see unipelt.arch.SiteTarget.kind).
from unipelt.types import SITE_KINDS  # noqa: E402  (the one list of hook-point kinds)


@dataclass(frozen=True)
class MethodDef:
    """What a plugin declares about one adapter method.

    name: what a spec writes in ``method:``.
    config: a dataclass; its fields are the spec keys the method accepts (validated by type,
        ``Literal`` choices and the ``min``/``max`` field metadata, with no coercion: ``"8"``,
        ``8.0`` and ``true`` are not integers; an integer is accepted as a float). Two optional
        methods of the config class take part in validation, each returning ``None`` or a pair
        ``(field, message)`` that becomes a SpecError at ``modules.<node>.<field>``:
        ``validate()`` (model-free rules between fields, checked by ``unipelt validate``) and
        ``check_site(site, model)`` (bounds against the model: a rank against the projection's
        widths, a length against the position table), called by the graph for every hook point
        the node resolves to, before any module is built, so that no size a spec or an edited
        ``unipelt.json`` gives is ever allocated unchecked.
    site_kinds: the hook-point kinds the method can attach to (``linear``, ``output``, ...).
    summary: one line for ``unipelt plugins``.
    default_gate_input: where this method's gate reads by default: ``layer`` (the block input,
        as UniPELT's LoRA and prefix gates) or ``site`` (the tensor the branch reads, as the
        adapter gate).
    gateable: whether a gate may be attached at all.
    """

    name: str
    config: type
    site_kinds: frozenset[str]
    summary: str = ""
    default_gate_input: Literal["layer", "site"] = "site"
    gateable: bool = True
    plugin: str = field(default="", compare=False)


def _plugin_name(pm: pluggy.PluginManager, plugin: Any) -> str:
    return pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))


class Registry:
    """The plugin manager plus the indexes built from it."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self.methods: dict[str, MethodDef] = {}
        self.architectures: dict[str, Any] = {}  # model_type -> Architecture
        self._index()

    @property
    def hook(self):
        return self.pm.hook

    def _index(self) -> None:
        for impl in self.pm.hook.unipelt_methods.get_hookimpls():
            owner = _plugin_name(self.pm, impl.plugin)
            for m in impl.function() or []:
                if not isinstance(m, MethodDef):
                    raise PluginError(f"plugin {owner!r}: unipelt_methods returned {m!r}, not a MethodDef")
                bad = set(m.site_kinds) - set(SITE_KINDS)
                if bad:
                    raise PluginError(f"plugin {owner!r}: method {m.name!r} names unknown site kinds {sorted(bad)}")
                if not dataclasses.is_dataclass(m.config):
                    raise PluginError(f"plugin {owner!r}: method {m.name!r} config must be a dataclass")
                if m.name in self.methods:
                    raise PluginError(
                        f"method {m.name!r} declared by both {self.methods[m.name].plugin!r} and {owner!r}"
                    )
                self.methods[m.name] = dataclasses.replace(m, plugin=owner)
        for impl in self.pm.hook.unipelt_architectures.get_hookimpls():
            owner = _plugin_name(self.pm, impl.plugin)
            for arch in impl.function() or []:
                for mt in arch.model_types:
                    if mt in self.architectures:
                        raise PluginError(
                            f"model type {mt!r} claimed by architectures {self.architectures[mt].name!r} and {arch.name!r} ({owner!r})"
                        )
                    self.architectures[mt] = arch

    def site_names(self) -> list[str]:
        names: set[str] = set()
        for arch in self.architectures.values():
            names.update(arch.sites)
            names.update(arch.global_sites)
        return sorted(names)


def make_plugin_manager(extra_plugins: tuple[Any, ...] = (), load_entrypoints: bool = True) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    # Validate at registration: a hookimpl with a wrong signature (register) or a typo in its
    # name (check_pending) fails here, naming the plugin and the hook.
    try:
        # the core's own plugin: the host kinds of hook point (trylast, so a plugin may take over)
        from unipelt import sites

        pm.register(sites, name="unipelt.sites")
        if load_entrypoints:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        for p in extra_plugins:
            pm.register(p)
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(str(e)) from e
    return pm


_override: Registry | None = None


@lru_cache(maxsize=1)
def _default_registry() -> Registry:
    return Registry(make_plugin_manager())


def get_registry() -> Registry:
    """The registry of the plugins installed in this environment (built once)."""
    return _override if _override is not None else _default_registry()


def use_registry(registry: Registry | None) -> None:
    """Replace the process-wide registry (tests; applications embedding extra plugins)."""
    global _override
    _override = registry


def refresh_registry() -> Registry:
    """Rebuild the registry from the entry points (after installing a plugin at run time)."""
    _default_registry.cache_clear()
    return get_registry()


# ------------------------------------------------------------------------------------------
# config dataclass validation: turns a spec mapping into a method's config, or one SpecError
# ------------------------------------------------------------------------------------------
def config_fields(config_cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_cls)}


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if tp is bool:
        return "true/false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin in (list, tuple):
        (inner, *_) = get_args(tp) or (Any,)
        return f"a list of {_describe(inner)}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if tp is Any:
        return True, value
    if origin is Literal:
        return (value in get_args(tp)), value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        # an integer is a number (`alpha: 16`); a bool, a string or a non-finite float is not
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                f = float(value)
            except OverflowError:
                return False, value
            return math.isfinite(f), f
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            return False, value
        (inner, *_) = get_args(tp) or (Any,)
        out = []
        for item in value:
            ok, v = _coerce(item, inner)
            if not ok:
                return False, value
            out.append(v)
        return True, tuple(out) if origin is tuple else out
    return isinstance(value, tp), value


def build_config(config_cls: type, values: dict[str, Any], *, source: str | None, path: str) -> Any:
    """Validate ``values`` against the dataclass ``config_cls`` and return an instance.

    Unknown keys, wrong types, out-of-range numbers and invalid choices each raise one
    :class:`SpecError` naming ``path.<field>`` and what was expected.
    """
    fields = config_fields(config_cls)
    hints = get_type_hints(config_cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            valid = ", ".join(sorted(fields)) or "(none)"
            raise SpecError(f"unknown field {excerpt(key)}; valid fields here: {valid}", source=source, path=f"{path}.{key}")
        ok, coerced = _coerce(value, hints[key])
        if not ok:
            raise SpecError(
                f"expected {_describe(hints[key])}, got {excerpt(value)}", source=source, path=f"{path}.{key}"
            )
        meta = fields[key].metadata
        if isinstance(coerced, (int, float)) and not isinstance(coerced, bool):
            lo, hi = meta.get("min"), meta.get("max")
            if lo is not None and coerced < lo:
                raise SpecError(f"expected a value >= {lo}, got {excerpt(value)}", source=source, path=f"{path}.{key}")
            if hi is not None and coerced > hi:
                raise SpecError(f"expected a value <= {hi}, got {excerpt(value)}", source=source, path=f"{path}.{key}")
        kwargs[key] = coerced
    try:
        cfg = config_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise SpecError(str(e), source=source, path=path) from e
    check = getattr(cfg, "validate", None)
    if check is not None:
        problem = check()
        if problem:
            field_name, message = problem
            raise SpecError(message, source=source, path=f"{path}.{field_name}" if field_name else path)
    return cfg
