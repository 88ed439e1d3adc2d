"""Training, evaluation and gate statistics for an adapted model: the engine behind ``unipelt train``,
``unipelt eval`` and ``unipelt gates``, usable as a Python API.

    from unipelt.train import TrainConfig, load_data, train

    train_rows = load_data("train.jsonl")                 # or "drugreview", "drugreview:dev", "chatterbot"
    eval_rows = load_data("drugreview:dev")
    report = train("specs/unipelt-al.yaml", "minilm", train_rows, eval_rows,
                   TrainConfig(out_dir="runs/al", epochs=3, lr=1e-3, batch_size=16))
    report["epochs"][-1]["eval"]                           # {"accuracy": ..., "macro_f1": ..., "loss": ...}
    report.handle                                          # the AdapterHandle (not part of the JSON)

What ``train`` does, in order:

- the task comes from ``TrainConfig.task`` or from the data: rows with labels mean sequence
  classification, prompt/response pairs or plain text mean causal language modelling;
- a model name is loaded with :func:`unipelt.models.load_model` (classification: with as many
  labels as the data has); a model object is used as given (pass its ``tokenizer=``);
- classification needs a trainable head: a spec without a ``train`` node at ``head`` gets one
  (``{"method": "train", "sites": "head"}``, named ``head``), and the report says so
  (``added_head``);
- the adapter is initialised under ``seed``; the data order of epoch ``e`` is a permutation drawn
  from a generator seeded by ``(seed, e)`` alone, so it never depends on what ran before;
- AdamW over the adapter's parameters with per-group learning rates (:func:`param_groups`): LoRA+
  (a lora node's ``lr_ratio``: B learns ``lr_ratio`` times faster than A) and ``gate_lr`` for gates;
  a warm-up (``warmup_steps`` or ``warmup_ratio``) then a ``linear``, ``cosine`` or ``constant``
  schedule; gradient accumulation; gradient clipping; ``max_steps`` overrides ``epochs``;
- an evaluation after every epoch (accuracy and macro-F1 for classification, loss and perplexity
  for LM);
- with ``out_dir``: a checkpoint ``out_dir/checkpoint-N`` at every epoch end and every
  ``save_steps`` optimizer steps, each written to a temporary directory and renamed into place:
  ``adapter/`` (with any training-time reparameterisation, so training can continue),
  ``trainer_state.json`` (step, epoch, position in the epoch, history) and ``training_state.pt``
  (optimizer, scheduler and RNG states). ``resume=True`` continues from the newest checkpoint and
  ends with the same adapter, bit for bit, as an uninterrupted run with the same seed;
- at the end ``out_dir/adapter`` (after :meth:`AdapterHandle.drop_reparameterization`) and
  ``out_dir/report.json``: metrics per epoch, parameter counts, the optimizer groups with their learning rates
  (``param_groups``), wall time per step, the gate table.

Training under ``transformers.Trainer`` instead: a compiled model is an ordinary ``nn.Module``
whose only trainable parameters are the adapter's, so Trainer trains it as it is; save the adapter
with :class:`UnipeltCallback`::

    handle = unipelt.compile(model, "specs/lora.yaml")
    trainer = Trainer(model=model, args=TrainingArguments("out", report_to=[], save_steps=100),
                      train_dataset=rows, data_collator=collator,
                      optimizers=(torch.optim.AdamW(param_groups(handle, 1e-3)), None),  # LoRA+ / gate lr
                      callbacks=[UnipeltCallback(handle, "out")])
    trainer.train()   # out/checkpoint-N/adapter at each save, out/adapter at the end
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
import weakref
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from unipelt.data import (BUILTIN_DATASETS, IGNORE_INDEX, Example, Tokenized, builtin_dataset, collate,
                          encode_classification, encode_lm, label_set, read_examples)
from unipelt.errors import AdapterFileError, DataError, ModelError, UnipeltError

TASKS = ("classification", "causal-lm")
SCHEDULES = ("linear", "cosine", "constant")
STATE_JSON = "trainer_state.json"
STATE_PT = "training_state.pt"
REPORT_FILE = "report.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class TrainingError(UnipeltError):
    """A training run that cannot start or continue (bad options, a mismatched checkpoint)."""


# ------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Options of :func:`train` (the ``unipelt train`` flags of the same names).

    task: ``classification``, ``causal-lm`` or None (from the data: labels mean classification).
    lr, epochs, batch_size (examples per micro-batch), grad_accum (micro-batches per step),
    max_length (tokens; longer rows are cut), max_steps (optimizer steps; overrides epochs).
    warmup_steps / warmup_ratio (of the total steps; give at most one), schedule (after warm-up).
    gate_lr: learning rate of the gates (default: lr). LoRA+ comes from the spec (``lr_ratio``).
    save_steps: a checkpoint every N optimizer steps (besides every epoch end);
    save_total_limit: keep only the newest N checkpoints. resume: True (newest checkpoint in
    out_dir) or a checkpoint directory. overwrite: delete an earlier run's checkpoints, adapter
    and report in out_dir instead of refusing.
    labels: the class labels in index order (default: the sorted labels of the training data; an
    evaluation row with a label outside them is a DataError).
    model_name: recorded in the report and the adapter (set automatically when a name is given).
    data_fields: the field names the data was read with (``text``, ``label``, ``prompt``,
    ``response``), recorded with the adapter so ``unipelt eval``/``gates`` read files the same way.
    """

    out_dir: str | None = None
    task: Literal["classification", "causal-lm"] | None = None
    lr: float = 1e-3
    epochs: int = 3
    batch_size: int = 8
    eval_batch_size: int | None = None
    grad_accum: int = 1
    max_length: int = 256
    max_steps: int | None = None
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    gate_lr: float | None = None
    seed: int = 0
    gradient_checkpointing: bool = False
    save_steps: int | None = None
    save_total_limit: int | None = None
    resume: bool | str = False
    overwrite: bool = False
    labels: list[str] | None = None
    use_chat_template: bool = True
    progress: bool = True
    device: str | None = None
    adapter_name: str = "default"
    model_name: str | None = None
    data_fields: dict[str, str] | None = None

    def check(self) -> None:
        def positive(name, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise TrainingError(f"{name} must be a positive integer, got {v!r}")

        for name in ("epochs", "batch_size", "grad_accum", "max_length"):
            positive(name)
        for name in ("max_steps", "save_steps", "save_total_limit", "eval_batch_size"):
            positive(name, allow_none=True)
        if self.task is not None and self.task not in TASKS:
            raise TrainingError(f"unknown task {self.task!r}; expected one of: {', '.join(TASKS)}")
        if self.schedule not in SCHEDULES:
            raise TrainingError(f"unknown schedule {self.schedule!r}; expected one of: {', '.join(SCHEDULES)}")
        if not self.lr > 0 or (self.gate_lr is not None and not self.gate_lr > 0):
            raise TrainingError("learning rates must be positive")
        if self.warmup_steps < 0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise TrainingError("warmup_steps must be >= 0 and warmup_ratio in [0, 1)")
        if self.warmup_steps and self.warmup_ratio:
            raise TrainingError("give warmup_steps or warmup_ratio, not both")
        if self.resume and not self.out_dir and not isinstance(self.resume, (str, os.PathLike)):
            raise TrainingError("resume=True needs out_dir (the run to continue)")


class TrainReport(dict):
    """The JSON report (a dict); ``handle``, ``model`` and ``tokenizer`` ride along as attributes."""

    handle: Any = None
    model: Any = None
    tokenizer: Any = None


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
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


def encode(examples: Sequence[Example], tokenizer, task: str, *, labels: Sequence[str] | None = None,
           max_length: int = 256, use_chat_template: bool = True) -> list[Tokenized]:
    """Tokenize for ``task``; LM rows left without any target token (a prompt filling ``max_length``)
    are dropped, since they carry no loss."""
    if task == "classification":
        return encode_classification(examples, tokenizer, labels or label_set(examples), max_length)
    rows = encode_lm(examples, tokenizer, max_length, use_chat_template=use_chat_template)
    return [r for r in rows if any(t != IGNORE_INDEX for t in r.labels[1:])]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch: a permutation that depends on (seed, epoch) and nothing else."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + 17) % (2**63 - 1))
    return torch.randperm(n, generator=g).tolist()


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ModelError("the tokenizer has no pad or EOS token to pad batches with")
    return int(pad)


def _batches(rows: Sequence[Tokenized], batch_size: int, pad_id: int, device) -> Any:
    for i in range(0, len(rows), batch_size):
        b = collate(rows[i:i + batch_size], pad_id)
        yield {k: v.to(device) for k, v in b.items()}


# ------------------------------------------------------------------------------------------
# evaluation and gates
# ------------------------------------------------------------------------------------------
def macro_f1(gold: Sequence[int], pred: Sequence[int]) -> float:
    """Unweighted mean of the per-class F1 over the classes present in gold or predictions."""
    classes = sorted(set(gold) | set(pred))
    scores = []
    for c in classes:
        tp = sum(1 for g, p in zip(gold, pred) if g == c and p == c)
        fp = sum(1 for g, p in zip(gold, pred) if g != c and p == c)
        fn = sum(1 for g, p in zip(gold, pred) if g == c and p != c)
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


@torch.no_grad()
def evaluate_encoded(model: nn.Module, rows: Sequence[Tokenized], task: str, *, pad_id: int,
                     batch_size: int = 16) -> dict[str, float]:
    """Metrics of ``model`` (in eval mode, restored afterwards) on encoded rows.

    classification: ``loss`` (mean cross-entropy), ``accuracy``, ``macro_f1``;
    causal-lm: ``loss`` (mean over all target tokens), ``perplexity`` = exp(loss), ``tokens``.
    """
    if not rows:
        return {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        if task == "classification":
            gold, pred, loss_sum = [], [], 0.0
            for b in _batches(rows, batch_size, pad_id, device):
                labels = b.pop("labels")
                logits = model(**b).logits.float()
                loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
                gold += labels.tolist()
                pred += logits.argmax(-1).tolist()
            n = len(gold)
            return {"loss": loss_sum / n, "accuracy": sum(g == p for g, p in zip(gold, pred)) / n,
                    "macro_f1": macro_f1(gold, pred), "examples": n}
        loss_sum, tokens = 0.0, 0
        for b in _batches(rows, batch_size, pad_id, device):
            # The labels go into the call: a prompt-tuning rewrite lengthens the sequence and pads the
            # labels to match, so the model's own loss (the mean over target tokens) is the one to use.
            n_targets = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
            if n_targets == 0:
                continue
            loss_sum += float(model(**b).loss.float()) * n_targets
            tokens += n_targets
        loss = loss_sum / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens, "examples": len(rows)}
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, tokenizer, examples: Sequence[Example], *, task: str | None = None,
             labels: Sequence[str] | None = None, batch_size: int = 16, max_length: int = 256,
             use_chat_template: bool = True) -> dict[str, float]:
    """Tokenize ``examples`` and return :func:`evaluate_encoded`'s metrics."""
    task = task or detect_task(examples)
    rows = encode(examples, tokenizer, task, labels=labels, max_length=max_length, use_chat_template=use_chat_template)
    return evaluate_encoded(model, rows, task, pad_id=_pad_id(tokenizer), batch_size=batch_size)


def trivial_baseline(task: str, train_rows: Sequence[Tokenized], eval_rows: Sequence[Tokenized], *,
                     model: nn.Module | None = None, pad_id: int = 0, batch_size: int = 16) -> dict:
    """What a trained adapter's eval result should beat, on the same eval rows (empty without any).

    classification: always answering the training data's most frequent label (``majority``, its
    class index): its ``accuracy`` and ``macro_f1``, computed as :func:`evaluate_encoded` does.
    causal-lm: the base ``model`` before any adapter is attached (``loss``, ``perplexity``); call
    it before compiling.
    """
    if not eval_rows:
        return {}
    if task == "classification":
        counts: dict[int, int] = {}
        for r in train_rows:
            counts[r.labels] = counts.get(r.labels, 0) + 1
        majority = max(sorted(counts), key=lambda c: counts[c])  # ties: the lowest index
        gold = [r.labels for r in eval_rows]
        pred = [majority] * len(gold)
        return {"kind": "majority class", "majority": majority,
                "accuracy": sum(g == majority for g in gold) / len(gold), "macro_f1": macro_f1(gold, pred)}
    if model is None:
        return {}
    return {"kind": "untrained", **evaluate_encoded(model, eval_rows, task, pad_id=pad_id, batch_size=batch_size)}


@torch.no_grad()
def gate_means(handle, rows: Sequence[Tokenized], *, pad_id: int, batch_size: int = 16) -> dict[str, dict[int, float]]:
    """Mean gate value of every gated module at every layer over a data set: ``{module: {layer: mean}}``.

    Each example contributes one value per gate (per-token gates averaged over its real tokens,
    as :meth:`AdapterHandle.gates` does); the table is the mean over the examples. Empty when the
    adapter has no gates.
    """
    if not handle.graph.gates or not rows:
        return {}
    model = handle.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: dict[tuple[str, int], float] = defaultdict(float)
    counts: dict[tuple[str, int], int] = defaultdict(int)
    try:
        for b in _batches(rows, batch_size, pad_id, device):
            b.pop("labels", None)
            for key, v in handle.gates(b).values.items():
                sums[key] += float(v.float().sum())
                counts[key] += int(v.numel())
    finally:
        model.train(was_training)
    table: dict[str, dict[int, float]] = {}
    for (node, layer) in sorted(sums):
        table.setdefault(node, {})[layer] = sums[(node, layer)] / max(counts[(node, layer)], 1)
    return table


def gate_table_text(table: dict[str, dict[int, float]], max_columns: int = 12) -> str:
    """The gate table as text: one row per module, one column per layer; with more than
    ``max_columns`` layers (a 30-layer model would not fit a terminal) one row per layer instead."""
    if not table:
        return "(the adapter has no gates)"
    layers = sorted({l for d in table.values() for l in d})
    if len(layers) > max_columns:
        names = list(table)
        widths = [max(len(n), 6) for n in names]
        lines = ["layer   " + " ".join(f"{n:>{w}}" for n, w in zip(names, widths))]
        for l in layers:
            cells = [f"{table[n][l]:>{w}.3f}" if l in table[n] else " " * w for n, w in zip(names, widths)]
            lines.append(f"{('L' + str(l)) if l >= 0 else 'global':<7} " + " ".join(cells))
        return "\n".join(lines)
    w = max([len(n) for n in table] + [6])
    lines = [f"{'module':<{w}}  " + " ".join(f"{('L' + str(l)) if l >= 0 else 'global':>6}" for l in layers)]
    for node, d in table.items():
        lines.append(f"{node:<{w}}  " + " ".join(f"{d[l]:>6.3f}" if l in d else f"{'':>6}" for l in layers))
    return "\n".join(lines)


def plot_gates(table: dict[str, dict[int, float]], path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw the gate table as a heat map (rows: layers, columns: modules, values annotated) into a PNG.

    Uses matplotlib's Agg canvas directly, so no display and no global backend switch is needed.
    """
    if not table:
        raise UnipeltError("the adapter has no gates: nothing to plot")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is an optional extra
        raise UnipeltError("plotting needs matplotlib: pip install 'unipelt[plot]'") from e
    modules = list(table)
    layers = sorted({l for d in table.values() for l in d})
    data = [[table[m].get(l, float("nan")) for m in modules] for l in layers]
    fig = Figure(figsize=(1.6 + 1.3 * len(modules), 1.2 + 0.45 * len(layers)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(modules)), labels=modules)
    ax.set_yticks(range(len(layers)), labels=[f"layer {l}" if l >= 0 else "global" for l in layers])
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            if v == v:  # not NaN
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=9)
    fig.colorbar(im, ax=ax, label="mean gate value")
    ax.set_title(title or "gate values (mean over examples)")
    fig.tight_layout()
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, dest)
    return dest


# ------------------------------------------------------------------------------------------
# optimizer: per-group learning rates
# ------------------------------------------------------------------------------------------
def param_groups(handle, lr: float, *, gate_lr: float | None = None, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups for an adapter.

    Gates learn at ``gate_lr`` (default ``lr``). LoRA+: the ``lora_B`` of every branch whose
    node sets ``lr_ratio`` learns at ``lr_ratio × lr`` (its ``lora_A`` at ``lr``). Everything else
    at ``lr``. A node's ``lr_scale`` multiplies the rate of its non-gate parameters. Each group
    carries a ``name`` (``default``, ``gate``, ``lora_B x16``, ``lr_scale x0.1``); parameters
    keep the adapter's canonical order within a group, so an optimizer state dict reloads.
    """
    groups_by_role = handle.parameter_groups()
    gate_ids = {id(p) for p in groups_by_role.get("gate", [])}
    b_ratio: dict[int, float] = {}
    for mod in handle.branch_modules.values():
        ratio = getattr(mod, "lr_ratio", None)
        if not ratio:
            continue
        roles = getattr(mod, "param_roles", lambda: {})()
        for pname, role in roles.items():
            if role == "lora_B":
                b_ratio[id(getattr(mod, pname))] = float(ratio)
    scales = handle.lr_scales()
    groups: dict[str, dict] = {}
    for p in handle.parameters():
        if not p.requires_grad:
            continue
        if id(p) in gate_ids:
            name, plr = "gate", gate_lr if gate_lr is not None else lr
        elif id(p) in b_ratio:
            name, plr = f"lora_B x{b_ratio[id(p)]:g}", lr * b_ratio[id(p)]
        else:
            name, plr = "default", lr
        if id(p) in scales and name != "gate":
            name, plr = ("" if name == "default" else name + " ") + f"lr_scale x{scales[id(p)]:g}", plr * scales[id(p)]
        g = groups.setdefault(name, {"name": name, "params": [], "lr": plr, "weight_decay": weight_decay})
        g["params"].append(p)
    return list(groups.values())


def make_schedule(optimizer, schedule: str, total_steps: int, warmup_steps: int):
    """LambdaLR: linear warm-up from 0 over ``warmup_steps``, then linear decay to 0, cosine decay to
    0, or constant (the formulas of transformers' schedulers)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------------
# what the adapter records about its training (read back by eval, merge, export)
# ------------------------------------------------------------------------------------------
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

    info = training_info(adapter_dir)
    name = model or info.get("model")
    if not name:
        raise ModelError(f"{adapter_dir}: no base model recorded with this adapter; name the model")
    task = task or info.get("task")
    labels = list(info.get("labels") or labels or []) or None
    if task == "classification" and labels is None:
        raise ModelError(f"{adapter_dir}: the number of classes is unknown: pass data with labels")
    m, tok = load_model(str(name), task=task, num_labels=len(labels) if labels else None)
    if task == "classification" and labels:
        _name_labels(m, labels)
    m.to(_device(device))
    handle = unipelt.load(m, adapter_dir)
    if task is None:
        task = "causal-lm" if type(m).__name__.endswith(("ForCausalLM", "LMHeadModel")) else "classification"
        if task == "classification" and labels is None:
            n = int(getattr(m.config, "num_labels", 2))
            labels = [str(i) for i in range(n)]
    resolved = {**info, "model": str(name), "task": task, "labels": labels}
    return m, tok, handle, resolved


def _name_labels(model: nn.Module, labels: Sequence[str]) -> None:
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg.id2label = {i: str(l) for i, l in enumerate(labels)}
        cfg.label2id = {str(l): i for i, l in enumerate(labels)}


def _device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (those with a ``trainer_state.json``) of a run, oldest first."""
    d = Path(out_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_JSON).is_file() and (p / STATE_PT).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _save_checkpoint(out: Path, handle, optimizer, scheduler, state: dict, limit: int | None) -> Path:
    final = out / f"checkpoint-{state['step']}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=out))
    try:
        handle.save(tmp / "adapter")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
                   tmp / STATE_PT)
        with open(tmp / STATE_JSON, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2, default=str)
            f.write("\n")
        _fsync_tree(tmp)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if limit:
        for old in list_checkpoints(out)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------
# the training loop
# ------------------------------------------------------------------------------------------
def _has_head_node(spec) -> bool:
    return any(m.method == "train" and "head" in m.sites for m in spec.modules.values())


def _with_head(spec):
    """The spec plus a ``train`` node at ``head`` (named ``head``, or ``head_2``... if taken)."""
    from unipelt.spec import parse_spec

    raw = copy.deepcopy(spec.raw) if spec.raw else {"version": 1, "modules": {}}
    name, i = "head", 1
    while name in raw.get("modules", {}):
        i += 1
        name = f"head_{i}"
    raw.setdefault("modules", {})[name] = {"method": "train", "sites": "head"}
    new = parse_spec(raw)
    new.source = spec.source
    return new, name


def _model_name(name: str) -> str:
    from unipelt.models import BUILTIN

    if name in BUILTIN:
        return name
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


def train(spec, model, train_examples: Sequence[Example], eval_examples: Sequence[Example] | None = None,
          config: TrainConfig | None = None, *, tokenizer=None) -> TrainReport:
    """Train an adapter; returns the report (also written to ``out_dir/report.json``).

    ``spec``: a path, dict or parsed Spec. ``model``: a built-in name or a local model directory
    (loaded for the task, with as many labels as the data has), or an ``nn.Module`` (pass its
    ``tokenizer``; it must already have the right head). See the module docstring for the rest.
    """
    from unipelt.compiler import base_param_count, compile as _compile
    from unipelt.models import load_model
    from unipelt.spec import parse_spec

    cfg = copy.deepcopy(config) if config is not None else TrainConfig()
    cfg.check()
    spec = parse_spec(spec)  # spec errors before any model is loaded
    train_examples = list(train_examples)
    eval_examples = list(eval_examples or [])
    task = cfg.task or detect_task(train_examples)
    if task == "classification":
        for ex in train_examples + eval_examples:
            if ex.label is None:
                raise DataError(f"{ex.where()}: no label (classification needs one on every row)")
        labels = list(cfg.labels) if cfg.labels else label_set(train_examples)
        if len(labels) < 2:
            raise DataError(f"classification needs at least two labels; the data has {labels}")
        known = set(labels)
        for ex in train_examples + eval_examples:  # an eval label never trained on cannot be predicted
            if ex.label not in known:
                said = "the given labels" if cfg.labels else "the training data"
                raise DataError(f"{ex.where()}: label {ex.label!r} does not occur in {said} "
                                f"({', '.join(labels)})")
    else:
        labels = None

    out = Path(cfg.out_dir) if cfg.out_dir else None
    resume_from = _resume_point(out, cfg.resume) if cfg.resume else None
    if out is not None:
        _prepare_out_dir(out, resuming=resume_from is not None, overwrite=cfg.overwrite)

    # model ------------------------------------------------------------------------------
    if isinstance(model, (str, os.PathLike)):
        model_name = cfg.model_name or _model_name(str(model))
        try:
            net, tok = load_model(str(model), task=task, num_labels=len(labels) if labels else None)
        except ModelError as e:
            if cfg.task is None and task == "causal-lm":  # say why the task is LM: no label field was found
                raise ModelError(f"{e}; the task was taken as causal-lm because the training data has no label "
                                 "field: name the label field (--label-field) or the task (--task)") from None
            raise
    else:
        model_name = cfg.model_name or getattr(getattr(model, "config", None), "name_or_path", None) or None
        net, tok = model, tokenizer
    tok = tokenizer if tokenizer is not None else tok
    if tok is None:
        raise ModelError("training needs a tokenizer: pass tokenizer= with a model object")
    if labels:
        n_out = getattr(getattr(net, "config", None), "num_labels", None)
        if n_out is not None and n_out != len(labels):
            raise ModelError(f"the model's head has {n_out} outputs but the data has {len(labels)} labels ({', '.join(labels)})")
        _name_labels(net, labels)
    device = _device(cfg.device)
    net.to(device)

    # data (before the model is touched: a bad row leaves a caller's model as it was) ---------
    pad_id = _pad_id(tok)
    train_rows = encode(train_examples, tok, task, labels=labels, max_length=cfg.max_length,
                        use_chat_template=cfg.use_chat_template)
    if not train_rows:
        raise DataError(f"no usable training rows: every prompt fills max_length={cfg.max_length} tokens")
    eval_rows = encode(eval_examples, tok, task, labels=labels, max_length=cfg.max_length,
                       use_chat_template=cfg.use_chat_template) if eval_examples else []
    n = len(train_rows)
    micro_per_epoch = math.ceil(n / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
    fingerprint = {"examples": n, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "seed": cfg.seed,
                   "total_steps": total_steps, "task": task, "labels": labels}
    resume_state = _read_checkpoint_state(resume_from, fingerprint) if resume_from is not None else None
    if cfg.gradient_checkpointing and not getattr(net, "supports_gradient_checkpointing", False):
        raise ModelError(f"{type(net).__name__} does not support gradient checkpointing")

    # what the result is compared with: the majority class, or the base model before training
    baseline = trivial_baseline(task, train_rows, eval_rows, model=net, pad_id=pad_id,
                                batch_size=cfg.eval_batch_size or cfg.batch_size)

    # the adapter ---------------------------------------------------------------------------
    added_head = None
    if task == "classification" and not _has_head_node(spec):
        spec, added_head = _with_head(spec)
        if cfg.progress:
            print(f"note: the spec trains no head; added module {added_head!r} (method train at head) "
                  "so that the classifier learns", file=sys.stderr)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    handle = _compile(net, spec, cfg.adapter_name)
    info = {"model": model_name, "task": task, "labels": labels, "max_length": cfg.max_length,
            "use_chat_template": cfg.use_chat_template}
    if cfg.data_fields:
        info["fields"] = dict(cfg.data_fields)
    record_training_info(handle, info)

    # optimizer, controllers ---------------------------------------------------------------
    groups = param_groups(handle, cfg.lr, gate_lr=cfg.gate_lr, weight_decay=cfg.weight_decay)
    controllers = [c for res in handle.registry.hook.unipelt_training_controllers(handle=handle) or [] for c in (res or [])]
    for c in controllers:
        extra = c.param_groups(handle, cfg.lr) if hasattr(c, "param_groups") else None
        if extra:
            taken = {id(p) for g in extra for p in g["params"]}
            groups = [dict(g, params=[p for p in g["params"] if id(p) not in taken]) for g in groups]
            groups = [g for g in groups if g["params"]] + list(extra)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_schedule(optimizer, cfg.schedule, total_steps, warmup)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]

    if cfg.gradient_checkpointing:
        enable = getattr(net, "activation_checkpointing_enable", None) or getattr(net, "gradient_checkpointing_enable")
        kw = "activation_checkpointing_kwargs" if enable.__name__.startswith("activation") else "gradient_checkpointing_kwargs"
        enable(**{kw: {"use_reentrant": False}})
    use_cache = getattr(getattr(net, "config", None), "use_cache", None)
    if use_cache is not None:
        net.config.use_cache = False  # no KV cache while training (and none with checkpointing)

    # resume -------------------------------------------------------------------------------
    step, epoch0, group0, history, partial = 0, 0, 0, [], (0.0, 0)
    if resume_from is not None:
        step, epoch0, group0, history, partial = _load_checkpoint(resume_from, resume_state, handle, optimizer, scheduler)

    # loop ---------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not cfg.progress, dynamic_ncols=True)
    step_times: list[float] = []
    examples_seen, t_start = 0, time.perf_counter()
    last_saved = None
    net.train()
    try:
        for epoch in range(epoch0, n_epochs):
            if step >= total_steps:
                break
            order = epoch_order(n, cfg.seed, epoch)
            micro = [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
            accum_groups = [micro[i:i + cfg.grad_accum] for i in range(0, len(micro), cfg.grad_accum)]
            # resumed in the middle of an epoch: its loss so far came with the checkpoint
            epoch_loss, epoch_steps = partial if epoch == epoch0 else (0.0, 0)
            gi = group0 if epoch == epoch0 else 0
            while gi < len(accum_groups) and step < total_steps:
                t0 = time.perf_counter()
                step_loss = 0.0
                for idx in accum_groups[gi]:
                    batch = {k: v.to(device) for k, v in collate([train_rows[i] for i in idx], pad_id).items()}
                    outputs = net(**batch)
                    loss = outputs.loss
                    for c in controllers:
                        if hasattr(c, "regularizer"):
                            loss = loss + c.regularizer()
                    (loss / len(accum_groups[gi])).backward()
                    step_loss += float(loss.detach()) / len(accum_groups[gi])
                    examples_seen += len(idx)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                gi += 1
                for c in controllers:
                    if hasattr(c, "on_step"):
                        c.on_step(step, step_loss)
                step_times.append(time.perf_counter() - t0)
                epoch_loss += step_loss
                epoch_steps += 1
                elapsed = time.perf_counter() - t_start
                bar.set_postfix(loss=f"{step_loss:.4f}", ex_s=_rate(examples_seen, elapsed),
                                epoch=epoch + 1, refresh=False)
                bar.update(1)
                if out is not None and cfg.save_steps and step % cfg.save_steps == 0 and gi < len(accum_groups):
                    state = _state_json(step, epoch, gi, history, fingerprint, total_steps, epoch_loss, epoch_steps)
                    _save_checkpoint(out, handle, optimizer, scheduler, state, cfg.save_total_limit)
                    last_saved = step
            complete = gi >= len(accum_groups)
            metrics = evaluate_encoded(net, eval_rows, task, pad_id=pad_id,
                                       batch_size=cfg.eval_batch_size or cfg.batch_size) if eval_rows else {}
            entry = {"epoch": epoch + 1, "step": step, "complete": complete,
                     "train_loss": epoch_loss / epoch_steps if epoch_steps else None, "eval": metrics}
            history.append(entry)
            if cfg.progress:
                bar.write(_epoch_line(entry, task))
            if out is not None:
                if complete:
                    state = _state_json(step, epoch + 1, 0, history, fingerprint, total_steps, 0.0, 0)
                else:  # stopped by max_steps: nothing follows, but keep the position exact
                    state = _state_json(step, epoch, gi, history[:-1], fingerprint, total_steps, epoch_loss, epoch_steps)
                _save_checkpoint(out, handle, optimizer, scheduler, state, cfg.save_total_limit)
                last_saved = step
    finally:
        bar.close()
        if use_cache is not None:
            net.config.use_cache = use_cache
    wall = time.perf_counter() - t_start

    # the end: gates, final adapter, report --------------------------------------------------
    net.eval()
    gate_rows = eval_rows or train_rows
    gates = gate_means(handle, gate_rows, pad_id=pad_id, batch_size=cfg.eval_batch_size or cfg.batch_size)
    summary = handle.summary(base_param_count(net))
    report = TrainReport({
        "model": model_name,
        "task": task,
        "labels": labels,
        "max_length": cfg.max_length,
        "spec": spec.raw,
        "spec_source": spec.source,
        "added_head": added_head,
        "data": {"train": n, "train_dropped": len(train_examples) - n, "eval": len(eval_rows)},
        "config": {k: v for k, v in asdict(cfg).items()},
        "steps": step,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "epochs": history,
        "final_eval": history[-1]["eval"] if history else {},
        "baseline": baseline,
        "params": {
            "trainable": sum(p.numel() for p in trainable),
            "kept": summary.kept,
            "training": summary.training,
            "base": summary.base_params,
            "percent_of_base": 100.0 * summary.kept / max(summary.base_params, 1),
            "per_module": summary.per_module(),
        },
        "time": {
            "wall_s": wall,
            "steps_timed": len(step_times),
            "per_step_s": statistics.fmean(step_times) if step_times else None,
            "per_step_median_s": statistics.median(step_times) if step_times else None,
            "examples_per_s": examples_seen / wall if wall > 0 and examples_seen else None,
        },
        "gates": {m: {str(l): v for l, v in d.items()} for m, d in gates.items()},
        "gate_data": "eval" if eval_rows else "train",
        "resumed_from": str(resume_from) if resume_from else None,
        "param_groups": [{"name": g.get("name", f"group {i}"), "lr": g["initial_lr"] if "initial_lr" in g else g["lr"],
                          "parameters": sum(p.numel() for p in g["params"])}
                         for i, g in enumerate(optimizer.param_groups)],
        "adapter": None,
        "last_checkpoint": str(out / f"checkpoint-{last_saved}") if out is not None and last_saved else None,
    })
    if out is not None:
        dropped = handle.drop_reparameterization()
        report["params"]["dropped_reparameterization"] = dropped
        report["adapter"] = str(handle.save(out / "adapter"))
        _atomic_json(out / REPORT_FILE, report)
    report.handle, report.model, report.tokenizer = handle, net, tok
    return report


def _rate(count: int, seconds: float) -> str:
    """Throughput for the progress bar, three significant digits: a slow real model on CPU
    (0.05 examples/s) must not read 0.0."""
    r = count / max(seconds, 1e-9)
    return f"{r:.0f}" if r >= 100 else f"{r:.3g}"


def _state_json(step, epoch, group, history, fingerprint, total_steps, epoch_loss, epoch_steps) -> dict:
    return {"step": step, "epoch": epoch, "group_in_epoch": group, "total_steps": total_steps,
            "history": history, "epoch_loss_sum": epoch_loss, "epoch_steps": epoch_steps,
            "fingerprint": fingerprint}


def _epoch_line(entry: dict, task: str) -> str:
    parts = [f"epoch {entry['epoch']}", f"step {entry['step']}"]
    if entry.get("train_loss") is not None:
        parts.append(f"train loss {entry['train_loss']:.4f}")
    m = entry.get("eval") or {}
    if task == "classification" and m:
        parts += [f"eval loss {m['loss']:.4f}", f"accuracy {m['accuracy']:.4f}", f"macro-F1 {m['macro_f1']:.4f}"]
    elif m:
        parts += [f"eval loss {m['loss']:.4f}", f"perplexity {m['perplexity']:.2f}"]
    return "  ".join(parts)


def _prepare_out_dir(out: Path, *, resuming: bool, overwrite: bool) -> None:
    previous = list_checkpoints(out) + [p for p in (out / "adapter", out / REPORT_FILE) if p.exists()]
    previous += [p for p in out.glob("checkpoint-*")] if out.is_dir() else []
    if previous and not resuming:
        if not overwrite:
            raise TrainingError(f"{out}: holds an earlier training run ({previous[0].name}); "
                                "resume it (--resume) or start again (--overwrite)")
        for p in set(previous):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _resume_point(out: Path | None, resume) -> Path:
    if resume is True or resume == "latest":
        found = list_checkpoints(out) if out is not None else []
        if not found:
            raise TrainingError(f"{out}: no checkpoint to resume from (checkpoint-N with {STATE_JSON} and {STATE_PT})")
        return found[-1]
    p = Path(resume)
    if not (p / STATE_JSON).is_file() or not (p / STATE_PT).is_file() or not (p / "adapter").is_dir():
        raise TrainingError(f"{p}: not a complete checkpoint (needs adapter/, {STATE_JSON} and {STATE_PT})")
    return p


def _read_checkpoint_state(ckpt: Path, fingerprint: dict) -> dict:
    try:
        state = json.loads((ckpt / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TrainingError(f"{ckpt / STATE_JSON}: unreadable ({e})") from None
    saved = state.get("fingerprint", {})
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in fingerprint.items() if saved.get(k) != v]
    if diffs:
        raise TrainingError(f"{ckpt}: this checkpoint belongs to a different run ({'; '.join(diffs)}); "
                            "resume with the same data, batch size, accumulation, steps and seed")
    return state


def _load_checkpoint(ckpt: Path, state: dict, handle, optimizer, scheduler):
    from safetensors.torch import load_file

    from unipelt.handle import WEIGHTS_FILE

    weights = ckpt / "adapter" / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights))
    except Exception as e:
        raise AdapterFileError(f"{weights}: unreadable ({e})") from None
    handle.load_state_dict(tensors, source=str(weights))
    blob = torch.load(ckpt / STATE_PT, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    _set_rng_state(blob["rng"])
    partial = (float(state.get("epoch_loss_sum", 0.0)), int(state.get("epoch_steps", 0)))
    return int(state["step"]), int(state["epoch"]), int(state["group_in_epoch"]), list(state.get("history", [])), partial


# ------------------------------------------------------------------------------------------
# transformers.Trainer
# ------------------------------------------------------------------------------------------
try:
    from transformers import TrainerCallback as _CallbackBase
except Exception:  # pragma: no cover - transformers is a dependency, Trainer needs accelerate
    _CallbackBase = object


class UnipeltCallback(_CallbackBase):
    """Save a unipelt adapter from ``transformers.Trainer``.

    At each of Trainer's save steps the adapter goes to ``out_dir/checkpoint-N/adapter`` (next to
    Trainer's own checkpoint files when ``out_dir`` is the Trainer's ``output_dir``); at the end of
    training to ``out_dir/adapter``. ``out_dir`` defaults to ``args.output_dir``. Pass
    ``drop_reparameterization=True`` to drop training-only parameters (the prefix MLP) before the
    final save; checkpoints always keep them.

        handle = unipelt.compile(model, spec)
        trainer = Trainer(model=model, args=TrainingArguments(out, report_to=[]), train_dataset=rows,
                          data_collator=collate_fn, callbacks=[UnipeltCallback(handle, out)])
        trainer.train()
    """

    def __init__(self, handle, out_dir: str | os.PathLike | None = None, *, drop_reparameterization: bool = False):
        self.handle = handle
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.drop = drop_reparameterization
        self.saved: list[Path] = []

    def _root(self, args) -> Path:
        return self.out_dir if self.out_dir is not None else Path(args.output_dir)

    def on_save(self, args, state, control, **kwargs):
        if getattr(state, "is_world_process_zero", True):
            dest = self._root(args) / f"checkpoint-{state.global_step}" / "adapter"
            self.saved.append(self.handle.save(dest))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if getattr(state, "is_world_process_zero", True):
            if self.drop:
                was = self.handle.model.training
                self.handle.model.eval()
                self.handle.drop_reparameterization()
                self.handle.model.train(was)
            self.saved.append(self.handle.save(self._root(args) / "adapter"))
        return control


__all__ = [
    "TrainConfig", "TrainReport", "TrainingError", "train", "evaluate", "evaluate_encoded", "load_data", "encode",
    "detect_task", "epoch_order", "param_groups", "trivial_baseline", "make_schedule", "gate_means", "gate_table_text", "plot_gates",
    "UnipeltCallback", "load_adapted", "training_info", "record_training_info", "list_checkpoints", "macro_f1",
]
