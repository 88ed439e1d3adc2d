"""Training, evaluation and gate statistics for an adapted model: the engine behind ``unipelt train``,
``unipelt eval`` and ``unipelt gates``, usable as a Python API (``unipelt.train`` re-exports it).

    from unipelt.training import TrainConfig, load_data, train

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
- ``compile``: ``torch.compile(model, fullgraph=True, mode=...)`` for the training forward
  (``auto``: :func:`choose_compile_mode`; a model that cannot be compiled trains eagerly under
  ``auto`` with a note, and is an error under an explicit mode);
- with ``out_dir``: a checkpoint ``out_dir/checkpoint-N`` at every epoch end and every
  ``save_steps`` optimizer steps, each written to a temporary directory and renamed into place:
  ``adapter/`` (with any training-time reparameterisation, so training can continue),
  ``trainer_state.json`` (step, epoch, position in the epoch, history) and ``training_state.pt``
  (optimizer, scheduler and RNG states); ``save_total_limit`` (default 2) keeps the newest
  checkpoints plus the best-evaluated one. ``resume=True`` continues from the newest checkpoint and
  ends with the same adapter, bit for bit, as an uninterrupted run with the same seed; a checkpoint
  whose fingerprint (spec, model, training data content, options) differs is refused, listing the
  changes; only the number of steps and the evaluation data may change, with a note;
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

The package, by concern: :mod:`~unipelt.training.options` (TrainConfig, device and compile
choices), :mod:`~unipelt.training.inputs` (data, task, tokenization, epoch order),
:mod:`~unipelt.training.optim` (parameter groups, schedule), :mod:`~unipelt.training.checkpoints`
(run directory, checkpoints, fingerprint), :mod:`~unipelt.training.evaluation` (metrics, gates),
:mod:`~unipelt.training.record` (the report, what an adapter records), :mod:`~unipelt.training.loop`
(:func:`train`) and :mod:`~unipelt.training.callback` (:class:`UnipeltCallback`).
"""
from __future__ import annotations

# First: unipelt.models installs the filter for bitsandbytes' kernels-hub warning, which must be in
# place before the callback module imports transformers' Trainer (and with it bitsandbytes).
import unipelt.models  # noqa: F401  # isort: skip
from unipelt.training.callback import UnipeltCallback
from unipelt.training.checkpoints import STATE_JSON, STATE_PT, RunState, list_checkpoints, run_fingerprint
from unipelt.training.evaluation import (evaluate, evaluate_encoded, gate_means, gate_table_text, macro_f1, plot_gates,
                                         trivial_baseline)
from unipelt.training.inputs import (check_max_length, detect_task, encode, epoch_order, load_data, pad_id,
                                     position_limit)
from unipelt.training.loop import TrainPlan, train
from unipelt.training.optim import collect_controllers, controller_loss, make_schedule, param_groups
from unipelt.training.options import (COMPILE_MODES, DEFAULT_SAVE_TOTAL_LIMIT, SCHEDULES, TASKS, TrainConfig, TrainingError,
                                      choose_compile_mode, resolve_device)
from unipelt.training.record import (REPORT_FILE, TrainReport, load_adapted, record_training_info,
                                     recorded_training_info, training_info)

__all__ = [
    "TrainConfig", "TrainReport", "TrainingError", "train", "evaluate", "evaluate_encoded", "load_data", "encode",
    "detect_task", "epoch_order", "param_groups", "trivial_baseline", "make_schedule", "gate_means", "gate_table_text",
    "plot_gates",
    "UnipeltCallback", "load_adapted", "training_info", "record_training_info", "recorded_training_info",
    "list_checkpoints", "macro_f1", "choose_compile_mode", "resolve_device", "check_max_length", "position_limit",
    "pad_id", "run_fingerprint", "RunState", "TrainPlan", "TASKS", "SCHEDULES", "COMPILE_MODES", "STATE_JSON",
    "STATE_PT", "REPORT_FILE", "DEFAULT_SAVE_TOTAL_LIMIT", "collect_controllers", "controller_loss",
]
