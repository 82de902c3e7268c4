"""``grok-serve`` (also ``python -m grok.serve``): the OpenAI-compatible server's command line.

    grok-serve                                     # the built-in model on 127.0.0.1:8000
    grok-serve --checkpoint /path/to/grok-2 --mesh 1x8 --max-batch 16 --port 8080

Bad flags or a checkpoint that does not load end with one line on stderr,
``grok-serve: error: ...``, and exit status 2 (command line) or 1 (anything else).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp

import grok
from grok.builtin import builtin_dir
from grok.cli.common import (
    EXIT_BAD_ARGS,
    EXIT_ERROR,
    Parser,
    UsageError,
    nonnegative_int,
    positive_float,
    positive_int,
    report,
)
from grok.cli.sample import DTYPES, QUANTIZE, parse_mesh
from grok.errors import GrokError
from grok.serve.app import DEFAULT_MAX_BODY_BYTES, create_app
from grok.serve.drain import DEFAULT_DRAIN_TIMEOUT_S, serve
from grok.serve.engine import DEFAULT_MAX_CONTEXT, DEFAULT_PREFILL_CHUNK, Engine
from grok.serve.metrics import Metrics
from grok.serve.text import ServedTokenizer
from grok.sharding import make_mesh
from grok.tokenizer import load_tokenizer

PROG = "grok-serve"
BUILTIN = "builtin"
BUILTIN_NAME = "grok-builtin"
API_KEY_ENV = "GROK_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``grok-serve``."""
    p = Parser(prog=PROG, description="Serve a Grok model over OpenAI's HTTP API.")
    p.add_argument(
        "--checkpoint", default=BUILTIN, help="checkpoint directory, or 'builtin' (the default)"
    )
    p.add_argument("--tokenizer", help="tokenizer file (default: found beside the checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=nonnegative_int, default=8000, help="port to listen on")
    p.add_argument("--max-batch", type=positive_int, default=8, help="decode slots (batch rows)")
    p.add_argument(
        "--max-context",
        type=positive_int,
        default=None,
        help=f"most tokens (prompt + completion) per sequence; default: the model's context, "
        f"at most {DEFAULT_MAX_CONTEXT}",
    )
    p.add_argument(
        "--max-queue", type=nonnegative_int, default=128, help="sequences waiting; more gets 503"
    )
    # The KV cache: a pool of pages, prompts prefilled in chunks, shared prompt prefixes.
    p.add_argument(
        "--kv-cache-tokens",
        type=positive_int,
        default=None,
        help="tokens the paged KV cache holds, for all sequences together; default: what fits "
        "in 90%% of device memory beside the weights, at most --max-batch full contexts",
    )
    p.add_argument(
        "--prefill-chunk",
        type=positive_int,
        default=DEFAULT_PREFILL_CHUNK,
        help="most prompt tokens prefilled between two decode steps (a long prompt goes in "
        f"pieces while the other streams keep moving; default {DEFAULT_PREFILL_CHUNK})",
    )
    p.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="do not share the KV pages of common prompt prefixes between requests",
    )
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="compute dtype")
    p.add_argument("--mesh", default=None, help="device mesh DATAxMODEL, e.g. 1x8")
    p.add_argument("--quantize", choices=QUANTIZE, default=None, help="keep weights in fp8")
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else none)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help=f"the model name clients use (default: the checkpoint folder's name, "
        f"{BUILTIN_NAME} for the built-in model)",
    )
    # Bounds and shutdown.
    p.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body read; more gets 413 (default: %(default)s)",
    )
    p.add_argument(
        "--drain-timeout",
        type=positive_float,
        default=DEFAULT_DRAIN_TIMEOUT_S,
        help="seconds running requests get to finish after SIGTERM (default: %(default)s)",
    )
    return p


def _context(max_context: int | None, checkpoint: Path) -> int:
    """The cache length per slot the flags ask for (0 when the config cannot be read here:
    Grok-1 pickles carry none, and the loader then plans without the cache)."""
    if max_context is not None:
        return max_context
    try:
        config = grok.load_config(checkpoint)
    except GrokError:
        return 0
    return min(config.max_position_embeddings, DEFAULT_MAX_CONTEXT)


def build_engine(args: argparse.Namespace) -> tuple[Engine, str, Metrics]:
    """Loads the model and tokenizer as the flags say; returns (engine, served name, metrics)."""
    mesh = make_mesh(*parse_mesh(args.mesh)) if args.mesh else None
    if args.checkpoint == BUILTIN:
        checkpoint, name = builtin_dir(), BUILTIN_NAME
    else:
        checkpoint = Path(args.checkpoint)
        if not checkpoint.is_dir():
            raise UsageError(f"--checkpoint {checkpoint}: not a directory")
        name = checkpoint.resolve().name
    loaded = load_tokenizer(Path(args.tokenizer) if args.tokenizer else checkpoint)
    context = _context(args.max_context, checkpoint)
    if args.kv_cache_tokens is not None and args.kv_cache_tokens < context:
        raise UsageError(
            f"--kv-cache-tokens {args.kv_cache_tokens} holds less than one sequence of "
            f"--max-context {context}"
        )
    model = grok.load_pretrained(
        checkpoint,
        dtype=jnp.dtype(args.dtype),
        mesh=mesh,
        quantize=args.quantize,
        # The memory plan leaves room for the KV pool --kv-cache-tokens asks for, else for one
        # whole context (the pool then takes what the weights leave, up to --max-batch).
        kv_batch=-(-args.kv_cache_tokens // context) if args.kv_cache_tokens and context else 1,
        kv_context=context,
    )
    longest = model.config.max_position_embeddings
    if args.max_context is not None and args.max_context > longest:
        raise UsageError(
            f"--max-context {args.max_context} is longer than the model's context "
            f"(max_position_embeddings = {longest})"
        )
    # Decided here, once: ids the tokenizer cannot decode are served as U+FFFD (see
    # ServedTokenizer for why a smaller tokenizer is not refused).
    tokenizer = ServedTokenizer(loaded, model.config.vocab_size)
    mismatch = tokenizer.mismatch()
    if mismatch is not None:
        print(f"{PROG}: warning: {mismatch}", file=sys.stderr, flush=True)
    metrics = Metrics(args.max_batch)
    engine = Engine(
        model,
        tokenizer,
        max_batch=args.max_batch,
        max_context=args.max_context,
        max_queue=args.max_queue,
        metrics=metrics,
        kv_cache_tokens=args.kv_cache_tokens,
        prefill_chunk=args.prefill_chunk,
        prefix_cache=args.prefix_cache,
    )
    return engine, args.served_model_name or name, metrics


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``grok-serve``: loads, then serves until interrupted."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    try:
        engine, name, metrics = build_engine(args)
    except UsageError as e:
        report(PROG, e)
        return EXIT_BAD_ARGS
    except (GrokError, OSError) as e:
        report(PROG, e)
        return EXIT_ERROR
    app = create_app(
        engine,
        served_name=name,
        api_key=args.api_key,
        metrics=metrics,
        max_body_bytes=args.max_body_bytes,
        drain_timeout=args.drain_timeout,
    )
    print(
        f"{PROG}: serving {name} (max batch {engine.max_batch}, context {engine.max_context}, "
        f"KV cache {engine.kv_cache_tokens} tokens) on http://{args.host}:{args.port}",
        file=sys.stderr,
        flush=True,
    )
    serve(app, app.state.drain, host=args.host, port=args.port)  # returns after a drain
    return 0


if __name__ == "__main__":
    sys.exit(main())
