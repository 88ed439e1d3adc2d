"""The trivial baseline `unipelt train` prints beside its result (issue 13): the majority class's
accuracy and macro-F1 on the eval data, or the base model's perplexity before training."""
from __future__ import annotations

import math

import pytest

from unipelt.cli import main
from unipelt.data import Example, Tokenized
from unipelt.models import load_model
from unipelt.train import TrainConfig, evaluate, train, trivial_baseline

LORA = {"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4}}}


def rows(labels: list[int]) -> list[Tokenized]:
    return [Tokenized(input_ids=[1, 2], attention_mask=[1, 1], labels=y, line=i + 1) for i, y in enumerate(labels)]


def test_majority_class_by_hand():
    # training majority: class 2 (3 of 5); eval: 4 rows of which 2 are class 2
    b = trivial_baseline("classification", rows([2, 0, 2, 1, 2]), rows([2, 0, 2, 1]))
    assert b["kind"] == "majority class" and b["majority"] == 2
    assert b["accuracy"] == 0.5
    # per-class F1 over the classes present (0, 1, 2): class 2: tp 2, fp 2, fn 0 -> 4/6; others 0
    assert b["macro_f1"] == pytest.approx((2 * 2 / (2 * 2 + 2 + 0)) / 3)


def test_majority_tie_takes_the_lowest_class_and_no_eval_gives_nothing():
    assert trivial_baseline("classification", rows([1, 0]), rows([1]))["majority"] == 0
    assert trivial_baseline("classification", rows([1, 0]), []) == {}


def test_lm_baseline_is_the_base_models_perplexity(tmp_path):
    data = [Example(text=f"the cat number {i} sat on the mat", line=i + 1) for i in range(8)]
    report = train(LORA, "tiny-llama", data, data[:4],
                   TrainConfig(out_dir=str(tmp_path / "run"), epochs=2, batch_size=4, lr=1e-2, progress=False))
    base, tok = load_model("tiny-llama")
    before = evaluate(base, tok, data[:4], task="causal-lm")
    b = report["baseline"]
    assert b["kind"] == "untrained"
    assert b["loss"] == pytest.approx(before["loss"], rel=1e-6)
    assert math.isclose(b["perplexity"], math.exp(b["loss"]), rel_tol=1e-9)
    assert report["final_eval"]["perplexity"] < b["perplexity"]  # it learned something


def test_train_prints_the_baseline(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"text": "{"good fine" if i % 3 else "bad awful"} {i}", "label": "{"pos" if i % 3 else "neg"}"}}\n'
                            for i in range(9)))
    spec = tmp_path / "s.json"
    spec.write_text('{"version": 1, "modules": {"lora": {"method": "lora", "site": "attn.q", "r": 2}}}')
    code = main(["train", str(spec), "tiny-bert", "--data", str(data), "--eval", str(data), "--out", str(tmp_path / "o"),
                 "--epochs", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    # 6 of 9 rows are 'pos': accuracy 6/9, macro-F1 (2·6/(2·6 + 3))/2 over the two classes
    line = next(line for line in out.splitlines() if line.startswith("baseline"))
    assert "'pos'" in line and "accuracy 0.6667" in line and f"macro-F1 {12 / 15 / 2:.4f}" in line
