"""Adapter files on disk (issue 14): a corpus of corrupt adapters, checksums, output paths, stale
staging folders, umask, and a clean base checkpoint from ``save_pretrained``.

Every corrupt adapter must give one AdapterFileError naming the file (and the tensor or field),
exit code 4 on the command line, and leave the model exactly as it was.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import subprocess
import sys
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import unipelt
from conftest import Snapshot, make_batch, make_bert, make_llama, randomize
from unipelt import io
from unipelt.cli import main
from unipelt.errors import OutputError

SPEC = {"modules": {
    "lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4, "gate": True},
    "adapter": {"method": "adapter", "site": "ffn.out", "width": 4, "gate": True},
}}
KEY = "lora.0.attn.q.lora_A"  # one tensor every corruption below aims at


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def saved(tmp_path):
    h = unipelt.compile(make_bert(), SPEC)
    randomize(h)
    return h.save(tmp_path / "adapter")


def meta_of(d):
    return json.loads((d / "unipelt.json").read_text(encoding="utf-8"))


def write_meta(d, meta):
    (d / "unipelt.json").write_text(json.dumps(meta), encoding="utf-8")


def rewrite(d, tensors, *, records: bool = True):
    """Replace the weights; with ``records``, also the checksums, so that only the content is wrong."""
    save_file(tensors, str(d / "adapter.safetensors"))
    if records:
        meta = meta_of(d)
        meta["tensors"] = io.tensor_records(tensors)
        write_meta(d, meta)


def expect_error(d, *needles):
    model = make_bert()
    snap = Snapshot(model)
    with pytest.raises(unipelt.AdapterFileError) as ei:
        unipelt.load(model, d)
    msg = str(ei.value)
    for n in needles:
        assert str(n) in msg, f"{n!r} not in {msg}"
    snap.assert_same()
    return msg


# ------------------------------------------------------------------------------------------
# the checksums themselves
# ------------------------------------------------------------------------------------------
def test_checksums_are_sha256_of_the_bytes_safetensors_stores(saved):
    """Independent reference: parse the safetensors layout by hand (8-byte little-endian header
    length, JSON header with data offsets) and hash each tensor's byte range."""
    raw = (saved / "adapter.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    records = meta_of(saved)["tensors"]
    keys = [k for k in header if k != "__metadata__"]
    assert sorted(keys) == sorted(records) and len(keys) > 4
    dtypes = {"F32": "float32"}
    for k in keys:
        a, b = header[k]["data_offsets"]
        assert records[k]["sha256"] == hashlib.sha256(data[a:b]).hexdigest()
        assert records[k]["shape"] == header[k]["shape"]
        assert records[k]["dtype"] == dtypes[header[k]["dtype"]]
    assert meta_of(saved)["format_version"] == 2


def test_a_sound_adapter_loads_without_a_warning(saved):
    model = make_bert()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = unipelt.load(model, saved)
    assert torch.equal(h.state_dict()[KEY], load_file(str(saved / "adapter.safetensors"))[KEY])


# ------------------------------------------------------------------------------------------
# the corpus of corrupt adapters
# ------------------------------------------------------------------------------------------
def _truncate(d, keep):
    f = d / "adapter.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[:keep(len(raw))])


def _bad_header(d):
    f = d / "adapter.safetensors"
    raw = bytearray(f.read_bytes())
    raw[9:14] = b"\xff\xfe{[\x00"  # inside the JSON header
    f.write_bytes(bytes(raw))


def _huge_header_length(d):
    f = d / "adapter.safetensors"
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 2 ** 40) + raw[8:])


def _flip_data(d):
    """Flip bits in the data of KEY (the header is left intact)."""
    f = d / "adapter.safetensors"
    raw = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    a, _ = json.loads(raw[8:8 + n])[KEY]["data_offsets"]
    raw[8 + n + a + 1] ^= 0x40
    f.write_bytes(bytes(raw))


def _with(d, fn, *, records=True):
    tensors = load_file(str(d / "adapter.safetensors"))
    fn(tensors)
    rewrite(d, tensors, records=records)


def _set(key, value):
    def fn(t):
        t[key] = value(t[key])
    return fn


def _nan(t):
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


def _inf(t):
    t = t.clone()
    t.view(-1)[0] = float("-inf")
    return t


def _meta_field(field, value):
    def fn(d):
        meta = meta_of(d)
        if value is KeyError:
            del meta[field]
        else:
            meta[field] = value
        write_meta(d, meta)
    return fn


def _record(key, field, value):
    def fn(d):
        meta = meta_of(d)
        meta["tensors"][key][field] = value
        write_meta(d, meta)
    return fn


CORPUS = {
    # the weights file
    "truncated-half": (lambda d: _truncate(d, lambda n: n // 2), ["adapter.safetensors", "corrupt"]),
    "truncated-last-byte": (lambda d: _truncate(d, lambda n: n - 1), ["adapter.safetensors", "corrupt"]),
    "truncated-to-header-length": (lambda d: _truncate(d, lambda n: 8), ["adapter.safetensors", "corrupt"]),
    "empty-weights": (lambda d: _truncate(d, lambda n: 0), ["adapter.safetensors", "corrupt"]),
    "bad-header": (_bad_header, ["adapter.safetensors", "corrupt"]),
    "huge-header-length": (_huge_header_length, ["adapter.safetensors", "corrupt"]),
    "missing-weights": (lambda d: (d / "adapter.safetensors").unlink(), ["adapter.safetensors", "missing"]),
    "flipped-data-bit": (_flip_data, ["adapter.safetensors", repr(KEY), "checksum"]),
    # wrong values, with the records rewritten to match: the content checks must catch them
    "nan": (lambda d: _with(d, _set(KEY, _nan)), [repr(KEY), "non-finite"]),
    "inf": (lambda d: _with(d, _set(KEY, _inf)), [repr(KEY), "non-finite"]),
    "int64": (lambda d: _with(d, _set(KEY, lambda t: (t * 100).to(torch.int64))), [repr(KEY), "dtype int64", "float32"]),
    "int8": (lambda d: _with(d, _set(KEY, lambda t: t.to(torch.int8))), [repr(KEY), "dtype int8"]),
    "bool": (lambda d: _with(d, _set(KEY, lambda t: t > 0)), [repr(KEY), "dtype bool"]),
    # the same with the original records: the record says what the tensor was
    "nan-unrecorded": (lambda d: _with(d, _set(KEY, _nan), records=False), [repr(KEY), "checksum"]),
    "fp16-unrecorded": (lambda d: _with(d, _set(KEY, lambda t: t.half()), records=False),
                        [repr(KEY), "dtype float16", "records float32"]),
    "bf16-unrecorded": (lambda d: _with(d, _set(KEY, lambda t: t.bfloat16()), records=False),
                        [repr(KEY), "dtype bfloat16", "records float32"]),
    "int-unrecorded": (lambda d: _with(d, _set(KEY, lambda t: t.to(torch.int32)), records=False),
                       [repr(KEY), "dtype int32"]),
    # keys and shapes
    "extra-key": (lambda d: _with(d, lambda t: t.update({"lora.0.attn.q.extra": torch.zeros(2)})),
                  ["unexpected keys: lora.0.attn.q.extra"]),
    "missing-key": (lambda d: _with(d, lambda t: t.pop(KEY)), ["missing keys: " + KEY]),
    "extra-key-unrecorded": (lambda d: _with(d, lambda t: t.update({"x": torch.zeros(2)}), records=False),
                             ["unipelt.json", "unexpected keys: x"]),
    "missing-key-unrecorded": (lambda d: _with(d, lambda t: t.pop(KEY), records=False),
                               ["unipelt.json", "missing keys: " + KEY]),
    "wrong-shape": (lambda d: _with(d, _set(KEY, lambda t: torch.zeros(t.shape[0] + 1, t.shape[1]))),
                    [repr(KEY), "shape (5, 32)", "expected (4, 32)"]),
    "wrong-shape-unrecorded": (lambda d: _with(d, _set(KEY, lambda t: t.reshape(-1)), records=False),
                               [repr(KEY), "shape (128,)", "records (4, 32)"]),
    # unipelt.json
    "missing-meta": (lambda d: (d / "unipelt.json").unlink(), ["unipelt.json", "missing"]),
    "empty-meta": (lambda d: (d / "unipelt.json").write_bytes(b""), ["unipelt.json", "empty"]),
    "blank-meta": (lambda d: (d / "unipelt.json").write_text(" \n", encoding="utf-8"), ["unipelt.json", "empty"]),
    "meta-not-utf8": (lambda d: (d / "unipelt.json").write_bytes(b'{"format": "\xff"}'), ["unipelt.json", "UTF-8"]),
    "meta-a-list": (lambda d: (d / "unipelt.json").write_text("[1, 2]", encoding="utf-8"), ["unipelt.json", "'format'"]),
    "meta-deeply-nested": (lambda d: (d / "unipelt.json").write_text("[" * 100000 + "]" * 100000, encoding="utf-8"),
                           ["unipelt.json", "corrupt JSON"]),
    "version-99": (_meta_field("format_version", 99), ["unipelt.json", "'format_version'", "99"]),
    "version-string": (_meta_field("format_version", "2"), ["unipelt.json", "'format_version'"]),
    "version-true": (_meta_field("format_version", True), ["unipelt.json", "'format_version'"]),
    "version-missing": (_meta_field("format_version", KeyError), ["unipelt.json", "'format_version'"]),
    "tensors-missing": (_meta_field("tensors", KeyError), ["unipelt.json", "'tensors'"]),
    "tensors-a-list": (_meta_field("tensors", []), ["unipelt.json", "'tensors'"]),
    "record-not-a-mapping": (lambda d: _meta_field("tensors", {**meta_of(d)["tensors"], KEY: "abc"})(d),
                             ["unipelt.json", f"'tensors.{KEY}'"]),
    "record-bad-sha": (_record(KEY, "sha256", "0" * 64), [repr(KEY), "checksum"]),
    "record-bad-dtype": (_record(KEY, "dtype", "float64"), [repr(KEY), "records float64"]),
    "base-sites-a-list": (lambda d: _meta_field("base", {**meta_of(d)["base"], "sites": []})(d),
                          ["unipelt.json", "'base.sites'"]),
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_corrupt_adapter_is_refused_and_the_model_untouched(saved, case):
    corrupt, needles = CORPUS[case]
    corrupt(saved)
    expect_error(saved, *needles)


def test_corrupt_weights_keep_an_existing_adapter_working(saved):
    model = make_bert()
    other = unipelt.compile(model, SPEC, name="other")
    randomize(other, seed=4)
    with torch.no_grad():
        before = model(**make_batch()).logits
    _flip_data(saved)
    with pytest.raises(unipelt.AdapterFileError, match="checksum"):
        unipelt.load(model, saved, name="second")
    assert list(model._modules["unipelt"]) == ["other"]
    with torch.no_grad():
        assert torch.equal(model(**make_batch()).logits, before)


def test_load_state_dict_refuses_nan_and_int_directly():
    """The handle's own load_state_dict (used by checkpoint resume) checks values and dtypes too."""
    h = unipelt.compile(make_bert(), SPEC)
    good = {k: v.clone() for k, v in h.state_dict().items()}
    before = h.state_dict()[KEY].clone()
    bad = dict(good, **{KEY: _nan(good[KEY])})
    with pytest.raises(unipelt.AdapterFileError, match="non-finite"):
        h.load_state_dict(bad, source="ckpt")
    with pytest.raises(unipelt.AdapterFileError, match="dtype int64"):
        h.load_state_dict(dict(good, **{KEY: good[KEY].long()}), source="ckpt")
    assert torch.equal(h.state_dict()[KEY], before)  # nothing copied



def test_save_refuses_nan_and_keeps_the_adapter_there(tmp_path):
    """handle.save of an adapter whose training diverged (NaN / infinity) wrote it, replacing the good
    adapter in the same directory with one that load refuses. Now save refuses it before anything is
    written, naming the tensor; the adapter already there is left byte for byte."""
    model = make_bert()
    h = unipelt.compile(model, SPEC)
    randomize(h, seed=1, std=0.2)
    dest = h.save(tmp_path / "ad")
    before = {f: (dest / f).read_bytes() for f in ("adapter.safetensors", "unipelt.json")}
    for value in (float("nan"), float("inf")):
        with torch.no_grad():
            h.state_dict()[KEY].view(-1)[3] = value
        with pytest.raises(unipelt.ModelError, match=rf"adapter 'default': tensor '{KEY}' has 1 non-finite value "
                                                     r"\(NaN or infinity\); not saved"):
            h.save(dest)
        assert {f: (dest / f).read_bytes() for f in before} == before
        assert sorted(os.listdir(tmp_path)) == ["ad"]  # no staging folder left
        with pytest.raises(unipelt.ModelError, match="non-finite"):
            h.save(tmp_path / "new")
        assert not (tmp_path / "new").exists()
    unipelt.load(make_bert(), dest)  # the good one still loads

# ------------------------------------------------------------------------------------------
# adapters saved before checksums (format version 1)
# ------------------------------------------------------------------------------------------
def _as_version_1(d):
    meta = meta_of(d)
    meta["format_version"] = 1
    del meta["tensors"]
    write_meta(d, meta)


def test_version_1_adapter_loads_with_a_warning(saved):
    ref = load_file(str(saved / "adapter.safetensors"))
    _as_version_1(saved)
    with pytest.warns(unipelt.UnipeltWarning, match="no checksums"):
        h = unipelt.load(make_bert(), saved)
    assert all(torch.equal(h.state_dict()[k], v) for k, v in ref.items())


def test_version_1_adapter_still_refuses_nan_and_int(saved):
    _as_version_1(saved)
    _with(saved, _set(KEY, _nan), records=False)
    with pytest.warns(UserWarning):
        expect_error(saved, repr(KEY), "non-finite")
    _with(saved, _set(KEY, lambda t: torch.zeros_like(t, dtype=torch.int64)), records=False)
    with pytest.warns(UserWarning):
        expect_error(saved, repr(KEY), "dtype int64")


def test_version_1_warning_is_one_line_on_the_command_line(trained, capsys):
    path, data = trained
    _as_version_1(path)
    code, out, err = run(capsys, "eval", path, "--data", data)
    assert code == 0, err
    lines = [l for l in err.splitlines() if "checksums" in l]
    assert lines == [f"warning: {path / 'unipelt.json'}: format version 1 records no checksums: the integrity of "
                     "adapter.safetensors is not verified (save the adapter again to add them)"]
    assert "UserWarning" not in err and "accuracy" in out


# ------------------------------------------------------------------------------------------
# names
# ------------------------------------------------------------------------------------------
def test_loading_into_a_taken_name_is_a_model_error(saved):
    model = make_bert()
    first = unipelt.load(model, saved)
    keys = list(model.state_dict())
    with pytest.raises(unipelt.ModelError, match="'default' is already attached") as ei:
        unipelt.load(model, saved)
    assert not isinstance(ei.value, unipelt.AdapterFileError)
    assert "name=" in str(ei.value)
    assert list(model.state_dict()) == keys
    second = unipelt.load(model, saved, name="again")  # another name is fine
    assert first.name == "default" and second.name == "again"


# ------------------------------------------------------------------------------------------
# the command line: corrupt adapters are exit 4 for eval, merge and export
# ------------------------------------------------------------------------------------------
CUSTOM_FIELDS = {"text": "review", "label": "stars", "prompt": "prompt", "response": "response"}


@pytest.fixture
def trained(tmp_path):
    """A LoRA classifier adapter recorded with custom field names, and data in those fields."""
    from unipelt.models import load_model
    from unipelt.train import record_training_info

    model, _ = load_model("tiny-bert", task="classification", num_labels=2)
    h = unipelt.compile(model, {"version": 1, "modules": {
        "lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 2},
        "gated": {"method": "adapter", "sites": "ffn.out", "width": 2, "gate": True}}})
    randomize(h)
    record_training_info(h, {"model": "tiny-bert", "task": "classification", "labels": ["neg", "pos"],
                             "fields": CUSTOM_FIELDS})
    path = h.save(tmp_path / "adapter")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"review": f"good {i}", "stars": "pos" if i % 2 else "neg"}) + "\n"
                            for i in range(4)), encoding="utf-8")
    return path, data


def test_trained_fixture_evaluates(trained, capsys):
    path, data = trained
    code, out, err = run(capsys, "eval", path, "--data", data)
    assert code == 0, err
    assert "accuracy" in out


@pytest.mark.parametrize("case", ["missing-meta", "empty-meta", "version-99", "meta-a-list"])
@pytest.mark.parametrize("command", ["eval", "gates"])
def test_broken_meta_with_custom_fields_is_an_adapter_error(trained, capsys, case, command):
    """Read with the default field names the data would fail ("no field 'text'", exit 5); the
    broken unipelt.json is the real problem and is reported as such."""
    path, data = trained
    CORPUS[case][0](path)
    code, _, err = run(capsys, command, path, "tiny-bert", "--data", data)
    assert code == 4, err
    assert str(path / "unipelt.json") in err and "Traceback" not in err and "'text'" not in err


@pytest.mark.parametrize("case", ["flipped-data-bit", "nan", "int64", "fp16-unrecorded"])
def test_eval_refuses_corrupt_weights_with_exit_4(trained, capsys, case):
    path, data = trained
    CORPUS[case][0](path)
    code, _, err = run(capsys, "eval", path, "--data", data)
    assert code == 4, err
    assert str(path / "adapter.safetensors") in err and repr(KEY) in err


@pytest.mark.parametrize("case", ["flipped-data-bit", "nan", "bool"])
def test_merge_and_export_refuse_corrupt_weights(tmp_path, capsys, case):
    from unipelt.models import load_model
    from unipelt.train import record_training_info

    model, _ = load_model("tiny-bert", task="classification", num_labels=2)
    h = unipelt.compile(model, {"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q"], "r": 2}}})
    randomize(h)
    record_training_info(h, {"model": "tiny-bert", "task": "classification", "labels": ["neg", "pos"]})
    path = h.save(tmp_path / "adapter")
    key = "lora.0.attn.q.lora_A"
    assert key == KEY
    CORPUS[case][0](path)
    for command in ("merge", "export"):
        code, _, err = run(capsys, command, path, "--out", tmp_path / command)
        assert code == 4, err
        assert repr(KEY) in err and not (tmp_path / command).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# ------------------------------------------------------------------------------------------
# output paths: compile, merge, export, gates --plot
# ------------------------------------------------------------------------------------------
LORA = {"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q"], "r": 2}}}


@pytest.fixture
def lora_adapter(tmp_path):
    from unipelt.models import load_model
    from unipelt.train import record_training_info

    model, _ = load_model("tiny-bert", task="classification", num_labels=2)
    h = unipelt.compile(model, LORA)
    randomize(h)
    record_training_info(h, {"model": "tiny-bert", "task": "classification", "labels": ["neg", "pos"]})
    return h.save(tmp_path / "adapter")


@pytest.fixture
def spec_path(tmp_path):
    p = tmp_path / "spec.json"
    p.write_text(json.dumps(LORA), encoding="utf-8")
    return p


def _commands(tmp_path, spec_path, adapter, data, out):
    return {
        "compile": ["compile", spec_path, "tiny-bert", "--out", out],
        "compile-graph": ["compile", spec_path, "tiny-bert", "--graph", out],
        "merge": ["merge", adapter, "--out", out],
        "export": ["export", adapter, "--out", out],
        "gates-plot": ["gates", adapter, "--data", data, "--plot", out],
    }


@pytest.fixture
def gated(tmp_path):
    """A gated adapter (gates needs one) with its data, for the --plot cases."""
    from unipelt.models import load_model
    from unipelt.train import record_training_info

    model, _ = load_model("tiny-bert", task="classification", num_labels=2)
    h = unipelt.compile(model, {"version": 1, "modules": {
        "lora": {"method": "lora", "sites": ["attn.q"], "r": 2, "gate": True}}})
    record_training_info(h, {"model": "tiny-bert", "task": "classification", "labels": ["neg", "pos"]})
    path = h.save(tmp_path / "gated")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"w {i}", "label": "pos" if i % 2 else "neg"}) + "\n"
                            for i in range(3)), encoding="utf-8")
    return path, data


def _argv(command, tmp_path, spec_path, lora_adapter, gated, out):
    adapter = gated[0] if command == "gates-plot" else lora_adapter
    return _commands(tmp_path, spec_path, adapter, gated[1], out)[command]


COMMANDS = ["compile", "compile-graph", "merge", "export", "gates-plot"]


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("command", COMMANDS)
def test_out_under_a_file(tmp_path, capsys, spec_path, lora_adapter, gated, command):
    f = tmp_path / "results.csv"
    f.write_text("keep", encoding="utf-8")
    before = _listing(tmp_path)
    code, _, err = run(capsys, *_argv(command, tmp_path, spec_path, lora_adapter, gated, f / "sub" / "x"))
    assert code == 7, err
    assert f"{f / 'sub' / 'x'}: cannot write here: {f} is a file" in err and "Traceback" not in err
    assert _listing(tmp_path) == before and f.read_text() == "keep"


@pytest.mark.parametrize("command", COMMANDS)
def test_out_is_an_existing_file_or_foreign_folder(tmp_path, capsys, spec_path, lora_adapter, gated, command):
    target = tmp_path / "target"
    if command in ("compile-graph", "gates-plot"):
        target.mkdir()  # a folder where a file goes
        (target / "notes.txt").write_text("keep", encoding="utf-8")
        needle = "is a folder"
    else:
        target.write_text("keep", encoding="utf-8")  # a file where a folder goes
        needle = "exists and is a file"
    before = _listing(tmp_path)
    code, _, err = run(capsys, *_argv(command, tmp_path, spec_path, lora_adapter, gated, target))
    assert code == 7, err
    assert f"{target}: {needle}" in err
    assert _listing(tmp_path) == before

    other = tmp_path / "other"  # an existing output of another kind
    if command in ("compile-graph", "gates-plot"):
        other.write_text("my own notes", encoding="utf-8")
    else:
        other.mkdir()
        (other / "notes.txt").write_text("keep", encoding="utf-8")
    before = _listing(tmp_path)
    code, _, err = run(capsys, *_argv(command, tmp_path, spec_path, lora_adapter, gated, other))
    assert code == 7, err
    assert f"{other}: exists and is not a" in err and "refusing to replace it" in err
    assert _listing(tmp_path) == before
    if other.is_file():
        assert other.read_text() == "my own notes"


@pytest.mark.parametrize("command", COMMANDS)
def test_out_replaces_its_own_kind(tmp_path, capsys, spec_path, lora_adapter, gated, command):
    """A second run over the first one's output replaces it (the same for every command, --plot
    included: it replaces a PNG and nothing else)."""
    out = tmp_path / "out"
    argv = _argv(command, tmp_path, spec_path, lora_adapter, gated, out)
    assert run(capsys, *argv)[0] == 0
    assert run(capsys, *argv)[0] == 0
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def _raise(err_no):
    def boom(*args, **kwargs):
        raise OSError(err_no, os.strerror(err_no))
    return boom


@pytest.mark.parametrize("command", COMMANDS)
def test_out_on_a_read_only_disk(tmp_path, capsys, spec_path, lora_adapter, gated, command, monkeypatch):
    """Read-only is simulated (the tests may run as root, for whom permissions do not apply): the
    staging folder cannot be created."""
    import types

    out = tmp_path / "ro" / "out"
    (tmp_path / "ro").mkdir()
    argv = _argv(command, tmp_path, spec_path, lora_adapter, gated, out)
    monkeypatch.setattr(io, "tempfile", types.SimpleNamespace(mkdtemp=_raise(errno.EROFS)))
    code, _, err = run(capsys, *argv)
    assert code == 7, err
    assert f"{out}: cannot write: Read-only file system" in err and "Traceback" not in err
    assert list((tmp_path / "ro").iterdir()) == []


def _partial_then_enospc(write_into, *, rust: bool = False):
    """A writer that writes half a file and then finds the disk full. ``rust``: as safetensors
    reports it (also from inside save_pretrained), a SafetensorError and not an OSError; seen on
    a real full tmpfs."""
    from safetensors import SafetensorError

    def boom(*args, **kwargs):
        write_into(args, kwargs).write_bytes(b"half")
        if rust:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return boom


@pytest.mark.parametrize("command", COMMANDS)
def test_out_on_a_full_disk_leaves_nothing_half_written(tmp_path, capsys, spec_path, lora_adapter, gated, command,
                                                        monkeypatch):
    import pathlib

    import matplotlib.figure
    import safetensors.torch
    import transformers

    out = tmp_path / "full" / "out"
    new = tmp_path / "new" / "deeper" / "out"  # folders the failed write creates are removed again
    argv = _argv(command, tmp_path, spec_path, lora_adapter, gated, out)
    # a previous output of the same kind: it must survive the failed write intact
    assert run(capsys, *argv)[0] == 0
    old = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.is_dir() else {out: out.read_bytes()}
    if command in ("compile", "export"):
        monkeypatch.setattr(safetensors.torch, "save_file",
                            _partial_then_enospc(lambda a, k: pathlib.Path(a[1]), rust=True))
    elif command == "merge":
        monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained",
                            _partial_then_enospc(lambda a, k: pathlib.Path(a[1]) / "model.safetensors", rust=True))
    elif command == "gates-plot":
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                            _partial_then_enospc(lambda a, k: pathlib.Path(a[1])))
    else:
        real = pathlib.Path.write_text
        boom = _partial_then_enospc(lambda a, k: a[0])

        def write_text(self, *a, **k):  # only the graph: loading the model may write files too
            return (boom if self.name == "out" and self.parent.name.startswith(".out.tmp-") else real)(self, *a, **k)

        monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    code, _, err = run(capsys, *argv)
    assert code == 7, err
    assert f"{out}: cannot write: No space left on device" in err and "Traceback" not in err
    now = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.is_dir() else {out: out.read_bytes()}
    assert now == old
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["out"]  # no staging folder left
    code, _, err = run(capsys, *argv[:-1], new)
    assert code == 7 and f"{new}: cannot write: No space left on device" in err, err
    assert not (tmp_path / "new").exists()


def test_exit_codes_are_the_ones_the_readme_documents():
    """The README's table and errors.EXIT_CODES say the same, for every error class."""
    import pathlib
    import re

    from unipelt import errors

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    rows = dict((name, int(code)) for code, name in re.findall(r"^\| (\d) \| `(\w+)` \|", readme, re.M))
    rows["UnipeltError"] = int(re.search(r"^\| (\d) \| any other `UnipeltError` \|", readme, re.M).group(1))
    assert rows == {cls.__name__: code for cls, code in errors.EXIT_CODES}
    assert len(set(rows.values())) == len(rows)
    for cls, code in errors.EXIT_CODES:
        e = cls("x", path="p") if cls in (errors.SpecError, errors.OutputError) else cls("x")
        assert errors.exit_code(e) == code


def test_output_error_is_an_oserror_naming_the_path(tmp_path):
    h = unipelt.compile(make_bert(), SPEC)
    f = tmp_path / "f"
    f.write_text("x", encoding="utf-8")
    with pytest.raises(OSError) as ei:
        h.save(f / "adapter")
    assert isinstance(ei.value, OutputError) and ei.value.path == str(f / "adapter")


# ------------------------------------------------------------------------------------------
# umask
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_output_folders_follow_the_umask(tmp_path, mask):
    h = unipelt.compile(make_bert(), SPEC)
    old = os.umask(mask)
    try:
        d = h.save(tmp_path / "adapter")
        g = io.write_text(tmp_path / "graph.dot", "digraph unipelt {}\n", what="graph file")
    finally:
        os.umask(old)
    assert d.stat().st_mode & 0o777 == 0o777 & ~mask
    for name in ("adapter.safetensors", "unipelt.json"):
        assert (d / name).stat().st_mode & 0o777 == 0o666 & ~mask
    assert g.stat().st_mode & 0o777 == 0o666 & ~mask


# ------------------------------------------------------------------------------------------
# staging folders left by interrupted writes
# ------------------------------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _age(path, seconds):
    t = time.time() - seconds
    for q in [path, *path.rglob("*")]:
        os.utime(q, (t, t))


def test_stale_staging_folders_are_cleaned_at_the_next_save(tmp_path):
    h = unipelt.compile(make_bert(), SPEC)
    h.save(tmp_path / "adapter")
    dead = _dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.05)
        entries = {  # name: (removed?, a folder?)
            # written by processes that are gone: removed
            f".adapter.tmp-{dead}-abcd1234": (True, True),
            f".checkpoint-3.tmp-{dead}-x1y2z3w4": (True, True),
            f".report.json.tmp-{dead}": (True, False),
            f".adapter.old-{dead}": (True, True),  # the swap finished (adapter exists)
            ".checkpoint-2.tmp-k3j4h5g6": (True, True),  # no pid, untouched for two hours: aged below
            # a live writer's (another process, and this one): kept
            f".checkpoint-4.tmp-{sleeper.pid}-q1w2e3r4": (False, True),
            f".adapter.tmp-{os.getpid()}-zzzzzzzz": (False, True),
            ".checkpoint-5.tmp-a1b2c3d4": (False, True),  # no pid and fresh: may be a writer's
            f".merged.old-{dead}": (False, True),  # no "merged": it may be the only copy
            # look-alikes not in the form unipelt writes them, and other names: kept
            f".notes.tmp-{dead}": (False, True),
            f".notes.tmp-{dead}-abcdefgh": (False, False),
            "notes.tmp-123": (False, False),
            ".hidden": (False, True),
        }
        for name, (_, folder) in entries.items():
            p = tmp_path / name
            if folder:
                p.mkdir()
                (p / "adapter.safetensors").write_bytes(b"x" * 1000)
            else:
                p.write_text("half", encoding="utf-8")
        _age(tmp_path / ".checkpoint-2.tmp-k3j4h5g6", 7200)
        # a reused pid: the live sleeper started after this entry was made
        reused = tmp_path / f".adapter.tmp-{sleeper.pid}-oldoldol"
        reused.mkdir()
        _age(reused, 7200)
        entries[reused.name] = (True, True)

        h.save(tmp_path / "adapter")
        left = {p.name for p in tmp_path.iterdir()}
        for name, (stale, _) in entries.items():
            assert (name not in left) == stale, name
        assert "adapter" in left
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_killed_save_leaves_a_staging_folder_that_the_next_save_removes(tmp_path):
    """A real kill -9 in the middle of a save (the weights written, the rename not yet done)."""
    code = f"""
import os, sys, signal
sys.path.insert(0, {os.path.dirname(__file__)!r})
import unipelt, safetensors.torch
from conftest import make_bert
h = unipelt.compile(make_bert(), {SPEC!r})
real = safetensors.torch.save_file
def save_then_die(*a, **k):
    real(*a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
safetensors.torch.save_file = save_then_die
h.save({str(tmp_path / 'adapter')!r})
"""
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ}, capture_output=True, timeout=300)
    assert p.returncode == -9, p.stderr.decode()[-2000:]
    left = [q.name for q in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".adapter.tmp-"), left
    unipelt.compile(make_bert(), SPEC).save(tmp_path / "adapter")
    assert [q.name for q in tmp_path.iterdir()] == ["adapter"]


# ------------------------------------------------------------------------------------------
# save_pretrained writes the base checkpoint clean
# ------------------------------------------------------------------------------------------
CLEAN_CASES = {
    "bert": (make_bert, "BertForSequenceClassification", SPEC),
    "llama": (make_llama, "LlamaForCausalLM", {"modules": {
        "lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4, "gate": True},
        "prefix": {"method": "prefix", "sites": "attn.kv", "length": 3},
        "adapter": {"method": "adapter", "site": "ffn.out", "width": 4}}}),
}


@pytest.mark.parametrize("case", sorted(CLEAN_CASES))
def test_save_pretrained_writes_a_clean_base(tmp_path, case):
    import transformers

    factory, cls_name, spec = CLEAN_CASES[case]
    cls = getattr(transformers, cls_name)
    model, batch = factory(), make_batch()
    with torch.no_grad():
        base = model(**batch).logits
    base_keys = list(model.state_dict())
    h = unipelt.compile(model, spec)
    randomize(h)
    with torch.no_grad():
        adapted = model(**batch).logits
    assert not torch.allclose(adapted, base, atol=1e-4)  # the adapter does change the outputs

    model.save_pretrained(tmp_path / "base")
    saved_keys = set(load_file(str(tmp_path / "base" / "model.safetensors")))
    reloaded, info = cls.from_pretrained(tmp_path / "base", output_loading_info=True, attn_implementation="eager")
    assert info["unexpected_keys"] == set() and info["missing_keys"] == set(), info
    assert not any("unipelt" in k for k in saved_keys)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(**batch).logits, base)

    # the adapted model itself is unchanged, and its state_dict() keeps the adapter (for torch
    # users who save and reload it, and for Trainer's own checkpoints, from which it resumes)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, adapted)
    sd = model.state_dict()
    assert {k for k in sd if not k.startswith("unipelt.")} == set(base_keys)
    assert any(k.startswith("unipelt.default.") for k in sd)
    # after the last detach, the hook is gone with the rest
    assert io.drop_adapter_keys in model._state_dict_hooks.values()
    h.detach()
    assert io.drop_adapter_keys not in model._state_dict_hooks.values()
    assert list(model.state_dict()) == base_keys


def test_unipelt_json_with_duplicate_keys_or_deep_nesting_is_an_adapter_error(tmp_path):
    # unipelt.json is read with the spec loader's strict JSON: a key given twice is refused (it was
    # last-wins) and a deeply nested file is one error (it was a RecursionError traceback)
    from unipelt.errors import AdapterFileError
    from unipelt.io import read_adapter_meta

    for name, text in (("dup", '{"format": "unipelt-adapter", "format": "x"}'),
                       ("deep", "[" * 100000 + "]" * 100000)):
        d = tmp_path / name
        d.mkdir()
        (d / "unipelt.json").write_text(text)
        with pytest.raises(AdapterFileError, match="unipelt.json"):
            read_adapter_meta(d)
