"""Compile the shrink kernels (constexpr tile table) to PTX for sm_90 with triton 3.6.0, the
version on the H200 machine, on a machine without a GPU (a private install of that triton first
on sys.path): the front end and the NVIDIA back end to PTX, no launch.

    pip install --no-deps --target /tmp/kern-t36 triton==3.6.0
    python benchmarks/results-2026-12-01/kernels-s6/t36_ptx_check.py /tmp/kern-t36 > t36_ptx_check.log
"""
import importlib.util
import itertools
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

print("triton", triton.__version__, triton.__file__)
root = Path(__file__).resolve().parents[3]
spec = importlib.util.spec_from_file_location("lg", root / "kernels" / "lora_group.py")
lg = importlib.util.module_from_spec(spec)
sys.modules["lg"] = lg
spec.loader.exec_module(lg)

INTS = {
    "_shrink_fwd_kernel": ("M", "K", "N", "act_start", "stride_xm", "stride_wn", "stride_zm"),
    "_shrink_dx_kernel": ("M", "K", "act_start", "stride_dzm", "stride_zm", "stride_wn", "stride_dxm"),
    "_shrink_dw_kernel": ("M", "K", "rows_per_split", "act_start", "stride_dzm", "stride_zm", "stride_xm", "stride_dwn"),
}


def build(fn, dt, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name == "seed_ptr":
            sig[name] = "*i64"
        elif name in ("dw_ptr", "db_ptr", "b_ptr"):
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = dt
        else:
            assert name in INTS[fn.__name__], name
            sig[name] = "i32"
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=dict(consts)), target=GPUTarget("cuda", 90, 32))
    return len(k.asm["ptx"])


for segs, (dt, prec), drop, act in itertools.product(
        [((16, 16, 18), (0.1, 0.0, 0.0)), ((300,), (0.0,)), ((4, 6, 3, 3), (0.25, 0.0, 0.5, 0.0))],
        [("*bf16", "tf32"), ("*fp32", "ieee"), ("*fp16", "tf32")], (False, True), (False, True)):
    t = lg._tiles(*segs)
    c = dict(t.kwargs(), HAS_DROP=drop, UPCAST=False, PRECISION=prec, BLOCK_N=t.block_n, BLOCK_K=64)
    sizes = [build(lg._shrink_fwd_kernel, dt, dict(c, BLOCK_M=32))]
    sizes += [build(f, dt, dict(c, HAS_ACT=act, BLOCK_M=64)) for f in (lg._shrink_dx_kernel, lg._shrink_dw_kernel)]
    print(f"tiles {t.n} {segs} {dt} drop={drop} act={act}: PTX chars fwd/dx/dw {sizes}", flush=True)
print("ALL OK")
