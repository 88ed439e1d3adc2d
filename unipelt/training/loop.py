"""The training loop behind ``unipelt train``: :func:`train` reads as its steps, each a small
function; the state that moves through the loop is a :class:`RunState`, the plan of the run a
:class:`TrainPlan`, and the pieces the steps share a :class:`Run`."""
from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from unipelt.data import Example, Tokenized, collate
from unipelt.errors import DataError, ModelError, SpecError
from unipelt.training.checkpoints import (LOCK_FILE, RunLock, RunState, atomic_json, best_step, check_output_dir, load_checkpoint,
                                          prepare_out_dir, read_checkpoint_state, remove_stale, resume_point,
                                          run_fingerprint, save_adapter, save_checkpoint)
from unipelt.training.distributed import DistContext, loss_items
from unipelt.training.distributed import setup as setup_distributed
from unipelt.training.distributed import wrap as wrap_distributed
from unipelt.training.evaluation import evaluate_encoded, gate_means, trivial_baseline
from unipelt.training.inputs import (check_max_length, class_labels, data_digest, detect_task, encode, epoch_order,
                                     pad_id)
from unipelt.training.optim import Optimisation, build_optimisation
from unipelt.training.options import (COMPILE_BACKEND_ENV, TrainConfig, TrainingError, bucket_width,
                                      choose_compile_mode, choose_precision, width_sensitivity,
                                      compile_backend, resolve_device)
from unipelt.training.record import REPORT_FILE, TrainReport, name_labels, record_training_info


@dataclass
class TrainPlan:
    """How many steps a run takes: ``rows`` encoded rows in micro-batches of ``batch_size``,
    ``grad_accum`` micro-batches per optimizer step."""

    rows: int
    batch_size: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    warmup_steps: int

    @classmethod
    def of(cls, rows: int, cfg: TrainConfig) -> TrainPlan:
        micro_per_epoch = math.ceil(rows / cfg.batch_size)
        steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
        total = cfg.max_steps or cfg.epochs * steps_per_epoch
        return cls(rows, cfg.batch_size, cfg.grad_accum, steps_per_epoch, total, math.ceil(total / steps_per_epoch),
                   cfg.warmup_steps or int(round(cfg.warmup_ratio * total)))

    def accumulation_groups(self, epoch: int, seed: int) -> list[list[list[int]]]:
        """The epoch's optimizer steps, each a list of micro-batches of row indices."""
        order = epoch_order(self.rows, seed, epoch)
        micro = [order[i:i + self.batch_size] for i in range(0, self.rows, self.batch_size)]
        return [micro[i:i + self.grad_accum] for i in range(0, len(micro), self.grad_accum)]


@dataclass
class Run:
    """What the steps of one training run share."""

    cfg: TrainConfig
    task: str
    net: nn.Module
    handle: Any
    opt: Optimisation
    plan: TrainPlan
    train_rows: Sequence[Tokenized]
    eval_rows: Sequence[Tokenized]
    pad: int
    device: torch.device
    out: Path | None
    fingerprint: dict
    state: RunState = field(default_factory=RunState)
    forward: Any = None                 # the training forward: the model, or torch.compile of it
    compile_info: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    examples_seen: int = 0
    last_saved: int | None = None
    bar: Any = None
    controller_events: list[dict] = field(default_factory=list)
    bucketed: bool = False              # training batches padded to bucket widths (CUDA graphs)
    autocast: torch.dtype | None = None  # the training forward's autocast dtype (None: fp32)
    dist: DistContext = field(default_factory=DistContext)
    train_module: Any = None            # what the forward calls: the model, or its DDP wrapper

    @property
    def progress(self) -> bool:
        """Progress output: on rank 0 only (every rank runs the same loop)."""
        return self.cfg.progress and self.dist.main

    def note(self, text: str) -> None:
        self.notes.append(text)
        if self.progress:
            print(f"note: {text}", file=sys.stderr)


# ------------------------------------------------------------------------------------------
# train(): the steps
# ------------------------------------------------------------------------------------------
def train(spec, model, train_examples: Sequence[Example], eval_examples: Sequence[Example] | None = None,
          config: TrainConfig | None = None, *, tokenizer=None) -> TrainReport:
    """Train an adapter; returns the report (also written to ``out_dir/report.json``).

    ``spec``: a path, dict or parsed Spec. ``model``: a built-in name or a local model directory
    (loaded for the task, with as many labels as the data has), or an ``nn.Module`` (pass its
    ``tokenizer``; it must already have the right head). See :mod:`unipelt.training` for the rest.

    Under ``torchrun`` / ``accelerate launch`` (``cfg.distributed``) every process calls this
    with the same arguments; see :mod:`unipelt.training.distributed`. A process group this call
    initialises is destroyed when it returns (one the caller set up is left alone).
    """
    cfg = copy.deepcopy(config) if config is not None else TrainConfig()
    cfg.check()
    dctx = setup_distributed(cfg.distributed, cfg.device)  # under torchrun/accelerate: this process's rank
    try:
        return _train(dctx, cfg, spec, model, train_examples, eval_examples, tokenizer)
    finally:
        dctx.finish()


def _train(dctx: DistContext, cfg: TrainConfig, spec, model, train_examples, eval_examples, tokenizer) -> TrainReport:
    from unipelt.spec import parse_spec

    device = dctx.device or resolve_device(cfg.device)
    spec = parse_spec(spec)  # spec errors before any model is loaded
    train_examples, eval_examples = list(train_examples), list(eval_examples or [])
    task = cfg.task or detect_task(train_examples)
    labels = class_labels(train_examples, eval_examples, cfg.labels) if task == "classification" else None

    out = Path(cfg.out_dir) if cfg.out_dir else None
    lock: RunLock | None = None
    # a run that fails before it writes anything takes away the directory it made (else a new
    # user's failed first try leaves runs/X holding only the lock file); a directory that existed
    # before the run is left as it was found, lock file aside
    created = out is not None and not out.exists() and not out.is_symlink()

    def open_run_dir() -> tuple[list[str], Path | None]:
        # rank 0 alone locks, cleans and prepares the directory; the others wait for its answer
        nonlocal lock
        lock, found = _open_run_dir(out)
        resume = resume_point(out, cfg.resume) if cfg.resume else None
        if out is not None:
            prepare_out_dir(out, resuming=resume is not None, overwrite=cfg.overwrite)
        return found, resume

    try:
        notes, resume_from = dctx.on_main(open_run_dir, "prepare the run directory")
        notes = list(notes)
        net, tok, model_name = _load_base(model, tokenizer, task, labels, cfg)
        check_max_length(net, cfg.max_length, model_name=model_name)
        net.to(device)
        # data before the adapter: a bad row leaves a caller's model as it was
        train_rows, eval_rows = _encode_data(train_examples, eval_examples, tok, task, labels, cfg)
        plan = TrainPlan.of(len(train_rows), cfg)
        fingerprint = run_fingerprint(
            spec_raw=spec.raw, model_name=model_name, task=task, labels=labels,
            train_digest=data_digest(train_examples), examples=len(train_rows),
            eval_digest=data_digest(eval_examples) if eval_examples else None, cfg=cfg, total_steps=plan.total_steps)
        resume_state = None
        if resume_from is not None:
            resume_state, changes = read_checkpoint_state(resume_from, fingerprint)
            notes += [f"resuming with a change: {c}" for c in changes]
        if cfg.gradient_checkpointing and not getattr(net, "supports_gradient_checkpointing", False):
            raise ModelError(f"{type(net).__name__} does not support gradient checkpointing")

        # what the result is compared with: the majority class, or the base model before training
        baseline = trivial_baseline(task, train_rows, eval_rows, model=net, pad_id=pad_id(tok),
                                    batch_size=cfg.eval_batch_size or cfg.batch_size)
        spec, added_head = _with_trainable_head(spec, task)
        if added_head:
            notes.append(f"the spec trains no head; added module {added_head!r} (method train at head) "
                         "so that the classifier learns")
        try:
            handle = _attach_adapter(net, spec, cfg, {"model": model_name, "task": task, "labels": labels,
                                                     "max_length": cfg.max_length,
                                                     "use_chat_template": cfg.use_chat_template})
        except SpecError as e:
            raise _head_budget_error(e, added_head) from None
        opt = build_optimisation(handle, lr=cfg.lr, gate_lr=cfg.gate_lr, weight_decay=cfg.weight_decay,
                                 schedule=cfg.schedule, total_steps=plan.total_steps, warmup_steps=plan.warmup_steps,
                                 optim=cfg.optim)
        run = Run(cfg=cfg, task=task, net=net, handle=handle, opt=opt, plan=plan, train_rows=train_rows,
                  eval_rows=eval_rows, pad=pad_id(tok), device=device, out=out, fingerprint=fingerprint, dist=dctx)
        for text in notes:
            run.note(text)
        if resume_from is not None:
            # the controllers first: gate pruning switches its branches off again, so the handle
            # expects the checkpoint's adapter, which leaves the pruned branches out
            opt.load_controller_state(resume_state.get("controllers") or {})
            run.state = load_checkpoint(resume_from, resume_state, handle, opt.optimizer, opt.scheduler)
            run.controller_events = list(resume_state.get("controller_events") or [])
        run.autocast = choose_precision(device, cfg.precision)

        t_start = time.perf_counter()
        with _training_mode(net, cfg.gradient_checkpointing):
            _set_training_module(run)
            _set_training_forward(run)
            _run_epochs(run, t_start)
        wall = time.perf_counter() - t_start

        report = _report(run, spec, model_name, labels, added_head, len(train_examples), wall, resume_from)
        report["baseline"] = baseline
        report["distributed"] = dctx.describe()
        _save_final(run, report)
        report.handle, report.model, report.tokenizer = handle, net, tok
        return report
    except BaseException:
        if lock is not None:
            lock.release()
            lock = None  # only rank 0 locks, so only rank 0 tidies
            _remove_unused_run_dir(out, created)
        raise
    finally:
        if lock is not None:
            lock.release()


def _remove_unused_run_dir(out: Path | None, created: bool) -> None:
    """After a failed run whose directory holds nothing but its lock file: remove the lock file,
    and the directory too if this run made it. Anything else in it (the user's files, earlier
    runs' checkpoints) leaves the directory as it is."""
    if out is None:
        return
    try:
        names = {p.name for p in out.iterdir()}
    except OSError:
        return
    if names != {LOCK_FILE}:
        return
    try:
        (out / LOCK_FILE).unlink()
        if created:
            out.rmdir()
    except OSError:
        pass  # best effort: a failed run's error is what the user needs to see


def _open_run_dir(out: Path | None) -> tuple[RunLock | None, list[str]]:
    """Check that ``out`` can be written, take its lock, and remove what interrupted saves left
    there (safe under the lock: no live run owns it). Returns the lock and the notes to print."""
    if out is None:
        return None, []
    check_output_dir(out)
    lock = RunLock(out)
    if not lock.acquire():
        return lock, []
    removed = remove_stale(out)
    if not removed:
        return lock, []
    return lock, [f"removed {len(removed)} temporary folder(s) left by an interrupted save: {', '.join(removed)}"]


def _load_base(model, tokenizer, task: str, labels: list[str] | None, cfg: TrainConfig):
    """The base model and tokenizer: a name or directory is loaded for the task (with as many
    labels as the data has); a model object is used as given."""
    from unipelt.models import load_model

    if isinstance(model, (str, os.PathLike)):
        model_name = cfg.model_name or _model_name(str(model))
        try:
            net, tok = load_model(str(model), task=task, num_labels=len(labels) if labels else None,
                                  quantize=cfg.quantize)
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
            raise ModelError(f"the model's head has {n_out} outputs but the data has {len(labels)} labels "
                             f"({', '.join(labels)})")
        name_labels(net, labels)
    return net, tok, model_name


def _model_name(name: str) -> str:
    from unipelt.models import BUILTIN

    if name in BUILTIN:
        return name
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


def _encode_data(train_examples, eval_examples, tok, task, labels, cfg: TrainConfig):
    kw = dict(labels=labels, max_length=cfg.max_length, use_chat_template=cfg.use_chat_template)
    train_rows = encode(train_examples, tok, task, progress="tokenize train" if cfg.progress else None, **kw)
    if not train_rows:
        raise DataError(f"no usable training rows: every prompt fills max_length={cfg.max_length} tokens")
    eval_rows = encode(eval_examples, tok, task, progress="tokenize eval" if cfg.progress else None,
                       **kw) if eval_examples else []
    return train_rows, eval_rows


def _with_trainable_head(spec, task: str):
    """Classification needs a trainable head: the spec plus a ``train`` node at ``head`` (named
    ``head``, or ``head_2``... if taken) when it has none; returns ``(spec, added name or None)``."""
    from unipelt.spec import parse_spec

    if task != "classification" or any(m.method == "train" and "head" in m.sites for m in spec.modules.values()):
        return spec, None
    raw = copy.deepcopy(spec.raw) if spec.raw else {"version": 1, "modules": {}}
    name, i = "head", 1
    while name in raw.get("modules", {}):
        i += 1
        name = f"head_{i}"
    raw.setdefault("modules", {})[name] = {"method": "train", "sites": "head"}
    new = parse_spec(raw)
    new.source = spec.source
    return new, name


def _head_budget_error(e: SpecError, added_head: str | None) -> SpecError:
    """``e`` as it is, or where the budget failed with a head this run added, the same error saying
    so: ``unipelt compile`` checks the spec as written, without that head, and passed."""
    if not added_head or e.path != "budget":
        return e
    return SpecError(f"{e.message}. Module {added_head!r} (method train at head) is not in the spec: unipelt train "
                     "added it because a classifier needs a trained head, and unipelt compile checks the spec "
                     "without it. Leave the budget room for it, or declare the head in the spec",
                     source=e.source, path=e.path)


def _attach_adapter(net: nn.Module, spec, cfg: TrainConfig, info: dict):
    """Compile the spec onto the model, initialised under the run's seed, with the training
    facts recorded for every save of the adapter."""
    from unipelt.compiler import compile as _compile

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    handle = _compile(net, spec, cfg.adapter_name)
    if cfg.data_fields:
        info = {**info, "fields": dict(cfg.data_fields)}
    if cfg.quantize:
        info = {**info, "quantize": cfg.quantize}  # what merge_adapter dequantizes from
    record_training_info(handle, info)
    return handle


def _set_training_module(run: Run) -> None:
    """The module the training steps call: the model, or under ``--distributed`` its DDP wrapper or
    the model with its base sharded by FSDP2 (:func:`unipelt.training.distributed.wrap`)."""
    def probe() -> torch.Tensor:  # DDP's check for adapter parameters that take no gradient
        batch = {k: v.to(run.device) for k, v in collate([run.train_rows[0]], run.pad).items()}
        return run.opt.regularised(run.net(**batch).loss)

    run.train_module = wrap_distributed(run.dist, run.net, run.handle, probe=probe if run.dist.mode == "ddp" else None)
    for text in run.dist.notes:
        run.note(text)


def _set_training_forward(run: Run) -> None:
    """The training forward: the training module itself, or ``torch.compile(module, fullgraph=True)``
    in the mode :func:`choose_compile_mode` picks (``fullgraph=False`` around DDP; FSDP2 stays
    eager). Evaluation always runs the model eagerly."""
    sensitive = width_sensitivity(run.handle)
    mode = choose_compile_mode(run.device, run.cfg.compile, width_sensitive=sensitive)
    backend = compile_backend()
    if mode is not None and run.dist.mode == "fsdp2":
        if run.cfg.compile != "auto":
            raise TrainingError(f"--compile {mode} with --distributed fsdp2 is not supported (untested); "
                                "use --compile off, or --distributed ddp")
        run.note("--distributed fsdp2 trains eagerly (--compile auto does not compile an FSDP2-sharded model)")
        mode = None
    # CUDA graphs record one graph per input shape: pad each batch to a bucket width, unless the
    # padding would change what the adapter computes (then each new width records a new graph)
    run.bucketed = mode == "reduce-overhead" and sensitive is None
    run.compile_info = {"requested": run.cfg.compile, "mode": mode, "backend": backend if mode else None,
                        "fallback": None, "bucketed": run.bucketed}
    if mode == "reduce-overhead" and sensitive is not None:
        run.note(f"--compile reduce-overhead without length buckets: {sensitive}; every new batch width "
                 "records a new CUDA graph")
    if mode is None:
        run.forward = run.train_module
        return
    kwargs = {"mode": mode} if backend == "inductor" else {}
    from torch._dynamo.exc import InvalidBackend

    _resolve_loss_function(run.net)

    # DDP's own forward (its logger, the reducer's bookkeeping) cannot be traced: under DDP the
    # graph breaks around the model by design, so fullgraph is off there (torch's DDP + compile path)
    fullgraph = run.dist.mode != "ddp"
    if not fullgraph:
        run.compile_info["fullgraph"] = False
    try:
        run.forward = torch.compile(run.train_module, fullgraph=fullgraph, backend=backend, **kwargs)
    except InvalidBackend:
        raise TrainingError(f"{COMPILE_BACKEND_ENV}={backend!r}: not a torch.compile backend "
                            f"(torch._dynamo.list_backends() lists them)") from None


def _resolve_loss_function(net: nn.Module) -> None:
    """transformers looks the loss up on every forward given labels (``loss_function``) and, for a
    class whose name does not say its loss (GPT2LMHeadModel), logs "loss_type=None ...
    unrecognized" there: a logger call torch.compile(fullgraph=True) cannot trace, so every GPT-2
    LM run with --compile failed before its first step. Looked up once here, eagerly, and set on
    the model, the forward finds the same function (ForCausalLMLoss) without the call."""
    from transformers import PreTrainedModel
    from transformers.loss.loss_utils import LOSS_MAPPING

    for m in net.modules():
        if isinstance(m, PreTrainedModel) and "_loss_function" not in vars(m) \
                and getattr(m, "loss_type", None) not in LOSS_MAPPING:
            m.loss_function = m.loss_function  # the getter's default (and its one warning), eagerly


class _training_mode:
    """Train mode, no KV cache (and gradient checkpointing if asked) for the loop; the cache
    setting is restored afterwards."""

    def __init__(self, net: nn.Module, checkpointing: bool):
        self.net, self.checkpointing = net, checkpointing
        self.use_cache = getattr(getattr(net, "config", None), "use_cache", None)

    def __enter__(self):
        if self.checkpointing:
            enable = (getattr(self.net, "activation_checkpointing_enable", None)
                      or getattr(self.net, "gradient_checkpointing_enable"))
            kw = ("activation_checkpointing_kwargs" if enable.__name__.startswith("activation")
                  else "gradient_checkpointing_kwargs")
            enable(**{kw: {"use_reentrant": False}})
        if self.use_cache is not None:
            self.net.config.use_cache = False
        self.net.train()
        return self

    def __exit__(self, *exc):
        if self.use_cache is not None:
            self.net.config.use_cache = self.use_cache
        return False


# ------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------
def _run_epochs(run: Run, t_start: float) -> None:
    from tqdm.auto import tqdm

    st, plan = run.state, run.plan
    run.bar = tqdm(total=plan.total_steps, initial=st.step, desc="train", unit="step", disable=not run.progress,
                   dynamic_ncols=True)
    first_epoch = st.epoch
    _drain_events(run)  # what the controllers decided before the first step (a fixed AdapterDrop)
    try:
        for epoch in range(first_epoch, plan.epochs):
            if st.step >= plan.total_steps:
                break
            if epoch != first_epoch:
                st.start_epoch(epoch)
            groups = plan.accumulation_groups(epoch, run.cfg.seed)
            while st.group_in_epoch < len(groups) and st.step < plan.total_steps:
                _optimizer_step(run, groups[st.group_in_epoch], t_start)
                if _checkpoint_due(run, len(groups)):
                    _save(run, run.state.to_json(run.fingerprint, plan.total_steps))
            _end_epoch(run, complete=st.group_in_epoch >= len(groups))
    finally:
        run.bar.close()


def _optimizer_step(run: Run, micro_batches: list[list[int]], t_start: float) -> None:
    """One optimizer step over its micro-batches (gradient accumulation), clipping, the schedule."""
    st, opt = run.state, run.opt
    t0 = time.perf_counter()
    step_loss = 0.0
    opt.before_step(st.step)
    for i, idx in enumerate(micro_batches):
        rows, weight = _share(run, idx)
        mine = [run.train_rows[j] for j in rows]
        # under CUDA graphs, pad to the bucket of the whole micro-batch's longest row (every rank
        # the same width, so the ranks' graphs match)
        width = (bucket_width(max(len(run.train_rows[j].input_ids) for j in idx), run.cfg.max_length)
                 if run.bucketed else None)
        batch = {k: v.to(run.device) for k, v in collate(mine, run.pad, width=width).items()}
        with run.dist.no_sync(run.train_module, last=i == len(micro_batches) - 1):
            step_loss += _micro_step(run, batch, len(micro_batches), weight)
        run.examples_seen += len(idx)
    if run.dist.active:
        run.dist.reduce_gradients(opt.trainable)  # FSDP2's replicated adapter; DDP reduced in backward
        step_loss = run.dist.sum_float(step_loss)  # each rank held its weighted share
    if run.cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(opt.trainable, run.cfg.max_grad_norm)
    opt.optimizer.step()
    opt.scheduler.step()
    st.step += 1
    st.group_in_epoch += 1
    opt.on_step(st.step, step_loss)  # gradients still readable (AdaLoRA's sensitivity)
    opt.optimizer.zero_grad(set_to_none=True)
    _drain_events(run)
    run.step_times.append(time.perf_counter() - t0)
    st.epoch_loss += step_loss
    st.epoch_steps += 1
    run.bar.set_postfix(loss=f"{step_loss:.4f}", ex_s=_rate(run.examples_seen, time.perf_counter() - t_start),
                        epoch=st.epoch + 1, refresh=False)
    run.bar.update(1)


def _drain_events(run: Run) -> None:
    """The controllers' new events into the run's history (report.json) and the progress output."""
    for ev in run.opt.events():
        run.controller_events.append(ev)
        if run.progress:
            run.bar.write(_event_line(ev))


def _share(run: Run, idx: list[int]) -> tuple[list[int], float | None]:
    """This process's rows of a micro-batch and the weight of its mean loss (None alone).

    Under ``--distributed`` each rank takes every ``world``-th row (:meth:`DistContext.shard`);
    its mean loss, times its share of the micro-batch's loss items (rows, or LM target tokens), is
    its part of the micro-batch's mean, and times ``world`` once more because the gradients are
    averaged over the ranks. A rank left without rows (a last micro-batch smaller than the world)
    runs one row at weight 0, so that it still joins the gradient reduction.
    """
    if not run.dist.active:
        return idx, None
    mine = run.dist.shard(idx)
    if not mine:
        return [idx[0]], 0.0
    total = sum(loss_items(run.train_rows[j], run.task) for j in idx)
    own = sum(loss_items(run.train_rows[j], run.task) for j in mine)
    return mine, (own / total * run.dist.world) if total else 0.0


def _micro_step(run: Run, batch: dict, n_micro: int, weight: float | None = None) -> float:
    """Forward and backward of one micro-batch (its loss scaled by ``1/n_micro`` for accumulation);
    returns its share of the step loss. ``weight``: this rank's weight under ``--distributed``
    (:func:`_share`); its returned share is divided by the world size, so the ranks' shares sum
    to the step loss of a one-process run.

    A compiled forward that cannot be compiled (a graph break under ``fullgraph=True``, a backend
    failure, in the forward or in the lazily compiled backward) fails before it computes anything:
    with ``--compile auto`` the run says so and redoes the micro-batch eagerly for good; an
    explicit mode is an error.
    """
    def objective(out) -> torch.Tensor:
        return run.opt.regularised(out.loss if weight is None else out.loss * weight)

    def eager() -> torch.Tensor:
        with _autocast(run):
            return objective(run.train_module(**batch))

    per_rank = 1 if weight is None else run.dist.world
    if run.forward is run.train_module:
        loss = eager()
        (loss / n_micro).backward()
        return float(loss.detach()) / n_micro / per_rank
    from torch._dynamo.exc import TorchDynamoException

    # the RNG state before the try: the eager redo draws the same dropout masks as an eager run would
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None
    try:
        if run.compile_info.get("mode") == "reduce-overhead" and run.device.type == "cuda":
            # CUDA graphs: each micro-step is a new iteration of the recorded graphs (the previous
            # step's outputs are no longer read), as benchmarks/speed.py does
            torch.compiler.cudagraph_mark_step_begin()
        with _autocast(run):
            loss = objective(run.forward(**batch))
        (loss / n_micro).backward()
    except TorchDynamoException as e:
        _compile_failed(run, e)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, run.device)
        loss = eager()
        (loss / n_micro).backward()
    return float(loss.detach()) / n_micro / per_rank


def _autocast(run: Run):
    """bf16 autocast around the forward and the loss (backward runs outside, as autocast asks)."""
    if run.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=run.device.type, dtype=run.autocast)


def _compile_failed(run: Run, e: Exception) -> None:
    reason = " ".join(str(e).split())[:300] or type(e).__name__  # dynamo's messages span lines; keep one
    mode = run.compile_info["mode"]
    if run.cfg.compile != "auto":
        raise TrainingError(f"--compile {mode}: torch.compile(fullgraph=True) cannot compile the adapted model's "
                            f"training forward ({type(e).__name__}: {reason}); train with --compile off") from e
    run.compile_info["fallback"] = f"{type(e).__name__}: {reason}"
    run.note(f"torch.compile (mode {mode}) failed on the training forward ({type(e).__name__}: {reason}); "
             "training eagerly")
    run.forward = run.train_module


def _checkpoint_due(run: Run, groups_in_epoch: int) -> bool:
    """A ``save_steps`` checkpoint inside the epoch (the epoch's last step saves at the epoch end)."""
    st = run.state
    return (run.out is not None and bool(run.cfg.save_steps) and st.step % run.cfg.save_steps == 0
            and st.group_in_epoch < groups_in_epoch)


def _end_epoch(run: Run, *, complete: bool) -> None:
    """Evaluate, record the epoch, print its line and checkpoint it."""
    st = run.state
    cfg = run.cfg
    metrics = evaluate_encoded(run.net, run.eval_rows, run.task, pad_id=run.pad,
                               batch_size=cfg.eval_batch_size or cfg.batch_size) if run.eval_rows else {}
    entry = {"epoch": st.epoch + 1, "step": st.step, "complete": complete,
             "train_loss": st.epoch_loss / st.epoch_steps if st.epoch_steps else None, "eval": metrics}
    st.history.append(entry)
    if run.progress:
        run.bar.write(_epoch_line(entry, run.task))
    if run.out is None:
        return
    if complete:
        saved = RunState(step=st.step, epoch=st.epoch + 1, history=st.history)
    else:  # stopped by max_steps: nothing follows, but keep the position exact
        saved = RunState(step=st.step, epoch=st.epoch, group_in_epoch=st.group_in_epoch, history=st.history[:-1],
                         epoch_loss=st.epoch_loss, epoch_steps=st.epoch_steps)
    _save(run, saved.to_json(run.fingerprint, run.plan.total_steps))


def _save(run: Run, state: dict) -> None:
    # the controllers' state (AdaLoRA's importance averages, pruning counters) and their events
    # so far travel with the checkpoint, for --resume
    state = dict(state, controllers=run.opt.controller_state(), controller_events=list(run.controller_events))
    # one rank writes (the adapter is whole on every rank, DDP or FSDP2); the others wait for it
    run.dist.on_main(lambda: save_checkpoint(run.out, run.handle, run.opt.optimizer, run.opt.scheduler, state,
                                             limit=run.cfg.save_total_limit,
                                             keep=best_step(run.state.history, run.task)),
                     f"write checkpoint-{state['step']}")
    run.last_saved = state["step"]


# ------------------------------------------------------------------------------------------
# the end: report, final adapter
# ------------------------------------------------------------------------------------------
def _executors(handle) -> dict:
    """The model's executor choice and how many fusion groups each executor ran (as the compile
    report names them), so a run says whether the Triton kernels trained it."""
    from unipelt.report import report_dict

    d = report_dict(handle)
    return {"choice": d["executor"], "groups": dict(Counter(g["executor"] for g in d["fusion_groups"]))}


def _report(run: Run, spec, model_name, labels, added_head, n_examples: int, wall: float, resume_from) -> TrainReport:
    from unipelt.compiler import base_param_count

    cfg, st, net = run.cfg, run.state, run.net
    net.eval()
    gates = gate_means(run.handle, run.eval_rows or run.train_rows, pad_id=run.pad,
                       batch_size=cfg.eval_batch_size or cfg.batch_size)
    summary = run.handle.summary(base_param_count(net))
    best = best_step(st.history, run.task)
    out = run.out
    return TrainReport({
        "model": model_name,
        "task": run.task,
        "labels": labels,
        "max_length": cfg.max_length,
        "spec": spec.raw,
        "spec_source": spec.source,
        "added_head": added_head,
        "data": {"train": run.plan.rows, "train_dropped": n_examples - run.plan.rows, "eval": len(run.eval_rows)},
        "config": dict(asdict(cfg)),
        "compile": dict(run.compile_info),
        "precision": "bf16" if run.autocast == torch.bfloat16 else "fp32",
        "executor": _executors(run.handle),
        "steps": st.step,
        "total_steps": run.plan.total_steps,
        "steps_per_epoch": run.plan.steps_per_epoch,
        "epochs": st.history,
        "final_eval": st.history[-1]["eval"] if st.history else {},
        "params": {
            "trainable": sum(p.numel() for p in run.opt.trainable),
            "kept": summary.kept,
            "training": summary.training,
            # what computes (not pruned, not in AdapterDrop's fixed layers) and the dropped layers' share
            "active": summary.active("kept"),
            "dropped": summary.dropped,
            "base": summary.base_params,
            "percent_of_base": 100.0 * summary.kept / max(summary.base_params, 1),
            "per_module": summary.per_module(),
        },
        # bytes of the base (packed weights and their quantization statistics) and of the adapter
        "memory": dict(summary.memory or {}),
        "time": {
            "wall_s": wall,
            "steps_timed": len(run.step_times),
            "per_step_s": statistics.fmean(run.step_times) if run.step_times else None,
            "per_step_median_s": statistics.median(run.step_times) if run.step_times else None,
            "examples_per_s": run.examples_seen / wall if wall > 0 and run.examples_seen else None,
        },
        "gates": {m: {str(l): v for l, v in d.items()} for m, d in gates.items()},
        "gate_data": "eval" if run.eval_rows else "train",
        "resumed_from": str(resume_from) if resume_from else None,
        "notes": list(run.notes),
        "param_groups": run.opt.group_table(),
        "controllers": {name: dict(rep, events=[e for e in run.controller_events if e["controller"] == name])
                        for name, rep in run.opt.controller_report().items()},
        "adapter": None,
        "last_checkpoint": str(out / f"checkpoint-{run.last_saved}") if out is not None and run.last_saved else None,
        "best_checkpoint": (str(out / f"checkpoint-{best}")
                            if out is not None and best is not None and (out / f"checkpoint-{best}").is_dir() else None),
    })


def _save_final(run: Run, report: TrainReport) -> None:
    """``out/adapter`` (training-only parameters dropped) and ``out/report.json``."""
    if run.out is None:
        return
    report["params"]["dropped_reparameterization"] = run.handle.drop_reparameterization()

    def write() -> str:
        report["adapter"] = str(save_adapter(run.handle, run.out / "adapter"))
        atomic_json(run.out / REPORT_FILE, report)
        return report["adapter"]

    report["adapter"] = run.dist.on_main(write, "save the final adapter")


def _rate(count: int, seconds: float) -> str:
    """Throughput for the progress bar, three significant digits: a slow real model on CPU
    (0.05 examples/s) must not read 0.0."""
    r = count / max(seconds, 1e-9)
    return f"{r:.0f}" if r >= 100 else f"{r:.3g}"


def _event_line(ev: dict) -> str:
    rest = ", ".join(f"{k}={v}" for k, v in ev.items() if k not in ("controller", "event", "step"))
    return f"step {ev.get('step')}: {ev.get('controller')} {ev.get('event', '')}" + (f" ({rest})" if rest else "")


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
