"""Triton kernels, one module per op family (installed as pyclloss.triton_kernels)."""
