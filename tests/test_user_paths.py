"""Issue 12's and issue 9's features tried as a new user who has read only the README tries them:
local model directories of architectures the other tests use least (GPT-2's fused Conv1D,
Mistral's grouped-query attention with a sliding window, RoBERTa's offset positions), data files
written by hand, each command followed to the next one. Each test is a regression test for
something that broke there."""
from __future__ import annotations

import json

import pytest
import torch

import unipelt
from conftest import make_batch, make_gpt2, randomize
from unipelt.cli import main
from unipelt.state import get_state

GATED_LORA = {"version": 1, "modules": {
    "lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 2, "gate": {"input": "layer"}}}}


def _gpt2_dir(tmp_path):
    """A local GPT-2 directory (config, weights, a byte-level tokenizer), as a user's model is."""
    from unipelt.models import _byte_tokenizer

    path = tmp_path / "gpt2"
    make_gpt2(vocab_size=300).save_pretrained(path)
    _byte_tokenizer(bert=False, chat=False).save_pretrained(path)
    return path


def test_merge_of_a_collapsed_adapter_leaves_its_pruned_branches_out(tmp_path):
    """`unipelt merge` of a collapsed gated LoRA in which collapse pruned one branch (its gate
    closed) and made the others' gates constants refused the whole adapter: "module 'lora' is
    gated: its gate depends on the input". The pruned branch computes nothing, so there is nothing
    to fold; the merged model now equals the collapsed adapted model (and export, which already
    left pruned branches out, agrees)."""
    from unipelt.export import merge_adapter
    from transformers import GPT2LMHeadModel

    path = _gpt2_dir(tmp_path)
    model = GPT2LMHeadModel.from_pretrained(path).eval()
    h = unipelt.compile(model, GATED_LORA)
    randomize(h)
    with torch.no_grad():
        h.gate_modules["lora@attn.q.1"].linear.bias.fill_(-30.0)  # closed on every token
    batch = make_batch(batch=2, length=6)
    rep = h.collapse([batch], spread=1.0)
    assert rep.pruned == ["lora.1.attn.q"] and len(rep.merged) == 3
    with torch.no_grad():
        want = model(**batch).logits
    h.save(tmp_path / "coll")
    merge_adapter(tmp_path / "coll", str(path), tmp_path / "merged")
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_merge_refusal_of_a_collapsed_adapter_names_the_real_reason(tmp_path, capsys):
    """A collapsed prefix and adapter run under constant gates; `unipelt merge` refused them as
    "gated: its gate depends on the input", which is no longer true. The refusal now says what
    stops them: they are not a linear change of a weight."""
    path = _gpt2_dir(tmp_path)
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(path).eval()
    h = unipelt.compile(model, {"version": 1, "modules": {
        "prefix": {"method": "prefix", "length": 2, "gate": {"input": "layer"}},
        "adapter": {"method": "adapter", "sites": "ffn.res", "reduction_factor": 4, "gate": {"input": "site"}}}})
    h.collapse([make_batch(batch=2, length=6)], spread=1.0)
    h.save(tmp_path / "coll")
    assert main(["merge", str(tmp_path / "coll"), str(path), "--out", str(tmp_path / "merged")]) == 1
    err = capsys.readouterr().err
    assert "depends on the input" not in err
    assert "module 'prefix'" in err and "module 'adapter'" in err and "not mergeable" in err
    assert "whose gate unipelt collapse made a constant" in err  # what does merge
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("method", ["prefix", "p_tuning_v2"])
@pytest.mark.parametrize("how", ["pruned", "dropped"])
def test_mixed_batch_leaves_out_a_pruned_or_dropped_prefix(method, how):
    """In a mixed batch the prefixes of every selected adapter are laid side by side in attention;
    a prefix branch that pruning (or collapse) had switched off, or that AdapterDrop's fixed layers
    drop, was laid there all the same, so the adapter's rows got another output than a call with
    that adapter alone (GPT-2: up to 0.30 on the logits). They are now left out, as alone."""
    from unipelt.pruning import prune

    model = make_gpt2()
    spec = {"version": 1, "modules": {"pre": {"method": method, "length": 2, "gate": True}}}
    if how == "dropped":
        spec["drop"] = {"layers": [0]}
    d = unipelt.compile(model, spec, name="d")
    randomize(d, seed=4)
    if how == "pruned":
        prune(d, ["pre.0.attn.kv"])
    other = unipelt.compile(model, {"version": 1, "modules": {"l": {"method": "lora", "sites": ["attn.q"], "r": 2}}},
                            name="o")
    randomize(other, seed=5)
    batch = make_batch()
    with torch.no_grad():
        unipelt.set_adapter(model, "d")
        alone_d = model(**batch).logits
        unipelt.set_adapter(model, "o")
        alone_o = model(**batch).logits
        mixed = model(**batch, adapter_names=["d", "o", "d"]).logits
    torch.testing.assert_close(mixed[[0, 2]], alone_d[[0, 2]], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mixed[1], alone_o[1], atol=1e-6, rtol=1e-6)


def test_an_adapter_saved_with_executor_triton_loads_where_the_kernels_cannot_run(tmp_path, monkeypatch):
    """An adapter trained on a GPU with `executor: triton` in its spec could not be loaded
    anywhere the kernels do not run: `unipelt eval` on a CPU, and `unipelt merge` and `export`
    everywhere (they load on the CPU), all failed with exit 4, "the adapter does not fit this
    model". The executor is how the groups run, not what the adapter computes: loading now falls
    back to the model's own choice with a warning naming the reason, and the saved spec keeps
    `executor: triton` for the next GPU. A spec compiled by hand with `executor: triton` there is
    still refused (the user asked for it now)."""
    import unipelt.compiler as compiler
    from unipelt.errors import ModelError, UnipeltWarning

    spec = {**GATED_LORA, "executor": "triton"}
    model = make_gpt2()
    h = unipelt.compile(model, spec)  # the interpreter runs the kernels here (conftest)
    randomize(h)
    batch = make_batch()
    with torch.no_grad():
        want = model(**batch).logits
    h.save(tmp_path / "a")
    monkeypatch.setattr(compiler, "kernels", lambda: "the Triton kernels cannot be imported (no triton)")
    monkeypatch.delenv("UNIPELT_EXECUTOR", raising=False)
    fresh = make_gpt2()
    with pytest.warns(UnipeltWarning, match=r"executor 'triton'.*no triton"):
        h2 = unipelt.load(fresh, tmp_path / "a")
    assert get_state(fresh).executor == "auto"
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, want, atol=1e-5, rtol=1e-5)
    h2.save(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "unipelt.json").read_text())["spec"]["executor"] == "triton"
    with pytest.raises(ModelError, match="'triton' cannot run"):
        unipelt.compile(make_gpt2(), spec)
    monkeypatch.setenv("UNIPELT_EXECUTOR", "triton")  # asked for now, through the variable: refused
    import warnings

    with pytest.raises(Exception, match="UNIPELT_EXECUTOR=triton"), warnings.catch_warnings():
        warnings.simplefilter("error", UnipeltWarning)  # refused, not first told it falls back
        unipelt.load(make_gpt2(), tmp_path / "a")


def test_budget_refusal_of_a_to_budget_spec_says_what_cannot_be_pruned():
    """A `to_budget` spec whose unprunable part (here a classifier head trained in place) is
    over the budget was refused with "the spec needs 2,499 parameters" and every module's count,
    the gated LoRA's included: it read as if the whole spec were 2,499 and the LoRA part of it.
    The message now says the 2,499 are what pruning cannot remove, of how many in all."""
    from unipelt.errors import SpecError

    spec = {"version": 1, "modules": {
        "lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 2, "gate": True},
        "head": {"method": "train", "sites": "head"}},
        "prune": {"to_budget": True}, "budget": {"max_params": 50}}
    from conftest import make_bert

    with pytest.raises(SpecError, match=r"budget: .* parameters \(kept\) that pruning cannot remove \(ungated branches"
                                        r".*of [\d,]+ in all\), over the budget \(max_params 50\)"):
        unipelt.compile(make_bert(), spec)


def test_collapse_and_gates_of_an_inactive_adapter_are_refused():
    """With two adapters on one model and the other one active, `a.collapse(batches)` measured no
    gate of `a` (it does not run) and reported success: nothing pruned, nothing constant, a
    difference of 0, on gates that were in fact nearly constant. `a.gates(batch)` returned an empty
    report the same way. Both now refuse, naming the active adapters; once `a` is active the same
    collapse makes its gates constants."""
    from unipelt.errors import ModelError

    model = make_gpt2()
    a = unipelt.compile(model, GATED_LORA, name="a")
    randomize(a, seed=1)
    with torch.no_grad():
        for g in a.gate_modules.values():
            g.linear.weight.mul_(1e-6)
    unipelt.compile(model, {"version": 1, "modules": {"l": {"method": "lora", "sites": ["attn.v"], "r": 2}}}, name="b")
    batch = make_batch()
    with pytest.raises(ModelError, match=r"adapter 'a' is not active \(active: b\).*set_adapter\(model, 'a'\)"):
        a.collapse([batch])
    with pytest.raises(ModelError, match=r"adapter 'a' is not active"):
        a.gates(batch)
    assert not a.spec.collapsed and all(not e.pruned for e in a.entries.values())
    unipelt.set_adapter(model, "a")
    assert len(a.collapse([batch]).constant) == 4


def test_gates_of_a_fused_adapter_are_read_while_its_fusion_is_active(fusion_registry):
    """An adapter fused by the active AdapterFusion runs (fused), so its gates are read there:
    the refusal above is for adapters that do not run."""
    model = make_gpt2()
    gated = {"version": 1, "modules": {"ad": {"method": "adapter", "sites": "ffn.out", "reduction_factor": 4,
                                              "gate": True}}}
    for i, n in enumerate("ab"):
        randomize(unipelt.compile(model, gated, name=n), seed=i)
    unipelt.compile(model, {"modules": {}, "combine": {"ffn.out": {"mode": "fusion", "adapters": ["a", "b"]}}},
                    name="fuse")
    values = get_state(model).handles["a"].gates(make_batch()).values
    assert len(values) == 2  # one gate per layer


def _roberta_dir(tmp_path):
    """A local RoBERTa classifier (130 positions, 129 usable past its padding index), byte tokenizer."""
    from transformers import RobertaConfig, RobertaForSequenceClassification
    from unipelt.models import _byte_tokenizer

    torch.manual_seed(0)
    path = tmp_path / "roberta"
    RobertaForSequenceClassification(RobertaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=130, pad_token_id=0, type_vocab_size=1, num_labels=3)).save_pretrained(path)
    _byte_tokenizer(bert=True, chat=False).save_pretrained(path)
    return path


def test_collapse_gates_and_eval_of_an_adapter_saved_from_python(tmp_path, capsys):
    """An adapter saved with `handle.save` (no training record) on a local RoBERTa classifier:
    `unipelt collapse` refused unlabelled calibration rows ("no label; the adapter is a
    classifier", though collapse never uses a label), and `collapse`, `gates` and `eval` all
    failed on their default `--max-length 256`, which the user never gave ("--max-length 256: ...
    has 129 positions"). Calibration rows now need no label whatever the adapter records, and the
    default length is 256 or the model's position table, whichever is shorter."""
    from unipelt.models import load_model

    path = _roberta_dir(tmp_path)
    model, _ = load_model(str(path), task="classification", num_labels=3)
    h = unipelt.compile(model, GATED_LORA)
    randomize(h)
    h.save(tmp_path / "a")
    (tmp_path / "calib.csv").write_text("sentence\nthe film was fine\n" + "a very long review " * 20 + "\n")
    (tmp_path / "dev.csv").write_text("sentence,label\ngood,0\nbad,1\n" + "long " * 200 + ",2\n")
    fields = ["--text-field", "sentence"]
    assert main(["collapse", str(tmp_path / "a"), str(path), "--data", str(tmp_path / "calib.csv"), *fields,
                 "--out", str(tmp_path / "c")]) == 0
    assert main(["gates", str(tmp_path / "a"), str(path), "--data", str(tmp_path / "calib.csv"), *fields]) == 0
    assert main(["eval", str(tmp_path / "a"), str(path), "--data", str(tmp_path / "dev.csv"), *fields]) == 0
    assert "error" not in capsys.readouterr().err
