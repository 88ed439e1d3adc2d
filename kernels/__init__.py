"""Fused Triton kernels for unipelt, installed as the package ``unipelt_kernels``.

Each kernel lives beside its pure-PyTorch reference, which stays the fallback.
"""
