"""NF4 dequantization in Triton: bitsandbytes' 4-bit weight format, unpacked into a float buffer.

The format (bitsandbytes ``quantize_4bit``, QLoRA, Dettmers et al. 2023, arXiv 2305.14314): the
weight, flattened row-major, is cut into blocks of ``blocksize`` values; each value is the index
(4 bits) of the nearest entry of a 16-value code book (NF4: quantiles of N(0, 1) scaled to
[-1, 1]) times its block's absmax. Two indices share a byte, the first value in the high nibble.
With double quantization (``compress_statistics``) the absmax values themselves are 8-bit
blockwise-quantized: absmax = code2[q] · absmax2[block of q] + offset.

    w[i] = code[nibble(i)] · absmax[i // blocksize]

Three layers, as the other kernels:
  ``_nf4_kernel`` (Triton): one program dequantizes ``ROWS`` whole quantization blocks, a
  ``(ROWS, blocksize/2)`` tile of packed bytes (vectorised loads): one absmax load per block (not
  per byte), the 16-entry code book read from its table, contiguous (hi, lo) pairs interleaved
  into 16-byte stores. Tile size and warps are autotuned on CUDA (:func:`_configs`); the
  interpreter runs one fixed config.
  :func:`dequantize_nf4`: the launcher, into a caller's buffer or a new tensor.
  The torch custom ops ``unipelt_kernels::nf4_dequantize`` and ``unipelt_kernels::nf4_linear``
  (:func:`nf4_linear`): what ``torch.compile`` traces (``fullgraph=True``, CUDA graphs) in place
  of a Python call, with fake implementations for tracing and, for the linear, an autograd rule
  whose backward dequantizes again rather than keeping the float weight (QLoRA's memory promise).
  Their ``torch.library.triton_op`` twins ``nf4_dequantize_t`` / ``nf4_linear_t`` (the same
  bodies, the kernel through ``wrap_triton``; the same autograd rule) are what a compiled forward
  on CUDA calls (``unipelt_kernels.compiled_ops``: ``UNIPELT_KERNEL_OPS=custom_op`` keeps the
  custom ops): inductor launches the kernel and the GEMM from its own generated code.

:func:`dequantize_reference` is the formula in PyTorch, the fallback (no Triton, a CPU tensor
outside the interpreter) and the test oracle beside bitsandbytes' own ``dequantize_4bit``.
Computed in float32, rounded once to the output dtype, as bitsandbytes' CUDA kernel does.

Under ``TRITON_INTERPRET=1`` (CPU) the kernel runs in the interpreter: set it before importing.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.nn import functional as F

from unipelt_kernels.compiled_ops import compiled_ops

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference below still works
    triton = None

# the fixed launch (the interpreter, and a first call inside CUDA-graph capture, where the
# autotuner must not benchmark): packed bytes per program and warps, the fastest measured on the
# H200's llama shapes; on CUDA the autotuner otherwise picks among _configs()
BYTES, WARPS = 2048, 4


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    def _configs() -> list:
        # bytes per program x warps: 2-16 KiB of output per program. Measured on the H200 (RESULTS.md,
        # issue 10): 1-2 KiB of packed bytes with 4 warps are the fastest on the llama shapes (2.7-3.9
        # TB/s), 8 KiB the slowest (2.1-3.2 TB/s)
        return [triton.Config({"BYTES": b}, num_warps=w) for b in (1024, 2048, 4096, 8192) for w in (4, 8)]

    @triton.jit
    def _nf4_kernel(q_ptr, absmax_ptr, code_ptr, out_ptr, n_bytes, n_values, n_blocks,
                    qabs_code_ptr, absmax2_ptr, offset_ptr,
                    HALF: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                    BYTES: tl.constexpr):
        # HALF = blocksize / 2 packed bytes per quantization block; ROWS whole blocks per program
        ROWS: tl.constexpr = (BYTES + HALF - 1) // HALF
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)
        rmask = rows < n_blocks
        offs = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
        m = offs < n_bytes  # the last block may be partial
        byte = tl.load(q_ptr + offs, mask=m, other=0).to(tl.int32)
        if NESTED:
            qa = tl.load(absmax_ptr + rows, mask=rmask, other=0).to(tl.int32)
            a = tl.load(qabs_code_ptr + qa, mask=rmask, other=0.0).to(tl.float32)
            offset = tl.load(offset_ptr).to(tl.float32)
            a = a * tl.load(absmax2_ptr + rows // BLOCKSIZE2, mask=rmask, other=0.0).to(tl.float32) + offset
        else:
            a = tl.load(absmax_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        hi = (byte >> 4) & 0xF
        lo = byte & 0xF
        # the code book read from its 64-byte table (L1 hits). Holding it in registers as a select
        # tree on the nibble's bits (15 selects a value) measured about 2x slower on the H200 (1.3-1.8
        # against 2.1-3.9 TB/s over the configs and llama shapes): the tree makes it ALU-bound
        vh = tl.load(code_ptr + hi).to(tl.float32)
        vl = tl.load(code_ptr + lo).to(tl.float32)
        vh = vh * a[:, None]
        vl = vl * a[:, None]
        ty = out_ptr.dtype.element_ty
        # (hi, lo) pairs interleaved into one contiguous run of 2·HALF values per block: coalesced
        # stores. join + reshape is what tl.interleave does, written with the core builtins because
        # tl.interleave is a @jit function of triton's standard library, which fails under the
        # interpreter when triton was imported before TRITON_INTERPRET was set
        v = tl.reshape(tl.join(vh, vl), [ROWS, 2 * HALF]).to(ty)
        o = rows[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
        tl.store(out_ptr + o, v, mask=o < n_values)  # an odd count leaves the last low nibble unused

    _nf4_tuned = triton.autotune(configs=_configs(), key=["n_bytes", "HALF", "NESTED"])(_nf4_kernel)


def _check(packed: Tensor, quant_type: str, blocksize: int) -> None:
    if quant_type != "nf4" and quant_type != "fp4":
        raise ValueError(f"quant_type {quant_type!r}: the kernel reads 4-bit code books only")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed weight of dtype {packed.dtype}: expected uint8 storage")
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize {blocksize}: expected a power of two (bitsandbytes uses 32-4096)")


def _state_tensors(packed: Tensor, qs) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
    """(absmax, code, code2, absmax2, offset, blocksize2) of a bitsandbytes ``QuantState``: the
    kernel's arguments; without double quantization code2/absmax2/offset are unused placeholders.
    The offset stays a 0-d tensor (read by the kernel), not a Python float: ``float()`` of a
    tensor would be a ``.item()``, a graph break and a device sync under torch.compile."""
    code = qs.code
    if code.device != packed.device or code.dtype != torch.float32:
        code = code.to(device=packed.device, dtype=torch.float32)
    if qs.nested:
        s2 = qs.state2
        code2 = s2.code
        if code2.device != packed.device or code2.dtype != torch.float32:
            code2 = code2.to(device=packed.device, dtype=torch.float32)
        return qs.absmax, code, code2, s2.absmax, qs.offset, int(s2.blocksize)
    return qs.absmax, code, code, code, code, 2


_TUNED: set[tuple] = set()  # launch keys the autotuner has picked a config for


def _launch(packed: Tensor, absmax: Tensor, code: Tensor, code2: Tensor, absmax2: Tensor, offset: Tensor,
            blocksize: int, blocksize2: int, nested: bool, out: Tensor, wrap=None) -> Tensor:
    """The kernel into ``out``; ``wrap``: ``torch.library.wrap_triton`` inside the triton_op twins,
    where inductor sees the kernel (autotuned by inductor itself, at the compiled graph's first run:
    never inside a capture, which CUDA graph trees and graphed steps start after warm-up runs)."""
    n_bytes, n_values = packed.numel(), out.numel()
    if not 2 * n_bytes - 1 <= n_values <= 2 * n_bytes:
        raise ValueError(f"out buffer of {n_values} values for {n_bytes} packed bytes")
    n_blocks = triton.cdiv(n_values, blocksize)
    half = blocksize // 2
    args = (packed, absmax, code, out, n_bytes, n_values, n_blocks, code2, absmax2, offset)
    key = (n_bytes, half, nested, out.dtype, out.device)
    # the autotuner benchmarks on a key's first call: never while a CUDA graph is being captured
    # (the launches would be recorded); a key it tuned before launches its pick there too. The twins
    # (``wrap``) neither read nor mark the keys: a traced launch is tuned by inductor, on its own copy
    # of the kernel, and its sizes may be symbolic (a SymInt has no hash)
    if out.is_cuda and not _interpreting() and ((wrap is None and key in _TUNED)
                                                or not torch.cuda.is_current_stream_capturing()):
        grid = lambda meta: (triton.cdiv(n_blocks, max(meta["BYTES"] // half, 1)),)  # noqa: E731
        (_nf4_tuned if wrap is None else wrap(_nf4_tuned))[grid](*args, HALF=half, BLOCKSIZE2=blocksize2,
                                                                  NESTED=nested)
        if wrap is None:
            _TUNED.add(key)
    else:
        grid = (triton.cdiv(n_blocks, max(BYTES // half, 1)),)
        kw = {} if _interpreting() else {"num_warps": WARPS}
        (_nf4_kernel if wrap is None else wrap(_nf4_kernel))[grid](*args, HALF=half, BLOCKSIZE2=blocksize2,
                                                                    NESTED=nested, BYTES=BYTES, **kw)
    return out


def _kernel_runs(t: Tensor) -> bool:
    return triton is not None and (t.is_cuda or _interpreting())


def dequantize_nf4(packed: Tensor, qs, out: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """The (out, in) float weight of a 4-bit ``packed`` weight and its bitsandbytes ``QuantState``
    ``qs``, written into ``out`` when given (shape ``qs.shape``), else a new tensor of ``dtype``
    (default ``qs.dtype``). The code book is the state's own, so FP4 works as well."""
    _check(packed, qs.quant_type, int(qs.blocksize))
    dtype = out.dtype if out is not None else (dtype or qs.dtype)
    if out is None:
        out = torch.empty(qs.shape, dtype=dtype, device=packed.device)
    elif tuple(out.shape) != tuple(qs.shape) or not out.is_contiguous():
        raise ValueError(f"out buffer {tuple(out.shape)}: expected a contiguous {tuple(qs.shape)}")
    if not _kernel_runs(packed):
        out.copy_(dequantize_reference(packed, qs))
        return out
    absmax, code, code2, absmax2, offset, bs2 = _state_tensors(packed, qs)
    return _launch(packed, absmax, code, code2, absmax2, offset, int(qs.blocksize), bs2, bool(qs.nested), out)


def dequantize_reference(packed: Tensor, qs) -> Tensor:
    """The same formula in PyTorch (float32 arithmetic, one rounding to ``qs.dtype``)."""
    _check(packed, qs.quant_type, int(qs.blocksize))
    if qs.nested:
        s2 = qs.state2
        absmax2, code2, offset, bs2 = s2.absmax, s2.code, qs.offset, int(s2.blocksize)
    else:
        absmax2 = code2 = offset = None
        bs2 = 2
    return _reference(packed, qs.absmax, qs.code, code2, absmax2, offset, int(qs.blocksize), bs2,
                      bool(qs.nested), list(qs.shape), qs.dtype)


def _reference(packed: Tensor, absmax: Tensor, code: Tensor, code2: Tensor | None, absmax2: Tensor | None,
               offset: Tensor | None, blocksize: int, blocksize2: int, nested: bool, shape: list[int],
               dtype: torch.dtype) -> Tensor:
    flat = packed.reshape(-1).to(torch.int32)
    idx = torch.stack([(flat >> 4) & 0xF, flat & 0xF], dim=1).reshape(-1)
    if nested:
        q = absmax.reshape(-1).long()
        a2 = absmax2.float().repeat_interleave(blocksize2)[: q.numel()]
        absmax = code2.float().to(q.device)[q] * a2 + offset.float()
    else:
        absmax = absmax.float()
    code = code.float().to(packed.device)
    n = 1
    for d in shape:
        n *= d
    idx = idx[:n]  # an odd count leaves the last low nibble unused
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (code[idx] * scale).reshape(shape).to(dtype)


# ------------------------------------------------------------------------------------------
# torch custom ops: what torch.compile traces (fullgraph, CUDA graphs) instead of Python calls
# ------------------------------------------------------------------------------------------
# One argument list for both ops: the packed weight and its quantization state as tensors and
# numbers (a bitsandbytes QuantState is a Python object the op schema cannot carry).
def _dequantize_body(packed: Tensor, absmax: Tensor, code: Tensor, code2: Tensor, absmax2: Tensor, offset: Tensor,
                     blocksize: int, blocksize2: int, nested: bool, shape: list[int], dtype: torch.dtype,
                     wrap=None) -> Tensor:
    if not _kernel_runs(packed):
        return _reference(packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, shape, dtype)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    return _launch(packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, out, wrap)


@torch.library.custom_op("unipelt_kernels::nf4_dequantize", mutates_args=())
def nf4_dequantize(packed: Tensor, absmax: Tensor, code: Tensor, code2: Tensor, absmax2: Tensor, offset: Tensor,
                   blocksize: int, blocksize2: int, nested: bool, shape: list[int], dtype: torch.dtype) -> Tensor:
    """The float weight (``shape``, ``dtype``) of a 4-bit packed weight: the Triton kernel on CUDA
    (and under the interpreter), the PyTorch formula elsewhere."""
    return _dequantize_body(packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, shape, dtype)


@nf4_dequantize.register_fake
def _(packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


@torch.library.custom_op("unipelt_kernels::nf4_linear", mutates_args=())
def nf4_linear_op(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, code2: Tensor, absmax2: Tensor,
                  offset: Tensor, blocksize: int, blocksize2: int, nested: bool, out_features: int,
                  in_features: int, bias: Tensor | None) -> Tensor:
    """``x · Wᵀ + bias`` for the 4-bit weight W, computed in ``x``'s dtype: one dequantization
    into a temporary (the caching allocator hands the freed block of one shape to the next layer
    of that shape: one reused buffer, as unsloth's), one GEMM."""
    w = nf4_dequantize(packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested,
                       [out_features, in_features], x.dtype)
    return F.linear(x, w, bias)


@nf4_linear_op.register_fake
def _(x, packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, out_features, in_features,
      bias):
    return x.new_empty((*x.shape[:-1], out_features))


def _linear_setup(ctx, inputs, output) -> None:
    x, packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, out_f, in_f, bias = inputs
    # only the packed weight and its state are kept (not x, not the float weight): grad_x needs W alone
    ctx.save_for_backward(packed, absmax, code, code2, absmax2, offset)
    ctx.meta = (blocksize, blocksize2, nested, out_f, in_f)
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad: Tensor, dequantize=nf4_dequantize):
    packed, absmax, code, code2, absmax2, offset = ctx.saved_tensors
    blocksize, blocksize2, nested, out_f, in_f = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        # dequantized again rather than kept from the forward: the float weight never outlives a GEMM
        w = dequantize(packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested,
                       [out_f, in_f], grad.dtype)
        grad_x = grad @ w
    if ctx.has_bias and ctx.needs_input_grad[12]:
        grad_bias = grad.reshape(-1, out_f).sum(0)
    return grad_x, None, None, None, None, None, None, None, None, None, None, None, grad_bias


nf4_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


# ------------------------------------------------------------------------------------------
# the same two ops as ``triton_op``s, for compiled forwards on CUDA (unipelt_kernels.compiled_ops):
# inductor traces their bodies, sees the kernel (``wrap_triton``) and launches it from its own
# generated code, the GEMM as its own extern call, instead of calling an opaque op through the
# dispatcher and Triton's Python launcher on every step
# ------------------------------------------------------------------------------------------
if triton is not None:

    @torch.library.triton_op("unipelt_kernels::nf4_dequantize_t", mutates_args=())
    def nf4_dequantize_t(packed: Tensor, absmax: Tensor, code: Tensor, code2: Tensor, absmax2: Tensor,
                         offset: Tensor, blocksize: int, blocksize2: int, nested: bool, shape: list[int],
                         dtype: torch.dtype) -> Tensor:
        return _dequantize_body(packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, shape,
                                dtype, torch.library.wrap_triton)

    @torch.library.triton_op("unipelt_kernels::nf4_linear_t", mutates_args=())
    def nf4_linear_t(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, code2: Tensor, absmax2: Tensor,
                     offset: Tensor, blocksize: int, blocksize2: int, nested: bool, out_features: int,
                     in_features: int, bias: Tensor | None) -> Tensor:
        w = _dequantize_body(packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested,
                             [out_features, in_features], x.dtype, torch.library.wrap_triton)
        return F.linear(x, w, bias)

    def _linear_t_backward(ctx, grad: Tensor):
        return _linear_backward(ctx, grad, dequantize=nf4_dequantize_t)

    nf4_linear_t.register_autograd(_linear_t_backward, setup_context=_linear_setup)


def nf4_linear(x: Tensor, packed: Tensor, qs, bias: Tensor | None = None) -> Tensor:
    """``x · Wᵀ + bias`` for a bitsandbytes 4-bit weight (``packed``, its ``QuantState`` ``qs``),
    in ``x``'s dtype; differentiable in ``x`` (and ``bias``), traceable by ``torch.compile``."""
    _check(packed, qs.quant_type, int(qs.blocksize))
    absmax, code, code2, absmax2, offset, bs2 = _state_tensors(packed, qs)
    out_f, in_f = int(qs.shape[0]), int(qs.shape[1])
    if x.shape[-1] != in_f:
        raise ValueError(f"input of {x.shape[-1]} features: the 4-bit weight is ({out_f}, {in_f})")
    # eager and compiled off CUDA: the custom op; compiled on CUDA: its triton_op twin (inductor
    # launches the kernel)
    op = nf4_linear_t if torch.compiler.is_compiling() and triton is not None and compiled_ops(x) else nf4_linear_op
    return op(x, packed, absmax, code, code2, absmax2, offset, int(qs.blocksize), bs2, bool(qs.nested), out_f, in_f,
              bias)
