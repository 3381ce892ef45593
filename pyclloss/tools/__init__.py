"""The tools built on the library: the ``pyclloss`` console script (``info``,
``train``, ``bench``, ``energy``), the reference trainer, the benchmark and
its workloads, the energy meters, and the loaders of the peer implementations.

The library (``import pyclloss``) never imports a tool.
"""
