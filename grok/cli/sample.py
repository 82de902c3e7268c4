"""``grok-sample``: generate text from a checkpoint, streaming it to the terminal.

    grok-sample --checkpoint DIR --prompt "The capital of France is" --max-new-tokens 32
    grok-sample --checkpoint DIR --chat --prompt @question.txt --temperature 0.7 --top-p 0.9
    echo "Once upon a time" | grok-sample --checkpoint DIR --prompt -

The completion goes to stdout (streamed token by token for a single prompt; for several
prompts each completion is printed under a header once the batch is done). Time to first
token and decode tokens per second go to stderr, and apart from them the seconds spent
compiling (JAX's persistent compilation cache, on unless ``--no-compile-cache``, makes that
near zero from the second run on). Bad input ends with one line on stderr,
``grok-sample: error: ...``, and exit status 2 (command line) or 1 (anything else).
"""

from __future__ import annotations

import argparse
import importlib
import io
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, TextIO

from grok.cli.common import (
    Parser,
    UsageError,
    finite_float,
    nonnegative_int,
    positive_int,
    run_program,
)

PROG = "grok-sample"
DTYPES = ("bfloat16", "float32", "float16")
QUANTIZE = ("fp8",)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``grok-sample``."""
    p = Parser(prog=PROG, description="Generate text with a Grok model.")
    p.add_argument(
        "--checkpoint",
        help="checkpoint directory (config.json + safetensors); default: the built-in model",
    )
    p.add_argument(
        "--tokenizer",
        help="tokenizer.tok.json or tokenizer.model (default: found beside the checkpoint)",
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="prompt text; repeat for a batch; @FILE reads a file, - reads stdin",
    )
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument(
        "--max-new-tokens", type=nonnegative_int, default=128, help="new tokens per prompt"
    )
    p.add_argument(
        "--temperature", type=finite_float, default=0.0, help="0 is greedy (the default)"
    )
    p.add_argument("--top-k", type=positive_int, default=None, help="keep the k most likely")
    p.add_argument(
        "--top-p", type=finite_float, default=None, help="nucleus sampling mass in (0, 1]"
    )
    p.add_argument(
        "--min-p", type=finite_float, default=None, help="keep tokens with p >= min_p * p_max"
    )
    p.add_argument(
        "--seed", type=nonnegative_int, default=0, help="random seed (same seed, same text)"
    )
    p.add_argument("--mesh", default=None, help="device mesh DATAxMODEL, e.g. 1x8")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="compute dtype")
    p.add_argument("--quantize", choices=QUANTIZE, default=None, help="keep weights in fp8")
    # Several processes, one mesh (grok.distributed): every process runs the same command with
    # its own --process-id; only process 0 prints.
    p.add_argument(
        "--coordinator",
        default=None,
        help="HOST:PORT of process 0, for a mesh over several processes "
        "(default: $JAX_COORDINATOR_ADDRESS)",
    )
    p.add_argument(
        "--num-processes",
        type=positive_int,
        default=None,
        help="processes (default: $JAX_NUM_PROCESSES)",
    )
    p.add_argument(
        "--process-id",
        type=nonnegative_int,
        default=None,
        help="this process (default: $JAX_PROCESS_ID)",
    )
    p.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not keep compiled programs on disk (default: ~/.cache/grok/jax, so a second "
        "run starts at once)",
    )
    return p


# With no --checkpoint and no --prompt, the built-in model continues this text from its corpus
# (CPython's reference documentation).
BUILTIN_PROMPT = "A class definition"


def read_stdin(stdin: TextIO | BinaryIO) -> str:
    """All of stdin as text, decoded as UTF-8 whatever the locale; UsageError if it is not."""
    raw = getattr(stdin, "buffer", stdin).read()
    if isinstance(raw, str):  # a text stream without a byte buffer (io.StringIO)
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(
            f"--prompt -: stdin is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})"
        ) from None


def read_prompts(values: Sequence[str], stdin: TextIO | BinaryIO) -> list[str]:
    """The prompt texts: each value as is, ``@FILE`` as that file's text, ``-`` as stdin."""
    if not values:
        raise UsageError("no prompt: pass --prompt TEXT (or --prompt @FILE, or --prompt -)")
    prompts = []
    stdin_text = None
    for value in values:
        if value == "-":
            if stdin_text is None:  # "-" twice reads stdin once and uses it twice
                stdin_text = read_stdin(stdin)
            prompts.append(stdin_text)
        elif value.startswith("@"):
            path = Path(value[1:])
            try:
                prompts.append(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as e:
                raise UsageError(f"--prompt {value}: cannot read {path}: {e}") from None
        else:
            prompts.append(value)
    return prompts


def parse_mesh(text: str) -> tuple[int, int]:
    """``"DATAxMODEL"`` -> (data, model), each >= 1."""
    parts = text.lower().split("x")
    try:
        sizes = tuple(int(s) for s in parts)
    except ValueError:
        sizes = ()
    if len(sizes) != 2 or min(sizes) < 1:
        raise UsageError(f"--mesh {text!r}: expected DATAxMODEL with positive sizes, e.g. 1x8")
    return sizes


def builtin_checkpoint() -> Path | None:
    """The built-in model's directory, when this install has one (``grok.builtin``)."""
    try:
        module = importlib.import_module("grok.builtin")
    except ModuleNotFoundError as e:
        if e.name == "grok.builtin":
            return None
        raise
    builtin_dir = getattr(module, "builtin_dir", None)
    return None if builtin_dir is None else Path(builtin_dir())


class TextStream:
    """Writes a sequence's text as its tokens arrive.

    Each token re-decodes the whole sequence and writes what is new, so tokenizers that join
    pieces (SentencePiece's leading spaces) or split a character over tokens (byte-level BPE)
    print the same text as one decode at the end; a trailing U+FFFD is held back until the
    next token completes the character.
    """

    def __init__(self, tokenizer, out: TextIO):
        self.tokenizer = tokenizer
        self.out = out
        self.ids: list[int] = []
        self.written = ""

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        self._write(final=False)

    def finish(self) -> None:
        self._write(final=True)
        self.out.write("\n")
        self.out.flush()

    def _write(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids)
        if not final and text.endswith("\ufffd"):
            return
        if text.startswith(self.written):
            self.out.write(text[len(self.written) :])
            self.out.flush()
            self.written = text


def run(args: argparse.Namespace, stdin: TextIO | BinaryIO, stdout: TextIO, stderr: TextIO) -> None:
    """Loads the model and tokenizer, generates, prints. Raises GrokError / UsageError."""
    echo_prompt = False
    if not args.prompt and not args.checkpoint and builtin_checkpoint() is not None:
        args.prompt = [BUILTIN_PROMPT]  # the first command of a new user: show the model working
        echo_prompt = True  # the user did not type it, so show what is being continued
    texts = read_prompts(args.prompt, stdin)
    mesh_shape = parse_mesh(args.mesh) if args.mesh else None

    import jax.numpy as jnp

    import grok
    from grok.distributed import initialize, is_main_process
    from grok.sampling import Sampler
    from grok.tokenizer import chat_stop_ids, encode_chat, load_tokenizer

    if initialize(args.coordinator, args.num_processes, args.process_id) and not is_main_process():
        stdout = stderr = io.StringIO()  # every process computes the same text; one prints it
    if not args.no_compile_cache:
        from grok.compile_cache import enable_compile_cache

        enable_compile_cache()
    sampler = Sampler(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p
    )
    checkpoint = Path(args.checkpoint) if args.checkpoint else builtin_checkpoint()
    if checkpoint is None:
        raise UsageError(
            "no --checkpoint given and this install has no built-in model: pass --checkpoint "
            "DIR, a directory with config.json and *.safetensors (and the tokenizer beside it, "
            "or pass --tokenizer FILE)"
        )
    if not checkpoint.is_dir():
        raise UsageError(f"--checkpoint {checkpoint}: not a directory")
    tokenizer_path = Path(args.tokenizer) if args.tokenizer else checkpoint
    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except grok.TokenizerError as e:
        hint = "" if args.tokenizer else "; pass --tokenizer FILE"
        raise grok.TokenizerError(f"{e}{hint}") from None
    if args.chat:
        prompts = [encode_chat(tokenizer, [("user", t)]) for t in texts]
        stops = chat_stop_ids(tokenizer)
    else:
        prompts = [tokenizer.encode(t) for t in texts]
        stops = [tokenizer.eos_id]

    mesh = None
    if mesh_shape is not None:
        from grok.sharding import make_mesh

        mesh = make_mesh(*mesh_shape)
    try:
        model = grok.load_pretrained(
            checkpoint,
            dtype=jnp.dtype(args.dtype),
            mesh=mesh,
            quantize=args.quantize,
            # The memory plan refuses a batch whose KV cache cannot fit before a byte is read
            # (a released checkpoint; a Grok-1 one is checked when generation starts).
            kv_batch=len(prompts),
            kv_context=max(len(p) for p in prompts) + args.max_new_tokens,
        )
    except NotImplementedError as e:
        raise UsageError(f"cannot load {checkpoint} as asked: {e}") from None

    stream = TextStream(tokenizer, stdout) if len(prompts) == 1 else None
    if echo_prompt:
        stdout.write(texts[0])
    result = model.generate(
        prompts,
        max_new_tokens=args.max_new_tokens,
        sampler=sampler,
        seed=args.seed,
        stop_tokens=stops,
        on_token=None if stream is None else (lambda _row, token: stream.push(token)),
    )
    if stream is not None:
        stream.finish()
    else:
        for i, tokens in enumerate(result.tokens):
            stdout.write(f"--- completion {i} ---\n{tokenizer.decode(tokens)}\n")
        stdout.flush()
    new = sum(len(t) for t in result.tokens)
    decode_run_s = result.decode_time_s - result.decode_compile_s
    rate = result.num_decode_tokens / decode_run_s if decode_run_s > 0 else 0.0
    print(
        f"{PROG}: {len(prompts)} sequence(s), {new} new tokens "
        f"({', '.join(sorted(set(result.finish_reasons)))}); "
        f"compile {result.compile_s:.2f} s; time to first token "
        f"{(result.time_to_first_token_s - result.prefill_compile_s) * 1e3:.1f} ms; "
        f"decode {rate:.1f} tokens/s (compile excluded)",
        file=stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``grok-sample``: returns the exit status (2: bad command line, 1: error)."""
    return run_program(
        build_parser(), lambda args: run(args, sys.stdin, sys.stdout, sys.stderr), argv
    )


if __name__ == "__main__":
    sys.exit(main())
