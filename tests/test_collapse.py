"""Collapse for serving (unipelt.collapse, ``handle.collapse``, ``unipelt collapse``): closed gates'
branches pruned, nearly constant gates folded as constants, LoRA under a constant gate merged by
the formula, the outputs within the measured difference, the saved collapsed adapter reloading
to the same outputs, and a refusal beyond the tolerance leaving the model as it was."""
from __future__ import annotations

import json

import pytest
import torch

import unipelt
from conftest import make_bert, make_batch, make_llama, randomize
from unipelt.cli import main
from unipelt.collapse import CollapseError, constant_delta_weight
from unipelt.models import load_model
from unipelt.pruning import ConstantGate
from unipelt.train import record_training_info

SPEC = {"version": 1, "modules": {
    "lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4, "gate": {"input": "layer"}},
    "prefix": {"method": "prefix", "sites": "attn.kv", "length": 3, "reparam": "mlp", "reparam_hidden": 16,
               "gate": {"input": "layer"}},
    "adapter": {"method": "adapter", "sites": "ffn.res", "reduction_factor": 4, "gate": {"input": "site"}},
}}


def trained_ish(model, spec=SPEC):
    """Random adapter weights; LoRA-q gates closed (bias -12), LoRA-v and adapter gates nearly
    constant (tiny weights), prefix gates left varying."""
    h = unipelt.compile(model, spec)
    randomize(h)
    with torch.no_grad():
        for k, g in h.gate_modules.items():
            if k.startswith("lora@attn.q"):
                g.linear.weight.zero_()
                g.linear.bias.fill_(-12.0)
            elif k.startswith(("lora@attn.v", "adapter")):
                g.linear.weight.mul_(1e-4)
            else:  # the prefix gates vary a lot over tokens and examples
                gen = torch.Generator().manual_seed(7)
                g.linear.weight.copy_(torch.randn(g.linear.weight.shape, generator=gen) * 2.0)
                g.linear.bias.zero_()
    return h


def out(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("factory", [make_bert, make_llama])
def test_collapse_prunes_folds_merges_and_reloads(tmp_path, factory):
    model = factory()
    h = trained_ish(model)
    calib = [make_batch(seed=i) for i in range(3)]
    probe = make_batch(seed=11)
    gated = [out(model, b) for b in calib + [probe]]
    rep = h.collapse(calib, tolerance=1e-3)
    assert rep.pruned == ["lora.0.attn.q", "lora.1.attn.q"]
    # the gates varying by at most `spread` (0.02) are the constants; on llama the second layer's
    # prefix gate saturates at 1 (large layer inputs), so it is one of them there
    assert sorted(rep.constant) == sorted(k for k, st in rep.stats.items() if st.spread <= 0.02 and k not in
                                          ("lora@attn.q.0", "lora@attn.q.1"))
    assert {"adapter.0", "adapter.1", "lora@attn.v.0", "lora@attn.v.1"} <= set(rep.constant)
    assert rep.merged == ["lora.0.attn.v", "lora.1.attn.v"]
    assert "prefix.0" in rep.kept_gates and rep.stats["prefix.0"].spread > 0.5
    assert rep.dropped_reparameterization > 0
    assert rep.params_after < rep.params_before
    # the constants are the calibration means; the outputs within what collapse measured
    for k, v in rep.constant.items():
        assert v == pytest.approx(rep.stats[k].mean, abs=1e-6)
    collapsed = [out(model, b) for b in calib + [probe]]
    worst = max(float((a - b).abs().max()) for a, b in zip(gated[:3], collapsed[:3]))
    assert worst <= 1e-3 and worst == pytest.approx(rep.max_abs_diff, abs=1e-6)
    torch.testing.assert_close(collapsed[3], gated[3], atol=1e-3, rtol=0)  # unseen data too (tiny gate weights)
    # nothing of the pruned branches or the constant gates is computed or saved
    assert all(isinstance(h.entries[k].gate, ConstantGate) for k in ("adapter.0.ffn.res", "lora.1.attn.v"))
    h.save(tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "unipelt.json").read_text())
    assert meta["spec"]["pruned"] == rep.pruned and sorted(meta["spec"]["collapsed"]) == sorted(rep.constant)
    fresh = factory()
    loaded = unipelt.load(fresh, tmp_path / "c")
    assert loaded.summary().kept == rep.params_after
    for b, expect in zip(calib + [probe], collapsed):
        torch.testing.assert_close(out(fresh, b), expect, atol=1e-5, rtol=1e-5)
    assert loaded.merge()["merged"] == rep.merged  # a constant-gated LoRA merges after loading too
    torch.testing.assert_close(out(fresh, probe), collapsed[3], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["replace", "multiply"])
def test_merged_delta_is_the_gated_lora_formula(mode):
    spec = {"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q"], "r": 4, "alpha": 6,
                                               "gate": {"input": "layer", "lora_scale": mode}}}}
    model = make_bert()
    h = unipelt.compile(model, spec)
    randomize(h)
    e = h.entries["lora.0.attn.q"]
    e.gate = ConstantGate(h.gate_modules["lora@attn.q.0"].spec if "lora@attn.q.0" in h.gate_modules
                          else h.gate_modules["lora.0"].spec, [0.3])
    b = e.branch
    scale = 0.3 if mode == "replace" else 0.3 * 6 / 4
    torch.testing.assert_close(constant_delta_weight(e), scale * (b.lora_B @ b.lora_A), rtol=1e-5, atol=1e-6)


def test_a_closed_prefix_gate_becomes_a_constant_not_a_removal():
    """g·P_k -> 0 leaves attention logits 0 to the prefix (not -inf): removing a closed prefix would
    change the outputs, so collapse folds its gate as a constant instead."""
    model = make_llama()
    h = unipelt.compile(model, SPEC)
    randomize(h)
    with torch.no_grad():
        for k, g in h.gate_modules.items():
            if k.startswith("prefix"):
                g.linear.weight.zero_()
                g.linear.bias.fill_(-12.0)
    calib = [make_batch(seed=i) for i in range(2)]
    before = [out(model, b) for b in calib]
    rep = h.collapse(calib, spread=0.0)  # no other gate made constant
    assert rep.pruned == [] and sorted(rep.constant) == ["prefix.0", "prefix.1"]
    for b, expect in zip(calib, before):
        torch.testing.assert_close(out(model, b), expect, atol=1e-5, rtol=1e-5)
    # removing the prefix instead does change the outputs: the fold above was needed
    from unipelt.pruning import prune

    prune(h, ["prefix.0.attn.kv", "prefix.1.attn.kv"])
    assert (out(model, calib[0]) - before[0]).abs().max() > 1e-3


def test_beyond_the_tolerance_nothing_changes():
    model = make_bert()
    h = unipelt.compile(model, SPEC)
    randomize(h)
    with torch.no_grad():
        for k, g in h.gate_modules.items():
            if k.startswith("adapter"):
                g.linear.weight.mul_(0.05)  # spread small enough to be folded, but not negligible
    calib = [make_batch(seed=i) for i in range(2)]
    before = out(model, calib[0])
    with pytest.raises(CollapseError, match="over the tolerance 1e-09"):
        h.collapse(calib, spread=0.5, tolerance=1e-9)
    assert h.spec.pruned == [] and h.spec.collapsed == {} and not any(e.merged for e in h.entries.values())
    assert not any(isinstance(g, ConstantGate) for g in h.gate_modules.values())
    torch.testing.assert_close(out(model, calib[0]), before, rtol=0, atol=0)


def test_collapse_command(tmp_path, capsys):
    model, tok = load_model("tiny-bert", task="classification", num_labels=2)
    h = trained_ish(model)
    record_training_info(h, {"model": "tiny-bert", "task": "classification", "labels": ["neg", "pos"]})
    h.save(tmp_path / "a")
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": f"some words {i} here", "label": ["neg", "pos"][i % 2]}) + "\n"
                            for i in range(6)))
    code = main(["collapse", str(tmp_path / "a"), "--data", str(data), "--out", str(tmp_path / "c"),
                 "--tolerance", "1e-3", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0
    assert res["pruned"] == ["lora.0.attn.q", "lora.1.attn.q"] and len(res["merged"]) == 2
    assert res["max_abs_diff"] <= 1e-3 and set(res["seconds"]) == {"base", "gated", "collapsed"}
    assert json.loads((tmp_path / "c" / "unipelt.json").read_text())["spec"]["pruned"] == res["pruned"]
    # refused: nothing written, the message names the adapter and the tolerance
    code = main(["collapse", str(tmp_path / "a"), "--data", str(data), "--out", str(tmp_path / "d"),
                 "--tolerance", "1e-12", "--spread", "1"])
    err = capsys.readouterr().err
    assert code != 0 and "over the tolerance" in err and str(tmp_path / "a") in err
    assert not (tmp_path / "d").exists()
    # the text output prints the difference, parameters and times
    code = main(["collapse", str(tmp_path / "a"), "--data", str(data), "--out", str(tmp_path / "e")])
    text = capsys.readouterr().out
    assert code == 0 and "output diff" in text and "parameters" in text and "x base" in text
    # --out onto the adapter itself (collapse is lossy): refused before anything runs, the adapter kept
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    for out in (tmp_path / "a", tmp_path / "sub" / ".." / "a"):
        code = main(["collapse", str(tmp_path / "a"), "--data", str(data), "--out", str(out)])
        err = capsys.readouterr().err
        assert code != 0 and "--out is the adapter being collapsed" in err, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before


def test_merged_leaves_forward_straight_to_the_base_layer():
    """A projection whose branches are all merged runs as the unadapted model's: the wrapper's
    forward is the base layer's (no host dispatch); unmerge restores the dispatch. Outputs equal,
    and a deep copy or a pickled copy of the collapsed model computes the same."""
    import copy
    import io

    from unipelt.runtime import Host, LeafWrapper

    model = make_llama()
    spec = {"modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4},
                        "adapter": {"method": "adapter", "sites": "ffn.res", "reduction_factor": 4}}}
    h = unipelt.compile(model, spec)
    randomize(h)
    model.eval()
    batch = make_batch()
    wrappers = [m for m in model.modules() if isinstance(m, LeafWrapper)]
    assert wrappers and not any(w.bypassed for w in wrappers)
    with torch.no_grad():
        live = model(**batch).logits
        h.merge()
        assert all(w.bypassed for w in wrappers)  # LoRA merged: nothing left at q and v
        calls = []
        run = Host.run
        Host.run = lambda self, x, y: calls.append(self.path) or run(self, x, y)
        try:
            merged = model(**batch).logits
        finally:
            Host.run = run
        assert not [p for p in calls if p.endswith(("q_proj", "v_proj"))]
        torch.testing.assert_close(merged, live, atol=1e-5, rtol=1e-5)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        for twin in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
            torch.testing.assert_close(twin(**batch).logits, merged, atol=0, rtol=0)
        h.unmerge()
        assert not any(w.bypassed for w in wrappers)
        torch.testing.assert_close(model(**batch).logits, live, atol=1e-6, rtol=0)
        # switched off, an adapter can still serve rows of a mixed batch: the wrappers keep dispatching
        unipelt.set_adapter(model, [])
        assert not any(w.bypassed for w in wrappers)
        names = [h.name] * batch["input_ids"].shape[0]
        torch.testing.assert_close(model(**batch, adapter_names=names).logits, live, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale_rule", ["replace", "multiply"])
def test_a_collapsed_gated_lora_exports_to_peft(tmp_path, scale_rule):
    """Gated LoRA collapsed (closed gates pruned, the others constants): `export --format peft`
    writes the constant into B (c replacing alpha/r, or c·alpha/r under lora_scale: multiply) and
    leaves the pruned branch out; PEFT loading the export computes the collapsed model's logits.
    Before, every gated module was refused as input-dependent, collapsed or not."""
    peft = pytest.importorskip("peft")
    from unipelt.export import export_peft

    spec = {"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4,
                                               "alpha": 8,
                                               "gate": {"input": "layer", "lora_scale": scale_rule}}}}
    model, _ = load_model("tiny-llama", task="causal-lm")
    h = unipelt.compile(model, spec)
    randomize(h)
    with torch.no_grad():
        for k, g in h.gate_modules.items():
            g.linear.weight.mul_(1e-5)  # nearly constant gates
            if k == "lora@attn.q.0":
                g.linear.bias.fill_(-12.0)  # closed: pruned by collapse
    calib = [make_batch(seed=i) for i in range(3)]
    rep = h.collapse(calib, tolerance=1e-3)
    assert rep.pruned == ["lora.0.attn.q"]
    probe = make_batch(seed=5)
    want = out(model, probe)
    record_training_info(h, {"model": "tiny-llama", "task": "causal-lm"})
    h.save(tmp_path / "a")
    export_peft(tmp_path / "a", tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert "model.layers.0.self_attn.q_proj" not in cfg["target_modules"]
    assert "model.layers.1.self_attn.q_proj" in cfg["target_modules"]
    fresh, _ = load_model("tiny-llama", task="causal-lm")
    pm = peft.PeftModel.from_pretrained(fresh, tmp_path / "peft").eval()
    torch.testing.assert_close(out(pm, probe), want, atol=1e-5, rtol=1e-5)


def test_a_collapsed_adapter_with_a_varying_gate_is_refused_by_name(tmp_path):
    """The gates collapse left varying (the prefix's here, made LoRA's) still refuse export, naming
    the module and its hook point; nothing is written."""
    from unipelt.export import ExportError, export_peft

    spec = {"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4,
                                               "gate": {"input": "layer"}}}}
    model, _ = load_model("tiny-llama", task="causal-lm")
    h = unipelt.compile(model, spec)
    randomize(h)
    with torch.no_grad():
        for k, g in h.gate_modules.items():
            if k != "lora@attn.v.1":
                g.linear.weight.mul_(1e-5)
            else:
                g.linear.weight.copy_(torch.randn(g.linear.weight.shape, generator=torch.Generator().manual_seed(3)) * 3)
    h.collapse([make_batch(seed=i) for i in range(3)], tolerance=1e-3)
    assert h.spec.collapsed and "lora@attn.v.1" not in h.spec.collapsed
    record_training_info(h, {"model": "tiny-llama", "task": "causal-lm"})
    h.save(tmp_path / "a")
    with pytest.raises(ExportError, match=r"module 'lora' \(lora\) at 1\.attn\.v is gated and its gate was not "
                                          r"collapsed"):
        export_peft(tmp_path / "a", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("factory", [make_bert, make_llama])
def test_constant_prefix_gate_is_folded_once(factory):
    """A prefix under a collapsed (constant) gate serves g·P_k and g·P_v made once, not scaled per
    forward and layer: in an eager inference call no multiplication of the prefix is left (two
    fewer per layer than a call that needs gradients, where the products stay in the graph), the
    outputs are the per-call path's bit for bit, and a changed P (a load, an update) is followed."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMul(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.mul:
                self.n += 1
            return func(*args, **(kwargs or {}))

    model = factory()
    h = trained_ish(model)
    with torch.no_grad():  # the prefix gates constant too: every gate collapses
        for k, g in h.gate_modules.items():
            if k.startswith("prefix"):
                g.linear.weight.zero_()
    calib = [make_batch(seed=i) for i in range(2)]
    h.collapse(calib)
    layers = [e for e in h.entries.values() if e.branch.reads == "kv"]
    assert layers and all(isinstance(e.gate, ConstantGate) for e in layers)
    b = make_batch(seed=5)
    model.eval()
    with torch.no_grad(), CountMul() as folded:
        served = model(**b).logits
    assert all(e.branch._fold_cache is not None for e in layers)
    with torch.enable_grad(), CountMul() as per_call:  # P trains: the scaling stays per call
        scaled = model(**b).logits
    assert per_call.n - folded.n == 2 * len(layers)
    torch.testing.assert_close(served, scaled.detach(), atol=0, rtol=0)
    with torch.no_grad():
        for e in layers:
            e.branch.prefix_kv.mul_(1.5)
        changed = model(**b).logits
    with torch.enable_grad():
        want = model(**b).logits.detach()
    torch.testing.assert_close(changed, want, atol=0, rtol=0)
    assert not torch.allclose(changed, served)


def test_constant_gate_casts_its_value_once():
    """A constant gate in a bf16 (or fp16) model serves its value cast once, not per call; a new
    value (a load into the buffer, a move to another device) is followed."""
    gate = ConstantGate(None, [0.25, 0.75])
    x = torch.zeros(3, 5, 8, dtype=torch.bfloat16)
    first, second = gate(x, None), gate(x, None)
    assert first.dtype == torch.bfloat16 and first.shape == (3, 1, 2)
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()  # one cast
    torch.testing.assert_close(first[0, 0], torch.tensor([0.25, 0.75], dtype=torch.bfloat16))
    gate.value.fill_(0.5)
    torch.testing.assert_close(gate(x, None)[2, 0], torch.tensor([0.5, 0.5], dtype=torch.bfloat16))
    assert gate(x.float(), None).dtype == torch.float32  # the stored dtype: the buffer itself


def test_collapse_command_prints_the_base_time_each_ratio_is_taken_against(tmp_path, capsys, monkeypatch):
    # each variant is timed interleaved with its own base rounds; the command printed only the
    # first rounds' base time beside both ratios, so a newcomer read "base 7.34 ms ... collapsed
    # 5.87 ms (1.05x base)". Times fixed here: the gated run against a 10 ms base, the collapsed
    # one against a 20 ms base
    import unipelt.collapse as collapse_mod

    model, tok = load_model("tiny-bert", task="classification", num_labels=2)
    h = trained_ish(model)
    record_training_info(h, {"model": "tiny-bert", "task": "classification", "labels": ["neg", "pos"]})
    h.save(tmp_path / "a")
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": f"some words {i} here"}) + "\n" for i in range(4)))
    rounds = iter([{"base": 0.010, "gated": 0.015}, {"base": 0.020, "collapsed": 0.021}])
    monkeypatch.setattr(collapse_mod, "forward_times", lambda *a, **k: next(rounds))
    assert main(["collapse", str(tmp_path / "a"), "--data", str(data), "--out", str(tmp_path / "c")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("forward"))
    assert "gated 15.00 ms (1.50x base: 10.00 ms in the same rounds)" in line
    assert "collapsed 21.00 ms (1.05x base: 20.00 ms in the same rounds)" in line
    rounds = iter([{"base": 0.010, "gated": 0.015}, {"base": 0.020, "collapsed": 0.021}])
    assert main(["collapse", str(tmp_path / "a"), "--data", str(data), "--out", str(tmp_path / "c"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["seconds"] == {"base": 0.010, "gated": 0.015, "collapsed": 0.021}
    assert res["base_seconds_with_collapsed"] == 0.020
    assert res["gated_over_base"] == pytest.approx(1.5) and res["collapsed_over_base"] == pytest.approx(1.05)


def test_collapse_refusal_names_the_callers_options(tmp_path, capsys):
    """The refusal named the command's flags (--tolerance, --spread, --closed) when raised by
    handle.collapse in Python, where they are keyword arguments: Python names the keywords, the
    command its flags."""
    model = make_bert()
    h = unipelt.compile(model, SPEC)
    randomize(h)
    calib = [make_batch(seed=i) for i in range(2)]
    with pytest.raises(CollapseError) as e:
        h.collapse(calib, spread=0.5, tolerance=1e-12)
    msg = str(e.value)
    assert "tolerance=" in msg and "spread=" in msg and "closed=" in msg and "--" not in msg, msg
    model, _ = load_model("tiny-bert", task="classification", num_labels=2)
    h = trained_ish(model)
    record_training_info(h, {"model": "tiny-bert", "task": "classification", "labels": ["neg", "pos"]})
    h.save(tmp_path / "a")
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": f"some words {i} here"}) + "\n" for i in range(6)))
    code = main(["collapse", str(tmp_path / "a"), "--data", str(data), "--out", str(tmp_path / "d"),
                 "--tolerance", "1e-12", "--spread", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "over the tolerance" in err
    assert "--tolerance" in err and "--spread" in err and "--closed" in err and "tolerance=" not in err, err
