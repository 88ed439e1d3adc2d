"""Host time per compiled forward + backward of one small LoRA layer (session 13, lead): the kernels
called as custom ops (every launch through the dispatcher and Triton's Python launcher) against
the same kernels as triton_ops (inductor launches them from its wrapper), and the grouped PyTorch
form. Shapes tiny, so the GPU finishes before the host issues the next step: the wall time per
step is the host's. Inductor's default mode (no CUDA graphs)."""
import sys
import time

import torch

import unipelt_kernels.lora_group as lg

M, K, D, R = 64, 256, 256, 16
g = torch.Generator().manual_seed(0)
x = torch.randn(M, K, generator=g).cuda().bfloat16().requires_grad_()
w = (torch.randn(D, K, generator=g) * 0.05).cuda().bfloat16()
A = (torch.randn(3 * R, K, generator=g) * 0.05).cuda().bfloat16().requires_grad_()
B = (torch.randn(3, D, R, generator=g) * 0.05).cuda().bfloat16().requires_grad_()


def kernels(x, A, B):
    z = lg.lora_shrink(x, A)  # a q,k,v-like group: one shrink, three expands
    y = 0
    for i in range(3):
        y = y + lg.lora_expand(x @ w.t(), z[:, i * R:(i + 1) * R], B[i], None, 2.0)
    return y


def grouped(x, A, B):
    z = x @ A.t()
    y = 0
    for i in range(3):
        y = y + (x @ w.t() + 2.0 * z[:, i * R:(i + 1) * R] @ B[i].t())
    return y


def time_it(fn, n=300):
    for _ in range(20):
        fn(x, A, B).float().sum().backward()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn(x, A, B).float().sum().backward()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


rows = []
for name, ops, fn in [("kernels, custom_op", "custom_op", kernels), ("kernels, triton_op", "triton_op", kernels),
                      ("grouped (PyTorch)", None, grouped), ("kernels, custom_op (again)", "custom_op", kernels),
                      ("kernels, triton_op (again)", "triton_op", kernels)]:
    torch._dynamo.reset()
    if ops:
        lg.COMPILED_OPS = ops
    us = time_it(torch.compile(fn, fullgraph=True))
    rows.append((name, us))
    print(f"{name:30s} {us:8.1f} us per compiled forward + backward", flush=True)
    eager = time_it(fn) if "again" not in name else None
    if eager is not None:
        print(f"{name + ' eager':30s} {eager:8.1f} us", flush=True)
sys.exit(0)
