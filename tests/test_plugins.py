"""Third-party plugins: a method defined outside unipelt, installed the way a package would be
(a module plus a ``*.dist-info`` directory registering it under the entry-point group
``unipelt``), is found, validated, compiled, trained and listed; conflicts and contract
violations are PluginErrors naming the plugins involved.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import pytest
import torch

import unipelt
from conftest import make_batch, make_bert, make_llama
from unipelt.errors import PluginError
from unipelt.hookspecs import hookimpl
from unipelt.registry import MethodDef, Registry, get_registry, make_plugin_manager, use_registry

SCALE_PLUGIN = '''
"""scale: a learned per-channel vector on an output hook point: y <- s ⊙ y, i.e. delta = (s - 1) ⊙ y."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from unipelt.hookspecs import hookimpl
from unipelt.registry import MethodDef

METHOD_NAME = "__METHOD_NAME__"


@dataclass
class ScaleConfig:
    """init: the starting value of every s_i (1 leaves the model unchanged)."""

    init: float = field(default=1.0, metadata={"min": 0})


class ScaleBranch(nn.Module):
    reads = "output"

    def __init__(self, cfg: ScaleConfig, d: int):
        super().__init__()
        self.s = nn.Parameter(torch.full((d,), cfg.init))

    def forward(self, x, gate=None):
        delta = (self.s - 1) * x
        return delta if gate is None else delta * gate


METHOD = MethodDef(name=METHOD_NAME, config=ScaleConfig, site_kinds=frozenset({"output"}),
                   summary="learned per-channel scaling of an output")


@hookimpl
def unipelt_methods():
    return [METHOD]


# a plugin may take only the hook arguments it needs (hooks are called with keywords)
@hookimpl
def unipelt_build_branch(method, config, site):
    if method.name != METHOD_NAME:
        return None
    return ScaleBranch(config, site.out_features)
'''


class Installed:
    """Writes plugin modules and their dist-info directories under one sys.path entry."""

    def __init__(self, root):
        self.root = root
        self.modules: list[str] = []
        sys.path.insert(0, str(root))

    def add(self, dist: str, ep_name: str, module: str, method_name: str = "scale", source: str = SCALE_PLUGIN):
        (self.root / f"{module}.py").write_text(source.replace("__METHOD_NAME__", method_name), encoding="utf-8")
        info = self.root / f"{dist}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n", encoding="utf-8")
        (info / "entry_points.txt").write_text(f"[unipelt]\n{ep_name} = {module}\n", encoding="utf-8")
        self.modules.append(module)
        importlib.invalidate_caches()

    def cleanup(self):
        sys.path.remove(str(self.root))
        for m in self.modules:
            sys.modules.pop(m, None)
        importlib.invalidate_caches()


@pytest.fixture
def installed(tmp_path, fresh_registry):
    inst = Installed(tmp_path)
    yield inst
    inst.cleanup()


def test_third_party_method(installed):
    installed.add("myplugin", "myplugin_scaling", "myplugin_scaling")
    use_registry(Registry(make_plugin_manager()))
    reg = get_registry()
    # listed next to the in-tree methods, which register through the same entry-point group
    assert reg.methods["scale"].plugin == "myplugin_scaling"
    assert reg.methods["lora"].plugin == "lora" and reg.methods["adapter"].plugin == "adapter"
    with pytest.raises(unipelt.SpecError, match="scale"):
        unipelt.validate({"modules": {"x": {"method": "scaal", "site": "ffn.out"}}})

    # the plugin's config is validated like any other
    with pytest.raises(unipelt.SpecError) as ei:
        unipelt.validate({"modules": {"s": {"method": "scale", "site": "ffn.out", "init": -1}}})
    assert ei.value.path == "modules.s.init"
    with pytest.raises(unipelt.SpecError) as ei:
        unipelt.compile(make_bert(), {"modules": {"s": {"method": "scale", "site": "attn.q"}}})
    assert ei.value.path == "modules.s.site"

    model = make_bert()
    batch = make_batch()
    with torch.no_grad():
        ref = model(**batch).logits
    h = unipelt.compile(model, {"modules": {"s": {"method": "scale", "site": "ffn.out"}, "l": {"method": "lora", "site": "attn.q"}}})
    assert sorted(k for k in h.named_parameters() if k.startswith("s.")) == ["s.0.ffn.out.s", "s.1.ffn.out.s"]
    assert h.summary().per_module()["s"]["kept"] == 2 * 32
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref)  # s = 1: identity at init

    # it trains: the gradient reaches s
    opt = torch.optim.AdamW(h.parameters(), lr=0.05, weight_decay=0.0)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, torch.tensor([0, 1, 2]))
        loss.backward()
        s = h.named_parameters()["s.1.ffn.out.s"]
        assert s.grad is not None and s.grad.abs().sum() > 0
        opt.step()
    model.eval()
    assert not torch.allclose(s.detach(), torch.ones(32))
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, ref)

    # the formula: the FFN's output projection (ffn.out, before the residual add and LayerNorm)
    # is multiplied by s
    out_mod = model.bert.encoder.layer[1].output
    seen = []
    hooks = [out_mod.register_forward_pre_hook(lambda m, a: seen.append(a)),
             out_mod.register_forward_hook(lambda m, a, o: seen.append(o))]
    with torch.no_grad():
        model(**batch)
        (mid, residual), y = seen
        expected = out_mod.LayerNorm(out_mod.dense.base_layer(mid) * s + residual)
        torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)
    for hk in hooks:
        hk.remove()
    h.detach()


def test_third_party_method_on_llama(installed):
    installed.add("myplugin", "myplugin_scaling", "myplugin_scaling")
    use_registry(Registry(make_plugin_manager()))
    model = make_llama()
    h = unipelt.compile(model, {"modules": {"s": {"method": "scale", "sites": ["attn.out", "ffn.out"], "init": 0.5}}})
    assert len(h.parameters()) == 4
    with torch.no_grad():
        assert model(**make_batch()).logits.isfinite().all()


def test_duplicate_method_names_both_plugins(installed):
    installed.add("plugin-a", "scale_a", "scale_plugin_a")
    installed.add("plugin-b", "scale_b", "scale_plugin_b")
    with pytest.raises(PluginError) as ei:
        Registry(make_plugin_manager())
    msg = str(ei.value)
    assert "'scale'" in msg and "scale_a" in msg and "scale_b" in msg


def test_plugin_redeclaring_a_builtin_method(installed):
    installed.add("evil", "lora_again", "lora_again_plugin", method_name="lora")
    with pytest.raises(PluginError) as ei:
        Registry(make_plugin_manager())
    assert "'lora'" in str(ei.value) and "lora_again" in str(ei.value)


# ------------------------------------------------------------------------------------------
# contract violations, through extra plugins registered directly
# ------------------------------------------------------------------------------------------
@dataclass
class _Cfg:
    k: int = 1


class _NotAMethodDef:
    @hookimpl
    def unipelt_methods(self):
        return [{"name": "oops"}]


class _BadSiteKind:
    @hookimpl
    def unipelt_methods(self):
        return [MethodDef(name="oops", config=_Cfg, site_kinds=frozenset({"everywhere"}))]


class _ConfigNotDataclass:
    @hookimpl
    def unipelt_methods(self):
        return [MethodDef(name="oops", config=dict, site_kinds=frozenset({"linear"}))]


class _TypoHook:
    @hookimpl
    def unipelt_build_brnch(self, method):  # misspelt hook name
        return None


class _WrongArgument:
    @hookimpl
    def unipelt_build_branch(self, method, layer_index):  # no such hook argument
        return None


@pytest.mark.parametrize("plugin,needle", [
    (_NotAMethodDef(), "not a MethodDef"),
    (_BadSiteKind(), "unknown site kinds"),
    (_ConfigNotDataclass(), "must be a dataclass"),
    (_TypoHook(), "unipelt_build_brnch"),
    (_WrongArgument(), "layer_index"),
], ids=["not_methoddef", "bad_site_kind", "config_not_dataclass", "typo_hook", "wrong_argument"])
def test_contract_violations_are_plugin_errors(plugin, needle):
    with pytest.raises(PluginError, match=needle):
        Registry(make_plugin_manager(extra_plugins=(plugin,)))


def test_branch_without_reads_attribute(fresh_registry, bert):
    class NoReads(torch.nn.Module):
        def forward(self, x, gate=None):
            return x * 0

    class Plugin:
        @hookimpl
        def unipelt_methods(self):
            return [MethodDef(name="noreads", config=_Cfg, site_kinds=frozenset({"output"}))]

        @hookimpl
        def unipelt_build_branch(self, method):
            return NoReads() if method.name == "noreads" else None

    reg = Registry(make_plugin_manager(extra_plugins=(Plugin(),)))
    from conftest import Snapshot

    snap = Snapshot(bert)
    with pytest.raises(PluginError, match="reads"):
        unipelt.compile(bert, {"modules": {"n": {"method": "noreads", "site": "ffn.out"}}}, registry=reg)
    snap.assert_same()


def test_method_nobody_builds(fresh_registry, bert):
    class Plugin:
        @hookimpl
        def unipelt_methods(self):
            return [MethodDef(name="ghost", config=_Cfg, site_kinds=frozenset({"output"}))]

    reg = Registry(make_plugin_manager(extra_plugins=(Plugin(),)))
    with pytest.raises(PluginError, match="ghost"):
        unipelt.compile(bert, {"modules": {"g": {"method": "ghost", "site": "ffn.out"}}}, registry=reg)
    assert "unipelt" not in bert._modules
