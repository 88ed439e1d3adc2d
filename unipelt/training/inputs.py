"""What a run reads: data sets (files or built-ins), the task they imply, their tokenization,
the per-epoch order, batches, and the checks that tie them to a model (labels, positions)."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from unipelt.data import (BUILTIN_DATASETS, IGNORE_INDEX, Example, Tokenized, TokenizedRows, builtin_dataset, collate,
                          iter_classification, iter_lm, label_name, label_set, read_examples)
from unipelt.errors import DataError, ModelError
from unipelt.training.options import TrainingError

PROGRESS_MIN_ROWS = 5000  # below this, tokenizing takes a few seconds: no bar


def load_data(value: str | os.PathLike, *, kind: Literal["classification", "lm", "auto"] = "auto",
              format: str | None = None, text_field: str = "text", label_field: str = "label",
              prompt_field: str = "prompt", response_field: str = "response") -> list[Example]:
    """A data file (JSONL/CSV/TSV) or a built-in data set: ``NAME`` (its train split) or ``NAME:SPLIT``
    (``drugreview``, ``drugreview:dev``, ``chatterbot:test``; see ``unipelt.data.BUILTIN_DATASETS``).
    An existing file of the same name wins over a built-in name. Nothing is downloaded."""
    text = str(value)
    name, _, split = text.partition(":")
    if name in BUILTIN_DATASETS and not Path(text).exists():
        examples = builtin_dataset(name, split or "train")
        if kind == "classification" and any(ex.label is None for ex in examples):
            raise DataError(f"{text}: the built-in data set {name!r} has no labels (it is LM data)")
        if kind == "lm" and any(ex.label is not None for ex in examples):
            # a labelled set used for LM: train on the texts
            examples = [Example(text=ex.text, line=ex.line, source=ex.source) for ex in examples]
        return examples
    return read_examples(text, format=format, text_field=text_field, label_field=label_field,
                         prompt_field=prompt_field, response_field=response_field, kind=kind)


def detect_task(examples: Sequence[Example]) -> str:
    """``classification`` when the rows have labels, else ``causal-lm``."""
    if not examples:
        raise DataError("no training examples")
    return "classification" if any(ex.label is not None for ex in examples) else "causal-lm"


def class_labels(train_examples: Sequence[Example], eval_examples: Sequence[Example],
                 given: Sequence[str] | None) -> list[str]:
    """The class labels in index order (``given``, else the training data's), after checking that
    every row has one of them: an evaluation label never trained on cannot be predicted."""
    for ex in [*train_examples, *eval_examples]:
        if ex.label is None:
            raise DataError(f"{ex.where()}: no label (classification needs one on every row)")
    # given as the rows' labels are (bools and numbers by the class name a file gives them)
    labels = [label_name(x) for x in given] if given else label_set(train_examples)
    if len(labels) < 2:
        raise DataError(f"classification needs at least two labels; the data has {labels}")
    known = set(labels)
    for ex in [*train_examples, *eval_examples]:
        if ex.label not in known:
            said = "the given labels" if given else "the training data"
            raise DataError(f"{ex.where()}: label {ex.label!r} does not occur in {said} ({', '.join(labels)})")
    return labels


def encode(examples: Sequence[Example], tokenizer, task: str, *, labels: Sequence[str] | None = None,
           max_length: int = 256, use_chat_template: bool = True,
           progress: str | None = None) -> Sequence[Tokenized]:
    """The rows of ``examples`` encoded for ``task``, as a sequence of :class:`Tokenized`.

    Classification rows are tokenized lazily, when a batch asks for them
    (:class:`LazyClassificationRows`): training starts at once, whatever the size of the file,
    and memory holds the texts only. LM rows are tokenized in one pass into packed arrays
    (:class:`~unipelt.data.TokenizedRows`, 4 bytes a token), because rows left without any
    target token (a prompt filling ``max_length``) are dropped and the number of rows fixes the
    number of steps; ``progress`` labels a progress bar on stderr for that pass, shown from
    ``PROGRESS_MIN_ROWS`` rows on (None: silent).
    """
    from tqdm.auto import tqdm

    if task == "classification":
        return LazyClassificationRows(examples, tokenizer, labels or label_set(examples), max_length)
    show = progress is not None and len(examples) >= PROGRESS_MIN_ROWS
    with tqdm(total=len(examples), desc=progress, unit="row", disable=not show, mininterval=1.0,
              dynamic_ncols=True) as bar:
        def counted():
            for ex in examples:
                bar.update(1)
                yield ex
        return TokenizedRows(r for r in iter_lm(counted(), tokenizer, max_length, use_chat_template)
                             if any(t != IGNORE_INDEX for t in r.labels[1:]))


class LazyClassificationRows(Sequence):
    """Classification examples that tokenize when indexed: ``rows[i]`` is the :class:`Tokenized`
    that :func:`~unipelt.data.encode_classification` gives for ``examples[i]``. Every row is
    checked (text present, label known) when the sequence is made, so a bad row is refused
    before the first step, not in the middle of the run."""

    def __init__(self, examples: Sequence[Example], tokenizer, labels: Sequence[str], max_length: int):
        known = set(labels)
        for ex in examples:
            if ex.text is None or ex.label is None:
                raise DataError(f"{ex.where()}: a classification example needs text and label")
            if ex.label not in known:
                raise DataError(f"{ex.where()}: label {ex.label!r} is not one of: {', '.join(labels)}")
        if tokenizer is None:
            raise ModelError("this model has no tokenizer; use a model directory that includes tokenizer files")
        self.examples, self.tokenizer, self.labels, self.max_length = examples, tokenizer, list(labels), max_length

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        chosen = self.examples[i] if isinstance(i, slice) else [self.examples[i]]
        rows = list(iter_classification(chosen, self.tokenizer, self.labels, self.max_length))
        return rows if isinstance(i, slice) else rows[0]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch: a permutation that depends on (seed, epoch) and nothing else."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + 17) % (2**63 - 1))
    return torch.randperm(n, generator=g).tolist()


def pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ModelError("the tokenizer has no pad or EOS token to pad batches with")
    return int(pad)


def batches(rows: Sequence[Tokenized], batch_size: int, pad: int, device) -> Iterator[dict[str, Any]]:
    for i in range(0, len(rows), batch_size):
        b = collate(rows[i:i + batch_size], pad)
        yield {k: v.to(device) for k, v in b.items()}


def position_limit(model: nn.Module) -> int | None:
    """The longest sequence the model's learned position table covers (BERT's
    ``position_embeddings``, GPT-2's ``wpe``), or None for models without one (rotary positions).
    RoBERTa-style tables start after the padding index, so they hold ``padding_idx + 1`` fewer."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in ("position_embeddings", "wpe"):
            offset = module.padding_idx + 1 if module.padding_idx is not None else 0
            return module.num_embeddings - offset
    return None


def check_max_length(model: nn.Module, max_length: int, *, model_name: str | None = None) -> None:
    """Refuse a ``max_length`` beyond the model's position table: the first long row would index
    past the table (an IndexError deep inside the embedding) instead of being cut."""
    limit = position_limit(model)
    if limit is not None and max_length > limit:
        name = model_name or type(model).__name__
        raise TrainingError(f"--max-length {max_length}: {name} has {limit} positions; give --max-length {limit} "
                            "or less")


def data_digest(examples: Sequence[Example]) -> str:
    """SHA-256 of the rows' content in order (text, label, prompt, response): two data sets with the
    same digest train the same run, whatever their file names."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.text, ex.label, ex.prompt, ex.response], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
