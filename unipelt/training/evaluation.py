"""Evaluation of an adapted model (accuracy and macro-F1, or loss and perplexity) and its gate
statistics over a data set (the table and the heat map of ``unipelt gates``)."""
from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from unipelt.data import IGNORE_INDEX, Example, Tokenized
from unipelt.errors import UnipeltError
from unipelt.training.inputs import batches, check_max_length, detect_task, encode
from unipelt.training.inputs import pad_id as _tokenizer_pad


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
            for b in batches(rows, batch_size, pad_id, device):
                labels = b.pop("labels")
                logits = model(**b).logits.float()
                loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
                gold += labels.tolist()
                pred += logits.argmax(-1).tolist()
            n = len(gold)
            return {"loss": loss_sum / n, "accuracy": sum(g == p for g, p in zip(gold, pred)) / n,
                    "macro_f1": macro_f1(gold, pred), "examples": n}
        loss_sum, tokens = 0.0, 0
        for b in batches(rows, batch_size, pad_id, device):
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



def evaluate(model: nn.Module, tokenizer, examples: Sequence[Example], *, task: str | None = None,
             labels: Sequence[str] | None = None, batch_size: int = 16, max_length: int = 256,
             use_chat_template: bool = True) -> dict[str, float]:
    """Tokenize ``examples`` and return :func:`evaluate_encoded`'s metrics."""
    task = task or detect_task(examples)
    check_max_length(model, max_length)
    rows = encode(examples, tokenizer, task, labels=labels, max_length=max_length, use_chat_template=use_chat_template)
    return evaluate_encoded(model, rows, task, pad_id=_tokenizer_pad(tokenizer), batch_size=batch_size)


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
        for b in batches(rows, batch_size, pad_id, device):
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
