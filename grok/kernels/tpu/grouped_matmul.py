"""The experts' grouped product as a Pallas TPU kernel, reading every layer's stacked expert
weights in place.

Glossary: A rows (token-expert assignments), L layers, E experts (groups), In / Out a
matrix's input and output width; Tm, Tk, Tn the tiles of rows, In and Out.

    out[a] = xs[a] @ (w[layer, g(a)] * scale[layer, g(a)])^T        g(a): row a's expert

Why not JAX's own: ``jax.lax.ragged_dot`` on TPU wants the weight as [E, In, Out]; given the
release's [E, Out, In] the compiler copied every layer's experts to that layout ahead of the
decode loop (48 GiB per chip for Grok-2 on 8 chips: compiled for v5p, temporaries of 113 GiB
at batch 8). Megablox's ``gmm`` reads [Out, In] tiles (``transpose_rhs``) but takes neither
FP8/int8 weights with their per-output-channel scales nor a layer index, and picks its input
dtype from the host's devices, not the program's. This kernel reads tiles [Tn, Tk] of
``w[layer, g]`` where the stacked weight lies (the layer a scalar of the grid), casts them to
the rows' dtype in VMEM (a FP8 weight is never dequantised in HBM) and applies the scale to
the float32 sums.

Rows are sorted by expert; each expert's rows are padded to whole tiles of Tm (so a tile has
one expert) in a buffer of a static bound of rows. Tiles past the used ones are skipped and
map to the last used tile, so the pipeline fetches nothing for them. In a decode step each
chosen expert's weights are read once; experts no row chose are not read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

MAX_ROW_TILE = 512  # Tm for long prompts: each weight tile is read once per row tile
SMALL_ROW_TILE = 64  # up to this Tm (decode), weight tiles of Tk 2048 (~0.35 us per grid step)


def row_tile(rows: int, groups: int) -> int:
    """Tm: about the rows per group, a power of two in [16, ``MAX_ROW_TILE``]."""
    per_group = max(16, -(-rows // groups))
    return min(MAX_ROW_TILE, 1 << (per_group - 1).bit_length())


def _tile(n: int, target: int) -> int:
    """The largest of target, target / 2, ... 128 that divides n; n itself if none does."""
    tile = target
    while tile >= 128:
        if n % tile == 0:
            return tile
        tile //= 2
    return n


def _kernel(
    layer_ref,  # [1] int32 (SMEM)
    group_ref,  # [R / Tm] int32 (SMEM): each row tile's expert
    used_ref,  # [1] int32 (SMEM): the row tiles in use
    x_ref,  # [Tm, Tk]
    w_ref,  # [Tn, Tk]
    s_ref,  # [1, Tn] float32 (or None)
    o_ref,  # [Tm, Tn]
    acc_ref,  # [Tm, Tn] float32
):
    del layer_ref, group_ref  # used by the index maps only
    i, k = pl.program_id(1), pl.program_id(2)

    @pl.when(i < used_ref[0])
    def _step():
        @pl.when(k == 0)
        def _init():
            acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

        x = x_ref[...]
        acc_ref[...] += jax.lax.dot_general(
            x,
            w_ref[...].astype(x.dtype),
            (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        )

        @pl.when(k == pl.num_programs(2) - 1)
        def _store():
            out = acc_ref[...]
            if s_ref is not None:
                out = out * s_ref[...]
            o_ref[...] = out.astype(o_ref.dtype)


def _kernel_without_scale(layer_ref, group_ref, used_ref, x_ref, w_ref, o_ref, acc_ref):
    _kernel(layer_ref, group_ref, used_ref, x_ref, w_ref, None, o_ref, acc_ref)


def grouped_matmul(
    xs: jax.Array,
    w: jax.Array,
    scale: jax.Array | None,
    layer: jax.Array,
    sizes: jax.Array,
    *,
    out_dtype: jnp.dtype = jnp.float32,
    interpret: bool = False,
) -> jax.Array:
    """Each row of ``xs`` times its expert's matrix of layer ``layer``.

    Args:
      xs: [A, In] rows sorted by expert, ``sizes[e]`` rows of expert e in order (rows past
        the sizes' total get 0).
      w: [L, E, Out, In] every layer's experts, the release's [out, in] (FP8, int8 or the
        rows' float dtype; cast to the rows' dtype tile by tile).
      scale: [L, E, Out, 1] float32 per-output-channel scales of a quantised ``w``, or None.
      layer: () int32.
      sizes: [E] int32.
      out_dtype: the result's dtype (sums are float32).
      interpret: run in Pallas' interpreter (any backend; for tests).
    Returns:
      [A, Out] in ``out_dtype``.
    """
    a, d_in = xs.shape
    _, e, d_out, _ = w.shape
    tm = row_tile(a, e)
    tk = _tile(d_in, 2048 if tm <= SMALL_ROW_TILE else 1024)
    tn = _tile(d_out, 512)
    rows = -(-(a + e * (tm - 1)) // tm) * tm  # every expert's rows padded to whole tiles

    sizes = sizes.astype(jnp.int32)
    padded = (sizes + tm - 1) // tm * tm  # [E]
    padded_end = jnp.cumsum(padded)
    group_start = jnp.cumsum(sizes) - sizes
    row_group = jnp.repeat(jnp.arange(e, dtype=jnp.int32), sizes, total_repeat_length=a)  # [A]
    in_group = jnp.arange(a, dtype=jnp.int32) - group_start[row_group]
    real = jnp.arange(a) < jnp.sum(sizes)  # rows past the sizes' total go nowhere
    dest = jnp.where(real, padded_end[row_group] - padded[row_group] + in_group, rows)  # [A]
    x_pad = jnp.zeros((rows, d_in), xs.dtype).at[dest].set(xs, mode="drop")  # [R, In]
    tiles = rows // tm
    used = (padded_end[-1] // tm).astype(jnp.int32)
    tile_start = jnp.minimum(jnp.arange(tiles), jnp.maximum(used - 1, 0)) * tm
    tile_group = jnp.minimum(jnp.searchsorted(padded_end, tile_start, side="right"), e - 1)

    def tile_of(i, used_ref):
        return jnp.minimum(i, jnp.maximum(used_ref[0] - 1, 0))  # skipped tiles: the last used

    def x_index(n, i, k, layer_ref, group_ref, used_ref):
        return tile_of(i, used_ref), k

    def w_index(n, i, k, layer_ref, group_ref, used_ref):
        return layer_ref[0], group_ref[tile_of(i, used_ref)], n, k

    def s_index(n, i, k, layer_ref, group_ref, used_ref):
        return layer_ref[0], group_ref[tile_of(i, used_ref)], 0, n

    def o_index(n, i, k, layer_ref, group_ref, used_ref):
        return tile_of(i, used_ref), n

    in_specs = [
        pl.BlockSpec((tm, tk), x_index),
        pl.BlockSpec((None, None, tn, tk), w_index),
    ]
    operands = [x_pad, w]
    kernel = _kernel_without_scale
    if scale is not None:
        # [L, E, Out, 1] as [L, E, 1, Out]: the same bytes (XLA keeps a trailing unit axis
        # outside), read as rows [1, Tn] that scale the float32 sums' columns.
        in_specs.append(pl.BlockSpec((None, None, 1, tn), s_index))
        operands.append(scale.reshape(scale.shape[0], e, 1, d_out).astype(jnp.float32))
        kernel = _kernel
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, d_out), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(d_out // tn, tiles, d_in // tk),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((tm, tn), o_index),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=2 * a * d_in * d_out,
            transcendentals=0,
            bytes_accessed=e * d_out * d_in * w.dtype.itemsize + (a * d_in + a * d_out) * 4,
        ),
        interpret=interpret,
    )(
        jnp.reshape(layer, (1,)).astype(jnp.int32),
        tile_group.astype(jnp.int32),
        used.reshape(1),
        *operands,
    )
    return jnp.where(real[:, None], out[jnp.minimum(dest, rows - 1)], 0).astype(out_dtype)


__all__ = ["grouped_matmul", "row_tile"]
