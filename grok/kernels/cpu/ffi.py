"""The native kernels as JAX functions: ``matvec`` (a matrix inside a stacked weight times a few
rows, or many), ``grouped_matvec`` (the MoE's ragged product), ``attention`` (causal
grouped-query attention with Grok's capped, tempered logits) and ``paged_attention`` (the same
over a paged KV cache, through page tables), each an XLA FFI custom call into the library
``build`` compiles, with a custom VJP where the model may differentiate it.

XLA:CPU leaves gaps that no flag closes (``--xla_cpu_use_onednn``,
``--xla_cpu_experimental_{onednn,xnn,ynn}_fusion_type=dot`` and ``--xla_cpu_use_xnnpack``
measured the same, jaxlib 0.10.2): a weight inside a stacked ``[L, ...]`` array is copied out
before every dot that reads it, its few-row bfloat16 products run far below the memory
bandwidth (see ``src/common.h`` for the figures), and attention's scores go through layout
copies and several elementwise passes. These read the matrices where they lie, at the
bandwidth, and keep a tile's scores in cache.

Every function raises ValueError where ``build.available`` is False for its dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from grok.kernels import xla
from grok.kernels.cpu.build import (
    ATTENTION_TARGET,
    GROUPED_TARGET,
    MATVEC_TARGET,
    PAGED_ATTENTION_TARGET,
    QUANT_GROUPED_TARGET,
    QUANT_MATVEC_TARGET,
    available,
    available_codes,
    why_unavailable,
)
from grok.kernels.xla import take

MAX_ROWS = 8  # one pass over the weights serves up to 8 rows; decode batches above fall back
PAGE_MULTIPLE = 16  # the paged kernel's page size is a multiple of this (src/paged_attention.cc)


def _put_zeros(w: jax.Array, index: jax.Array, part: jax.Array) -> jax.Array:
    """Zeros shaped like ``w`` with ``part`` at ``w[index]`` (a gradient of ``take``)."""
    lead = index.shape[0]
    starts = [index[k] for k in range(lead)] + [0] * (w.ndim - lead)
    part = part.reshape((1,) * lead + part.shape)
    return jax.lax.dynamic_update_slice(jnp.zeros_like(w), part, starts)


def _check(kernel: str, **operands: jax.Array) -> None:
    """ValueError unless the operands share a dtype with a kernel here (uint16: the bits of
    bfloat16); the first operand names the dtype the others must have."""
    (first, x), *others = operands.items()
    for name, o in others:
        if o.dtype != x.dtype:
            raise ValueError(f"{kernel}: {first} is {x.dtype} and {name} {o.dtype}")
    logical = jnp.bfloat16 if x.dtype == jnp.uint16 else x.dtype
    if not available(logical):
        raise ValueError(f"{kernel}: no kernel for {x.dtype} here ({why_unavailable() or 'dtype'})")


def _indices(index: tuple[jax.Array | int, ...]) -> jax.Array:
    if not index:
        return jnp.zeros((0,), jnp.int32)
    return jnp.stack([jnp.asarray(i, jnp.int32) for i in index])


# matvec.


@jax.custom_vjp
def _matvec(x: jax.Array, w: jax.Array, index: jax.Array) -> jax.Array:
    # bfloat16 goes in as is (the kernel also takes its uint16 bits): a bitcast here became a
    # copy of the whole stacked operand inside the layer loop.
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[-2]), jnp.float32)
    return jax.ffi.ffi_call(MATVEC_TARGET, out, vmap_method="sequential")(x, w, index)


def _matvec_fwd(x, w, index):
    return _matvec(x, w, index), (x, w, index)


def _matvec_bwd(res, g):  # g [R, O] float32
    x, w, index = res
    m = take(w, index)  # [O, I]
    dx = jnp.einsum("RO,OI->RI", g, m.astype(jnp.float32)).astype(x.dtype)
    dm = jnp.einsum("RO,RI->OI", g, x.astype(jnp.float32)).astype(w.dtype)
    return dx, _put_zeros(w, index, dm), None


_matvec.defvjp(_matvec_fwd, _matvec_bwd)


def matvec(x: jax.Array, w: jax.Array, index: tuple[jax.Array | int, ...] = ()) -> jax.Array:
    """``x @ w[index]^T`` in float32, reading ``w[index]`` in place.

    Args:
      x: [R, I] activations, R <= ``MAX_ROWS`` for one pass (more rows take more passes).
      w: [*lead, O, I] weights of ``x``'s dtype (float32 or bfloat16; both may also be the
        uint16 bits of bfloat16).
      index: one int32 scalar per leading axis of ``w``, clamped into range like
        ``lax.dynamic_slice``.
    Returns:
      [R, O] float32.
    """
    if x.ndim != 2 or w.ndim != 2 + len(index) or x.shape[1] != w.shape[-1]:
        raise ValueError(f"matvec: x {x.shape} and w {w.shape} with {len(index)} indices")
    _check("matvec", x=x, w=w)
    return _matvec(x, w, _indices(index))


# grouped_matvec.


def _group_of_rows(sizes: jax.Array, rows: int) -> jax.Array:
    """[A] the group of each row (G for rows past the sizes' total)."""
    return jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(rows), side="right").astype(jnp.int32)


@jax.custom_vjp
def _grouped(x: jax.Array, w: jax.Array, index: jax.Array, sizes: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[-2]), jnp.float32)
    return jax.ffi.ffi_call(GROUPED_TARGET, out, vmap_method="sequential")(x, w, index, sizes)


def _grouped_fwd(x, w, index, sizes):
    return _grouped(x, w, index, sizes), (x, w, index, sizes)


def _grouped_bwd(res, g):  # g [A, O] float32; a reference-speed gradient (not a decode path)
    x, w, index, sizes = res
    groups = w.shape[-3]
    mats = take(w, index)  # [G, O, I]
    row_group = _group_of_rows(sizes, x.shape[0])  # [A]
    g = jnp.where((row_group < groups)[:, None], g, 0.0)
    row_mats = mats[jnp.minimum(row_group, groups - 1)].astype(jnp.float32)  # [A, O, I]
    dx = jnp.einsum("AO,AOI->AI", g, row_mats).astype(x.dtype)
    dm = jax.ops.segment_sum(
        jnp.einsum("AO,AI->AOI", g, x.astype(jnp.float32)), row_group, num_segments=groups
    ).astype(w.dtype)  # [G, O, I]
    return dx, _put_zeros(w, index, dm), None, None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def grouped_matvec(
    x: jax.Array, w: jax.Array, sizes: jax.Array, index: tuple[jax.Array | int, ...] = ()
) -> jax.Array:
    """Rows of ``x`` sorted by group, each times its group's matrix: a grouped (ragged)
    matrix product for a few rows, reading the matrices in place.

    Args:
      x: [A, I] rows: the first ``sizes[0]`` for group 0, the next ``sizes[1]`` for group 1...
      w: [*lead, G, O, I] of ``x``'s dtype; ``index`` picks the leading axes (clamped).
      sizes: [G] int32 rows per group; rows past their total come out 0.
    Returns:
      [A, O] float32: row a is ``x[a] @ w[index][group of a]^T``. A group with rows reads its
      matrix once (up to ``MAX_ROWS`` rows per pass), a group without rows not at all.
    """
    lead = len(index)
    if x.ndim != 2 or w.ndim != 3 + lead or x.shape[1] != w.shape[-1]:
        raise ValueError(f"grouped_matvec: x {x.shape} and w {w.shape} with {lead} indices")
    if sizes.shape != (w.shape[-3],):
        raise ValueError(f"grouped_matvec: sizes {sizes.shape} for {w.shape[-3]} groups")
    _check("grouped_matvec", x=x, w=w)
    return _grouped(x, w, _indices(index), sizes.astype(jnp.int32))


# The products of weights stored as 8-bit codes.

CODE_GROUP = 128  # inputs per scale where a row has several (the kernels' kGroup)


def _check_codes(kernel: str, x: jax.Array, w: jax.Array, scale: jax.Array) -> None:
    """ValueError unless ``x`` is bfloat16 (or its uint16 bits), ``w`` codes with a kernel
    here and ``scale`` float32 [..., O, 1 or ceil(I / CODE_GROUP)] beside ``w`` [..., O, I]."""
    logical = jnp.bfloat16 if x.dtype == jnp.uint16 else x.dtype
    if not available_codes(logical, w.dtype):
        why = why_unavailable() or "dtypes, or a CPU without AVX512-BF16 and AVX512-VBMI"
        raise ValueError(f"{kernel}: no kernel for x {x.dtype} and w {w.dtype} here ({why})")
    groups = -(-w.shape[-1] // CODE_GROUP)
    if (
        scale.dtype != jnp.float32
        or scale.shape[:-1] != w.shape[:-1]
        or scale.shape[-1] not in (1, groups)
    ):
        raise ValueError(
            f"{kernel}: scale {scale.dtype}{list(scale.shape)} for w {list(w.shape)}: expected "
            f"float32 [..., {w.shape[-2]}, 1 or {groups}]"
        )


def quant_matvec(
    x: jax.Array, w: jax.Array, scale: jax.Array, index: tuple[jax.Array | int, ...] = ()
) -> jax.Array:
    """``x @ (w[index] * scale[index])^T`` in float32, reading the codes and scales in place.

    Args:
      x: [R, I] bfloat16 activations (or their uint16 bits); any R (from ``ffi``'s panel
        threshold on, packed panels).
      w: [*lead, O, I] float8_e4m3fn or int8 codes.
      scale: [*lead, O, G] float32: G = 1, one scale per output row, or ceil(I / 128), one per
        row and 128 inputs (the last group partial).
      index: one int32 scalar per leading axis, clamped like ``lax.dynamic_slice``.
    Returns:
      [R, O] float32. Not differentiable (quantised weights are for inference).
    """
    if x.ndim != 2 or w.ndim != 2 + len(index) or x.shape[1] != w.shape[-1]:
        raise ValueError(f"quant_matvec: x {x.shape} and w {w.shape} with {len(index)} indices")
    _check_codes("quant_matvec", x, w, scale)
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[-2]), jnp.float32)
    call = jax.ffi.ffi_call(QUANT_MATVEC_TARGET, out, vmap_method="sequential")
    return call(x, w, scale, _indices(index))


def quant_grouped_matvec(
    x: jax.Array,
    w: jax.Array,
    scale: jax.Array,
    sizes: jax.Array,
    index: tuple[jax.Array | int, ...] = (),
) -> jax.Array:
    """``grouped_matvec`` with the matrices stored as codes: rows of ``x`` [A, I] sorted by
    group, each times its group's ``w[index][g] * scale[index][g]`` (w [*lead, E, O, I] codes,
    scale [*lead, E, O, G] as ``quant_matvec``'s), ``sizes`` [E] rows per group; [A, O]
    float32, rows past the sizes' total 0. A group without rows reads nothing."""
    lead = len(index)
    if x.ndim != 2 or w.ndim != 3 + lead or x.shape[1] != w.shape[-1]:
        raise ValueError(f"quant_grouped_matvec: x {x.shape} and w {w.shape} with {lead} indices")
    if sizes.shape != (w.shape[-3],):
        raise ValueError(f"quant_grouped_matvec: sizes {sizes.shape} for {w.shape[-3]} groups")
    _check_codes("quant_grouped_matvec", x, w, scale)
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[-2]), jnp.float32)
    call = jax.ffi.ffi_call(QUANT_GROUPED_TARGET, out, vmap_method="sequential")
    return call(x, w, scale, _indices(index), sizes.astype(jnp.int32))


# attention.


def _attention_call(q, k, v, index, tau, positions, lengths, scale, cap):
    out = jax.ShapeDtypeStruct(q.shape, v.dtype)
    return jax.ffi.ffi_call(ATTENTION_TARGET, out, vmap_method="sequential")(
        q,
        k,
        v,
        index,
        tau.astype(jnp.float32),
        positions.astype(jnp.int32),
        lengths.astype(jnp.int32),
        scale=np.float32(scale),
        cap=np.float32(cap or 0.0),
    )


# The kernel's gradient is the XLA path's (``grok.kernels.xla.attention``): a prefill's
# attention runs natively, training's backward pass through XLA.
@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attention(q, k, v, tau, positions, lengths, scale, cap):
    return _attention_call(q, k, v, _indices(()), tau, positions, lengths, scale, cap)


def _attention_fwd(q, k, v, tau, positions, lengths, scale, cap):
    out = _attention(q, k, v, tau, positions, lengths, scale, cap)
    return out, (q, k, v, tau, positions, lengths)


def _attention_bwd(scale, cap, res, g):
    q, k, v, tau, positions, lengths = res

    def reference(q, k, v, tau):
        return xla.attention(q, k, v, tau, positions, lengths, scale=scale, cap=cap)

    _, vjp = jax.vjp(reference, q, k, v, tau)
    return (*vjp(g), None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    tau: jax.Array,
    positions: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    cap: float | None,
    index: tuple[jax.Array | int, ...] = (),
) -> jax.Array:
    """Causal grouped-query attention with capped, tempered logits, by the native kernel.

    For query row (b, t, k, g) the logits against keys j < min(positions[b, t] + 1,
    lengths[b], S) are ``cap * tanh(q . k_j * scale / cap) * tau[b, t]`` (no tanh when ``cap``
    is None), the probabilities their softmax rounded to ``v``'s dtype, the output their sum
    of values; a row that sees no key averages all S values (as a softmax over all-masked
    logits does). Differentiable in q, k, v and tau (the XLA path's gradient) where ``index``
    is empty; a read of a stacked cache in place is a decode step, not differentiated.

    Args:
      q: [B, T, K, G, H] queries (RoPE applied); H even.
      k, v: [*lead, B, S, K, H] keys (RoPE applied) and values of ``q``'s dtype (uint16: the
        bits of bfloat16 ones, with ``q`` likewise), read in place at ``index`` (one int32
        per leading axis, clamped like ``lax.dynamic_slice``); key s sits at position s.
      tau: [B, T] float32 temperature per query.
      positions: [B, T] int32 query positions; lengths: [B] int32 valid keys per row.
    Returns:
      [B, T, K, G, H] in ``v``'s dtype.
    """
    b, t, kh, g, h = q.shape
    lead = len(index)
    kv = k.shape[lead:]  # [B, S, K, H]
    if k.shape != v.shape or len(kv) != 4 or (kv[0], kv[2], kv[3]) != (b, kh, h):
        raise ValueError(f"attention: q {q.shape} with k {k.shape}, v {v.shape}, {lead} indices")
    if h % 2:
        raise ValueError(f"attention: no kernel for an odd head dim {h}")
    _check("attention", q=q, k=k, v=v)
    if index:
        return _attention_call(q, k, v, _indices(index), tau, positions, lengths, scale, cap)
    return _attention(q, k, v, tau, positions, lengths, scale, cap)


# paged attention.


def paged_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    pages: jax.Array,
    tau: jax.Array,
    positions: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    cap: float | None,
    index: tuple[jax.Array | int, ...] = (),
) -> jax.Array:
    """``attention`` over a paged KV cache, by the native kernel: the same numbers as the dense
    kernel over each row's keys gathered in position order.

    Args:
      q: [B, T, K, G, H] queries (RoPE applied); H even.
      k, v: [*lead, M, Z, K, H] pools of M pages of Z tokens (Z a multiple of
        ``PAGE_MULTIPLE``) of ``q``'s dtype (uint16: bfloat16 bits, ``q`` likewise), read in
        place at ``index`` (one int32 per leading axis, clamped like ``lax.dynamic_slice``).
      pages: i32 [B, W] page tables: position s of row b is page ``pages[b, s // Z]``, offset
        ``s % Z`` (S = W * Z); entries outside [0, M) are clamped (only masked keys read them).
      tau, positions: [B, T]; lengths: [B] (see ``attention``).
    Returns:
      [B, T, K, G, H] in ``v``'s dtype. Not differentiable (a decode-time read).
    """
    b, t, kh, g, h = q.shape
    lead = len(index)
    pool = k.shape[lead:]  # [M, Z, K, H]
    if k.shape != v.shape or len(pool) != 4 or (pool[2], pool[3]) != (kh, h):
        raise ValueError(f"paged_attention: q {q.shape} with k {k.shape}, v {v.shape}")
    if pages.ndim != 2 or pages.shape[0] != b:
        raise ValueError(f"paged_attention: pages {pages.shape} for q {q.shape}")
    if h % 2 or pool[1] % PAGE_MULTIPLE:
        raise ValueError(
            f"paged_attention: no kernel for head dim {h} (even) or page size {pool[1]} "
            f"(a multiple of {PAGE_MULTIPLE})"
        )
    _check("paged_attention", q=q, k=k, v=v)
    out = jax.ShapeDtypeStruct(q.shape, v.dtype)
    return jax.ffi.ffi_call(PAGED_ATTENTION_TARGET, out, vmap_method="sequential")(
        q,
        k,
        v,
        _indices(index),
        pages.astype(jnp.int32),
        tau.astype(jnp.float32),
        positions.astype(jnp.int32),
        lengths.astype(jnp.int32),
        scale=np.float32(scale),
        cap=np.float32(cap or 0.0),
    )
