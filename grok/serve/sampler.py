"""Per-row sampling for the server's batch: every setting is an array over the rows.

``grok.sampling.Sampler`` is a frozen dataclass whose settings are fixed at trace time: right
for one ``generate`` call, wrong for a server whose rows each belong to a different request.
Here the settings are [B] arrays inside the compiled step, so a new mix of settings is new
data, never a recompile. The order of the steps is the Sampler's (temperature, top-k, top-p,
min-p), preceded by OpenAI's presence and frequency penalties.

``RowSampler`` is ``sample_rows`` as the decode core's sampling hook (``grok.decode``), with
``RowData`` (settings and penalty counts) as the rows' sampler data.

Shape letters: B rows (decode slots), V vocab, R reported top logprobs (``TOP_LOGPROBS``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from grok import sampling
from grok.decode import token_keys

# The most alternatives a response may report per token (OpenAI's completions API allows 5).
TOP_LOGPROBS = 5


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSettings:
    """Sampling settings of each row (a pytree of [B] arrays).

    Attributes:
      temperature: f32 [B]; 0 is greedy (the highest-scoring token, ties to the lowest id).
      top_k: i32 [B]; keep the k highest-scoring tokens, 0 for off.
      top_p: f32 [B]; nucleus mass in (0, 1], 1 for off.
      min_p: f32 [B]; keep tokens with p >= min_p * p_max, 0 for off.
      presence_penalty: f32 [B]; subtracted once from every token already generated.
      frequency_penalty: f32 [B]; subtracted once per time a token was generated.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array

    @classmethod
    def zeros(cls, batch: int) -> RowSettings:
        """Greedy, unfiltered, unpenalised settings for ``batch`` rows."""

        def f(value: float) -> jax.Array:  # distinct buffers: the state is donated
            return jnp.full((batch,), value, jnp.float32)

        return cls(f(0.0), jnp.zeros((batch,), jnp.int32), f(1.0), f(0.0), f(0.0), f(0.0))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Draw:
    """What one sampling step gives back per row.

    Attributes:
      token: i32 [B], the chosen ids.
      logprob: f32 [B], log-probability of each chosen id under the model (before penalties,
        temperature and filters, as OpenAI-compatible servers report it).
      top_ids: i32 [B, R], the R most likely ids under the model, most likely first.
      top_logprobs: f32 [B, R], their log-probabilities.
    """

    token: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def penalized(logits: jax.Array, counts: jax.Array, s: RowSettings) -> jax.Array:
    """OpenAI's penalties: l - c * frequency - (c > 0) * presence. f32 [B, V], i32 [B, V]."""
    c = counts.astype(jnp.float32)  # [B, V]
    present = (counts > 0).astype(jnp.float32)
    return logits - c * s.frequency_penalty[:, None] - present * s.presence_penalty[:, None]


def _filtered(scores: jax.Array, s: RowSettings) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Tempered, filtered scores [B, V] (-inf where excluded), their ids [B, V] and whether
    they were sorted ([] bool: when not, the scores are in vocabulary order and the ids are
    unused)."""
    vocab = scores.shape[-1]
    scaled = sampling.tempered(scores, jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None])
    min_p = s.min_p[:, None]  # [B, 1]

    def unsorted(x):
        return sampling.min_p_filter(x, min_p), jnp.zeros(x.shape, jnp.int32)

    def by_rank(x):
        values, ids = jax.lax.top_k(x, vocab)  # [B, V] descending, ties lower id first
        k = jnp.where(s.top_k > 0, s.top_k, vocab)[:, None]  # [B, 1]
        values = jnp.where(jnp.arange(vocab)[None, :] < k, values, -jnp.inf)
        values = sampling.nucleus(values, s.top_p[:, None])  # renormalised over the top k
        return sampling.min_p_filter(values, min_p), ids

    needs_sort = jnp.any(((s.top_k > 0) & (s.top_k < vocab)) | (s.top_p < 1))
    values, ids = jax.lax.cond(needs_sort, by_rank, unsorted, scaled)
    return values, ids, needs_sort


def sample_rows(
    logits: jax.Array,
    counts: jax.Array,
    settings: RowSettings,
    keys: jax.Array,
    counters: jax.Array,
) -> Draw:
    """One token per row: row b draws with ``fold_in(keys[b], counters[b])`` only, so its
    tokens never depend on the other rows.

    Args:
      logits: f32 [B, V] model logits.
      counts: i32 [B, V] how often each token was generated so far (for the penalties).
      settings: the rows' ``RowSettings``.
      keys: [B] PRNG keys, one per row (from each request's seed).
      counters: i32 [B], the index of the token being drawn in its sequence.
    Returns:
      a ``Draw``.
    """
    logits = logits.astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)  # [B, V]
    top_logprobs, top_ids = jax.lax.top_k(logprobs, TOP_LOGPROBS)  # [B, R]
    scores = penalized(logits, counts, settings)  # [B, V]
    greedy = sampling.greedy(scores)  # [B], first maximum

    def draw(scores):
        values, ids, sorted_ = _filtered(scores, settings)
        step_keys = token_keys(keys, counters)  # [B]
        choice = jax.vmap(jax.random.categorical)(step_keys, values).astype(jnp.int32)  # [B]
        by_id = jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
        return jnp.where(sorted_, by_id, choice)

    random = settings.temperature > 0  # [B]
    sampled = jax.lax.cond(jnp.any(random), draw, lambda _: greedy, scores)
    token = jnp.where(random, sampled, greedy)  # [B]
    logprob = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
    return Draw(token, logprob, top_ids.astype(jnp.int32), top_logprobs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowData:
    """The rows' sampler data in the decode core's rows (``grok.decode.Rows.data``).

    Attributes:
      settings: the rows' ``RowSettings``.
      counts: i32 [B, V], how often each token was generated (for the penalties).
    """

    settings: RowSettings
    counts: jax.Array

    @classmethod
    def fresh(cls, settings: RowSettings, vocab: int) -> RowData:
        """Rows with ``settings`` that have generated nothing yet."""
        return cls(settings, jnp.zeros((settings.temperature.shape[0], vocab), jnp.int32))


@dataclasses.dataclass(frozen=True)
class RowSampler:
    """``sample_rows`` as the decode core's hook (``grok.decode.TokenSampler``): per-row
    ``RowData``, a ``Draw`` as the report; an active row's token counts for its penalties."""

    def __call__(
        self,
        logits: jax.Array,
        keys: jax.Array,
        counters: jax.Array,
        data: RowData,
        active: jax.Array,
    ) -> tuple[jax.Array, Draw, RowData]:
        draw = sample_rows(logits, data.counts, data.settings, keys, counters)
        rows = jnp.arange(draw.token.shape[0])
        counts = data.counts.at[rows, draw.token].add(active.astype(jnp.int32))  # [B, V]
        return draw.token, draw, RowData(data.settings, counts)


__all__ = [
    "TOP_LOGPROBS",
    "Draw",
    "RowData",
    "RowSampler",
    "RowSettings",
    "penalized",
    "sample_rows",
]
