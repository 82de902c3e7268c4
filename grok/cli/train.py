"""``grok-train``: trains the built-in model (``grok.builtin``) on CPython's ``pydoc_data.topics``.

Reads the tokenizer from ``--out`` (``grok-train-tokenizer`` writes it), trains
``grok.builtin.BUILTIN_CONFIG`` with ``grok.train``, writes resumable float32 checkpoints in
``--work`` and, at the end of the schedule, the bfloat16 model in the released layout plus
``training.json`` (held-out loss, perplexity, the unigram entropy of the held-out tokens) in
``--out``.

    grok-train-tokenizer
    grok-train                  # ~15 minutes on 2 CPU cores
    grok-train --resume         # continue from --work after an interruption

(``python scripts/train.py`` is the same program.) ``--out`` defaults to the package's
``grok/builtin`` folder, which is the checkout's own with ``pip install -e .``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from grok import data
from grok.builtin import BUILTIN_CONFIG, builtin_dir
from grok.cli.common import (
    EXIT_ERROR,
    Parser,
    nonnegative_int,
    positive_int,
    report,
    run_program,
)
from grok.errors import TokenizerError
from grok.testing import write_checkpoint
from grok.tokenizer import TOK_JSON_NAME, TokJsonTokenizer

try:  # grok.train needs optax, an optional dependency (the "train" extra); main() says so
    from grok.train import STATE_FILE, TrainConfig, Trainer
    from grok.train import run as train_run
except ModuleNotFoundError as e:
    if e.name != "optax":
        raise
    TrainConfig = None

PROG = "grok-train"

EXPORT_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``grok-train``."""
    defaults = TrainConfig()
    p = Parser(prog=PROG, description="Train the built-in model.")
    p.add_argument("--out", type=Path, default=builtin_dir(), help="tokenizer in, model out")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "grok-builtin-run")
    p.add_argument("--resume", action="store_true", help="continue from --work")
    p.add_argument("--until", type=positive_int, default=None, help="stop after this step")
    p.add_argument(
        "--export", action="store_true", help="export to --out even before the schedule's end"
    )
    p.add_argument("--steps", type=positive_int, default=defaults.steps)
    p.add_argument("--warmup-steps", type=nonnegative_int, default=defaults.warmup_steps)
    p.add_argument("--seed", type=nonnegative_int, default=defaults.seed)
    p.add_argument("--export-dtype", choices=sorted(EXPORT_DTYPES), default="bfloat16")
    return p


def run(args: argparse.Namespace) -> None:
    """Trains (or resumes), then exports the model and ``training.json`` to ``--out``."""
    defaults = TrainConfig()
    tok_path = args.out / TOK_JSON_NAME
    if not tok_path.is_file():
        raise TokenizerError(f"{tok_path}: not found; run grok-train-tokenizer first")
    tokenizer = TokJsonTokenizer.from_file(tok_path)
    config = BUILTIN_CONFIG
    if tokenizer.vocab_size != config.vocab_size:
        raise TokenizerError(
            f"{tok_path}: vocab_size {tokenizer.vocab_size} does not match the model's "
            f"{config.vocab_size}"
        )
    train = dataclasses.replace(
        defaults, steps=args.steps, warmup_steps=args.warmup_steps, seed=args.seed
    )

    docs = data.topics()
    corpus = data.split_corpus(docs, train.heldout_fraction, train.split_seed)
    train_stream = data.encode_documents(tokenizer, corpus.train)
    heldout_stream = data.encode_documents(tokenizer, corpus.heldout)
    print(
        f"corpus: {len(corpus.train)} training topics ({train_stream.size} tokens), "
        f"{len(corpus.heldout)} held out ({heldout_stream.size} tokens): "
        f"{', '.join(name for name, _ in corpus.heldout)}"
    )

    trainer = Trainer(config, train)
    count = sum(x.size for x in jax.tree_util.tree_leaves(trainer.params))
    print(f"model: {count:,} parameters; {train.steps} steps of {train.batch_size}x{train.seq_len}")
    if args.resume and (args.work / STATE_FILE).is_file():
        trainer.restore(args.work)
        print(f"resumed from {args.work} at step {trainer.step}")
    start = time.perf_counter()
    result = train_run(
        trainer, train_stream, heldout_stream, until=args.until, checkpoint_dir=args.work
    )
    wall = time.perf_counter() - start
    if trainer.step < train.steps and not args.export:
        print(f"stopped at step {trainer.step}; continue with --resume")
        return

    heldout_loss = result.heldout[-1][1] if result.heldout else None
    windows = data.eval_windows(heldout_stream, train.seq_len, train.eval_windows)
    export_dtype = EXPORT_DTYPES[args.export_dtype]
    full_params = trainer.params
    trainer.params = jax.tree_util.tree_map(
        lambda x: x.astype(export_dtype).astype(x.dtype), full_params
    )
    exported_loss = trainer.evaluate(windows)
    trainer.params = full_params
    if heldout_loss is None:
        heldout_loss = trainer.evaluate(windows)
    # The tokens the held-out loss is measured on: each window's targets.
    targets = windows[:, 1:]
    entropy = data.unigram_entropy(targets, config.vocab_size)
    write_checkpoint(args.out, config, trainer.params, tp=2, dtype=export_dtype)
    report = {
        "heldout_loss_nats": round(heldout_loss, 4),
        "heldout_perplexity": round(math.exp(heldout_loss), 2),
        "heldout_loss_exported_weights_nats": round(exported_loss, 4),
        "heldout_unigram_entropy_nats": round(entropy, 4),
        "heldout_unigram_perplexity": round(math.exp(entropy), 2),
        "heldout_tokens": int(targets.size),
        "heldout_topics": [name for name, _ in corpus.heldout],
        "train_tokens": int(train_stream.size),
        "final_train_loss_nats": round(result.losses[-1], 4) if result.losses else None,
        "steps_done": trainer.step,
        "parameters": count,
        "export_dtype": args.export_dtype,
        "train_config": dataclasses.asdict(train),
        "wall_seconds_this_invocation": round(wall, 1),
        "python": platform.python_version(),
        "corpus_sha256": data.corpus_digest(docs),
        "jax": jax.__version__,
    }
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``grok-train``."""
    if TrainConfig is None:
        report(PROG, 'needs the optax package: pip install -e ".[train]"')
        return EXIT_ERROR
    return run_program(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
