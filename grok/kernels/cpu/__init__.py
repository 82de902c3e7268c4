"""Native CPU kernels: the library's build (``build``), its JAX functions (``ffi``) and the seam's
operations as calls into them (``ops.CpuKernels``). ``grok.kernels.select`` picks
``CpuKernels`` for a program on one CPU device where the kernels exist for its dtype."""

from grok.kernels.cpu.build import (
    ATTENTION_TARGET,
    ENV_CACHE,
    ENV_SWITCH,
    GROUPED_TARGET,
    MATVEC_TARGET,
    QUANT_GROUPED_TARGET,
    QUANT_MATVEC_TARGET,
    available,
    available_codes,
    why_unavailable,
)
from grok.kernels.cpu.ffi import (
    MAX_ROWS,
    attention,
    grouped_matvec,
    matvec,
    quant_grouped_matvec,
    quant_matvec,
)
from grok.kernels.cpu.ops import CpuKernels

__all__ = [
    "ATTENTION_TARGET",
    "ENV_CACHE",
    "ENV_SWITCH",
    "GROUPED_TARGET",
    "MATVEC_TARGET",
    "MAX_ROWS",
    "QUANT_GROUPED_TARGET",
    "QUANT_MATVEC_TARGET",
    "CpuKernels",
    "attention",
    "available",
    "available_codes",
    "grouped_matvec",
    "matvec",
    "quant_grouped_matvec",
    "quant_matvec",
    "why_unavailable",
]
