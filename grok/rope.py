"""Rotary position embedding: frequency tables as pure functions, and their application.

Rotate-half (NeoX) layout over the whole head dim H: with x1 = x[..., :H/2] and
x2 = x[..., H/2:], ``rope(x) = concat(x1*cos - x2*sin, x2*cos + x1*sin)`` where the angle of
pair i at position p is ``p * inv_freq[i]``.

Tables are computed on the host in float64 and stored as float32 ``cos``/``sin`` of shape
[P, H/2] with P = ``max_position_embeddings``: positions up to 131071 keep full precision,
which an in-graph float32 product ``p * inv_freq`` would not.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from grok.config import GrokConfig


class RopeTable(NamedTuple):
    """cos and sin of every position's angles, each [P, H/2] float32 (mscale applied)."""

    cos: jax.Array
    sin: jax.Array


def original_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """Plain RoPE frequencies ``theta^(-2i/H)`` for i < H/2, float64 [H/2]."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    return 1.0 / theta**exponents


def _yarn_correction_dim(rotations: float, head_dim: int, theta: float, max_pos: int) -> float:
    # The dim index (in [0, H/2)) at which a frequency turns ``rotations`` times over max_pos.
    return head_dim * math.log(max_pos / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_inv_freq(config: GrokConfig) -> tuple[np.ndarray, float]:
    """YaRN frequencies and the cos/sin mscale, float64 [H/2] and a float.

    Dims that rotate more than ``beta_fast`` times over ``original_max_position_embeddings``
    keep their frequency (extrapolation); dims that rotate fewer than ``beta_slow`` times are
    divided by ``scaling_factor`` (interpolation); a linear ramp blends the dims between.
    ``extrapolation_factor`` scales the ramp, and ``mscale = (0.1 ln s + 1) * attn_factor``.
    """
    h = config.head_dim
    base = original_inv_freq(h, config.rope_theta)
    interpolated = base / config.scaling_factor
    original_len = config.original_max_position_embeddings
    assert original_len is not None  # checked by GrokConfig for rope_type "yarn"
    low = math.floor(_yarn_correction_dim(config.beta_fast, h, config.rope_theta, original_len))
    high = math.ceil(_yarn_correction_dim(config.beta_slow, h, config.rope_theta, original_len))
    low, high = max(low, 0), min(high, h - 1)  # the engines clamp to H - 1
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(h // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolate = (1.0 - ramp) * config.extrapolation_factor  # 1 on the fast (low-index) dims
    inv_freq = interpolated * (1.0 - extrapolate) + base * extrapolate
    mscale = 1.0
    if config.scaling_factor > 1.0:
        mscale = 0.1 * math.log(config.scaling_factor) + 1.0
    return inv_freq, mscale * config.attn_factor


def inv_freq_and_mscale(config: GrokConfig) -> tuple[np.ndarray, float]:
    """The frequencies [H/2] (float64) and cos/sin scale for the config's ``rope_type``."""
    if config.rope_type == "yarn":
        return yarn_inv_freq(config)
    return original_inv_freq(config.head_dim, config.rope_theta), 1.0


def rope_table_np(config: GrokConfig, num_positions: int | None = None) -> tuple[np.ndarray, ...]:
    """Host float64 ``(cos, sin)`` [P, H/2] for positions 0..P-1 (P = context by default)."""
    num_positions = num_positions or config.max_position_embeddings
    inv_freq, mscale = inv_freq_and_mscale(config)
    angles = np.arange(num_positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # [P, H/2]
    return np.cos(angles) * mscale, np.sin(angles) * mscale


def rope_table(config: GrokConfig, num_positions: int | None = None) -> RopeTable:
    """The rotary table as float32 device arrays [P, H/2]."""
    cos, sin = rope_table_np(config, num_positions)
    return RopeTable(jnp.asarray(cos, jnp.float32), jnp.asarray(sin, jnp.float32))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x`` [B, T, *, H] by angles whose cos/sin are [B, T, H/2]; float32 maths."""
    h2 = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :h2], x32[..., h2:]
    extra = x.ndim - cos.ndim  # head axes between T and H
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
