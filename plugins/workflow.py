"""The training workflow on the command line: ``train``, ``eval``, ``gates``, ``merge``, ``export``.

    unipelt train SPEC MODEL --data TRAIN [--eval EVAL] --out DIR [options]
    unipelt eval ADAPTER [MODEL] --data DATA [--json]
    unipelt gates ADAPTER [MODEL] --data DATA [--plot gates.png] [--json]
    unipelt merge ADAPTER [MODEL] --out DIR
    unipelt export ADAPTER --format peft --out DIR [--model MODEL]

DATA is a ``.jsonl``/``.csv``/``.tsv`` file (fields chosen with ``--text-field``, ``--label-field``,
``--prompt-field``, ``--response-field``) or a built-in data set, ``NAME`` or ``NAME:SPLIT``
(``drugreview``, ``drugreview:dev``, ``drugreview:test``, ``chatterbot``, ``chatterbot:test``).
The task follows from the data (labels: classification; prompt/response or text: causal LM)
unless ``--task`` says it. ``eval``, ``gates``, ``merge`` and ``export`` take the model, label
order, task, field names, chat-template choice and max length that training recorded in the
adapter (``unipelt.json``, key ``workflow``) unless a flag or MODEL says otherwise.

This plugin also records, on every save of an adapter trained by :func:`unipelt.train.train`, the
training facts (model, task, labels, max length, fields) under ``workflow`` in ``unipelt.json``.
"""
from __future__ import annotations

import argparse
import json

from unipelt.hookspecs import hookimpl


@hookimpl
def unipelt_adapter_saved(handle, path, metadata):
    from unipelt.train import recorded_training_info

    info = recorded_training_info(handle)
    if info is not None:
        metadata["workflow"] = json.loads(json.dumps(info, default=str))


# ------------------------------------------------------------------------------------------
# shared options
# ------------------------------------------------------------------------------------------
FIELDS = {"text": "text", "label": "label", "prompt": "prompt", "response": "response"}  # the defaults


def _data_options(p: argparse.ArgumentParser, *, trained: bool = False) -> None:
    g = p.add_argument_group("data")
    default = "the one used in training, else {}" if trained else "{}"
    g.add_argument("--format", choices=("jsonl", "csv", "tsv"), help="file format (default: from the extension)")
    g.add_argument("--text-field", help=f"field (column) holding the text (default: {default.format('text')})")
    g.add_argument("--label-field", help=f"field holding the class label (default: {default.format('label')})")
    g.add_argument("--prompt-field", help=f"field holding the prompt of a pair (default: {default.format('prompt')})")
    g.add_argument("--response-field", help=f"field holding the response (default: {default.format('response')})")
    g.add_argument("--task", choices=("classification", "causal-lm"),
                   help="the one used in training" if trained else
                   "default: from the data (a label field: classification; prompt/response or text: causal-lm)")
    g.add_argument("--no-chat-template", dest="chat_template", action="store_false", default=None,
                   help="format prompt/response pairs as 'prompt\\nresponse' even if the tokenizer has a chat template"
                        + (" (default: as in training)" if trained else ""))


def _fields(args, recorded: dict | None = None) -> dict[str, str]:
    """Field names: the flags, else the ones recorded at training, else the defaults."""
    recorded = recorded or {}
    return {k: getattr(args, f"{k}_field") or recorded.get(k) or v for k, v in FIELDS.items()}


def _read(value: str, args, task: str | None, fields: dict[str, str]):
    from unipelt.train import load_data

    kind = {"classification": "classification", "causal-lm": "lm"}.get(task or "", "auto")
    return load_data(value, kind=kind, format=args.format, text_field=fields["text"], label_field=fields["label"],
                     prompt_field=fields["prompt"], response_field=fields["response"])


def _print_metrics(metrics: dict, task: str) -> None:
    if task == "classification":
        print(f"examples   {metrics['examples']}")
        print(f"accuracy   {metrics['accuracy']:.4f}")
        print(f"macro-F1   {metrics['macro_f1']:.4f}")
        print(f"loss       {metrics['loss']:.4f}")
    else:
        print(f"examples   {metrics['examples']}")
        print(f"tokens     {metrics['tokens']}")
        print(f"loss       {metrics['loss']:.4f}")
        print(f"perplexity {metrics['perplexity']:.3f}")


# ------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from unipelt.spec import parse_spec
    from unipelt.train import TrainConfig, train

    spec = parse_spec(args.spec)  # spec errors first
    fields = _fields(args)
    train_rows = _read(args.data, args, args.task, fields)
    eval_rows = _read(args.eval, args, args.task, fields) if args.eval else []
    cfg = TrainConfig(
        out_dir=args.out, task=args.task, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, grad_accum=args.grad_accum, max_length=args.max_length,
        max_steps=args.max_steps, warmup_steps=args.warmup_steps, warmup_ratio=args.warmup_ratio,
        schedule=args.schedule, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else None, gate_lr=args.gate_lr,
        seed=args.seed, gradient_checkpointing=args.gradient_checkpointing, save_steps=args.save_steps,
        save_total_limit=args.save_total_limit or None, resume=args.resume or False, overwrite=args.overwrite,
        use_chat_template=args.chat_template is not False, progress=not args.no_progress, device=args.device,
        compile=args.compile, precision=args.precision, data_fields=fields, distributed=args.distributed,
        quantize=args.quantize, optim=args.optim,
    )
    report = train(spec, args.model, train_rows, eval_rows, cfg)
    if (report.get("distributed") or {}).get("rank", 0) != 0:
        return 0  # under torchrun/accelerate every process trains; rank 0 prints the result
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"task          {report['task']}" + (f" ({len(report['labels'])} labels: {', '.join(report['labels'])})"
                                                if report["labels"] else ""))
    if args.no_progress:  # with progress on, train() printed its notes as they came
        for text in report["notes"]:
            print(f"note          {text}")
    p = report["params"]
    # a random drop trains its inference layers in the steps that do not draw them
    at_inference = ((report.get("controllers") or {}).get("adapterdrop") or {}).get("random") not in (None, False)
    dropped_note = ""
    if p.get("dropped"):
        dropped_note = (f"; {p['dropped']:,} of them in AdapterDrop's fixed layers, saved but not computed"
                        + (" at inference" if at_inference else ""))
    print(f"trainable     {p['trainable']:,} parameters ({p['kept']:,} kept after training, "
          f"{p['percent_of_base']:.3f}% of the base{dropped_note})")
    # what gate pruning and AdapterDrop decided: in the progress output only while it is shown,
    # so a --no-progress run said nothing of it outside report.json
    ctl = report.get("controllers") or {}
    pruned = (ctl.get("prune") or {}).get("pruned") or []
    if pruned:
        shown = ", ".join(pruned[:8]) + (f", ... ({len(pruned) - 8} more)" if len(pruned) > 8 else "")
        print(f"pruned        {len(pruned)} branch(es) during training ({ctl['prune']['active_params']:,} parameters "
              f"active): {shown}; events in report.json (controllers.prune)")
    drop = ctl.get("adapterdrop") or {}
    dropped = drop.get("inference_layers") or []
    if dropped:
        # the spec's fixed layers are dropped in training too; a random drop's training choice varied
        fixed = drop.get("random") is False and not drop.get("ranking")
        print(f"adapterdrop   layers {', '.join(map(str, dropped))} dropped "
              + ("in training and at inference (the spec's drop.layers)" if fixed
                 else "at inference (saved in the adapter's spec)"))
    if report["resumed_from"]:
        print(f"resumed from  {report['resumed_from']}")
    if report["compile"]["mode"]:
        c = report["compile"]
        print(f"compiled      torch.compile mode {c['mode']} (backend {c['backend']})"
              + (f"; fell back to eager: {c['fallback']}" if c["fallback"] else ""))
    ex = report.get("executor") or {}
    if ex.get("choice") not in (None, "auto"):
        groups = ex.get("groups") or {}
        print(f"executor      {ex['choice']} ({sum(groups.values())} fusion groups: "
              + ", ".join(f"{n} {name}" for name, n in sorted(groups.items())) + ")")
    if report.get("precision") == "bf16":
        print("precision     bf16 autocast (weights, adapter and optimizer state in fp32)")
    median = report["time"]["per_step_median_s"]
    print(f"steps         {report['steps']} " + (f"({median:.3f} s/step median)" if median is not None
                                                 else "(none run now: the checkpoint was already at the end)"))
    for e in report["epochs"]:
        m = e["eval"]
        line = f"epoch {e['epoch']:<3}     train loss {e['train_loss']:.4f}" if e["train_loss"] is not None else f"epoch {e['epoch']}"
        if m and report["task"] == "classification":
            line += f"  eval accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  loss {m['loss']:.4f}"
        elif m:
            line += f"  eval loss {m['loss']:.4f}  perplexity {m['perplexity']:.3f}"
        print(line)
    b = report.get("baseline") or {}
    if b.get("kind") == "majority class":
        print(f"baseline      always {report['labels'][b['majority']]!r} (the training majority): "
              f"eval accuracy {b['accuracy']:.4f}  macro-F1 {b['macro_f1']:.4f}")
    elif b:
        print(f"baseline      the model before training: eval loss {b['loss']:.4f}  perplexity {b['perplexity']:.3f}")
    if report["gates"]:
        from unipelt.train import gate_table_text

        table = {mod: {int(l): v for l, v in d.items()} for mod, d in report["gates"].items()}
        print(f"gates (mean over the {report['gate_data']} data)")
        print("  " + gate_table_text(table).replace("\n", "\n  "))
    print(f"adapter       {report['adapter']}")
    print(f"report        {args.out}/report.json")
    return 0


# ------------------------------------------------------------------------------------------
# eval / gates
# ------------------------------------------------------------------------------------------
def _adapted(args, data, *, inputs_only: bool = False):
    """The recorded (or named) model with the adapter attached. ``inputs_only`` (collapse, gates:
    the model's inputs are all they read): a classifier's rows need no label, and carry its first
    class as a placeholder for the encoder (``data`` is updated in place)."""
    import dataclasses

    from unipelt.data import label_set
    from unipelt.errors import DataError
    from unipelt.train import detect_task, load_adapted

    task = args.task
    labels = label_set(data) if (task or detect_task(data)) == "classification" else None
    if inputs_only and labels is not None and any(ex.label is None for ex in data):
        labels = None  # some rows unlabelled: the head's own classes, not the data's
    model, tok, handle, info = load_adapted(args.adapter, args.model, task=task, labels=labels, device=args.device)
    if info["task"] == "classification" and inputs_only:
        data[:] = [dataclasses.replace(ex, label=info["labels"][0]) for ex in data]
    elif info["task"] == "classification":
        known = set(info.get("labels") or [])
        for ex in data:
            if ex.label is None:
                raise DataError(f"{args.data}: line {ex.line}: no label; the adapter is a classifier")
            if ex.label not in known:
                raise DataError(f"{args.data}: line {ex.line}: label {ex.label!r} is not one the adapter was "
                                f"trained on ({', '.join(info['labels'])})")
    return model, tok, handle, info


def _read_for_adapter(args):
    """The data of ``eval``/``gates``, read with the field names and task recorded at training unless
    the flags say otherwise."""
    from unipelt.train import training_info

    # the adapter's unipelt.json first: a missing, empty or unreadable one is an adapter error
    # (exit 4), not a "field 'text' missing" data error from reading with the default field names
    info = training_info(args.adapter)
    data = _read(args.data, args, args.task or info.get("task"), _fields(args, info.get("fields")))
    chat = args.chat_template if args.chat_template is not None else info.get("use_chat_template", True) is not False
    return data, chat


def _default_length(model) -> int:
    """``--max-length`` when neither the flag nor the training record gives one: 256, or the
    model's position table where that is shorter (a 130-position RoBERTa holds 129), since the
    user never asked for 256 and check_max_length would refuse it."""
    from unipelt.training.inputs import position_limit

    limit = position_limit(model)
    return 256 if limit is None else min(256, limit)


def cmd_eval(args: argparse.Namespace) -> int:
    from unipelt.train import evaluate

    data, chat = _read_for_adapter(args)
    model, tok, handle, info = _adapted(args, data)
    task = info["task"]
    metrics = evaluate(model, tok, data, task=task, labels=info.get("labels"), batch_size=args.batch_size,
                       max_length=args.max_length or info.get("max_length") or _default_length(model),
                       use_chat_template=chat)
    if args.json:
        print(json.dumps({"adapter": args.adapter, "model": info.get("model"), "task": task, **metrics}, indent=2))
    else:
        print(f"adapter    {args.adapter}")
        print(f"task       {task}")
        _print_metrics(metrics, task)
    return 0


PLOT_FILE = "PNG file"


def cmd_gates(args: argparse.Namespace) -> int:
    from unipelt import io
    from unipelt.errors import UnipeltError
    from unipelt.train import _pad_id, encode, gate_means, gate_table_text, plot_gates

    if args.plot:  # refused before any model is loaded; an existing PNG is replaced, any other file kept
        io.check_output_path(args.plot, kind="file", what=PLOT_FILE, replaces=io.is_png)
    data, chat = _read_calibration(args)  # gate values need the inputs only, as collapse's
    model, tok, handle, info = _adapted(args, data, inputs_only=True)
    from unipelt.training.inputs import check_max_length

    max_length = args.max_length or info.get("max_length") or _default_length(model)
    check_max_length(model, max_length)  # else an IndexError inside the position embeddings
    rows = encode(data, tok, info["task"], labels=info.get("labels"),
                  max_length=max_length, use_chat_template=chat)
    table = gate_means(handle, rows, pad_id=_pad_id(tok), batch_size=args.batch_size)
    if not table:
        raise UnipeltError(f"{args.adapter}: the adapter has no gated module, so there are no gate values")
    if args.plot:
        with io.atomic_output(args.plot, kind="file", what=PLOT_FILE, replaces=io.is_png) as staged:
            plot_gates(table, staged, title=f"gate values, mean over {len(rows)} examples")
    if args.json:
        print(json.dumps({"examples": len(rows), "gates": {m: {str(l): v for l, v in d.items()} for m, d in table.items()},
                          "plot": args.plot}, indent=2))
    else:
        print(f"gate values per module and layer (mean over {len(rows)} examples)")
        print(gate_table_text(table))
        if args.plot:
            print(f"\nheat map written to {args.plot}")
    return 0


# ------------------------------------------------------------------------------------------
# collapse
# ------------------------------------------------------------------------------------------
def _read_calibration(args):
    """Calibration data for ``collapse`` and ``gates``: the model's inputs only. For a classifier whose labels
    training recorded, rows need no label and any label is accepted (read as plain text: a file
    of unlabelled text used to be refused with "missing field 'label'"); the rows carry the first
    class as a placeholder for the encoder, and the labels are never used."""
    import dataclasses

    from unipelt.train import training_info

    info = training_info(args.adapter)
    labels = info.get("labels") or []
    if (args.task or info.get("task")) != "classification" or not labels:
        return _read_for_adapter(args)
    data = _read(args.data, args, "causal-lm", _fields(args, info.get("fields")))  # the text field only
    return [dataclasses.replace(ex, label=labels[0]) for ex in data], True


def _number(text: str, ok, what: str, kind=float):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value != value or not ok(value):  # NaN fails every comparison
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


# collapse's thresholds: a negative tolerance or a --closed of 2 (which prunes every branch) was
# taken as given, and --max-examples 0 silently meant all of them
def _gate_value(text: str) -> float:
    return _number(text, lambda v: 0.0 <= v <= 1.0, "a gate value in [0, 1]")


def _non_negative(text: str) -> float:
    return _number(text, lambda v: 0.0 <= v < float("inf"), "a finite number >= 0")


def _positive_int(text: str) -> int:
    return _number(text, lambda v: v >= 1, "a positive integer", kind=int)


def cmd_collapse(args: argparse.Namespace) -> int:
    """Collapse a gated adapter on calibration data (unipelt.collapse) and save it to --out."""
    from pathlib import Path

    from unipelt import io
    from unipelt.collapse import CollapseError, forward_times
    from unipelt.errors import OutputError
    from unipelt.state import get_state
    from unipelt.train import record_training_info
    from unipelt.training.inputs import batches, check_max_length, encode, pad_id

    dest = io.check_output_path(args.out, kind="dir", what="unipelt adapter directory", replaces=io.is_adapter_dir)
    src = Path(args.adapter)
    if src.exists() and src.resolve() == dest.resolve():
        # collapse is lossy (closed branches pruned, gates replaced by constants, the prefix MLP dropped):
        # written over its input, the gated adapter would be gone
        raise OutputError(f"{dest}: --out is the adapter being collapsed; collapse prunes and folds, so the gated "
                          "adapter would be lost: write the collapsed one to another folder; nothing written",
                          path=str(dest))
    data, chat = _read_calibration(args)
    if args.max_examples:
        data = data[:args.max_examples]
    model, tok, handle, info = _adapted(args, data, inputs_only=True)
    max_length = args.max_length or info.get("max_length") or _default_length(model)
    check_max_length(model, max_length)
    rows = encode(data, tok, info["task"], labels=info.get("labels"), max_length=max_length, use_chat_template=chat)
    device = next(model.parameters()).device
    calib = []
    for b in batches(rows, args.batch_size, pad_id(tok), device):
        b.pop("labels", None)
        calib.append(b)
    model.eval()
    state = get_state(model)
    active = set(state.ctx.active)

    def base() -> None:
        state.set_active(set())  # the base model alone

    def adapted() -> None:
        state.set_active(active)

    # each variant timed in rounds interleaved with the base model's, and its ratio taken against
    # the base rounds it was interleaved with (timed one after the other, a shared machine once
    # made the base model look slower than the gated one)
    before = forward_times(model, calib, {"base": base, "gated": adapted})
    adapted()
    try:
        rep = handle.collapse(calib, closed=args.closed, spread=args.spread, tolerance=args.tolerance,
                              merge=not args.no_merge)
    except CollapseError as e:
        # the API's message names collapse's keyword arguments; the command's user sets its flags
        raise CollapseError(f"{args.adapter}: {e.what}; nothing written", cli=True) from None
    after = forward_times(model, calib, {"base": base, "collapsed": adapted})
    adapted()
    # the collapsed adapter keeps what training recorded (model, task, labels, field names, max
    # length), so eval, gates and a second collapse need no repeated flags, as on the original
    record_training_info(handle, info)
    handle.save(dest)
    t_base, t_gated, t_collapsed = before["base"], before["gated"], after["collapsed"]
    gated_x, collapsed_x = t_gated / max(t_base, 1e-12), t_collapsed / max(after["base"], 1e-12)
    result = dict(rep.to_dict(), adapter=args.adapter, out=str(dest), examples=len(rows),
                  seconds={"base": t_base, "gated": t_gated, "collapsed": t_collapsed},
                  base_seconds_with_collapsed=after["base"], gated_over_base=gated_x, collapsed_over_base=collapsed_x)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"calibration   {len(rows)} examples of {args.data}")
    print(f"pruned        {len(rep.pruned)} branch(es) whose gate stays <= {args.closed:g}: {', '.join(rep.pruned) or '-'}")
    print(f"constant      {len(rep.constant)} gate(s) varying <= {args.spread:g}: "
          + (", ".join(f"{k}={v[0]:.3f}" if len(v) == 1 else f"{k}={v}" for k, v in rep.constant.items()) or "-"))
    print(f"merged        {len(rep.merged)} branch(es) folded into the base weights")
    print(f"still gated   {len(rep.kept_gates)} gate(s)")
    print(f"output diff   max |gated - collapsed| = {rep.max_abs_diff:.3g} (outputs up to {rep.ref_max_abs:.3g})"
          + (f", tolerance {args.tolerance:g}" if args.tolerance is not None else ""))
    print(f"parameters    {rep.params_before:,} -> {rep.params_after:,} kept"
          + (f" ({rep.merged_params:,} of them in merged LoRA: no inference cost, saved to unmerge)"
             if rep.merged_params else "")
          + (f" (and {rep.dropped_reparameterization:,} training-only dropped)" if rep.dropped_reparameterization else ""))
    # each ratio beside the base time it is taken against: the two sets of rounds differ
    print(f"forward       gated {t_gated * 1e3:.2f} ms ({gated_x:.2f}x base: {t_base * 1e3:.2f} ms in the same rounds), "
          f"collapsed {t_collapsed * 1e3:.2f} ms ({collapsed_x:.2f}x base: {after['base'] * 1e3:.2f} ms in the same rounds) "
          "per pass over the calibration data (each variant timed interleaved with the base model)")
    print(f"adapter       {dest}")
    return 0


# ------------------------------------------------------------------------------------------
# merge / export
# ------------------------------------------------------------------------------------------
def cmd_merge(args: argparse.Namespace) -> int:
    from unipelt.export import merge_adapter

    dest = merge_adapter(args.adapter, args.model, args.out)
    print(f"merged model written to {dest} (load it with transformers' AutoModel...from_pretrained)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from unipelt.export import export_peft

    dest = export_peft(args.adapter, args.out, model=args.model)
    print(f"PEFT LoRA adapter written to {dest} (load it with peft.PeftModel.from_pretrained(base_model, {str(dest)!r}))")
    return 0


# ------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------
@hookimpl
def unipelt_add_commands(subparsers):
    from unipelt.models import BUILTIN

    models_help = "a local Hugging Face model directory, or a built-in name: " + ", ".join(BUILTIN)
    data_help = ("a .jsonl/.csv/.tsv file, or a built-in data set NAME or NAME:SPLIT "
                 "(drugreview, drugreview:dev, drugreview:test, chatterbot, chatterbot:test)")

    t = subparsers.add_parser("train", help="train an adapter (classification or causal LM) and save it",
                              description="Train SPEC on MODEL. Writes DIR/adapter, DIR/report.json and "
                                          "DIR/checkpoint-N (resumable with --resume).")
    t.add_argument("spec", help="spec file (YAML or JSON)")
    t.add_argument("model", help=models_help)
    t.add_argument("--data", required=True, help="training data: " + data_help)
    t.add_argument("--eval", help="evaluation data, evaluated after every epoch (same forms as --data)")
    t.add_argument("--out", required=True, help="run directory")
    _data_options(t)
    o = t.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    o.add_argument("--gate-lr", type=float, help="learning rate of the gates (default: --lr)")
    o.add_argument("--epochs", type=int, default=3, help="epochs (default: 3)")
    o.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    o.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch (default: 8)")
    o.add_argument("--eval-batch-size", type=int, help="default: --batch-size")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    o.add_argument("--max-length", type=int, default=256, help="tokens per row; longer rows are cut (default: 256)")
    w = o.add_mutually_exclusive_group()
    w.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default: 0)")
    w.add_argument("--warmup-ratio", type=float, default=0.0, help="warm-up as a fraction of all steps")
    o.add_argument("--schedule", choices=("linear", "cosine", "constant"), default="linear",
                   help="learning-rate schedule after warm-up (default: linear)")
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 turns it off (default: 1)")
    o.add_argument("--seed", type=int, default=0, help="seeds the adapter's initialisation and the data order (default: 0)")
    o.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    o.add_argument("--quantize", choices=("nf4", "fp4", "int8"),
                   help="load the base in 4-bit (nf4, fp4: QLoRA) or 8-bit through bitsandbytes (default: as saved)")
    o.add_argument("--optim", choices=("adamw", "adamw8bit", "paged_adamw8bit"), default="adamw",
                   help="optimizer: torch AdamW, or bitsandbytes' 8-bit-state AdamW (paged: CUDA only) (default: adamw)")
    o.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    o.add_argument("--compile", choices=("auto", "off", "default", "reduce-overhead"), default="auto",
                   help="torch.compile(fullgraph=True) the training forward in this mode; auto: off on CPU, "
                        "'reduce-overhead' with length buckets on CUDA ('default' when a gate pools by the "
                        "unmasked mean), and eager with a note if the model cannot be compiled (default: auto)")
    o.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="the training forward's arithmetic: bf16 autocast (weights, adapter and optimizer stay "
                        "fp32) or fp32; auto: bf16 on a GPU that supports it, fp32 on CPU (default: auto)")
    o.add_argument("--distributed", choices=("auto", "none", "ddp", "fsdp2"), default="auto",
                   help="data-parallel training across the processes torchrun or accelerate launch started: ddp "
                        "(the adapter's gradients reduced), fsdp2 (the frozen base sharded, the adapter whole on "
                        "each process), none; auto: ddp with several processes, fsdp2 when accelerate is "
                        "configured for FSDP, none with one process (default: auto)")
    c = t.add_argument_group("checkpoints")
    c.add_argument("--save-steps", type=int, help="also checkpoint every N optimizer steps (always: every epoch end)")
    c.add_argument("--save-total-limit", type=int, default=2,
                   help="keep the newest N checkpoints plus the best-evaluated one; 0 keeps all (default: 2)")
    c.add_argument("--resume", nargs="?", const=True, metavar="CHECKPOINT",
                   help="continue from the newest checkpoint in --out, or from CHECKPOINT; refused when the spec, "
                        "model, data or an option changed (only --epochs/--max-steps and --eval may change)")
    c.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--json", action="store_true", help="print the report as JSON")
    t.set_defaults(func=cmd_train)

    def adapter_cmd(name, help, description):
        p = subparsers.add_parser(name, help=help, description=description)
        p.add_argument("adapter", help="adapter directory (adapter.safetensors + unipelt.json), e.g. RUN/adapter")
        p.add_argument("model", nargs="?", help=models_help + " (default: the model recorded at train time)")
        return p

    e = adapter_cmd("eval", "evaluate a trained adapter on a data set",
                    "Accuracy and macro-F1 (classification) or loss and perplexity (causal LM).")
    e.add_argument("--data", required=True, help=data_help)
    _data_options(e, trained=True)
    e.add_argument("--batch-size", type=int, default=16, help="examples per batch (default: 16)")
    e.add_argument("--max-length", type=int, help="default: the one used in training, else 256 (or the model's position table, if shorter)")
    e.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=cmd_eval)

    g = adapter_cmd("gates", "gate values per layer and module over a data set (table, heat map)",
                    "Mean gate value of every gated module at every layer over the examples of a data set.")
    g.add_argument("--data", required=True, help=data_help)
    _data_options(g, trained=True)
    g.add_argument("--plot", metavar="PNG", help="write a heat map (layers x modules, values annotated)")
    g.add_argument("--batch-size", type=int, default=16, help="examples per batch (default: 16)")
    g.add_argument("--max-length", type=int, help="default: the one used in training, else 256 (or the model's position table, if shorter)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.set_defaults(func=cmd_gates)

    c = adapter_cmd("collapse", "collapse a gated adapter for serving on calibration data",
                    "Measure every gate on calibration data; prune the branches of closed gates, replace nearly "
                    "constant gates by their value, drop the prefix MLP, merge LoRA whose gate is now constant; "
                    "print the output difference gated vs collapsed, parameters and forward time before and after, "
                    "and save the collapsed adapter to --out (refused beyond --tolerance).")
    c.add_argument("--data", required=True, help="calibration data: " + data_help)
    c.add_argument("--out", required=True, help="output adapter directory")
    _data_options(c, trained=True)
    c.add_argument("--tolerance", type=_non_negative, help="refuse (write nothing) if max |gated - collapsed| output "
                                                          "exceeds this")
    c.add_argument("--closed", type=_gate_value, default=0.01, help="a gate whose largest value is at most this is "
                                                                    "closed, in [0, 1] (default: 0.01)")
    c.add_argument("--spread", type=_gate_value, default=0.02, help="a gate whose values vary by at most this becomes "
                                                                    "a constant, in [0, 1] (default: 0.02)")
    c.add_argument("--no-merge", action="store_true", help="keep LoRA with a constant gate unmerged")
    c.add_argument("--max-examples", type=_positive_int, help="use the first N calibration examples")
    c.add_argument("--batch-size", type=_positive_int, default=16, help="examples per batch (default: 16)")
    c.add_argument("--max-length", type=int, help="default: the one used in training, else 256 (or the model's position table, if shorter)")
    c.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c.set_defaults(func=cmd_collapse)

    m = adapter_cmd("merge", "merge an adapter into its base model and save a plain transformers model",
                    "Fold every ungated LoRA (and in-place trained parameters) into the weights and save_pretrained "
                    "the result with its tokenizer. Refuses adapters with gated or non-linear modules "
                    "(adapters, prefixes, prompts), naming the module.")
    m.add_argument("--out", required=True, help="output model directory")
    m.set_defaults(func=cmd_merge)

    x = subparsers.add_parser("export", help="export an adapter to another library's format (peft)",
                              description="Write a LoRA-only adapter in Hugging Face PEFT's format, loadable "
                                          "with peft.PeftModel.from_pretrained. The base model gives the module "
                                          "paths: --model, default the one recorded at train time.")
    x.add_argument("adapter", help="adapter directory")
    x.add_argument("--format", choices=("peft",), default="peft", help="output format (default: peft)")
    x.add_argument("--out", required=True, help="output directory")
    x.add_argument("--model", help=models_help + " (default: the model recorded at train time)")
    x.set_defaults(func=cmd_export)


# ------------------------------------------------------------------------------------------
# several adapters: merge-adapters, import-peft (issue 11)
# ------------------------------------------------------------------------------------------
def cmd_merge_adapters(args) -> int:
    from unipelt.merging import merge_adapters

    dest = merge_adapters(args.adapters, args.out, weights=args.weights, method=args.method, density=args.density,
                          svd_rank=args.svd_rank, majority_sign=args.majority_sign, seed=args.seed, name=args.name,
                          svd_clamp=args.svd_clamp)
    n = len(args.adapters)
    print(f"merged {n} adapter{'' if n == 1 else 's'} ({args.method}) into {dest}")
    return 0


def cmd_import_peft(args) -> int:
    from unipelt.peft_import import import_peft

    dest = import_peft(args.peft_dir, args.out, model=args.model)
    print(f"PEFT adapter {args.peft_dir} imported as the unipelt adapter {dest}")
    return 0


@hookimpl(specname="unipelt_add_commands")
def add_several_adapter_commands(subparsers):
    from unipelt.merging import METHODS

    m = subparsers.add_parser(
        "merge-adapters", help="merge several trained LoRA adapters into one (linear, svd, ties, dare, cat)",
        description="Combine LoRA adapters made for one base into a new adapter, with the semantics of HF PEFT's "
                    "add_weighted_adapter: linear/ties/dare_linear/dare_ties/magnitude_prune combine A and B "
                    "(same rank needed), svd and the *_svd variants combine the full deltas and truncate, cat "
                    "is the exact weighted sum of the summed rank. No model is loaded.")
    m.add_argument("adapters", nargs="+", help="adapter directories")
    m.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default: 1 each)")
    m.add_argument("--method", choices=METHODS, default="linear", help="combination (default: linear)")
    m.add_argument("--density", type=float, help="fraction of entries kept by ties, dare_*, magnitude_prune")
    m.add_argument("--svd-rank", type=int, help="rank of the svd results (default: the largest input rank)")
    m.add_argument("--svd-clamp", type=float, metavar="Q",
                   help="clamp the svd results' factors to the Q-quantile of their entries (PEFT's svd_clamp)")
    m.add_argument("--majority-sign", choices=("total", "frequency"), default="total",
                   help="TIES' sign election (default: total)")
    m.add_argument("--seed", type=int, default=0, help="seed of DARE's random drop (default: 0)")
    m.add_argument("--name", default="merged", help="the merged adapter's name (default: merged)")
    m.add_argument("--out", required=True, help="output adapter directory")
    m.set_defaults(func=cmd_merge_adapters)

    from unipelt.models import BUILTIN

    i = subparsers.add_parser(
        "import-peft", help="read a Hugging Face PEFT adapter (LoRA, DoRA, IA3, prompt or prefix tuning) into a unipelt adapter",
        description="Translate adapter_config.json + adapter_model.safetensors into a unipelt spec and adapter with "
                    "the same outputs (unipelt.load(model, DIR) does the same in Python). Other PEFT types come "
                    "from plugins (hook unipelt_import_peft).")
    i.add_argument("peft_dir", help="PEFT adapter directory")
    i.add_argument("--out", required=True, help="output unipelt adapter directory")
    i.add_argument("--model", help="base model: a local Hugging Face directory or a built-in name ("
                                   + ", ".join(BUILTIN) + "); default: the config's base_model_name_or_path")
    i.set_defaults(func=cmd_import_peft)
