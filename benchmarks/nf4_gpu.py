"""GPU checks of the 4-bit path (issue 10), one JSON line per result into ``--out``:

1. ``kernels/nf4.py`` against bitsandbytes' ``dequantize_4bit`` on CUDA: bit-exact or not (max
   abs difference) for the llama scenario's weight shapes, NF4 and FP4, with and without double
   quantization, bf16 and fp16 outputs; then timed (CUDA events, median of ``--iters`` after
   warm-up; and replayed from a CUDA graph of 20 calls, the GPU-side time) against
   ``dequantize_4bit`` on the same tensors, into the same kind of buffer, with the achieved
   bandwidth of the graph time (packed bytes + absmax read, float values written) and the config
   the autotuner picked; then every fixed config (bytes per program x warps) on
   plain absmax bf16, graph-timed.
2. The plugin on CUDA: LoRA on an NF4 llama (2 layers of the scenario's width), logits and
   adapter gradients of the Triton path against bitsandbytes' own ``Linear4bit.forward``; merge
   dequantizes and matches the live outputs; the Triton path under ``torch.compile(fullgraph=True)``
   (aot_eager: the traced graph with the custom ops, no inductor codegen) against eager.

    PYTHONPATH=. python benchmarks/nf4_gpu.py --out $OUT/nf4-gpu.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES = [(2048, 2048), (5632, 2048), (2048, 5632)]  # q/k/v/o, gate/up, down of the llama scenario


def timed(fn, iters: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def timed_graph(fn, iters: int, per_graph: int = 20) -> float:
    """GPU time of one call: ``per_graph`` calls captured in a CUDA graph, the median replay over
    ``iters``, divided. Eager timing of a few-microsecond kernel measures the host's launch path
    (Python, dispatch) as much as the kernel; replayed, the calls run back to back."""
    fn()  # compiled / tuned outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(per_graph):
            fn()
    return timed(g.replay, iters, warmup=3) / per_graph


def _bytes_moved(qs, out: torch.Tensor) -> int:
    n = out.numel()
    absmax = qs.absmax.numel() * qs.absmax.element_size()
    return n // 2 + absmax + n * out.element_size()


def kernel_rows(iters: int) -> list[dict]:
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    import speed

    speed.ensure_plugins()  # makes kernels/ importable as unipelt_kernels
    import triton

    from unipelt_kernels import nf4
    from unipelt_kernels.nf4 import dequantize_nf4

    rows = []
    torch.manual_seed(0)
    for shape in SHAPES:
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        for qt in ("nf4", "fp4"):
            for nested in (False, True):
                for dt in (torch.bfloat16, torch.float16):
                    q, qs = quantize_4bit(w.to(dt), blocksize=64, quant_type=qt, compress_statistics=nested)
                    ref = dequantize_4bit(q, qs)
                    out = torch.empty(qs.shape, dtype=dt, device="cuda")
                    got = dequantize_nf4(q, qs, out=out)
                    row = {"kind": "kernel", "shape": list(shape), "quant": qt, "double_quant": nested,
                           "dtype": str(dt).removeprefix("torch."), "bit_exact": bool(torch.equal(got, ref)),
                           "max_abs_diff": float((got.float() - ref.float()).abs().max())}
                    if qt == "nf4":
                        bnb_out = torch.empty_like(out)
                        row["bnb_ms"] = timed(lambda: dequantize_4bit(q, qs, out=bnb_out), iters)
                        row["triton_ms"] = timed(lambda: dequantize_nf4(q, qs, out=out), iters)
                        row["speedup"] = row["bnb_ms"] / row["triton_ms"]
                        row["bnb_graph_ms"] = timed_graph(lambda: dequantize_4bit(q, qs, out=bnb_out), iters)
                        row["triton_graph_ms"] = timed_graph(lambda: dequantize_nf4(q, qs, out=out), iters)
                        row["graph_speedup"] = row["bnb_graph_ms"] / row["triton_graph_ms"]
                        moved = _bytes_moved(qs, out)
                        row["bnb_gbps"] = moved / row["bnb_graph_ms"] / 1e6
                        row["triton_gbps"] = moved / row["triton_graph_ms"] / 1e6
                        best = getattr(nf4._nf4_tuned, "best_config", None)
                        row["tuned_config"] = str(best) if best is not None else None
                    rows.append(row)
        # every fixed config on plain absmax bf16 (what the autotuner chooses among)
        q, qs = quantize_4bit(w, blocksize=64, quant_type="nf4")
        out = torch.empty(qs.shape, dtype=torch.bfloat16, device="cuda")
        absmax, code, code2, absmax2, offset, bs2 = nf4._state_tensors(q, qs)
        n_values = out.numel()
        n_blocks = triton.cdiv(n_values, 64)
        for cfg in nf4._configs():
            b, warps = cfg.kwargs["BYTES"], cfg.num_warps
            grid = (triton.cdiv(n_blocks, max(b // 32, 1)),)

            def launch(b=b, warps=warps, grid=grid):
                nf4._nf4_kernel[grid](q, absmax, code, out, q.numel(), n_values, n_blocks, code2, absmax2, offset,
                                      HALF=32, BLOCKSIZE2=bs2, NESTED=False, BYTES=b, num_warps=warps)

            ms = timed_graph(launch, iters)
            rows.append({"kind": "kernel-config", "shape": list(shape), "bytes_per_program": b,
                         "num_warps": warps, "graph_ms": ms, "gbps": _bytes_moved(qs, out) / ms / 1e6,
                         "bit_exact": bool(torch.equal(out, dequantize_4bit(q, qs)))})
    return rows


def plugin_rows() -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    import speed
    import unipelt
    from unipelt_plugins.bnb import quantize_model, set_dequant_backend

    speed.ensure_plugins()
    rows = []
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=2, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=1000, attn_implementation="sdpa")
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    quantize_model(model, "nf4", compute_dtype=torch.bfloat16, double_quant=True, device="cuda")
    spec = {"modules": {"lora": {"method": "lora", "r": 16, "alpha": 32,
                                 "sites": ["attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.gate", "ffn.down"]}}}
    h = unipelt.compile(model, spec)
    with torch.no_grad():
        for p in h.parameters():
            p.normal_(0, 0.02)
    ids = torch.randint(0, 1000, (2, 256), device="cuda")
    res = {}
    for backend in ("bnb", "triton"):
        set_dequant_backend(backend)
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        res[backend] = (out.logits.detach().float(), torch.cat([p.grad.flatten().float() for p in h.parameters()]))
    lb, gb = res["bnb"]
    lt, gt = res["triton"]
    rows.append({"kind": "plugin", "what": "triton vs bnb dequant path (bf16 NF4 double-quant, LoRA r16 all)",
                 "logits_max_abs_diff": float((lb - lt).abs().max()), "logits_max_abs": float(lb.abs().max()),
                 "grad_rel_diff": float((gb - gt).norm() / gb.norm())})
    # the Triton path traced whole (custom ops in the graph, 0 graph breaks or it raises)
    set_dequant_backend("triton")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.zero_grad(set_to_none=True)
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    lc, gc = out.logits.detach().float(), torch.cat([p.grad.flatten().float() for p in h.parameters()])
    rows.append({"kind": "plugin", "what": "triton path: torch.compile(fullgraph=True, aot_eager) vs eager",
                 "logits_max_abs_diff": float((lc - lt).abs().max()), "grad_rel_diff": float((gc - gt).norm() / gt.norm())})
    torch._dynamo.reset()
    set_dequant_backend("bnb")
    with torch.no_grad():
        live = model(input_ids=ids).logits.float()
        result = h.merge()
        merged = model(input_ids=ids).logits.float()
    rows.append({"kind": "plugin", "what": "merge on NF4 (dequantized bf16 copy) vs live",
                 "merged": len(result["merged"]), "max_abs_diff": float((merged - live).abs().max()),
                 "max_abs": float(live.abs().max())})
    return rows


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--iters", type=int, default=50)
    a = p.parse_args()
    rows = []
    for part in (kernel_rows, plugin_rows):
        try:
            rows += part(a.iters) if part is kernel_rows else part()
        except Exception as e:  # keep what was measured
            rows.append({"kind": part.__name__, "error": f"{type(e).__name__}: {e}"})
    a.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
