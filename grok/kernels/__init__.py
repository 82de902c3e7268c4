"""The kernel seam: the few operations the model and its layers call (``base.Kernels``), and
the one place that picks their implementation for a program (``select``).

- ``xla.XlaKernels``: the reference, plain XLA operations. GPUs, TPUs, device meshes,
  training, and the CPU wherever the native kernels do not apply.
- ``cpu.CpuKernels``: the native CPU kernels (C++ through XLA FFI) on one CPU device, plain
  or quantised weights.
- ``tpu.TpuKernels``: XLA's with Pallas TPU kernels for attention and the experts, on TPUs
  (a mesh of them, or one), plain or quantised weights.

The choice follows the platform of the devices the program is compiled for (a mesh's, or the
devices the parameters live on), never the host's default backend, and the chosen object is
passed explicitly: to ``grok.model.forward_fns`` and from there to every Haiku module. Another
platform's kernels are one more module beside ``xla`` and ``cpu`` and one more branch here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from grok.kernels import cpu
from grok.kernels.base import Kernels
from grok.kernels.xla import REFERENCE, XlaKernels

__all__ = ["REFERENCE", "Kernels", "XlaKernels", "devices_of", "select"]


def devices_of(tree: Any) -> set[jax.Device]:
    """The devices the ``jax.Array`` leaves of ``tree`` live on (a model's parameters)."""
    return {
        d for x in jax.tree_util.tree_leaves(tree) if isinstance(x, jax.Array) for d in x.devices()
    }


def select(
    dtype: jnp.dtype,
    *,
    mesh: Mesh | None = None,
    devices: Iterable[jax.Device] = (),
    quant: str | None = None,
    training: bool = False,
) -> Kernels:
    """The kernels for a program compiled for ``mesh``'s devices, or else for ``devices`` (those
    its parameters live on: ``devices_of(params)``), computing in ``dtype``.

    ``CpuKernels`` for one CPU device with no mesh, not for training, whether the matrices are
    quantised (``quant``, a mode of ``grok.quant.QUANT_MODES``) or not; its native kernels run
    where they exist for ``dtype`` (``cpu.available``: float32, or bfloat16 with AVX512-BF16,
    and not switched off by ``GROK_NATIVE=0``; the quantised ones, ``cpu.available_codes``,
    for bfloat16 with AVX512-VBMI too), and without them it still feeds XLA:CPU the views it
    needs. ``TpuKernels`` for TPUs, on a mesh or one device (its kernels run per device inside
    ``shard_map``, so it must know the mesh), not for training (the kernels have no
    gradients). Else the XLA reference for the devices' platform. ValueError for no devices
    or mixed platforms.
    """
    devices = list(mesh.devices.flat) if mesh is not None else list(devices)
    platforms = {d.platform for d in devices}
    if len(platforms) != 1:
        raise ValueError(f"select: expected the devices of one platform, got {sorted(platforms)}")
    platform = platforms.pop()
    if platform == "cpu" and mesh is None and len(devices) == 1 and not training:
        return cpu.CpuKernels(native=cpu.available(dtype))
    if platform == "tpu" and not training and (mesh is not None or len(devices) == 1):
        from grok.kernels.tpu import TpuKernels  # Pallas: imported for TPU programs only

        return TpuKernels(mesh=mesh)
    return XlaKernels(platform)
