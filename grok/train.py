"""Training the library's model: next-token loss, router balance loss, AdamW, checkpoints.

Glossary: B batch, T positions, V vocab, L layers, E experts, k experts per token.

The model trained is exactly ``grok.model.LanguageModel`` (the Grok-2 code path). The only
addition is a method interceptor around each ``MoE.__call__`` that recomputes the router
probabilities of that layer's input (the router is one small float32 matmul) and records the
Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e`` as Haiku state: ``f_e`` is the
fraction of the k-of-E assignments that go to expert e (not differentiable), ``P_e`` the mean
router probability of expert e. Out of the layer loop the state comes stacked [L].
A perfectly balanced router gives 1 in every layer.

Checkpoints are written in the released layout (``grok.checkpoint.write_checkpoint``, float32 so
that a resumed run is exact) with ``optimizer.npz`` and ``train_state.json`` beside them.
The batch of step n depends only on (seed, n), so a run resumed from step n continues with
the same batches, parameters and optimizer state as the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from grok import data
from grok.checkpoint import ReleasedCheckpoint, write_checkpoint
from grok.config import GrokConfig
from grok.errors import CheckpointError, ConfigError
from grok.kernels import REFERENCE, Kernels, devices_of, select
from grok.model import LanguageModel
from grok.moe import MoE, route
from grok.progress import progress_bar
from grok.rope import rope_table

OPTIMIZER_FILE = "optimizer.npz"
STATE_FILE = "train_state.json"
BALANCE_STATE = "balance_loss"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Every knob of a training run. Defaults are the built-in model's run."""

    steps: int = 600  # optimizer steps in the whole run (the schedule's length)
    batch_size: int = 16  # B windows per step
    seq_len: int = 128  # T positions per window
    peak_lr: float = 3e-3  # small models tolerate a high rate; warmup keeps the start stable
    warmup_steps: int = 50  # linear warmup from 0 to peak_lr
    final_lr_fraction: float = 0.1  # cosine decay ends at peak_lr * this
    weight_decay: float = 0.1  # AdamW decay on matrices (not norms, not the router)
    adam_b2: float = 0.95  # shorter second-moment memory than 0.999: steadier on short runs
    clip_norm: float = 1.0  # global gradient-norm clip
    balance_coef: float = 0.01  # weight of the router load-balancing loss (Switch uses 0.01)
    seed: int = 0  # parameter init and batch order
    heldout_fraction: float = 0.1  # topics held out for the evaluation loss
    split_seed: int = 0  # which topics are held out (must match the tokenizer's training)
    eval_every: int = 100  # steps between held-out evaluations (and at the end)
    eval_windows: int | None = None  # cap on held-out windows evaluated; None: all
    checkpoint_every: int = 200  # steps between checkpoints (and at the end)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train field {name!r} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(
                f"train field 'warmup_steps' must be in [0, steps={self.steps}), "
                f"got {self.warmup_steps}"
            )


class StepMetrics(NamedTuple):
    """What one training step reports (scalars)."""

    loss: jax.Array  # next-token cross-entropy, nats
    balance: jax.Array  # load-balancing loss, mean over layers (1 = balanced)
    grad_norm: jax.Array  # before clipping
    lr: jax.Array


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to ``peak_lr``, then cosine decay to ``peak_lr * final_lr_fraction``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.peak_lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.steps,
        end_value=cfg.peak_lr * cfg.final_lr_fraction,
    )


def _decay_mask(params: Any) -> Any:
    """True for the matrices AdamW decays: every weight but norms and the router."""
    return {
        module: {name: "norm" not in module and name != "router" for name in leaves}
        for module, leaves in params.items()
    }


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the warmup-cosine schedule."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(
            learning_rate(cfg), b2=cfg.adam_b2, weight_decay=cfg.weight_decay, mask=_decay_mask
        ),
    )


def _balance_interceptor(config: GrokConfig) -> Callable:
    """Records each MoE layer's load-balancing loss as Haiku state (see module docstring)."""
    e, k = config.num_local_experts, config.num_experts_per_tok

    def intercept(next_f, args, kwargs, context):
        out = next_f(*args, **kwargs)
        if isinstance(context.module, MoE) and context.method_name == "__call__":
            x = args[0]  # [B, T, D]
            w_gate = hk.get_parameter("router", (e, config.hidden_size), jnp.float32)  # [E, D]
            _, experts, probs = route(
                x,
                w_gate,
                cap=config.router_logit_softcapping,
                k=k,
                renormalize=config.moe_router_renormalize,
            )  # experts [B, T, k], probs [B, T, E]
            share = jnp.mean(jax.nn.one_hot(experts, e), axis=(0, 1, 2))  # [E], f_e
            mean_prob = jnp.mean(probs, axis=(0, 1))  # [E], P_e
            balance = e * jnp.sum(jax.lax.stop_gradient(share) * mean_prob)
            hk.set_state(BALANCE_STATE, balance)
        return out

    return intercept


def training_forward(
    config: GrokConfig, moe_impl: str = "auto", kernels: Kernels = REFERENCE
) -> hk.TransformedWithState:
    """``LanguageModel`` in float32 with the balance loss as state.

    ``apply(params, state, None, tokens [B, T], rope)`` returns
    ``(logits [B, T, V], {moe module: {"balance_loss": [L]}})``. The parameter tree is the
    one ``grok.model.forward_fns`` uses; ``moe_impl`` and ``kernels`` are as there.
    """

    def fn(tokens, rope):
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        lengths = jnp.full((b,), t, jnp.int32)
        with hk.intercept_methods(_balance_interceptor(config)):
            model = LanguageModel(config, jnp.float32, moe_impl, kernels=kernels)
            logits, _ = model(tokens, positions, rope, None, lengths)
        return logits

    return hk.transform_with_state(fn)


class _Compiled(NamedTuple):
    forward: hk.TransformedWithState
    optimizer: optax.GradientTransformation
    step: Callable  # (params, opt_state, net_state, windows, step) -> (params, opt_state, m)
    eval: Callable  # (params, net_state, windows) -> summed loss


@functools.lru_cache(maxsize=16)
def _initializer(config: GrokConfig, train: TrainConfig) -> Callable:
    """The jitted ``(key) -> (params, net_state, opt_state)`` of a run (its trace runs the
    forward once, whose kernels do not change the parameters: the reference's)."""
    forward, optimizer = training_forward(config), make_optimizer(train)
    rope = rope_table(config, train.seq_len)

    def init_fn(key):
        tokens = jnp.zeros((1, train.seq_len), jnp.int32)
        params, net_state = forward.init(key, tokens, rope)
        return params, net_state, optimizer.init(params)

    return jax.jit(init_fn)


@functools.lru_cache(maxsize=16)
def _compiled(config: GrokConfig, train: TrainConfig, moe_impl: str, kernels: Kernels) -> _Compiled:
    """The jitted step and evaluation of a run, shared by every Trainer with these configs."""
    forward = training_forward(config, moe_impl, kernels)
    optimizer = make_optimizer(train)
    schedule = learning_rate(train)
    rope = rope_table(config, train.seq_len)

    def losses(params, net_state, windows):
        """(cross-entropy summed over the B * T targets, mean balance loss over layers)."""
        inputs, targets = windows[:, :-1], windows[:, 1:]  # [B, T]
        logits, state = forward.apply(params, net_state, None, inputs, rope)  # [B, T, V]
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T]
        balance = jnp.mean(jnp.stack([s[BALANCE_STATE] for s in state.values()]))
        return jnp.sum(nll), balance

    def step_fn(params, opt_state, net_state, windows, step):
        def objective(p):
            total, balance = losses(p, net_state, windows)
            loss = total / (windows.shape[0] * (windows.shape[1] - 1))
            return loss + train.balance_coef * balance, (loss, balance)

        grads, (loss, balance) = jax.grad(objective, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = StepMetrics(loss, balance, optax.tree.norm(grads), schedule(step))
        return params, opt_state, metrics

    def eval_fn(params, net_state, windows):
        return losses(params, net_state, windows)[0]

    return _Compiled(forward, optimizer, jax.jit(step_fn, donate_argnums=(0, 1)), jax.jit(eval_fn))


class Trainer:
    """A training run: the jitted step, evaluation, checkpointing and resuming.

    Attributes:
      config: the model's GrokConfig; train: the TrainConfig.
      params: float32 Haiku parameter tree; opt_state: the optimizer's state; step: steps done.
    """

    def __init__(self, config: GrokConfig, train: TrainConfig, moe_impl: str = "auto"):
        self.config = config
        self.train = train
        # The seed only picks the initial parameters and the batches: share the compiled step.
        shared = dataclasses.replace(train, seed=0)
        self.params, self._net_state, self.opt_state = _initializer(config, shared)(
            jax.random.PRNGKey(train.seed)
        )
        # The step runs on the kernels for the device the parameters were made on.
        kernels = select(jnp.float32, devices=devices_of(self.params), training=True)
        self._fns = _compiled(config, shared, moe_impl, kernels)
        self.step = 0

    def train_step(self, windows: np.ndarray) -> StepMetrics:
        """One optimizer step on int32 windows [B, T + 1]; returns the step's metrics."""
        self.params, self.opt_state, metrics = self._fns.step(
            self.params,
            self.opt_state,
            self._net_state,
            jnp.asarray(windows, jnp.int32),
            jnp.int32(self.step),
        )
        self.step += 1
        return metrics

    def evaluate(self, windows: np.ndarray) -> float:
        """Mean next-token loss (nats) over int32 windows [W, T + 1], in batches of B."""
        total, count = 0.0, 0
        b = self.train.batch_size
        for i in range(0, windows.shape[0], b):
            chunk = windows[i : i + b]
            batch = jnp.asarray(chunk, jnp.int32)
            total += float(self._fns.eval(self.params, self._net_state, batch))
            count += chunk.shape[0] * (chunk.shape[1] - 1)
        return total / count

    # Checkpoints.

    def save(self, directory: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
        """Writes params (released layout, float32), optimizer state and the step."""
        out = write_checkpoint(directory, self.config, self.params, tp=2, dtype=jnp.float32)
        leaves = jax.tree_util.tree_leaves(self.opt_state)
        np.savez(out / OPTIMIZER_FILE, *[np.asarray(x) for x in leaves])
        state = {"step": self.step, "train": dataclasses.asdict(self.train), **(extra or {})}
        (out / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        return out

    def restore(self, directory: str | os.PathLike[str]) -> None:
        """Loads params, optimizer state and step written by :meth:`save`.

        Raises CheckpointError when a file is missing or the optimizer state does not match
        this run's (different model shape or optimizer).
        """
        directory = Path(directory)
        for name in (OPTIMIZER_FILE, STATE_FILE):
            if not (directory / name).is_file():
                raise CheckpointError(f"{directory / name}: missing, cannot resume from here")
        with ReleasedCheckpoint(directory, self.config) as ckpt:
            loaded = ckpt.load_params(jnp.float32)
        # Placed like the arrays they replace, so the compiled step is reused as is.
        self.params = jax.tree_util.tree_map(
            lambda ref, x: jax.device_put(jnp.asarray(x, ref.dtype), ref.sharding),
            self.params,
            loaded,
        )
        template, treedef = jax.tree_util.tree_flatten(self.opt_state)
        with np.load(directory / OPTIMIZER_FILE) as saved:
            arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        if len(arrays) != len(template):
            raise CheckpointError(
                f"{directory / OPTIMIZER_FILE}: holds {len(arrays)} optimizer arrays, "
                f"this run's optimizer has {len(template)}"
            )
        for i, (ref, got) in enumerate(zip(template, arrays, strict=True)):
            if tuple(ref.shape) != got.shape:
                raise CheckpointError(
                    f"{directory / OPTIMIZER_FILE}: array {i} has shape {list(got.shape)}, "
                    f"expected {list(ref.shape)}"
                )
        self.opt_state = jax.tree_util.tree_unflatten(
            treedef,
            [
                jax.device_put(jnp.asarray(a, ref.dtype), ref.sharding)
                for ref, a in zip(template, arrays, strict=True)
            ],
        )
        self.step = int(json.loads((directory / STATE_FILE).read_text())["step"])


class RunResult(NamedTuple):
    """What :func:`run` returns: per-step training losses and held-out evaluations."""

    losses: list[float]  # training loss of each step run here
    heldout: list[tuple[int, float]]  # (step, mean held-out loss in nats)


def run(
    trainer: Trainer,
    train_stream: np.ndarray,
    heldout_stream: np.ndarray,
    *,
    until: int | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Trains from ``trainer.step`` to ``until`` (default: the schedule's end).

    Evaluates on the held-out stream every ``eval_every`` steps and at the end, and writes a
    checkpoint every ``checkpoint_every`` steps and at the end when ``checkpoint_dir`` is set.
    """
    cfg = trainer.train
    until = cfg.steps if until is None else min(until, cfg.steps)
    windows = data.eval_windows(heldout_stream, cfg.seq_len, cfg.eval_windows)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    losses: list[float] = []
    heldout: list[tuple[int, float]] = []
    start_step, start_time = trainer.step, time.perf_counter()
    bar = progress_bar(
        until, desc="training", unit="step", initial=trainer.step, quiet=not progress
    )
    with bar:
        while trainer.step < until:
            batch = data.batch_at(train_stream, trainer.step, cfg.batch_size, cfg.seq_len, cfg.seed)
            metrics = trainer.train_step(batch)
            loss = float(metrics.loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss} at step {trainer.step}")
            losses.append(loss)
            elapsed = max(time.perf_counter() - start_time, 1e-9)
            rate = (trainer.step - start_step) * tokens_per_step / elapsed
            bar.set_postfix_str(f"loss {loss:.3f}, {rate:,.0f} tok/s", refresh=False)
            bar.update(1)
            done = trainer.step == until
            if trainer.step % cfg.eval_every == 0 or done:
                value = trainer.evaluate(windows)
                heldout.append((trainer.step, value))
                with bar.external_write_mode():  # the line goes above the bar
                    log(
                        f"step {trainer.step}: train loss {loss:.4f}, held-out loss "
                        f"{value:.4f} (perplexity {math.exp(value):.2f}), balance "
                        f"{float(metrics.balance):.3f}, lr {float(metrics.lr):.2e}"
                    )
            if checkpoint_dir is not None and (trainer.step % cfg.checkpoint_every == 0 or done):
                trainer.save(checkpoint_dir)
    return RunResult(losses, heldout)
