"""The training loop: determinism, exact resume, held-out loss, balance loss, checkpoints."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok import data, train
from grok.api import load_pretrained
from grok.errors import CheckpointError, GrokError
from grok.presets import TINY_GROK2

CONFIG = TINY_GROK2.replace(vocab_size=32, num_local_experts=4)
TRAIN = train.TrainConfig(
    steps=6,
    batch_size=4,
    seq_len=16,
    peak_lr=1e-2,
    warmup_steps=1,
    eval_every=3,
    checkpoint_every=3,
)


def _stream(n: int, seed: int) -> np.ndarray:
    """A learnable token stream: runs of +1 steps mod V from random starts."""
    rng = np.random.default_rng(seed)
    runs = [(s + np.arange(8)) % CONFIG.vocab_size for s in rng.integers(0, 32, n // 8)]
    return np.concatenate(runs).astype(np.int32)


# Every expert on every token, masked: the same outputs as the default block path (tested in
# the MoE's own tests) and several times faster to compile, which dominates these tiny runs.
MOE = "dense"
TRAIN_STREAM = _stream(2000, 0)
HELDOUT_STREAM = _stream(400, 1)
# The training forward pass, jitted once for the tests that call it on [1, 16] tokens.
FORWARD = jax.jit(train.training_forward(CONFIG, MOE).apply)


def _run(trainer, until=None, checkpoint_dir=None):
    return train.run(
        trainer,
        TRAIN_STREAM,
        HELDOUT_STREAM,
        until=until,
        checkpoint_dir=checkpoint_dir,
        progress=False,
        log=lambda _: None,
    )


@pytest.fixture(scope="module")
def uninterrupted():
    trainer = train.Trainer(CONFIG, TRAIN, MOE)
    return trainer, _run(trainer)


@pytest.mark.slow  # a Trainer compiles its init (and, to train, its step)
def test_same_seed_same_run_and_loss_falls(uninterrupted):
    trainer, result = uninterrupted
    again = _run(train.Trainer(CONFIG, TRAIN, MOE))
    assert again.losses == result.losses
    assert len(result.losses) == TRAIN.steps
    assert result.losses[-1] < result.losses[0] - 0.3
    other = _run(train.Trainer(CONFIG, dataclasses.replace(TRAIN, seed=1), MOE), until=2)
    assert other.losses != result.losses[:2]


@pytest.mark.slow  # a Trainer compiles its init (and, to train, its step)
def test_heldout_loss_reported_at_eval_steps_and_end(uninterrupted):
    trainer, result = uninterrupted
    steps = [s for s, _ in result.heldout]
    assert steps == [3, 6]
    first, last = result.heldout[0][1], result.heldout[-1][1]
    assert np.isfinite(last) and last < first
    assert last < np.log(CONFIG.vocab_size)  # better than uniform over V
    windows = data.eval_windows(HELDOUT_STREAM, TRAIN.seq_len)
    assert trainer.evaluate(windows) == pytest.approx(last, rel=1e-6)


@pytest.mark.slow  # a Trainer compiles its init (and, to train, its step)
def test_resumed_run_continues_with_the_same_losses(uninterrupted, tmp_path):
    _, full = uninterrupted
    first = train.Trainer(CONFIG, TRAIN, MOE)
    part = _run(first, until=3, checkpoint_dir=tmp_path)
    assert part.losses == full.losses[:3]
    assert (tmp_path / train.OPTIMIZER_FILE).is_file()
    assert (tmp_path / train.STATE_FILE).is_file()

    resumed = train.Trainer(CONFIG, TRAIN, MOE)
    resumed.restore(tmp_path)
    assert resumed.step == 3
    rest = _run(resumed)
    np.testing.assert_allclose(rest.losses, full.losses[3:], rtol=1e-6)
    assert rest.heldout[-1][1] == pytest.approx(full.heldout[-1][1], rel=1e-5)


@pytest.mark.slow  # a Trainer compiles its init (and, to train, its step)
def test_checkpoint_is_the_released_layout_and_loads(uninterrupted, tmp_path):
    trainer, _ = uninterrupted
    out = trainer.save(tmp_path)
    names = sorted(p.name for p in out.glob("*.safetensors"))
    assert any(n.endswith("-TP-common.safetensors") for n in names)
    assert any(n.endswith("-TP-001.safetensors") for n in names)  # experts split over 2 ranks
    model = load_pretrained(out, dtype=jnp.float32, quiet=True)
    tokens = HELDOUT_STREAM[None, :16]
    expected, _ = FORWARD(trainer.params, trainer._net_state, None, jnp.asarray(tokens), _rope(16))
    np.testing.assert_allclose(model.logits(tokens), expected, rtol=1e-5, atol=1e-5)


def _rope(t):
    from grok.rope import rope_table

    return rope_table(CONFIG, t)


@pytest.mark.slow  # a Trainer compiles its init (and, to train, its step)
def test_restore_refuses_a_directory_without_optimizer_state(tmp_path):
    with pytest.raises(CheckpointError, match="optimizer.npz"):
        train.Trainer(CONFIG, TRAIN, MOE).restore(tmp_path)


@pytest.mark.slow  # a Trainer compiles its init (and, to train, its step)
def test_balance_loss_is_one_for_a_uniform_router():
    trainer = train.Trainer(CONFIG, TRAIN, MOE)
    params = jax.tree_util.tree_map(lambda x: x, trainer.params)
    moe = next(m for m in params if m.endswith("/moe"))
    params[moe] = dict(params[moe], router=jnp.zeros_like(params[moe]["router"]))
    tokens = jnp.asarray(TRAIN_STREAM[None, :16])
    _, state = FORWARD(params, trainer._net_state, None, tokens, _rope(16))
    balance = state[moe][train.BALANCE_STATE]  # [L]
    assert balance.shape == (CONFIG.num_hidden_layers,)
    np.testing.assert_allclose(balance, 1.0, rtol=1e-6)


def test_split_and_batches_are_deterministic():
    docs = [(f"t{i}", f"text {i}") for i in range(20)]
    a = data.split_corpus(docs, 0.1, seed=0)
    assert a == data.split_corpus(docs, 0.1, seed=0)
    assert len(a.heldout) == 2 and not set(a.heldout) & set(a.train)
    assert sorted(a.train + a.heldout) == sorted(docs)
    b1 = data.batch_at(TRAIN_STREAM, 5, 4, 16, seed=0)
    assert b1.shape == (4, 17)
    np.testing.assert_array_equal(b1, data.batch_at(TRAIN_STREAM, 5, 4, 16, seed=0))
    assert not np.array_equal(b1, data.batch_at(TRAIN_STREAM, 6, 4, 16, seed=0))
    with pytest.raises(GrokError, match="shorter than one window"):
        data.batch_at(TRAIN_STREAM[:10], 0, 4, 16, seed=0)


def test_unigram_entropy():
    assert data.unigram_entropy(np.array([3, 3, 3]), 8) == 0.0
    assert data.unigram_entropy(np.arange(8), 8) == pytest.approx(np.log(8))
