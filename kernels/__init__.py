"""Triton kernels and their launchers, installed as ``flowgmm_fast.kernels``.

Each module holds the ``@triton.jit`` kernels of one op family and the launcher functions that reshape, allocate,
pick block sizes and launch them. The custom ops with autograd live in :mod:`flowgmm_fast.ops.triton_ops`.
"""
