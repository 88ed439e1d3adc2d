"""NF4 dequantization in Triton: bitsandbytes' 4-bit weight format, unpacked into a float buffer.

The format (bitsandbytes ``quantize_4bit``, QLoRA, Dettmers et al. 2023, arXiv 2305.14314): the
weight, flattened row-major, is cut into blocks of ``blocksize`` values; each value is the index
(4 bits) of the nearest entry of a 16-value code book (NF4: quantiles of N(0, 1) scaled to
[-1, 1]) times its block's absmax. Two indices share a byte, the first value in the high nibble.
With double quantization (``compress_statistics``) the absmax values themselves are 8-bit
blockwise-quantized: absmax = code2[q] · absmax2[block of q] + offset.

    w[i] = code[nibble(i)] · absmax[i // blocksize]

:func:`dequantize_nf4` writes w into ``out`` (a caller's reused buffer, as unsloth does, or a new
tensor); :func:`dequantize_reference` is the same formula in PyTorch, the fallback and the test
oracle beside bitsandbytes' own ``dequantize_4bit``. Computed in float32, rounded once to the
output dtype, as bitsandbytes' CUDA kernel does.

Under ``TRITON_INTERPRET=1`` (CPU) the kernel runs in the interpreter: set it before importing.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference below still works
    triton = None

# bytes per program: 2 values each; 1024 keeps the interpreter to a few programs on test shapes
BLOCK = 1024


if triton is not None:

    @triton.jit
    def _nf4_kernel(q_ptr, absmax_ptr, code_ptr, out_ptr, n_bytes,
                    qabs_code_ptr, absmax2_ptr, offset,
                    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                    BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        m = offs < n_bytes
        byte = tl.load(q_ptr + offs, mask=m, other=0).to(tl.int32)
        hi = (byte >> 4) & 0xF
        lo = byte & 0xF
        # both values of a byte are in one block (blocksize is even)
        blk = (offs * 2) // BLOCKSIZE
        if NESTED:
            qa = tl.load(absmax_ptr + blk, mask=m, other=0).to(tl.int32)
            a = tl.load(qabs_code_ptr + qa, mask=m, other=0.0).to(tl.float32)
            a = a * tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=m, other=0.0).to(tl.float32) + offset
        else:
            a = tl.load(absmax_ptr + blk, mask=m, other=0.0).to(tl.float32)
        vh = tl.load(code_ptr + hi, mask=m, other=0.0).to(tl.float32) * a
        vl = tl.load(code_ptr + lo, mask=m, other=0.0).to(tl.float32) * a
        ty = out_ptr.dtype.element_ty
        # (hi, lo) pairs interleaved into one contiguous run of 2·BLOCK values: coalesced stores
        # (two stride-2 stores leave half of every written sector to a second pass). join +
        # reshape is what tl.interleave does; written with the core builtins because
        # tl.interleave is a @jit function of triton's standard library, which fails under the
        # interpreter when triton was imported before TRITON_INTERPRET was set
        v = tl.reshape(tl.join(vh, vl), [2 * BLOCK]).to(ty)
        o = pid * BLOCK * 2 + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + o, v, mask=o < n_bytes * 2)


def _check(packed: Tensor, qs) -> None:
    if qs.quant_type != "nf4" and qs.quant_type != "fp4":
        raise ValueError(f"quant_type {qs.quant_type!r}: the kernel reads 4-bit code books only")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed weight of dtype {packed.dtype}: expected uint8 storage")
    if qs.blocksize % 2:
        raise ValueError(f"blocksize {qs.blocksize} is odd")


def dequantize_nf4(packed: Tensor, qs, out: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """The (out, in) float weight of a 4-bit ``packed`` weight and its bitsandbytes ``QuantState``
    ``qs``, written into ``out`` when given (shape ``qs.shape``), else a new tensor of ``dtype``
    (default ``qs.dtype``). The code book is the state's own, so FP4 works as well."""
    _check(packed, qs)
    dtype = out.dtype if out is not None else (dtype or qs.dtype)
    if out is None:
        out = torch.empty(qs.shape, dtype=dtype, device=packed.device)
    elif tuple(out.shape) != tuple(qs.shape) or not out.is_contiguous():
        raise ValueError(f"out buffer {tuple(out.shape)}: expected a contiguous {tuple(qs.shape)}")
    if triton is None:
        out.copy_(dequantize_reference(packed, qs))
        return out
    n_bytes = packed.numel()
    code = qs.code.to(device=packed.device, dtype=torch.float32)
    if qs.nested:
        s2 = qs.state2
        absmax, code2, absmax2 = qs.absmax, s2.code.to(packed.device, torch.float32), s2.absmax
        offset, bs2 = float(qs.offset), int(s2.blocksize)
    else:
        absmax, code2, absmax2, offset, bs2 = qs.absmax, code, code, 0.0, 2
    grid = (triton.cdiv(n_bytes, BLOCK),)
    _nf4_kernel[grid](packed, absmax, code, out, n_bytes, code2, absmax2, offset,
                      BLOCKSIZE=int(qs.blocksize), BLOCKSIZE2=bs2, NESTED=bool(qs.nested), BLOCK=BLOCK)
    return out


def dequantize_reference(packed: Tensor, qs) -> Tensor:
    """The same formula in PyTorch (float32 arithmetic, one rounding to ``qs.dtype``)."""
    _check(packed, qs)
    flat = packed.reshape(-1).to(torch.int32)
    idx = torch.stack([(flat >> 4) & 0xF, flat & 0xF], dim=1).reshape(-1)
    if qs.nested:
        s2 = qs.state2
        q = qs.absmax.reshape(-1).long()
        a2 = s2.absmax.float().repeat_interleave(s2.blocksize)[: q.numel()]
        absmax = s2.code.float().to(q.device)[q] * a2 + float(qs.offset)
    else:
        absmax = qs.absmax.float()
    code = qs.code.float().to(packed.device)
    n = idx.numel()
    scale = absmax.repeat_interleave(qs.blocksize)[:n]
    return (code[idx] * scale).reshape(qs.shape).to(qs.dtype)
