"""Grok's attention over a paged KV cache as a Pallas TPU kernel: the keys and values read in
place from the pool's pages, found through each row's page table.

Glossary: B batch, T query positions, L layers, M pages in the pool, Z tokens per page, W
page-table entries per row, K kv heads, G query heads per kv head, H head dim; Tq positions of
one query block, P pages of one grid step.

For query (b, t) at position p = positions[b, t] and key j of row b, which sits in page
``pages[b, j // Z]`` at offset ``j % Z`` of layer ``layer`` of the pool:

    s = cap * tanh(q . k_j * scale / cap) * tau[b, t]      (no tanh when cap is None)
    visible: j <= p and j < lengths[b]
    out = sum_j softmax_j(s over the visible j) * v_j       (online, page by page)

the paged form of ``grok.kernels.xla.attention`` (``grok.kernels.xla.paged_attention``). JAX's
own paged attention kernels take neither Grok's soft cap nor its temperature, which multiplies
the capped logits per query position.

How it runs: a grid of (row, query block, step over the row's pages), the last a reduction
with the running max, sum and output in VMEM scratch. The page tables, the rows' lengths, each
query block's last visible key and the layer are scalar-prefetched (SMEM), so the pool's
BlockSpecs fetch the pages a row's table names: a step takes P pages (P operands of the same
pool, page i of the step from entry ``step * P + i``), [Z, K, H] each, read where they lie in
the stacked [L, M, Z, K, H] pool. Pages past a query block's last visible key are neither
fetched (their index repeats the last needed page, which the pipeline does not fetch again)
nor computed. A row that sees no key comes out 0 (as ``blocked_attention`` gives).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NEG_INF = -1e30  # masked logits (finite, as the XLA path: no NaN in an all-masked page)
# Query rows (K x G x Tq) of one block: its float32 output and running sums live in VMEM
# (16 MiB scoped), 128 lanes each: 512 rows of H 128 are 256 KiB apiece.
BLOCK_ROWS = 512
PAGES_PER_STEP = 8  # P: pages of one grid step (each step costs ~0.35 us of overhead)


def query_block(t: int, rows_per_position: int) -> int:
    """Tq: about ``BLOCK_ROWS`` rows of (kv head x G) positions, a multiple of 16 (bfloat16
    tiles), at least 16; T itself when that is no more (a decode step: 1)."""
    tq = max(16, BLOCK_ROWS // rows_per_position // 16 * 16)
    return t if t <= tq else tq


def _kernel(
    # scalar prefetch (SMEM)
    pages_ref,  # i32 [B * W]
    lengths_ref,  # i32 [B]
    ends_ref,  # i32 [B * nq]: keys below this are the only ones a query block sees
    layer_ref,  # i32 [1]
    # blocks (VMEM)
    q_ref,  # [K, G, Tq, H]
    pos_ref,  # i32 [Tq, 1]
    tau_ref,  # f32 [Tq, 1]
    *refs,  # P key pages [Z, K, H], P value pages, out [K, G, Tq, H], scratch m, l, acc
    scale: float,
    cap: float | None,
    per_step: int,
    page_size: int,
):
    k_refs, v_refs = refs[:per_step], refs[per_step : 2 * per_step]
    o_ref, m_ref, l_ref, acc_ref = refs[2 * per_step :]
    b, qi, step = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kh_count, g_count = q_ref.shape[0], q_ref.shape[1]
    end = ends_ref[b * pl.num_programs(1) + qi]

    @pl.when(step == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    positions = pos_ref[...]  # [Tq, 1]
    tau = tau_ref[...]  # [Tq, 1]
    length = lengths_ref[b]
    for i in range(per_step):
        first_key = (step * per_step + i) * page_size

        @pl.when(first_key < end)
        def _page(i=i, first_key=first_key):
            key_pos = first_key + jax.lax.broadcasted_iota(jnp.int32, (1, page_size), 1)
            visible = (key_pos <= positions) & (key_pos < length)  # [Tq, Z]
            for kh in range(kh_count):  # static: a kv head's rows of the page
                k = k_refs[i][:, kh, :]  # [Z, H]
                v = v_refs[i][:, kh, :]

                def one_head(g, carry, kh=kh, k=k, v=v):  # a loop: the kernel stays small
                    q = q_ref[kh, g]  # [Tq, H]
                    s = jax.lax.dot_general(
                        q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
                    )  # [Tq, Z]
                    s = s * scale
                    if cap is not None:
                        s = cap * jnp.tanh(s / cap)
                    s = jnp.where(visible, s * tau, NEG_INF)
                    m_old = m_ref[kh, g]  # [Tq, 1]
                    m_new = jnp.maximum(m_old, jnp.max(s, axis=1, keepdims=True))
                    p = jnp.where(visible, jnp.exp(s - m_new), 0.0)  # [Tq, Z]
                    correction = jnp.exp(m_old - m_new)
                    l_ref[kh, g] = l_ref[kh, g] * correction + jnp.sum(p, axis=1, keepdims=True)
                    pv = jax.lax.dot_general(
                        p.astype(v.dtype),
                        v,
                        (((1,), (0,)), ((), ())),
                        preferred_element_type=jnp.float32,
                    )  # [Tq, H]
                    acc_ref[kh, g] = acc_ref[kh, g] * correction + pv
                    m_ref[kh, g] = m_new
                    return carry

                jax.lax.fori_loop(0, g_count, one_head, 0)

    @pl.when(step == pl.num_programs(2) - 1)
    def _out():
        l = l_ref[...]
        o_ref[...] = (acc_ref[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "cap", "pages_per_step", "interpret"))
def paged_attention(
    q: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    layer: jax.Array,
    pages: jax.Array,
    tau: jax.Array,
    positions: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    cap: float | None,
    pages_per_step: int = PAGES_PER_STEP,
    interpret: bool = False,
) -> jax.Array:
    """Causal grouped-query attention with Grok's capped, tempered logits over a paged KV cache.

    Args:
      q: [B, T, K, G, H] queries (RoPE applied).
      k_pool, v_pool: [L, M, Z, K, H] keys (RoPE applied) and values of every layer, of
        ``q``'s dtype; ``layer`` (an int32 scalar) picks the layer read.
      pages: i32 [B, W] page tables: key j of row b is page ``pages[b, j // Z]`` at offset
        ``j % Z``; entries outside [0, M) are clamped (only keys past the length hold them).
      tau: f32 [B, T], the queries' temperatures (``grok.attention.attention_temperature``).
      positions: i32 [B, T], the queries' positions (increasing along T).
      lengths: i32 [B], valid keys per row.
      scale, cap: the logits are ``cap * tanh(q . k * scale / cap) * tau`` (cap None: no
        tanh).
      pages_per_step: P, pages fetched per grid step.
      interpret: run in Pallas' interpreter (any backend) instead of compiling for a TPU.
    Returns:
      [B, T, K, G, H] in ``v_pool``'s dtype.
    """
    b, t, kh, g, h = q.shape
    _, m, z, _, _ = k_pool.shape
    w = pages.shape[1]
    tq = query_block(t, kh * g)
    nq = -(-t // tq)
    pad_t = nq * tq - t
    per_step = min(pages_per_step, w)
    steps = -(-w // per_step)

    qt = jnp.pad(jnp.transpose(q, (0, 2, 3, 1, 4)), ((0, 0),) * 3 + ((0, pad_t), (0, 0)))
    positions = jnp.pad(positions.astype(jnp.int32), ((0, 0), (0, pad_t)), mode="edge")
    tau = jnp.pad(tau.astype(jnp.float32), ((0, 0), (0, pad_t)), mode="edge")
    lengths = lengths.astype(jnp.int32)
    # The key each query block sees up to (its last position + 1, at most the row's length).
    block_last = positions.reshape(b, nq, tq).max(axis=2)  # [B, nq]
    ends = jnp.minimum(block_last + 1, lengths[:, None]).reshape(-1)
    table = jnp.pad(pages.astype(jnp.int32), ((0, 0), (0, steps * per_step - w)), mode="edge")
    table = jnp.clip(table, 0, m - 1).reshape(-1)
    width = steps * per_step

    def page_map(i):
        def index(bi, qi, step, pages_ref, lengths_ref, ends_ref, layer_ref):
            # Past the block's last visible key the last needed page again: not fetched anew.
            # (lax.div: non-negative operands, and no floor correction for Mosaic to lower)
            last = jax.lax.div(jnp.maximum(ends_ref[bi * nq + qi] - 1, 0), jnp.int32(z))
            entry = jnp.minimum(step * per_step + i, last)
            return layer_ref[0], pages_ref[bi * width + entry], 0, 0, 0

        return pl.BlockSpec((None, None, z, kh, h), index)

    def row_map(bi, qi, step, *_):
        return bi, 0, 0, qi, 0

    def column_map(bi, qi, step, *_):
        return bi, qi, 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(b, nq, steps),
        in_specs=[
            pl.BlockSpec((None, kh, g, tq, h), row_map),
            pl.BlockSpec((None, tq, 1), column_map),
            pl.BlockSpec((None, tq, 1), column_map),
            *[page_map(i) for i in range(per_step)],
            *[page_map(i) for i in range(per_step)],
        ],
        out_specs=pl.BlockSpec((None, kh, g, tq, h), row_map),
        scratch_shapes=[
            pltpu.VMEM((kh, g, tq, 1), jnp.float32),
            pltpu.VMEM((kh, g, tq, 1), jnp.float32),
            pltpu.VMEM((kh, g, tq, h), jnp.float32),
        ],
    )
    kernel = functools.partial(_kernel, scale=scale, cap=cap, per_step=per_step, page_size=z)
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, kh, g, nq * tq, h), v_pool.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
    )(
        table,
        lengths,
        ends,
        jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)),
        qt,
        positions[..., None],
        tau[..., None],
        *([k_pool] * per_step),
        *([v_pool] * per_step),
    )
    return jnp.transpose(out[:, :, :, :t], (0, 3, 1, 2, 4))  # [B, T, K, G, H]


__all__ = ["BLOCK_ROWS", "PAGES_PER_STEP", "paged_attention", "query_block"]
