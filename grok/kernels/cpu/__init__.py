"""Native CPU kernels: the library's build (``build``), its JAX functions (``ffi``) and the seam's
operations as calls into them (``ops.CpuKernels``). ``grok.kernels.select`` picks
``CpuKernels`` for a program on one CPU device where the kernels exist for its dtype."""

from grok.kernels.cpu.build import (
    ATTENTION_TARGET,
    ENV_CACHE,
    ENV_SWITCH,
    GROUPED_TARGET,
    MATVEC_TARGET,
    available,
    why_unavailable,
)
from grok.kernels.cpu.ffi import MAX_ROWS, attention, grouped_matvec, matvec
from grok.kernels.cpu.ops import CpuKernels

__all__ = [
    "ATTENTION_TARGET",
    "ENV_CACHE",
    "ENV_SWITCH",
    "GROUPED_TARGET",
    "MATVEC_TARGET",
    "MAX_ROWS",
    "CpuKernels",
    "attention",
    "available",
    "grouped_matvec",
    "matvec",
    "why_unavailable",
]
