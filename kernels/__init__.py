"""Fused Triton kernels for unipelt, installed as the package ``unipelt_kernels``.

Each kernel lives beside its pure-PyTorch reference, which stays the fallback.

Imported under its folder's name (``import kernels`` with the repository root on ``sys.path``,
as ``python -m`` or pytest from a checkout does), this folder would pass for the PyPI package
``kernels`` that other libraries probe for (transformers' ``is_kernels_available``, bitsandbytes'
``from kernels import get_kernel``). Under that name it stands aside: the real package, when one
is installed elsewhere on ``sys.path``, is loaded in its place; otherwise the module is left
empty and looks like a bare namespace directory (``__file__`` None, no submodules), which
transformers reads as "not installed" and from which ``from kernels import get_kernel`` raises
ImportError, exactly as without the folder. (Raising ImportError outright would be simpler, but
transformers imports the probe target unguarded and would fail to import.)

Imported as ``unipelt_kernels`` on a machine with CUDA, it turns on inductor's static launcher
for user-defined Triton kernels (see :func:`_launch_user_kernels_statically`).
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None and _spec.origin != os.path.abspath(__file__):
        _real = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _real  # the import statement returns what sys.modules holds afterwards
        _spec.loader.exec_module(_real)
    else:
        __file__ = None  # noqa: F811 - a namespace directory, not an installed package
        __path__ = []  # no submodules under the borrowed name
else:
    def _launch_user_kernels_statically() -> None:
        """Let inductor launch the kernels from its generated code through its static CUDA launcher,
        as it launches its own kernels, instead of Triton's Python launcher.

        The LoRA, NF4 and bottleneck ops are ``triton_op``s, which inductor compiles into its code.
        Each of their launches then goes through Triton's Python launcher unless
        ``torch._inductor.config.static_launch_user_defined_triton_kernels`` is on (off by default in
        torch 2.11-2.13). In inductor's default mode, where the step waits for the host, that cost
        11 ms of a 31-ms llama train step; with the static launcher the step took 25.9 ms (H200,
        benchmarks/RESULTS.md, Kernels, session 14). Under CUDA graphs it makes no difference.

        Inductor falls back to Triton's launcher for a kernel the static one cannot take. The
        setting covers every user-defined Triton kernel compiled in the process, not only these.
        Setting the variable TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS (to 0 or 1)
        leaves the choice to it. Nothing changes without CUDA, or where this torch lacks the setting
        or its static launcher."""
        import os

        if "TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS" in os.environ:
            return
        import torch

        if not torch.cuda.is_available():
            return
        from torch._inductor import config

        if getattr(config, "use_static_cuda_launcher", False) \
                and hasattr(config, "static_launch_user_defined_triton_kernels"):
            config.static_launch_user_defined_triton_kernels = True

    _launch_user_kernels_statically()
