"""The llama.cpp peer, through ``llama-cpp-python`` (an optional package, built from source with
native CPU flags: see docs/performance.md), on the GGUF file ``grok.bench.gguf_file`` writes.

Glossary: B batch, T prompt tokens, N new tokens, V vocab.

It runs as llama.cpp's own batched examples do, through the library's C API (which
``llama-cpp-python`` exposes as ``llama_cpp.*``): one context per batch size with B
sequences (``n_seq_max``, a KV cache of its own for each), the B prompts decoded as one batch
with the logits of each row's last position only, then N - 1 steps of one token per row,
each row's next token picked by llama.cpp's greedy sampler from its logits. The figures are
grok's: prefill of the prompts (median of 3 after a warm-up), time to first token, decode
tokens per second over the batch, the whole generation, each from a generation timed after
a warm-up one. ``n_threads`` is the benchmark's ``--threads``, for the prompt and the steps.

The weights' format: ``float32``, ``bfloat16`` or ``q8_0`` (``GGUF_FORMATS``). The KV cache is
llama.cpp's default (float16), flash attention its default (``auto``).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path
from typing import Any

import numpy as np

from grok.bench.gguf_file import gguf_path
from grok.bench.shapes import resolve
from grok.errors import GenerationError

CTX_ALIGN = 256  # llama.cpp pads each sequence's cache to a multiple of this


def missing() -> str | None:
    """Why this peer cannot run here (a package not installed), or None; imports nothing."""
    if importlib.util.find_spec("llama_cpp") is None:
        return (
            "llama-cpp-python is not installed (build it from source with native flags: "
            "docs/performance.md, 'Installing the llama.cpp peer')"
        )
    if importlib.util.find_spec("gguf") is None:
        return "gguf is not installed (pip install -e '.[bench]')"
    return None


class LlamaRunner:
    """One llama.cpp model and its greedy generation at a batch size.

    ``llama`` is the ``llama_cpp`` module; ``path`` the GGUF file; ``threads`` for the
    prompt and the steps.
    """

    def __init__(self, llama: Any, path: Path, threads: int):
        self.lc = llama
        params = llama.llama_model_default_params()
        self.model = llama.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise GenerationError(f"{path}: llama.cpp could not load the model")
        self.threads = threads
        self.sampler = llama.llama_sampler_init_greedy()

    def context(self, rows: int, cells: int, batch_tokens: int) -> Any:
        """A context for ``rows`` sequences of up to ``cells`` tokens each."""
        lc = self.lc
        params = lc.llama_context_default_params()
        params.n_ctx = rows * (-(-cells // CTX_ALIGN) * CTX_ALIGN)
        params.n_seq_max = rows
        params.n_batch = params.n_ubatch = batch_tokens  # the prompts in one pass
        params.n_threads = params.n_threads_batch = self.threads
        ctx = lc.llama_init_from_model(self.model, params)
        if not ctx:
            raise GenerationError(f"llama.cpp could not create a context for {rows} sequences")
        return ctx

    def decode(self, ctx: Any, batch: Any) -> None:
        status = self.lc.llama_decode(ctx, batch)
        if status != 0:
            raise GenerationError(f"llama_decode returned {status}")

    def fill_prompts(self, batch: Any, prompts: np.ndarray) -> None:
        """The B prompts [B, T] as one batch, logits at each row's last position only."""
        b, t = prompts.shape
        for r in range(b):
            for p in range(t):
                i = r * t + p
                batch.token[i] = int(prompts[r, p])
                batch.pos[i] = p
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = r
                batch.logits[i] = p == t - 1
        batch.n_tokens = b * t

    def reset(self, ctx: Any, batch: Any, prompts: np.ndarray) -> None:
        """An empty cache and the prompts in the batch (untimed: C code fills a batch in
        microseconds, Python's ctypes in a millisecond)."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(ctx), True)
        self.fill_prompts(batch, prompts)

    def prefill(self, ctx: Any, batch: Any, prompts: np.ndarray) -> list[int]:
        """Decodes the prompts (``reset`` first); each row's greedy first token."""
        b, t = prompts.shape
        self.decode(ctx, batch)
        return [self.lc.llama_sampler_sample(self.sampler, ctx, r * t + t - 1) for r in range(b)]

    def generate(self, ctx: Any, batch: Any, prompts: np.ndarray, new: int) -> dict[str, Any]:
        """Greedy generation of ``new`` tokens per row: times and tokens [B, new]."""
        b, t = prompts.shape
        self.reset(ctx, batch, prompts)
        start = time.perf_counter()
        last = self.prefill(ctx, batch, prompts)
        first = time.perf_counter()
        tokens = [last]
        for step in range(new - 1):
            for r in range(b):
                batch.token[r] = last[r]
                batch.pos[r] = t + step
                batch.n_seq_id[r] = 1
                batch.seq_id[r][0] = r
                batch.logits[r] = True
            batch.n_tokens = b
            self.decode(ctx, batch)
            last = [self.lc.llama_sampler_sample(self.sampler, ctx, r) for r in range(b)]
            tokens.append(last)
        end = time.perf_counter()
        return {"start": start, "first": first, "end": end, "tokens": np.array(tokens).T}

    def close(self) -> None:
        self.lc.llama_sampler_free(self.sampler)
        self.lc.llama_model_free(self.model)


def llama_child(args: argparse.Namespace) -> dict[str, Any]:
    """Prefill, time to first token, decode and the whole generation at each batch size."""
    import llama_cpp
    from llama_cpp import _logger

    _logger.set_verbose(False)  # llama.cpp's load log would bury a failure's message
    llama_cpp.llama_backend_init()
    config = resolve(args.shape)
    path = gguf_path(args.gguf_dir, args.shape, args.dtype)
    runner = LlamaRunner(llama_cpp, path, args.threads)
    prompts = np.random.default_rng(0).integers(0, config.vocab_size, (max(args.batch), args.T))
    out: dict[str, Any] = {
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "gguf": path.name,
        "n_threads": args.threads,
    }
    try:
        for b in args.batch:
            out[f"b{b}"] = _measure(runner, prompts[:b], args.N, config.vocab_size)
    finally:
        runner.close()
    return out


def _measure(runner: LlamaRunner, prompts: np.ndarray, new: int, vocab: int) -> dict[str, Any]:
    b, t = prompts.shape
    lc = runner.lc
    ctx = runner.context(b, t + new, b * t)
    batch = lc.llama_batch_init(b * t, 0, 1)
    try:
        runner.generate(ctx, batch, prompts, new)  # warm-up: buffers, pages, caches
        run = runner.generate(ctx, batch, prompts, new)
        tokens = run["tokens"]
        if tokens.shape != (b, new) or tokens.min() < 0 or tokens.max() >= vocab:
            raise GenerationError(f"llama.cpp returned tokens outside [0, {vocab})")
        times = []
        for _ in range(3):  # the prompt alone, as grok's and Mixtral's prefill figure
            runner.reset(ctx, batch, prompts)
            start = time.perf_counter()
            runner.prefill(ctx, batch, prompts)
            times.append(time.perf_counter() - start)
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)
    return {
        "prefill_s": float(np.median(times)),
        "ttft_s": run["first"] - run["start"],
        "decode_tok_s": b * (new - 1) / (run["end"] - run["first"]),
        "generate_s": run["end"] - run["start"],
    }
