"""The training record: the report of a run (``report.json``), and what an adapter records about
its training (model, task, labels, max length, fields) so that ``eval``, ``gates``, ``merge`` and
``export`` load it the same way (:func:`load_adapted`)."""
from __future__ import annotations

import json
import os
import weakref
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from unipelt.errors import ModelError, UnipeltWarning
from unipelt.training.options import resolve_device

REPORT_FILE = "report.json"


class TrainReport(dict):
    """The JSON report (a dict); ``handle``, ``model`` and ``tokenizer`` ride along as attributes."""

    handle: Any = None
    model: Any = None
    tokenizer: Any = None


_INFO: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def record_training_info(handle, info: dict) -> None:
    """Attach workflow facts (model name, task, labels, max_length) to ``handle``: the ``workflow``
    plugin writes them into ``unipelt.json`` under ``"workflow"`` whenever the adapter is saved."""
    _INFO[handle] = dict(info)


def recorded_training_info(handle) -> dict | None:
    return _INFO.get(handle)


def training_info(adapter_dir: str | os.PathLike) -> dict:
    """What training recorded about an adapter: ``unipelt.json``'s ``workflow`` entry, else the
    ``report.json`` of the run directory that holds it (``DIR/adapter`` or ``DIR/checkpoint-N/adapter``).
    Empty when neither exists (an adapter written by ``unipelt compile``)."""
    from unipelt.handle import read_adapter_meta

    d = Path(adapter_dir)
    meta = read_adapter_meta(d)
    info = meta.get("workflow")
    if isinstance(info, dict):
        return dict(info)
    for report in (d.parent / REPORT_FILE, d.parent.parent / REPORT_FILE):
        if report.is_file():
            try:
                data = json.loads(report.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            return {k: data.get(k) for k in ("model", "task", "labels", "max_length") if k in data}
    return {}


def load_adapted(adapter_dir: str | os.PathLike, model: str | None = None, *, task: str | None = None,
                 labels: Sequence[str] | None = None, device: str | None = None):
    """Load the base model an adapter was trained on and attach the adapter.

    ``model``: a built-in name or a local directory (default: the one recorded at train time).
    ``task`` and ``labels`` default to the recorded ones; an adapter without a record (from
    ``unipelt compile``) takes ``labels`` from the caller (e.g. the data's label set).
    Returns ``(model, tokenizer, handle, info)`` where info has the resolved task and labels.
    """
    import unipelt
    from unipelt.models import load_model

    dev = resolve_device(device)  # before loading anything: --device cuda without a GPU fails at once
    info = training_info(adapter_dir)
    name = model or info.get("model")
    if not name:
        raise ModelError(f"{adapter_dir}: no base model recorded with this adapter; name the model")
    task = task or info.get("task")
    given = list(labels or []) or None
    labels = list(info.get("labels") or []) or None
    if labels is None and task in (None, "classification"):
        # no record (an adapter saved from Python): a classifier's trained head says how many
        # classes it has; without this the model was built with 2 and the head failed to load.
        # The data's labels name them when they are as many (the data may hold only some)
        n = _saved_head_classes(adapter_dir)
        if n is not None and (task == "classification" or _natural_task(str(name)) == "classification"):
            task, labels = "classification", given if given and len(given) == n else [str(i) for i in range(n)]
    if labels is None and given:
        labels = given
        task = task or "classification"  # labelled data: built with their count, not the directory's
    if task == "classification" and labels is None:
        raise ModelError(f"{adapter_dir}: the number of classes is unknown: pass data with labels")
    with warnings.catch_warnings():
        if task == "classification" and labels and _saved_head_classes(adapter_dir) == len(labels):
            # the adapter brings its trained head: that the directory's own head was replaced
            # on loading (load_model's warning) is no news, the adapter's overwrites it
            warnings.filterwarnings("ignore", message=r".*its classification head has \d+ labels", category=UnipeltWarning)
        m, tok = load_model(str(name), task=task, num_labels=len(labels) if labels else None)
    if task == "classification" and labels:
        name_labels(m, labels)
    m.to(dev)
    handle = unipelt.load(m, adapter_dir)
    if task is None:
        task = "causal-lm" if type(m).__name__.endswith(("ForCausalLM", "LMHeadModel")) else "classification"
        if task == "classification" and labels is None:
            n = int(getattr(m.config, "num_labels", 2))
            labels = [str(i) for i in range(n)]
    resolved = {**info, "model": str(name), "task": task, "labels": labels}
    return m, tok, handle, resolved


def _saved_head_classes(adapter_dir) -> int | None:
    """The output size of a ``train`` module at ``head`` in the adapter's tensor records, or None."""
    from unipelt.io import read_adapter_meta
    from unipelt.spec import parse_spec

    try:
        meta = read_adapter_meta(adapter_dir)
        spec = parse_spec(meta["spec"])
    except Exception:  # a corrupt adapter is reported by the load that follows, with its file and field
        return None
    records = meta.get("tensors") or {}
    for name, node in spec.modules.items():
        if node.method == "train" and "head" in node.sites:
            # the head's output layer: BERT's and the decoders' head is one Linear
            # (head.head.bias / .weight); RoBERTa's is dense then out_proj (head.head.out_proj.*).
            # Records follow the state dict's module order, so the last bias (else the last
            # weight: GPT-2's and Llama's score has none) is the output layer's
            keys = [k for k in records if k.startswith(f"{name}.head.")]
            last = [k for k in keys if k.endswith(".bias")][-1:] or [k for k in keys if k.endswith(".weight")][-1:]
            rec = records.get(last[0]) if last else None
            if rec and rec.get("shape"):
                return int(rec["shape"][0])
    return None


def _natural_task(name: str) -> str | None:
    """The task a model loads as without one: a built-in's default, or a directory whose
    config.json names a ...ForSequenceClassification class."""
    from unipelt.models import _DEFAULT_TASK

    if name in _DEFAULT_TASK:
        return _DEFAULT_TASK[name]
    try:
        cfg = json.loads((Path(name).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    archs = cfg.get("architectures") or []
    return "classification" if any(str(a).endswith("ForSequenceClassification") for a in archs) else None


def name_labels(model: nn.Module, labels: Sequence[str]) -> None:
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg.id2label = {i: str(l) for i, l in enumerate(labels)}
        cfg.label2id = {str(l): i for i, l in enumerate(labels)}
