"""Grok's attention as a Pallas TPU kernel: linear memory in the sequence, the KV cache read in
place, exact to the spec (section 2.1 and 2.3).

Glossary: B batch, T query positions, S cache slots, L layers, K kv heads (those of one
device), G query heads per kv head, H head dim; R = G * Tq rows of one query block.

For query (b, t) at position p = positions[b, t] and key j of row b:

    s = cap * tanh(q . k_j * scale / cap) * tau[b, t]      (no tanh when cap is None)
    visible: j <= p and j < lengths[b]
    out = sum_j softmax_j(s over the visible j) * v_j       (online, key block by key block)

JAX's own TPU kernels do not fit: splash attention and ragged paged attention take a soft cap
but not Grok's temperature, which multiplies the logits after the cap, per query position.

How it reads its operands (so that nothing is copied; checked on the compiled programs):

- The keys and values are the whole cache [L, B, S, K, H] of every layer, and the layer an
  index the kernel gets as a scalar (``PrefetchScalarGridSpec``): each block is read where
  the cache lies, not from a slice of it. XLA's TPU layout of a cache shard with one kv head
  ([..., S, 1, H]) puts the unit axis outside S, so the kernel reads that one as
  [L, B, S, H] (a bitcast); with several kv heads the layout is row-major and the kernel
  reads blocks [Sk, K, H] holding every head.
- The queries are handed over as [B, K, G, T, H] (for T = 1: [B, K, G, H]), a copy of q
  that costs little: the G query heads of a kv head and Tq positions form the R rows of one
  matrix product, head-major (row r is head r // Tq at position r % Tq).
- Positions and temperatures arrive as rows [1, Tq]; the kernel turns them into columns
  [Tq, 1] with a diagonal mask and a sum (no transposes), so they cost no 128-lane copy in
  HBM.
- Key blocks past a query block's last position or past its row's length are neither read
  nor computed: causal prefill does about half the work of the full score matrix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NEG_INF = -1e30  # masked logits (finite, as the XLA path: no NaN in an all-masked block)
ROWS = 1024  # about this many query rows (G * Tq * K) per block: the MXU's tiles, VMEM's size
SCORES_BYTES = 1 << 19  # one head's float32 scores [R, Sk] of a step at most (bounds Sk)
MAX_KEY_BLOCK = 4096  # decode: a few large key blocks (each grid step costs ~0.35 us)
MIN_KEY_BLOCK = 512  # prefill: blocks of 512 keys
KV_VMEM_BYTES = 4 << 20  # the key and value blocks' VMEM, double-buffered (of 16 MiB scoped)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def query_block(t: int, rows_per_position: int) -> int:
    """Tq, the positions of one query block: about ``ROWS`` rows of (kv head x G) per position,
    a multiple of 16 (bfloat16 tiles), at most T rounded up to 16; 1 for a decode step (T 1)."""
    if t == 1:
        return 1
    tq = max(16, ROWS // rows_per_position // 16 * 16)
    tq = 1 << (tq.bit_length() - 1)  # a power of two: divides every larger power of two
    return min(tq, _round_up(t, 16))


def key_block(s: int, rows: int, heads: int, head_dim: int, itemsize: int) -> int:
    """Sk, the keys of one block: the largest power of two dividing S, between
    ``MIN_KEY_BLOCK`` and ``MAX_KEY_BLOCK``, whose scores [rows, Sk] take at most
    ``SCORES_BYTES`` and whose key and value blocks (double-buffered) at most
    ``KV_VMEM_BYTES`` of VMEM; else S itself for a short S; 0 when neither (the caller pads S).

    A block [Sk, K, H] of several heads sits in VMEM in tiles of 32 / itemsize sublanes: its K
    heads take that many rows (16 for bfloat16), so Sk shrinks with it.
    """
    sublanes = 1 if heads == 1 else _round_up(heads, 32 // itemsize)
    by_vmem = KV_VMEM_BYTES // (4 * sublanes * head_dim * itemsize)
    target = min(MAX_KEY_BLOCK, max(MIN_KEY_BLOCK, SCORES_BYTES // 4 // rows), by_vmem)
    block = 1 << (target.bit_length() - 1)
    while block >= 128:
        if s % block == 0:
            return block
        block //= 2
    return s if s <= min(MAX_KEY_BLOCK, by_vmem) else 0


def _column(row: jax.Array) -> jax.Array:
    """[1, n] -> [n, 1]: the diagonal of the row broadcast to [n, n], summed over lanes."""
    n = row.shape[1]
    square = jnp.broadcast_to(row, (n, n))
    eye = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0) == jax.lax.broadcasted_iota(
        jnp.int32, (n, n), 1
    )
    return jnp.sum(jnp.where(eye, square, 0.0), axis=1, keepdims=True)


def _head(ref, h: int, layer_ref, select: bool) -> jax.Array:
    """Kv head h of a key or value block [Sk, K, H] ([Sk, H]: the one head), or with ``select``
    the head ``layer_ref[1]`` of the block's K (the sublane index must be static: a chain of
    selects reads each head from VMEM once)."""
    if ref.ndim == 2:
        return ref[...]
    if not select:
        return ref[:, h, :]
    out = ref[:, 0, :]
    for c in range(1, ref.shape[1]):
        out = jnp.where(layer_ref[1] == c, ref[:, c, :], out)
    return out


def _kernel(
    layer_ref,  # [2] int32 (SMEM): the layer, and the kv head to read (``kv_head``)
    lengths_ref,  # [B] int32 (SMEM)
    visits_ref,  # [B * nq] int32 (SMEM): key blocks each query block reads
    q_ref,  # [K, G, Tq, H] (or [K, G, H] for Tq 1)
    pos_ref,  # [1, Tq] float32
    tau_ref,  # [1, Tq] float32
    k_ref,  # [Sk, K, H] (or [Sk, H] with one kv head)
    v_ref,
    o_ref,  # like q_ref
    m_ref,  # [K, R, 1] float32: running max
    l_ref,  # [K, R, 1] float32: running sum
    acc_ref,  # [K, R, H] float32
    *,
    scale: float,
    cap: float | None,
    heads: int,
    group: int,
    key_block_size: int,
    num_query_blocks: int,
    select: bool,
):
    b, i, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    visits = visits_ref[b * num_query_blocks + i]

    @pl.when(kb == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(kb < visits)
    def _step():
        tq = pos_ref.shape[1]
        rows = group * tq
        if tq == 1:  # one position: every row has it
            p = jnp.broadcast_to(pos_ref[...], (rows, 1))
            tau = jnp.broadcast_to(tau_ref[...], (rows, 1))
        else:  # head-major rows: the positions' column once per query head
            p = jnp.concatenate([_column(pos_ref[...])] * group, axis=0)  # [R, 1]
            tau = jnp.concatenate([_column(tau_ref[...])] * group, axis=0)
        j = kb * key_block_size + jax.lax.broadcasted_iota(jnp.int32, (1, key_block_size), 1)
        j = j.astype(jnp.float32)  # positions < 2^24 are exact in float32
        visible = (j <= p) & (j < lengths_ref[b].astype(jnp.float32))  # [R, Sk]
        for h in range(heads):  # static: the kv heads of this device
            q = q_ref[h].reshape(rows, q_ref.shape[-1])  # [R, H]
            k = _head(k_ref, h, layer_ref, select)  # [Sk, H]
            v = _head(v_ref, h, layer_ref, select)
            s = jax.lax.dot_general(
                q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )  # [R, Sk]
            s = s * scale
            if cap is not None:
                s = cap * jnp.tanh(s / cap)
            s = jnp.where(visible, s * tau, NEG_INF)
            m_prev = m_ref[h]  # [R, 1]
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            probs = jnp.where(visible, jnp.exp(s - m_new), 0.0)  # [R, Sk]
            correction = jnp.exp(m_prev - m_new)
            l_ref[h] = l_ref[h] * correction + jnp.sum(probs, axis=1, keepdims=True)
            pv = jnp.dot(probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
            acc_ref[h] = acc_ref[h] * correction + pv  # [R, H]
            m_ref[h] = m_new

    @pl.when(kb == pl.num_programs(2) - 1)
    def _finish():
        for h in range(heads):
            l = l_ref[h]
            out = acc_ref[h] / jnp.where(l > 0, l, 1.0)  # a row that sees no key: 0
            o_ref[h] = out.reshape(o_ref.shape[1:]).astype(o_ref.dtype)


def _query_blocks(q, tau, positions, lengths, tq: int, sk: int, nk: int):
    """The queries as the kernel reads them ([B, K, G, H] for T 1, else [B, K, G, Tp, H], T
    padded to whole blocks of Tq) and their block spec; positions and temperatures as rows
    [B, nq, 1, Tq] (padding repeats the last position); and the key blocks each query block
    visits, [B * nq]: up to its last position and its row's length."""
    b, t, heads, group, h = q.shape
    t_pad = _round_up(t, tq)
    nq = t_pad // tq

    def pad_t(x: jax.Array, mode: str) -> jax.Array:
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, t_pad - t)
        return jnp.pad(x, widths, mode=mode)

    pos = pad_t(positions.astype(jnp.int32), "edge")  # [B, Tp]
    last = jnp.minimum(jnp.max(pos.reshape(b, nq, tq), axis=2) + 1, lengths[:, None])  # [B, nq]
    visits = jnp.clip((last + sk - 1) // sk, 1, nk).astype(jnp.int32).reshape(b * nq)
    pos_rows = pos.astype(jnp.float32).reshape(b, nq, 1, tq)
    tau_rows = pad_t(tau.astype(jnp.float32), "edge").reshape(b, nq, 1, tq)
    if t == 1:
        qk = q[:, 0]  # [B, K, G, H]
        q_spec = pl.BlockSpec((None, heads, group, h), lambda b, i, kb, *_: (b, 0, 0, 0))
    else:
        qk = jnp.transpose(pad_t(q, "constant"), (0, 2, 3, 1, 4))  # [B, K, G, Tp, H]
        q_spec = pl.BlockSpec((None, heads, group, tq, h), lambda b, i, kb, *_: (b, 0, 0, i, 0))
    return qk, q_spec, pos_rows, tau_rows, visits


def flash_attention(
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    layer: jax.Array,
    tau: jax.Array,
    positions: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    cap: float | None,
    kv_head: jax.Array | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Causal grouped-query attention of q over layer ``layer`` of a cache.

    Args:
      q: [B, T, K, G, H] queries (RoPE applied).
      keys, values: [L, B, S, K, H], every layer's keys and values (RoPE applied); key j of
        row b sits at position j. A [B, S, K, H] array is taken as one layer.
      layer: () int32, the layer read.
      tau: [B, T] float32 temperatures; positions: [B, T] int32 (< 2^24); lengths: [B] int32.
      scale, cap: the logits are ``cap * tanh(q . k * scale / cap) * tau`` (cap None: no tanh).
      kv_head: () int32, or None. Given, q is [B, T, 1, G, H]: query heads of the one kv head
        ``kv_head`` of the cache's K, read in place (each key block holds every head: K times
        the bytes of that head). For kv heads replicated over devices whose query heads are
        split.
      interpret: run the kernel in Pallas' interpreter (any backend; for tests).
    Returns:
      [B, T, K, G, H] in the values' dtype; a query that sees no key gets 0.
    """
    if keys.ndim == 4:  # one layer: [B, S, K, H]
        keys, values, layer = keys[None], values[None], jnp.zeros((), jnp.int32)
    b, t, heads, group, h = q.shape
    s_len = keys.shape[2]
    select = kv_head is not None
    block_heads = keys.shape[3] if select else heads  # the kv heads of one key block
    tq = query_block(t, heads * group)
    rows = heads * group * tq
    block_of = functools.partial(
        key_block, rows=rows, heads=block_heads, head_dim=h, itemsize=keys.dtype.itemsize
    )
    sk = block_of(s_len)
    if sk == 0:  # no block divides S: pad the keys (a copy; a cache of power-of-two S never)
        sk = block_of(_round_up(s_len, 128))
        pad = [(0, 0), (0, 0), (0, _round_up(s_len, 128) - s_len), (0, 0), (0, 0)]
        keys, values = jnp.pad(keys, pad), jnp.pad(values, pad)
        s_len = keys.shape[2]
    nk = s_len // sk
    qk, q_spec, pos_rows, tau_rows, visits = _query_blocks(q, tau, positions, lengths, tq, sk, nk)
    nq = pos_rows.shape[1]

    if block_heads == 1:  # XLA keeps a one-head shard as [L, B, 1, S, H]: read it as [L, B, S, H]
        keys, values = keys[:, :, :, 0], values[:, :, :, 0]
        kv_block = (None, None, sk, h)
    else:
        kv_block = (None, None, sk, block_heads, h)

    def kv_index(b, i, kb, layer_ref, lengths_ref, visits_ref):
        # Blocks past the last visited one map to it: the pipeline does not fetch them again.
        block = jnp.minimum(kb, visits_ref[b * nq + i] - 1)
        return (layer_ref[0], b, block) + (0,) * (len(kv_block) - 3)

    kv_spec = pl.BlockSpec(kv_block, kv_index)
    row_spec = pl.BlockSpec((None, None, 1, tq), lambda b, i, kb, *_: (b, i, 0, 0))
    scratch_rows = group * tq
    kernel = functools.partial(
        _kernel,
        scale=scale,
        cap=cap,
        heads=heads,
        group=group,
        key_block_size=sk,
        num_query_blocks=nq,
        select=select,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(qk.shape, values.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, nq, nk),
            in_specs=[q_spec, row_spec, row_spec, kv_spec, kv_spec],
            out_specs=q_spec,
            scratch_shapes=[
                pltpu.VMEM((heads, scratch_rows, 1), jnp.float32),
                pltpu.VMEM((heads, scratch_rows, 1), jnp.float32),
                pltpu.VMEM((heads, scratch_rows, h), jnp.float32),
            ],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=4 * b * t * heads * group * s_len * h,
            transcendentals=2 * b * t * heads * group * s_len,
            bytes_accessed=2 * b * s_len * block_heads * h * keys.dtype.itemsize + 2 * qk.nbytes,
        ),
        interpret=interpret,
    )(
        jnp.stack([layer, jnp.int32(0) if kv_head is None else kv_head]).astype(jnp.int32),
        lengths.astype(jnp.int32),
        visits,
        qk,
        pos_rows,
        tau_rows,
        keys,
        values,
    )
    if t == 1:
        return out[:, None]  # [B, 1, K, G, H]
    return jnp.transpose(out, (0, 3, 1, 2, 4))[:, :t]  # [B, T, K, G, H]


__all__ = ["flash_attention", "key_block", "query_block"]
