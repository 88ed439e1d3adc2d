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
