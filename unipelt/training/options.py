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
    labels: the class labels in index order (default: the sorted labels of the training data; an
    evaluation row with a label outside them is a DataError).
    model_name: recorded in the report and the adapter (set automatically when a name is given).
    data_fields: the field names the data was read with (``text``, ``label``, ``prompt``,
    ``response``), recorded with the adapter so ``unipelt eval``/``gates`` read files the same way.
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
    adapter_name: str = "default"
    model_name: str | None = None
    data_fields: dict[str, str] | None = None
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


def choose_compile_mode(device: torch.device, requested: str = "auto") -> str | None:
    """The ``torch.compile`` mode for the training forward, or None for eager.

    ``off``: eager. ``default`` / ``reduce-overhead``: that mode, on any device. ``auto``: eager on
    CPU (compiling a small CPU step costs more than it saves), ``default`` on CUDA. This one
    function holds the ``auto`` choice so that GPU benchmarks can change it in one place.
    """
    if requested == "off":
        return None
    if requested != "auto":
        return requested
    return "default" if device.type == "cuda" else None


def compile_backend() -> str:
    """The torch.compile backend: inductor unless ``UNIPELT_COMPILE_BACKEND`` names another
    (``aot_eager`` checks the graph capture on CPU without inductor's code generation)."""
    return os.environ.get(COMPILE_BACKEND_ENV) or "inductor"
