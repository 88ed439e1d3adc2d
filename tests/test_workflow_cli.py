"""The workflow commands (plugin ``unipelt_plugins.workflow``): train, eval, gates, merge, export.

Run in-process through ``unipelt.cli.main`` (the same parser the ``unipelt`` script builds, with
the plugin's subcommands added through the ``unipelt_add_commands`` hook).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import unipelt
from unipelt.cli import main
from unipelt.models import load_model
from unipelt.train import record_training_info

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GATED = {"version": 1, "modules": {
    "lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4, "gate": {"input": "layer"}},
    "adapter": {"method": "adapter", "sites": "ffn.out", "reduction_factor": 16, "gate": True}}}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def cls_file(tmp_path):
    return write_jsonl(tmp_path / "cls.jsonl", [
        {"review": ("good fine great " if i % 3 else "bad awful poor ") + str(i), "stars": "pos" if i % 3 else "neg"}
        for i in range(12)])


@pytest.fixture
def spec_file(tmp_path):
    def write(spec: dict, name: str = "spec.json") -> str:
        p = tmp_path / name
        p.write_text(json.dumps(spec), encoding="utf-8")
        return str(p)
    return write


def adapted_logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def make_batch(tok, texts=("hello there", "a longer sentence to pad the other")):
    return dict(tok(list(texts), return_tensors="pt", padding=True))


def saved_adapter(tmp_path, name, spec, *, task, labels=None, seed=1):
    """An adapter with random (non-zero) weights, saved with its training record."""
    model, tok = load_model(name, task=task, num_labels=len(labels) if labels else None)
    handle = unipelt.compile(model, spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    record_training_info(handle, {"model": name, "task": task, "labels": labels})
    path = tmp_path / f"adapter-{name}"
    handle.save(path)
    return model, tok, handle, path


# ------------------------------------------------------------------------------------------
# train / eval / gates
# ------------------------------------------------------------------------------------------
def test_train_eval_gates_plot(tmp_path, capsys, cls_file, spec_file):
    spec = spec_file(GATED)
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", spec, "tiny-bert", "--data", cls_file, "--eval", cls_file, "--out", out,
                            "--text-field", "review", "--label-field", "stars", "--epochs", "2", "--batch-size", "4",
                            "--lr", "5e-3", "--gate-lr", "1e-2", "--warmup-ratio", "0.2", "--schedule", "cosine")
    assert code == 0, err
    assert "macro-F1" in stdout and "gates" in stdout
    assert (stdout + err).count("added module 'head'") == 1  # said once (it used to be said on both streams)
    assert "train" in err  # the progress bar (stderr)
    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == ["neg", "pos"] and report["model"] == "tiny-bert"
    assert len(report["epochs"]) == 2 and set(report["gates"]) == {"lora@attn.q", "lora@attn.v", "adapter"}
    assert report["config"]["gate_lr"] == 1e-2
    final = report["final_eval"]

    code, stdout, err = run(capsys, "eval", out / "adapter", "tiny-bert", "--data", cls_file,
                            "--text-field", "review", "--label-field", "stars", "--json")
    assert code == 0, err
    metrics = json.loads(stdout)
    assert metrics["accuracy"] == final["accuracy"] and metrics["macro_f1"] == final["macro_f1"]
    assert metrics["loss"] == pytest.approx(final["loss"], abs=1e-5)

    png = tmp_path / "plots" / "gates.png"
    code, stdout, err = run(capsys, "gates", out / "adapter", "tiny-bert", "--data", cls_file,
                            "--text-field", "review", "--label-field", "stars", "--plot", png)
    assert code == 0, err
    assert "lora" in stdout and "adapter" in stdout and "L0" in stdout and "L1" in stdout
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    import matplotlib.image

    image = matplotlib.image.imread(str(png))
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    code, stdout, _ = run(capsys, "gates", out / "adapter", "tiny-bert", "--data", cls_file,
                          "--text-field", "review", "--label-field", "stars", "--json")
    table = json.loads(stdout)["gates"]
    for module, layers in report["gates"].items():
        for layer, v in layers.items():
            assert table[module][layer] == pytest.approx(v, abs=1e-6)


def test_train_lm_prompt_response_with_chat_template_and_resume(tmp_path, capsys, spec_file):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"q": f"What is {i} plus one?", "a": f"It is {i + 1}."}
                                                 for i in range(12)])
    spec = spec_file({"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4}}})
    common = ["train", spec, "tiny-llama", "--data", data, "--eval", data, "--prompt-field", "q",
              "--response-field", "a", "--epochs", "2", "--batch-size", "4", "--lr", "1e-2", "--save-steps", "2",
              "--save-total-limit", "0", "--no-progress"]  # 0: keep every checkpoint, to resume from the first
    full = tmp_path / "full"
    code, stdout, err = run(capsys, *common, "--out", full)
    assert code == 0, err
    report = json.loads((full / "report.json").read_text())
    assert report["task"] == "causal-lm" and "perplexity" in report["final_eval"]
    assert report["epochs"][-1]["eval"]["loss"] < report["epochs"][0]["eval"]["loss"]

    # the same run without --resume is refused; "interrupted" after checkpoint-2 it resumes exactly
    code, _, err = run(capsys, *common, "--out", full)
    assert code == 1 and "--resume" in err
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    code, _, err = run(capsys, *common, "--out", part, "--resume")
    assert code == 0, err
    a, b = load_file(str(full / "adapter" / "adapter.safetensors")), load_file(str(part / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    code, stdout, err = run(capsys, "eval", full / "adapter", "tiny-llama", "--data", data, "--prompt-field", "q",
                            "--response-field", "a", "--json")
    assert code == 0, err
    assert json.loads(stdout)["loss"] == pytest.approx(report["final_eval"]["loss"], rel=1e-6)


# ------------------------------------------------------------------------------------------
# data errors: one message naming the file and the line, exit code 5
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,content,needle", [
    ("broken.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{broken\n', "line 3"),
    ("nolabel.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n', "line 2"),
    ("ragged.csv", "text,label\nhello,a\nwor,ld,b\n", "line 3"),
])
def test_data_errors_exit_5_with_file_and_line(tmp_path, capsys, spec_file, name, content, needle):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    spec = spec_file({"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q"], "r": 2}}})
    code, stdout, err = run(capsys, "train", spec, "tiny-bert", "--data", path, "--out", tmp_path / "run")
    assert code == 5
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and str(path) in lines[0] and needle in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "run" / "adapter").exists()


def test_missing_data_file_and_unknown_builtin_split(tmp_path, capsys, spec_file):
    spec = spec_file({"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q"], "r": 2}}})
    code, _, err = run(capsys, "train", spec, "tiny-bert", "--data", tmp_path / "nope.jsonl", "--out", tmp_path / "r")
    assert code == 5 and "nope.jsonl: file not found" in err
    # eval reads the adapter's record before the data (issue 14): give it a real adapter
    assert run(capsys, "compile", spec, "tiny-bert", "--out", tmp_path / "init")[0] == 0
    code, _, err = run(capsys, "eval", tmp_path / "init", "tiny-bert", "--data", "drugreview:nosuch")
    assert code == 5 and "nosuch" in err


def test_eval_refuses_labels_the_adapter_does_not_know(tmp_path, capsys):
    spec = {"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q"], "r": 2},
                                      "head": {"method": "train", "sites": "head"}}}
    _, _, _, path = saved_adapter(tmp_path, "tiny-bert", spec, task="classification", labels=["neg", "pos"])
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": "meh"}])
    code, _, err = run(capsys, "eval", path, "tiny-bert", "--data", data)
    assert code == 5 and f"{data}: line 2: label 'meh'" in err


# ------------------------------------------------------------------------------------------
# export to PEFT
# ------------------------------------------------------------------------------------------
ALL_LINEARS = {"bert": ["attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down"],
               "llama": ["attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.gate", "ffn.down"]}


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("sites", ["qv", "all"])
def test_peft_export_round_trip(tmp_path, capsys, family, sites):
    peft = pytest.importorskip("peft")
    name = f"tiny-{family}"
    task, labels = ("classification", ["a", "b", "c"]) if family == "bert" else ("causal-lm", None)
    modules = {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"] if sites == "qv" else ALL_LINEARS[family],
                        "r": 4, "alpha": 8 if sites == "qv" else 6}}
    if sites == "all":  # a second node on a layer subset, rsLoRA: rank/alpha patterns, stacked ranks
        modules["extra"] = {"method": "lora", "sites": ["attn.v"], "r": 2, "rslora": True, "layers": [1]}
    if task == "classification":
        modules["head"] = {"method": "train", "sites": "head"}
    model, tok, handle, path = saved_adapter(tmp_path, name, {"version": 1, "modules": modules}, task=task, labels=labels)
    batch = make_batch(tok)
    ref = adapted_logits(model, batch)

    out = tmp_path / "peft"
    code, stdout, err = run(capsys, "export", path, "--format", "peft", "--out", out)  # model from the record
    assert code == 0, err
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == name
    assert config["task_type"] == ("SEQ_CLS" if task == "classification" else "CAUSAL_LM")
    tensors = load_file(str(out / "adapter_model.safetensors"))
    q0 = handle.branch_modules["lora.0.attn.q"]
    path_q0 = handle.graph.branches[0].site.path
    assert torch.equal(tensors[f"base_model.model.{path_q0}.lora_A.weight"], q0.lora_A.detach())
    assert torch.equal(tensors[f"base_model.model.{path_q0}.lora_B.weight"], q0.lora_B.detach())
    assert config["lora_alpha"] / config["r"] == q0.scale

    base, _ = load_model(name, task=task, num_labels=len(labels) if labels else None)
    peft_model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        got = peft_model(**batch).logits
    if sites == "qv":
        assert torch.equal(got, ref)
    else:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_peft_export_gpt2_fused_qkv_and_model_option(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    spec = {"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4}}}
    model, tok, handle, path = saved_adapter(tmp_path, "tiny-gpt2", spec, task="causal-lm")
    (path / "unipelt.json").write_text(json.dumps({k: v for k, v in json.loads((path / "unipelt.json").read_text()).items()
                                                   if k != "workflow"}))  # no record: --model is needed
    code, _, err = run(capsys, "export", path, "--out", tmp_path / "peft")
    assert code == 3 and "no base model recorded" in err
    code, _, err = run(capsys, "export", path, "--out", tmp_path / "peft", "--model", "tiny-gpt2")
    assert code == 0, err
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["fan_in_fan_out"] is True  # q and v slices stacked on c_attn
    batch = make_batch(tok)
    ref = adapted_logits(model, batch)
    base, _ = load_model("tiny-gpt2")
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()(**batch).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_export_of_a_classifier_saved_from_python_reads_its_class_count(tmp_path, capsys):
    """An adapter saved by ``handle.save`` (no training record) of a 3-class classifier: export
    (and eval, gates: the same loader) built the model with 2 classes and failed on the head's
    shape ('head.head.bias' has shape (3,), expected (2,), exit 4). The trained head's recorded
    shape gives the class count; PEFT loading the export computes the adapter's logits."""
    peft = pytest.importorskip("peft")
    spec = {"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4},
                                      "head": {"method": "train", "sites": "head"}}}
    model, tok = load_model("tiny-bert", task="classification", num_labels=3)
    h = unipelt.compile(model, spec)
    with torch.no_grad():
        for p in h.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    h.save(tmp_path / "a")
    batch = make_batch(tok)
    ref = adapted_logits(model, batch)
    code, _, err = run(capsys, "export", tmp_path / "a", "--format", "peft", "--out", tmp_path / "peft",
                       "--model", "tiny-bert")
    assert code == 0, err
    base, _ = load_model("tiny-bert", task="classification", num_labels=3)
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()(**batch).logits
    assert got.shape[-1] == 3
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_peft_export_refuses_gated_and_adapters(tmp_path, capsys):
    _, _, _, path = saved_adapter(tmp_path, "tiny-llama", GATED, task="causal-lm")
    code, stdout, err = run(capsys, "export", path, "--out", tmp_path / "peft")
    assert code == 1
    assert "module 'lora'" in err and "gated" in err and "module 'adapter'" in err
    assert not (tmp_path / "peft").exists()


# ------------------------------------------------------------------------------------------
# merge
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_merge_produces_a_plain_model(tmp_path, capsys, name):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if name == "tiny-bert":
        spec = {"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v", "ffn.down"], "r": 4},
                                          "head": {"method": "train", "sites": "head"}}}
        task, labels, auto = "classification", ["neg", "pos"], AutoModelForSequenceClassification
    else:
        spec = {"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v", "ffn.down"], "r": 4},
                                          "norms": {"method": "train", "sites": "norm"}}}
        task, labels, auto = "causal-lm", None, AutoModelForCausalLM
    model, tok, handle, path = saved_adapter(tmp_path, name, spec, task=task, labels=labels)
    batch = make_batch(tok)
    ref = adapted_logits(model, batch)
    out = tmp_path / "merged"
    code, stdout, err = run(capsys, "merge", path, name, "--out", out)
    assert code == 0, err
    merged = auto.from_pretrained(str(out)).eval()
    assert not any("unipelt" in k or "lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, ref, rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(str(out))("hello")["input_ids"] == tok("hello")["input_ids"]
    if labels:
        assert merged.config.id2label == {0: "neg", 1: "pos"}


def test_merge_refuses_gated(tmp_path, capsys):
    _, _, _, path = saved_adapter(tmp_path, "tiny-bert", GATED, task="classification", labels=["a", "b"])
    code, stdout, err = run(capsys, "merge", path, "tiny-bert", "--out", tmp_path / "merged")
    assert code != 0
    assert "cannot merge" in err and "module 'lora'" in err and "gated" in err and "module 'adapter'" in err
    assert not (tmp_path / "merged").exists()


def test_commands_are_registered_by_the_plugin():
    from unipelt.cli import build_parser
    from unipelt.registry import get_registry

    names = {p.name if hasattr(p, "name") else str(p) for p in get_registry().pm.get_plugins()}
    assert any("workflow" in n for n in names) or get_registry().pm.get_plugin("workflow") is not None
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"train", "eval", "gates", "merge", "export"} <= set(sub.choices)


# ------------------------------------------------------------------------------------------
# found by using the workflow as a new user would, on CSV/TSV/JSONL files of their own
# ------------------------------------------------------------------------------------------
SENTIMENT = [("I loved this movie", "positive"), ("terrible experience", "negative"), ("it was okay", "neutral"),
             ("what a great day", "positive"), ("rude staff and slow", "negative"), ("nothing special", "neutral")]


def write_table(path, header, rows, delimiter=","):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def test_train_refuses_an_eval_label_not_in_the_training_data(tmp_path, capsys, spec_file):
    """Regression: the label set was taken from train + eval, so a label seen only in --eval became a
    class the model could never learn (and silently lowered accuracy); now exit 5 naming the file and line."""
    spec = spec_file({"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q"], "r": 2}}})
    train_csv = write_table(tmp_path / "train.csv", ["sentence", "sentiment"], SENTIMENT * 2)
    dev_csv = write_table(tmp_path / "dev.csv", ["sentence", "sentiment"], SENTIMENT[:3] + [("so so", "mixed")])
    code, _, err = run(capsys, "train", spec, "tiny-bert", "--data", train_csv, "--eval", dev_csv, "--out",
                       tmp_path / "run", "--text-field", "sentence", "--label-field", "sentiment", "--no-progress")
    assert code == 5, err
    assert err.strip().splitlines() == [
        f"error: {dev_csv}: line 5: label 'mixed' does not occur in the training data (negative, neutral, positive)"]
    assert not (tmp_path / "run").exists()


def test_eval_gates_merge_reuse_the_recorded_fields_and_model(tmp_path, capsys, spec_file):
    """A run trained on `sentence,sentiment` columns: eval and gates used to need the field flags
    (and MODEL) again, else 'cannot tell the task'; now they default to what training recorded."""
    train_csv = write_table(tmp_path / "train.csv", ["sentence", "sentiment"], SENTIMENT * 2)
    dev_tsv = write_table(tmp_path / "dev.tsv", ["sentence", "sentiment"], SENTIMENT, delimiter="\t")
    spec = spec_file({"version": 1, "modules": {
        "lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 2, "gate": True}}})
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", spec, "tiny-bert", "--data", train_csv, "--eval", dev_tsv, "--out", out,
                       "--text-field", "sentence", "--label-field", "sentiment", "--epochs", "1", "--no-progress")
    assert code == 0, err
    meta = json.loads((out / "adapter" / "unipelt.json").read_text())
    assert meta["workflow"]["fields"] == {"text": "sentence", "label": "sentiment", "prompt": "prompt",
                                          "response": "response"}
    code, stdout, err = run(capsys, "eval", out / "adapter", "--data", dev_tsv, "--json")
    assert code == 0, err
    final = json.loads((out / "report.json").read_text())["final_eval"]
    assert json.loads(stdout)["accuracy"] == final["accuracy"] and json.loads(stdout)["examples"] == 6
    code, stdout, err = run(capsys, "gates", out / "adapter", "--data", dev_tsv, "--json")
    assert code == 0, err
    assert set(json.loads(stdout)["gates"]) == {"lora@attn.q", "lora@attn.v"}  # one gate per projection
    # the flags still win over the record
    code, _, err = run(capsys, "eval", out / "adapter", "--data", dev_tsv, "--label-field", "nope")
    assert code == 5 and "'nope'" in err


def test_lm_taken_from_the_data_on_an_encoder_says_why(tmp_path, capsys, spec_file):
    """A classification file whose label column is not named `label` reads as LM text; the model
    error on an encoder now says the task came from the data and which flag to give."""
    train_csv = write_table(tmp_path / "train.csv", ["text", "sentiment"], SENTIMENT)
    spec = spec_file({"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q"], "r": 2}}})
    code, _, err = run(capsys, "train", spec, "tiny-bert", "--data", train_csv, "--out", tmp_path / "run")
    assert code == 3
    (line,) = err.strip().splitlines()
    assert "no causal-LM head" in line and "--label-field" in line and "--task" in line


def test_resuming_a_finished_run_says_so_and_keeps_the_adapter(tmp_path, capsys, spec_file):
    """Resuming a run that had already finished printed '0.000 s/step median' as if steps ran."""
    train_csv = write_table(tmp_path / "train.csv", ["text", "label"], SENTIMENT)
    spec = spec_file({"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q"], "r": 2}}})
    common = ["train", spec, "tiny-bert", "--data", train_csv, "--out", tmp_path / "run", "--epochs", "1",
              "--batch-size", "3", "--no-progress"]
    code, _, err = run(capsys, *common)
    assert code == 0, err
    before = load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))
    code, stdout, err = run(capsys, *common, "--resume")
    assert code == 0, err
    assert "steps         2 (none run now: the checkpoint was already at the end)" in stdout
    assert f"resumed from  {tmp_path / 'run' / 'checkpoint-2'}" in stdout
    after = load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------
# issue 14: one error, no traceback, for paths, devices, lengths and changed runs
# ------------------------------------------------------------------------------------------
TINY_TRAIN = ["--text-field", "review", "--label-field", "stars", "--epochs", "1", "--batch-size", "4", "--no-progress"]


def test_train_out_that_cannot_be_a_directory(tmp_path, capsys, cls_file, spec_file):
    spec = spec_file({"version": 1, "modules": {"lora": {"method": "lora", "sites": "attn.q", "r": 2}}})
    taken = tmp_path / "taken.txt"
    taken.write_text("keep me")
    for out, needle in ((taken, f"{taken}: exists and is not a directory"),
                        (taken / "run", f"{taken}: is a file, so the run directory {taken}/run cannot be created")):
        code, _, err = run(capsys, "train", spec, "tiny-bert", "--data", cls_file, "--out", out, *TINY_TRAIN)
        assert code == 7 and err.startswith(f"error: {needle}") and len(err.strip().splitlines()) == 1, err
    assert taken.read_text() == "keep me"


def test_max_length_and_device_errors_in_train_and_eval(tmp_path, capsys, cls_file, spec_file):
    spec = spec_file({"version": 1, "modules": {"lora": {"method": "lora", "sites": "attn.q", "r": 2}}})
    code, _, err = run(capsys, "train", spec, "tiny-bert", "--data", cls_file, "--out", tmp_path / "long",
                       "--max-length", "2000", *TINY_TRAIN)
    assert code == 1 and err.strip() == "error: --max-length 2000: tiny-bert has 512 positions; give --max-length 512 or less"
    assert not (tmp_path / "long" / "adapter").exists()
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", spec, "tiny-bert", "--data", cls_file, "--out", out, *TINY_TRAIN)
    assert code == 0, err
    code, _, err = run(capsys, "eval", out / "adapter", "--data", cls_file, "--max-length", "2000")
    assert code == 1 and "--max-length 2000" in err and "512 positions" in err and "Traceback" not in err
    # gates too (it encoded without the check: an IndexError inside the position embeddings)
    code, _, err = run(capsys, "gates", out / "adapter", "--data", cls_file, "--max-length", "2000")
    assert code == 1 and "--max-length 2000" in err and "512 positions" in err and "Traceback" not in err
    if not torch.cuda.is_available():
        for argv in (["train", spec, "tiny-bert", "--data", cls_file, "--out", tmp_path / "gpu", *TINY_TRAIN],
                     ["eval", out / "adapter", "--data", cls_file]):
            code, _, err = run(capsys, *argv, "--device", "cuda")
            assert code == 1 and err.startswith("error: --device cuda: no CUDA GPU is available here"), err


def test_resume_with_a_new_lr_is_refused(tmp_path, capsys, cls_file, spec_file):
    """Regression: --resume kept the checkpoint's learning rate and ignored a new --lr."""
    spec = spec_file({"version": 1, "modules": {"lora": {"method": "lora", "sites": "attn.q", "r": 2}}})
    out = tmp_path / "run"
    base = ["train", spec, "tiny-bert", "--data", cls_file, "--out", out, *TINY_TRAIN]
    code, _, err = run(capsys, *base, "--lr", "1e-3", "--compile", "off")
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["compile"] == {
        "requested": "off", "mode": None, "backend": None, "fallback": None, "bucketed": False}
    code, _, err = run(capsys, *base, "--lr", "5e-3", "--resume")
    assert code == 1 and "lr (0.001 in the checkpoint, 0.005 now)" in err
    code, stdout, err = run(capsys, *base, "--lr", "1e-3", "--resume", "--epochs", "2")
    assert code == 0, err
    assert "note          resuming with a change: total_steps (3 in the checkpoint, 6 now)" in stdout


def test_a_closed_stdout_ends_quietly(monkeypatch, capsys):
    # `unipelt plugins | head` closes the pipe early: the command stops with the exit code of a
    # process ended by SIGPIPE (128 + 13), no traceback and nothing on stderr (it was a
    # BrokenPipeError traceback, where the README promises one-line errors)
    import sys

    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["plugins"]) == 141
    assert capsys.readouterr().err == ""


def test_eval_of_a_roberta_classifier_saved_from_python_reads_its_class_count(tmp_path, capsys):
    # RoBERTa's head is classifier.dense + classifier.out_proj, so the saved tensors are
    # head.head.dense.* and head.head.out_proj.*: the class count was read only from head.head.bias
    # or .weight (BERT's single Linear), found none, and the model was built with the directory's
    # 2 classes, so the 3-class adapter failed to load (exit 4, shape (3, 32) expected (2, 32))
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from unipelt.models import _byte_tokenizer

    cfg = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    RobertaForSequenceClassification(RobertaConfig(**cfg, num_labels=2)).save_pretrained(tmp_path / "rob")
    tok = _byte_tokenizer(bert=True, chat=False)
    tok.save_pretrained(tmp_path / "rob")
    with pytest.warns(unipelt.UnipeltWarning, match="head has 2 labels, the data 3"):
        model, _ = load_model(str(tmp_path / "rob"), task="classification", num_labels=3)
    h = unipelt.compile(model, {"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q"], "r": 2},
                                                          "head": {"method": "train", "sites": "head"}}})
    with torch.no_grad():
        for p in h.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    h.save(tmp_path / "a")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": str(i % 3)} for i, t in enumerate(["a b", "c", "d e f"])])
    code, out, err = run(capsys, "eval", tmp_path / "a", tmp_path / "rob", "--data", data, "--json", "--max-length", "32")
    assert code == 0, err
    assert json.loads(out)["examples"] == 3
    assert "warning" not in err  # the adapter brings its head: the directory's replaced one is no news
