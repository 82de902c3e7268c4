"""Loading Grok-1's released ``ckpt-0`` pickles into this library's parameter tree.

The files are read one leaf at a time by ``grok.grok1.folder`` (every shape checked, no
pickle code run: ``grok.grok1.pickle_parser``) and placed into the stacked parameter tree
(``grok.params``). Two ways to hold the matrices:

- ``quantize=None``: every int8 matrix is dequantised (``weight * scales``, exact in float32)
  and cast to ``dtype``.
- ``quantize="int8"``: the matrices stay int8 on the device with float32 per-output-channel
  scales (``grok.layers.QuantWeight``). q/k/v and the expert W1/W3 keep the release's int8
  values and scales bit for bit. The attention output (``o_proj``) and expert W2 were released
  with 8 scale blocks along the *input* axis, which a per-output-channel scale cannot express:
  those two are re-quantised per output channel from their exactly dequantised values
  (``grok.quant.quantize``). That adds at most half a new quantisation step per entry to
  those two matrices, on top of the release's own rounding.

The whole parameter tree is built on the host, then put on one device. A full Grok-1 (316 B
parameters) fits neither one host's memory comfortably nor one accelerator: for that, convert
it once with ``scripts/convert.py`` and load the safetensors output with a mesh.

Shape letters: V vocab, D width, N query heads, K kv heads, H head dim, E experts,
Fe expert width, L layers.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grok.config import GrokConfig
from grok.errors import CheckpointError, ConfigError
from grok.grok1.folder import config_beside, found_ckpt_dir, tensors_in
from grok.grok1.release import (
    QuantizedWeight8bit,
    check_grok1_config,
    dequantize,
)
from grok.params import WeightSpec, hf_to_unit, weight_specs
from grok.quant import quantize, scale_shape

QUANTIZE_MODES = (None, "int8")


def _scale_to_unit(spec: WeightSpec, scales: np.ndarray) -> np.ndarray:
    """Per-output-channel scales [out, 1] (released layout) -> our unit scale shape."""
    unit_in = tuple(d - spec.lead for d in spec.in_dims)
    return np.asarray(scales, np.float32).reshape(scale_shape(spec.unit_shape, unit_in))


def requantize_per_channel(qw: QuantizedWeight8bit) -> QuantizedWeight8bit:
    """int8 [out, in] with one float32 scale per output row, from ``qw``'s exact values.

    A ``qw`` whose scales are already [out, 1] is returned with the same int8 values (scales
    widened to float32). Otherwise the matrix is dequantised in float32 and each row is
    re-quantised with scale max|row| / 127 (1 for an all-zero row), rounding to nearest.
    """
    out_rows = qw.weight.shape[0]
    if qw.scales.shape == (out_rows, 1):
        return QuantizedWeight8bit(qw.weight, qw.scales.astype(np.float32))
    q, scale = quantize(dequantize(qw, np.float32), "int8", in_dims=(1,))  # [out, in], [out, 1]
    return QuantizedWeight8bit(q, scale)


def read_grok1_params(
    path: str | os.PathLike[str],
    config: GrokConfig,
    *,
    dtype: Any = jnp.bfloat16,
    quantize: str | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """The Haiku parameter tree (host numpy arrays) of a Grok-1 ``ckpt-0``.

    Leaves are read one file at a time. With ``quantize="int8"`` every quantised matrix is
    ``name`` (int8, the parameter's shape) plus ``name + "_scale"`` (float32, the shape with
    the input dims set to 1); see the module docstring for o_proj and W2. The router stays
    float32, norms and the embedding are ``dtype``.
    """
    if quantize not in QUANTIZE_MODES:
        raise ConfigError(
            f"quantize must be None or 'int8' for a Grok-1 checkpoint, got {quantize!r}"
        )
    check_grok1_config(config)
    ckpt_dir = found_ckpt_dir(path)
    dtype = jnp.dtype(dtype)
    # Released name -> (spec, unit index) for every tensor the model needs.
    where: dict[str, tuple[WeightSpec, tuple[int, ...]]] = {}
    for spec in weight_specs(config):
        for unit, name in spec.hf_names():
            where[name] = (spec, unit)
    params: dict[str, dict[str, np.ndarray]] = {}

    def buffer(spec: WeightSpec, name: str, shape: tuple[int, ...], dt: Any) -> np.ndarray:
        module = params.setdefault(spec.module, {})
        if name not in module:
            module[name] = np.zeros(shape, dt)
        return module[name]

    filled: set[str] = set()
    for hf_name, value in tensors_in(ckpt_dir, config):
        if hf_name not in where:  # cannot happen for a config that passed check_grok1_config
            raise CheckpointError(f"{ckpt_dir}: tensor {hf_name} has no place in the model")
        spec, unit = where[hf_name]
        filled.add(hf_name)
        if isinstance(value, QuantizedWeight8bit) and quantize == "int8":
            qw = requantize_per_channel(value)
            q = buffer(spec, spec.name, spec.shape, np.int8)
            s_shape = scale_shape(spec.shape, spec.in_dims)
            s = buffer(spec, spec.name + "_scale", s_shape, np.float32)
            q[unit] = hf_to_unit(spec, qw.weight)
            s[unit] = _scale_to_unit(spec, qw.scales)
            continue
        if isinstance(value, QuantizedWeight8bit):
            value = dequantize(value, np.float32)
        target = buffer(spec, spec.name, spec.shape, np.dtype(spec.dtype(dtype)))
        target[unit] = hf_to_unit(spec, np.asarray(value, np.float32))
    missing = sorted(set(where) - filled)
    if missing:
        raise CheckpointError(f"{ckpt_dir}: tensor {missing[0]} was never read")
    return params


def load_grok1_params(
    path: str | os.PathLike[str],
    *,
    config: GrokConfig | None = None,
    dtype: Any = jnp.bfloat16,
    quantize: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    check_finite: bool = True,
) -> tuple[GrokConfig, dict[str, dict[str, jax.Array]]]:
    """(config, parameters on the first device) of a Grok-1 ``ckpt-0`` folder (or its parent).

    Args:
      path: the ``ckpt-0`` folder of ``tensor{i:05d}_000`` pickles, or its parent.
      config: the model's config; default ``grok1_config_for(path)`` (``GROK1`` unless a
        ``config.json`` sits beside the checkpoint).
      dtype: parameter/compute dtype; dequantised matrices are cast to it.
      quantize: None (dequantise) or ``"int8"`` (int8 matrices on the device, see the module
        docstring for which keep the release's exact values).
      mesh: must be None; sharded Grok-1 loading goes through the converted safetensors.
      check_finite: refuse a NaN or Inf in any float parameter (CheckpointError naming it).
    """
    if mesh is not None:
        raise ConfigError(
            f"{os.fspath(path)}: Grok-1 pickles load onto one device only; convert them with "
            "scripts/convert.py and load the safetensors output with a mesh"
        )
    ckpt_dir = found_ckpt_dir(path)
    config = config or config_beside(ckpt_dir)
    host = read_grok1_params(ckpt_dir, config, dtype=dtype, quantize=quantize)
    for module, leaves in host.items() if check_finite else ():
        for name, value in leaves.items():
            if value.dtype != np.int8 and not np.all(np.isfinite(value.astype(np.float32))):
                raise CheckpointError(
                    f"{ckpt_dir}: parameter {module}/{name} holds a non-finite "
                    "value (NaN or Inf); the weights are damaged"
                )
    device = jax.devices()[0]
    return config, jax.tree_util.tree_map(lambda x: jax.device_put(x, device), host)
