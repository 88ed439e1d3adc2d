"""Which ops a compiled forward calls, for every kernel module (LoRA group, bottleneck, NF4).

Each kernel is registered twice: as an opaque ``torch.library.custom_op`` (torch.compile keeps it
as one node and calls it through the dispatcher and Triton's Python launcher on every step) and
as a ``torch.library.triton_op`` twin (inductor traces its body, sees the ``wrap_triton``'d
kernels and launches them from its own generated code). ``UNIPELT_KERNEL_OPS`` picks for compiled
forwards: ``triton_op`` (default) or ``custom_op``. Tensors off CUDA (the interpreter) take the
custom ops whatever it says: inductor's CPU code cannot launch a Triton kernel, and under
``TRITON_INTERPRET=1`` ``wrap_triton`` hands kernels back untraced. Eager calls never go through
the twins. No triton import here: the NF4 module works without triton (its PyTorch formula).
"""
from __future__ import annotations

import os

from torch import Tensor


def ops_choice(value: str) -> str:
    """``value`` of ``UNIPELT_KERNEL_OPS``, checked."""
    if value not in ("triton_op", "custom_op"):
        raise ValueError(f"UNIPELT_KERNEL_OPS={value!r}: expected triton_op or custom_op")
    return value


COMPILED_OPS = ops_choice(os.environ.get("UNIPELT_KERNEL_OPS", "triton_op"))


def compiled_ops(x: Tensor) -> bool:
    """Whether a compiled forward on ``x`` calls the ``triton_op`` twins."""
    return COMPILED_OPS == "triton_op" and x.device.type == "cuda"
