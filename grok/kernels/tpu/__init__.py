"""The TPU implementation of the kernel seam: ``TpuKernels`` (``ops``), XLA's operations with
Pallas TPU kernels where XLA's own would copy or grow: attention (``flash_attention``) and the
experts' grouped product (``grouped_matmul``), each in a module of its own.

Pallas TPU kernels compile wherever libtpu is installed (the ``tpu`` extra), with or without a
TPU, and run in Pallas' interpreter on any backend (``TpuKernels(interpret=True)``).
"""

from grok.kernels.tpu.ops import CacheLayer, TpuKernels

__all__ = ["CacheLayer", "TpuKernels"]
