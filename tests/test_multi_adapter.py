"""Several named adapters on one model; loading errors; atomic saves; gradient checkpointing."""
from __future__ import annotations

import json

import pytest
import torch

import unipelt
from unipelt.errors import OutputError
from conftest import Snapshot, make_batch, make_bert, make_gpt2, make_llama, randomize

SPEC_A = {"modules": {
    "lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4, "gate": True},
    "adapter": {"method": "adapter", "site": "ffn.out", "width": 4, "gate": True},
}}
SPEC_B = {"modules": {
    "lora": {"method": "lora", "sites": ["attn.q", "attn.o"], "r": 2},
    "pa": {"method": "adapter", "site": "ffn", "width": 6, "scale": 4.0},
}}


def out(model, batch):
    with torch.no_grad():
        o = model(**batch, output_hidden_states=True)
    return torch.cat([o.logits.flatten(), o.hidden_states[-1].flatten()])


def alone(factory, spec, handle):
    """A fresh base with only this adapter, holding the same tensors."""
    m = factory()
    unipelt.compile(m, spec).load_state_dict(handle.state_dict())
    return m


@pytest.mark.parametrize("factory", [make_bert, make_llama], ids=["bert", "llama"])
def test_two_named_adapters(factory):
    batch = make_batch()
    model = factory()
    ref = out(model, batch)
    snap = Snapshot(model)
    ha = unipelt.compile(model, SPEC_A, name="a")
    randomize(ha, seed=1)
    hb = unipelt.compile(model, SPEC_B, name="b")  # the newest adapter becomes the active one
    randomize(hb, seed=2)
    # the two adapters' parameters are disjoint, and both are trainable
    assert not {id(p) for p in ha.parameters()} & {id(p) for p in hb.parameters()}
    assert all(p.requires_grad for p in ha.parameters() + hb.parameters())

    only_a, only_b = out(alone(factory, SPEC_A, ha), batch), out(alone(factory, SPEC_B, hb), batch)
    assert not torch.allclose(only_a, only_b, atol=1e-4)
    torch.testing.assert_close(out(model, batch), only_b, atol=1e-6, rtol=0)
    unipelt.set_adapter(model, "a")
    torch.testing.assert_close(out(model, batch), only_a, atol=1e-6, rtol=0)
    unipelt.set_adapter(model, "b")
    torch.testing.assert_close(out(model, batch), only_b, atol=1e-6, rtol=0)
    unipelt.set_adapter(model, ["a", "b"])  # both at once: different from either alone
    both = out(model, batch)
    assert not torch.allclose(both, only_a, atol=1e-4) and not torch.allclose(both, only_b, atol=1e-4)
    with pytest.raises(unipelt.ModelError, match="no adapter named 'c'"):
        unipelt.set_adapter(model, "c")

    # each handle saves its own tensors only
    assert set(ha.state_dict()) == set(ha.named_parameters())
    assert not set(hb.state_dict()) - set(hb.named_parameters())

    # detaching one keeps the other working
    unipelt.set_adapter(model, "a")
    ha.detach()
    assert "a" not in model._modules["unipelt"]
    unipelt.set_adapter(model, "b")
    torch.testing.assert_close(out(model, batch), only_b, atol=1e-6, rtol=0)
    # ... and detaching the last restores the model exactly
    hb.detach()
    snap.assert_same()
    assert torch.equal(out(model, batch), ref)


def test_same_name_twice_is_a_model_error(bert):
    h = unipelt.compile(bert, SPEC_A, name="x")
    state = {k: v.clone() for k, v in bert.state_dict().items()}
    with pytest.raises(unipelt.ModelError, match="'x' is already attached"):
        unipelt.compile(bert, SPEC_B, name="x")
    assert list(bert.state_dict()) == list(state)  # the failed compile added nothing
    assert h.named_parameters().keys() == unipelt.compile(make_bert(), SPEC_A).named_parameters().keys()


def test_merge_with_two_adapters(bert):
    """Unmerging one adapter re-applies another's merge of the same weight."""
    batch = make_batch()
    s1 = {"modules": {"l": {"method": "lora", "sites": ["attn.q"], "r": 2}}}
    s2 = {"modules": {"l": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 3}}}
    h1 = unipelt.compile(bert, s1, name="one")
    h2 = unipelt.compile(bert, s2, name="two", activate=False)
    randomize(h1, seed=3)
    randomize(h2, seed=4)
    unipelt.set_adapter(bert, ["one", "two"])
    live = out(bert, batch)
    w0 = bert.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    h1.merge()
    h2.merge()
    torch.testing.assert_close(out(bert, batch), live, atol=1e-4, rtol=0)
    h1.unmerge()
    torch.testing.assert_close(out(bert, batch), live, atol=1e-4, rtol=0)
    h2.unmerge()
    assert torch.equal(bert.bert.encoder.layer[0].attention.self.query.weight, w0)
    assert torch.equal(out(bert, batch), live)


# ------------------------------------------------------------------------------------------
# loading errors: each names the file and the field, and leaves the model untouched
# ------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    model = make_bert()
    h = unipelt.compile(model, SPEC_A)
    randomize(h)
    return h.save(tmp_path / "adapter")


def _expect_load_error(model, path, *needles):
    snap = Snapshot(model)
    with pytest.raises(unipelt.AdapterFileError) as ei:
        unipelt.load(model, path)
    for n in needles:
        assert str(n) in str(ei.value), f"{n!r} not in {ei.value}"
    snap.assert_same()
    return ei.value


def test_load_roundtrip(saved):
    meta = json.loads((saved / "unipelt.json").read_text())
    assert meta["format"] == "unipelt-adapter" and meta["base"]["architecture"] == "bert"
    h = unipelt.load(make_bert(), saved, name="renamed")
    assert h.name == "renamed"


def test_corrupt_safetensors(saved):
    (saved / "adapter.safetensors").write_bytes(b"\x00garbage" * 10)
    _expect_load_error(make_bert(), saved, saved / "adapter.safetensors", "corrupt")


def test_truncated_safetensors(saved):
    f = saved / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _expect_load_error(make_bert(), saved, f)


def test_missing_weights(saved):
    (saved / "adapter.safetensors").unlink()
    _expect_load_error(make_bert(), saved, saved / "adapter.safetensors", "missing")


def test_missing_metadata(saved):
    (saved / "unipelt.json").unlink()
    _expect_load_error(make_bert(), saved, saved / "unipelt.json", "missing")


def test_missing_directory(tmp_path):
    _expect_load_error(make_bert(), tmp_path / "nowhere", "nowhere")


def test_corrupt_json(saved):
    (saved / "unipelt.json").write_text('{"format": "unipelt-adapter", ', encoding="utf-8")
    _expect_load_error(make_bert(), saved, saved / "unipelt.json", "corrupt JSON")


@pytest.mark.parametrize("field,value,needle", [
    ("format", "peft", "'format'"),
    ("format_version", 99, "'format_version'"),
    ("spec", None, "'spec'"),
    ("base", "bert", "'base'"),
])
def test_bad_metadata_fields(saved, field, value, needle):
    meta = json.loads((saved / "unipelt.json").read_text())
    meta[field] = value
    (saved / "unipelt.json").write_text(json.dumps(meta), encoding="utf-8")
    _expect_load_error(make_bert(), saved, saved / "unipelt.json", needle)


def test_invalid_stored_spec(saved):
    meta = json.loads((saved / "unipelt.json").read_text())
    meta["spec"]["modules"]["lora"]["r"] = "four"
    (saved / "unipelt.json").write_text(json.dumps(meta), encoding="utf-8")
    _expect_load_error(make_bert(), saved, saved / "unipelt.json", "'spec'", "modules.lora.r")


def test_tensor_missing_from_file(saved):
    from safetensors.torch import load_file, save_file

    f = saved / "adapter.safetensors"
    tensors = load_file(str(f))
    del tensors["lora.0.attn.q.lora_A"]
    tensors["lora.0.attn.q.extra"] = torch.zeros(1)
    save_file(tensors, str(f))
    _expect_load_error(make_bert(), saved, f, "missing keys: lora.0.attn.q.lora_A", "unexpected keys: lora.0.attn.q.extra")


def test_hidden_size_mismatch(tmp_path):
    h = unipelt.compile(make_bert(hidden=64), SPEC_A)
    path = h.save(tmp_path / "wide")
    err = _expect_load_error(make_bert(hidden=32), path, path / "unipelt.json", "base.hidden_size", "64", "32")
    assert "another base model" in str(err)


def test_layer_count_mismatch(tmp_path):
    path = unipelt.compile(make_llama(layers=3), SPEC_A).save(tmp_path / "deep")
    _expect_load_error(make_llama(layers=2), path, path / "unipelt.json", "base.num_layers")


def test_architecture_mismatch(tmp_path):
    path = unipelt.compile(make_bert(), SPEC_A).save(tmp_path / "bert")
    _expect_load_error(make_llama(), path, path / "unipelt.json", "base.architecture", "'bert'", "'llama'")


def test_adapter_that_does_not_fit_the_model(tmp_path):
    """A stored spec naming a hook point the new architecture lacks."""
    spec = {"modules": {"l": {"method": "lora", "sites": ["ffn.gate"], "r": 2}}}
    path = unipelt.compile(make_llama(), spec).save(tmp_path / "llama")
    _expect_load_error(make_bert(), path, "does not fit", "ffn.gate")


def test_failed_load_keeps_an_existing_adapter(saved):
    model = make_bert()
    other = unipelt.compile(model, SPEC_B, name="other")
    randomize(other)
    before = out(model, make_batch())
    (saved / "adapter.safetensors").write_bytes(b"junk")
    with pytest.raises(unipelt.AdapterFileError):
        unipelt.load(model, saved)
    assert list(model._modules["unipelt"]) == ["other"]
    assert torch.equal(out(model, make_batch()), before)


# ------------------------------------------------------------------------------------------
# saving
# ------------------------------------------------------------------------------------------
def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_save_replaces_atomically(tmp_path, monkeypatch):
    import safetensors.torch

    model = make_bert()
    h = unipelt.compile(model, SPEC_A)
    dest = h.save(tmp_path / "adapter")
    old = _files(dest)
    randomize(h, seed=9)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        h.save(dest)
    assert _files(dest) == old  # the old adapter is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary left behind
    monkeypatch.undo()

    # a successful save replaces it, and the new contents load
    h.save(dest)
    assert _files(dest) != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    fresh = make_bert()
    unipelt.load(fresh, dest)
    assert torch.equal(out(fresh, make_batch()), out(model, make_batch()))


def test_save_refuses_a_foreign_directory(tmp_path):
    h = unipelt.compile(make_bert(), SPEC_A)
    d = tmp_path / "results"
    d.mkdir()
    (d / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(OutputError, match="not a unipelt adapter"):
        h.save(d)
    assert _files(d) == {"notes.txt": b"keep me"}
    f = tmp_path / "afile"
    f.write_text("x", encoding="utf-8")
    with pytest.raises(OutputError, match="exists and is a file"):
        h.save(f)
    assert f.read_text() == "x"
    # an empty directory is fine
    (tmp_path / "empty").mkdir()
    h.save(tmp_path / "empty")
    assert (tmp_path / "empty" / "unipelt.json").exists()


# ------------------------------------------------------------------------------------------
# gradient checkpointing
# ------------------------------------------------------------------------------------------
def _grads(factory, checkpointing: bool, reentrant: bool = False):
    model = factory()
    h = unipelt.compile(model, SPEC_A)
    randomize(h, seed=5)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    batch = make_batch()
    # count the calls of one adapted adapter host: the recomputation calls it a second time
    calls = []
    first_layer = h.info.layers[0]
    hook = first_layer.get_submodule(h.graph.branches[0].site.path[len(h.info.layer_paths[0]) + 1:]) \
        .register_forward_hook(lambda *a: calls.append(1))
    loss = (model(**batch).logits ** 2).mean()
    loss.backward()
    hook.remove()
    assert len(calls) == (2 if checkpointing else 1)
    grads = {k: p.grad for k, p in h.named_parameters().items()}
    assert all(g is not None for g in grads.values()), [k for k, g in grads.items() if g is None]
    return loss.detach(), grads


@pytest.mark.parametrize("factory", [make_bert, make_llama, make_gpt2], ids=["bert", "llama", "gpt2"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_gradient_checkpointing_same_gradients(factory, reentrant):
    loss0, g0 = _grads(factory, checkpointing=False)
    loss1, g1 = _grads(factory, checkpointing=True, reentrant=reentrant)
    assert torch.equal(loss0, loss1)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert any(g.abs().sum() > 0 for k, g in g0.items() if k.startswith("gate."))


def test_switching_away_from_a_merged_adapter_unmerges_it():
    """Regression: a merged adapter made inactive by set_adapter kept changing the outputs from
    inside the base weights; switching away unmerges it (as PEFT does)."""
    model = make_bert()
    batch = make_batch()
    with torch.no_grad():
        base = model(**batch).logits
    lora = {"modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 2}}}
    a = unipelt.compile(model, lora, name="a")
    randomize(a)
    unipelt.compile(model, {"modules": {"ad": {"method": "adapter", "site": "ffn.out", "width": 4}}}, name="b",
                    activate=False)
    with torch.no_grad():
        only_a = model(**batch).logits
    assert a.merge()["merged"]
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, only_a, atol=1e-5)
    unipelt.set_adapter(model, "b")  # b starts as the identity: the outputs are the base's again
    assert not any(e.merged for e in a.entries.values())
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, base, atol=1e-6)
    unipelt.set_adapter(model, "a")
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, only_a, atol=1e-5)


@pytest.mark.parametrize("factory", [make_bert, make_llama], ids=["bert", "llama"])
def test_an_unknown_keyword_in_a_model_call_is_an_error(factory):
    """Regression: transformers drops keywords its typed **kwargs does not declare, so a typo or
    another library's keyword changed nothing without a word. (PEFT's adapter_names= was the
    example; it is now unipelt's own mixed-batch keyword, tests/test_mixed_batch.py: the typo
    adapter_name= is the example instead.)"""
    from unipelt.errors import ModelError

    model = factory()
    unipelt.compile(model, {"modules": {"lora": {"method": "lora", "sites": ["attn.q"], "r": 2}}})
    batch = make_batch()
    with torch.no_grad():
        model(**batch, output_hidden_states=True, return_dict=True)  # declared ones pass
        with pytest.raises(ModelError, match="'adapter_name'"):
            model(**batch, adapter_name="default")
