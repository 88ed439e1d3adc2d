"""The options of a training run (:class:`TrainConfig`, the ``unipelt train`` flags of the same
names), their checks, and the choices made from them: the device and the ``torch.compile`` mode."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

from unipelt.errors import UnipeltError

TASKS = ("classification", "causal-lm")
SCHEDULES = ("linear", "cosine", "constant")
COMPILE_MODES = ("auto", "off", "default", "reduce-overhead")
PRECISIONS = ("auto", "fp32", "bf16")
DISTRIBUTED_MODES = ("auto", "none", "ddp", "fsdp2")
DEFAULT_SAVE_TOTAL_LIMIT = 2
COMPILE_BACKEND_ENV = "UNIPELT_COMPILE_BACKEND"  # e.g. "aot_eager" for CPU tests; default inductor


class TrainingError(UnipeltError):
    """A training run that cannot start or continue (bad options, a mismatched checkpoint, an
    output directory that cannot be written)."""


QUANTIZE = ("nf4", "fp4", "int8")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")


@dataclass
class TrainConfig:
    """Options of :func:`unipelt.training.train` (the ``unipelt train`` flags of the same names).

    task: ``classification``, ``causal-lm`` or None (from the data: labels mean classification).
    lr, epochs, batch_size (examples per micro-batch), grad_accum (micro-batches per step),
    max_length (tokens; longer rows are cut; at most the model's position table), max_steps
    (optimizer steps; overrides epochs). warmup_steps / warmup_ratio (of the total steps; give at
    most one), schedule (after warm-up). gate_lr: learning rate of the gates (default: lr). LoRA+
    comes from the spec (``lr_ratio``).
    save_steps: a checkpoint every N optimizer steps (besides every epoch end);
    save_total_limit: keep the newest N checkpoints (default 2) plus the one with the best
    evaluation; None keeps all. resume: True (newest checkpoint in out_dir) or a checkpoint
    directory. overwrite: delete an earlier run's checkpoints, adapter and report in out_dir
    instead of refusing.
    compile: ``torch.compile`` the adapted model for the training forward: ``off``, ``default``,
    ``reduce-overhead`` or ``auto`` (:func:`choose_compile_mode`).
    precision: the training forward's arithmetic: ``fp32``, ``bf16`` (autocast: matrix products in
    bfloat16, weights, adapter and optimizer state stay fp32) or ``auto`` (:func:`choose_precision`).
    labels: the class labels in index order (default: the sorted labels of the training data; an
    evaluation row with a label outside them is a DataError).
    model_name: recorded in the report and the adapter (set automatically when a name is given).
    data_fields: the field names the data was read with (``text``, ``label``, ``prompt``,
    ``response``), recorded with the adapter so ``unipelt eval``/``gates`` read files the same way.
    distributed: data-parallel training across the processes a launcher (``torchrun``,
    ``accelerate launch``) started: ``ddp``, ``fsdp2`` (the frozen base sharded), ``none``, or
    ``auto`` (DDP with several processes, FSDP2 when accelerate is configured for FSDP, else none);
    see :mod:`unipelt.training.distributed`.
    quantize: load a named model with a bitsandbytes base (``nf4``, ``fp4``: 4-bit, QLoRA;
    ``int8``); the adapter is saved as usual and loads onto the 16-bit model too.
    optim: ``adamw`` (torch), ``adamw8bit`` or ``paged_adamw8bit`` (bitsandbytes' 8-bit-state
    AdamW; paged falls back to unpaged on the CPU, as bitsandbytes warns).
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
    save_total_limit: int | None = DEFAULT_SAVE_TOTAL_LIMIT
    resume: bool | str = False
    overwrite: bool = False
    labels: list[str] | None = None
    use_chat_template: bool = True
    progress: bool = True
    device: str | None = None
    compile: Literal["auto", "off", "default", "reduce-overhead"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    adapter_name: str = "default"
    model_name: str | None = None
    data_fields: dict[str, str] | None = None
    distributed: Literal["auto", "none", "ddp", "fsdp2"] = "auto"
    # a bitsandbytes base (nf4, fp4, int8) for a model loaded by name, and the optimizer
    quantize: Literal["nf4", "fp4", "int8"] | None = None
    optim: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw"

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
        if self.compile not in COMPILE_MODES:
            raise TrainingError(f"unknown compile mode {self.compile!r}; expected one of: {', '.join(COMPILE_MODES)}")
        if self.precision not in PRECISIONS:
            raise TrainingError(f"unknown precision {self.precision!r}; expected one of: {', '.join(PRECISIONS)}")
        if self.distributed not in DISTRIBUTED_MODES:
            raise TrainingError(f"unknown distributed mode {self.distributed!r}; expected one of: "
                                f"{', '.join(DISTRIBUTED_MODES)}")
        if not self.lr > 0 or (self.gate_lr is not None and not self.gate_lr > 0):
            raise TrainingError("learning rates must be positive")
        if self.warmup_steps < 0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise TrainingError("warmup_steps must be >= 0 and warmup_ratio in [0, 1)")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise TrainingError(f"unknown quantize {self.quantize!r}; expected one of: {', '.join(QUANTIZE)}")
        if self.optim not in OPTIMIZERS:
            raise TrainingError(f"unknown optim {self.optim!r}; expected one of: {', '.join(OPTIMIZERS)}")
        if self.warmup_steps and self.warmup_ratio:
            raise TrainingError("give warmup_steps or warmup_ratio, not both")
        if self.resume and not self.out_dir and not isinstance(self.resume, (str, os.PathLike)):
            raise TrainingError("resume=True needs out_dir (the run to continue)")


def resolve_device(device: str | None) -> torch.device:
    """The device to train or evaluate on: ``device``, else CUDA when there is a GPU, else CPU.
    A device that is not there (``cuda`` without a GPU, ``cuda:3`` on a one-GPU machine) is a
    TrainingError, not a traceback from the first tensor moved there."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise TrainingError(f"--device {device!r}: not a device name; expected cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"--device {device}: no CUDA GPU is available here (torch.cuda.is_available() is "
                                "False); use --device cpu or leave --device out")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TrainingError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                f"numbered 0 to {torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TrainingError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise TrainingError(f"--device {device}: unsupported device type {dev.type!r}; expected cpu, cuda or mps")
    return dev


def choose_compile_mode(device: torch.device, requested: str = "auto", *, width_sensitive: str | None = None) -> str | None:
    """The ``torch.compile`` mode for the training forward, or None for eager.

    ``off``: eager. ``default`` / ``reduce-overhead``: that mode, on any device. ``auto``: eager on
    CPU (compiling a small CPU step costs more than it saves); on CUDA ``reduce-overhead`` (CUDA
    graphs: the fastest mode in every cell of benchmarks/RESULTS.md), whose batches are padded to
    a few bucket widths (:func:`bucket_width`) so that it records a graph per bucket, not per batch.
    When padding changes what the adapter computes (``width_sensitive`` says why: a gate pooled by
    the unmasked ``mean``) ``auto`` takes ``default`` instead, which needs no bucketing. This one
    function holds the ``auto`` choice so that GPU benchmarks can change it in one place.
    """
    if requested == "off":
        return None
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return None
    return "default" if width_sensitive else "reduce-overhead"


def choose_precision(device: torch.device, requested: str = "auto") -> torch.dtype | None:
    """The autocast dtype of the training forward, or None for fp32. ``auto``: bf16 on a GPU that
    supports it (what Trainer's ``--bf16`` does; the floor of benchmarks/speed.py is bf16 too),
    fp32 on CPU, where bf16 matrix products are slower."""
    if requested == "fp32":
        return None
    if requested == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


# the smallest bucket: below it, padding costs nothing measurable and saves graphs
MIN_BUCKET = 16


# up to here the buckets are powers of two; above, multiples of it (a 600-token batch pads to 768,
# not 1024: padding is compute, and a recorded graph per bucket is cheap next to it)
BUCKET_STEP = 256


def bucket_width(width: int, max_length: int | None) -> int:
    """The padded width of a batch whose longest row has ``width`` tokens: the next power of two
    (at least :data:`MIN_BUCKET`) up to :data:`BUCKET_STEP`, the next multiple of it above, never
    beyond ``max_length`` (rows are cut there already). A CUDA-graph run then sees a handful of
    widths (16, 32, 64, 128, 256, 512, 768, 1024, ...) instead of one per distinct batch length."""
    b = MIN_BUCKET
    while b < width and b < BUCKET_STEP:
        b *= 2
    if b < width:
        b = -(-width // BUCKET_STEP) * BUCKET_STEP
    if max_length is not None and b > max_length:
        b = max(max_length, width)
    return b


def width_sensitivity(handle) -> str | None:
    """Why padding a batch wider would change the adapter's output, or None: a gate pooled by the
    reference's unmasked ``mean`` averages over padding too."""
    for gp in handle.graph.gates.values():
        if gp.spec.pooling == "mean":
            return f"gate {gp.gate_id} averages over padding (pooling: mean)"
    return None


def compile_backend() -> str:
    """The torch.compile backend: inductor unless ``UNIPELT_COMPILE_BACKEND`` names another
    (``aot_eager`` checks the graph capture on CPU without inductor's code generation)."""
    return os.environ.get(COMPILE_BACKEND_ENV) or "inductor"
