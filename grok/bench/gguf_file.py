"""A GGUF file of a bench shape, for llama.cpp: Mixtral's layout (the ``llama`` architecture
with experts), the random weights grok's own benchmark runs, and a minimal tokenizer.

Written with the ``gguf`` package (llama.cpp's own writer and quantisers), in one of
``GGUF_FORMATS``: float32, bfloat16, or Q8_0 (blocks of 32 int8 codes with one float16 scale;
llama.cpp's 8-bit format, against which grok's FP8 weights are compared). As llama.cpp's own
converter and quantiser leave them, the norms and the router (``ffn_gate_inp``) stay float32.

The ``llama`` architecture has what ``bench-grok1`` has, at the same widths: V, D, L, N/K
heads of H, E experts top-k of Fe (``ffn_gate_exps``, ``ffn_up_exps``, ``ffn_down_exps``),
the head tied to the embedding or not. Not what it lacks: Grok's caps, its norms after
attention and after the experts, its multipliers, gelu (llama.cpp runs SiLU): the same
matrices and bytes per token, not the same function. A grok config with a dense MLP beside
the experts (Grok-2's) has no ``llama`` equivalent and is refused.

The tokenizer is the least llama.cpp loads: SentencePiece-style (``llama``) with ``<unk>``,
``<s>``, ``</s>``, the 256 byte tokens ``<0x00>`` .. ``<0xFF>`` and placeholder pieces up to
V. The benchmark feeds token ids, so no text is ever tokenised.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from grok.config import GrokConfig
from grok.errors import ConfigError

GGUF_FORMATS = ("float32", "bfloat16", "q8_0")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: llama.cpp's SentencePiece defaults
BYTE_TOKENS = 256
Q8_0_BLOCK = 32  # values per Q8_0 block, along a matrix's input (last) axis


def missing() -> str | None:
    """Why a GGUF file cannot be written here (the package not installed), or None."""
    if importlib.util.find_spec("gguf") is None:
        return "gguf is not installed (pip install -e '.[bench]')"
    return None


def gguf_path(directory: str | Path, shape: str, fmt: str) -> Path:
    """Where the benchmark keeps the GGUF file of ``shape`` in ``fmt``."""
    return Path(directory) / f"{shape}-{fmt}.gguf"


def check_config(config: GrokConfig, fmt: str = "float32") -> None:
    """ConfigError unless the ``llama`` architecture can hold ``config``'s matrices in
    ``fmt`` (Q8_0 needs every matrix's input width a multiple of its 32-value blocks)."""
    c = config
    if fmt not in GGUF_FORMATS:
        raise ConfigError(f"GGUF format {fmt!r}: expected one of {', '.join(GGUF_FORMATS)}")
    if fmt == "q8_0":
        widths = {
            "hidden_size": c.hidden_size,
            "num_attention_heads * head_dim": c.num_attention_heads * c.head_dim,
            "moe_intermediate_size": c.moe_intermediate_size,
        }
        for field, width in widths.items():
            if width % Q8_0_BLOCK:
                raise ConfigError(
                    f"{field} {width} is not a multiple of Q8_0's blocks of {Q8_0_BLOCK}"
                )
    if config.has_dense_mlp:
        raise ConfigError(
            "the shape has a dense MLP beside the experts, which llama.cpp's llama "
            "architecture cannot express: compare on bench-grok1, or leave llama out of --engines"
        )
    least = len(SPECIAL_TOKENS) + BYTE_TOKENS
    if config.vocab_size < least:
        raise ConfigError(
            f"vocab_size {config.vocab_size} is below the {least} tokens a llama.cpp "
            "SentencePiece vocabulary needs (3 special tokens and 256 byte tokens)"
        )


def tokenizer(vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) of the minimal SentencePiece-style vocabulary."""
    from gguf import TokenType

    tokens = list(SPECIAL_TOKENS) + [f"<0x{b:02X}>" for b in range(BYTE_TOKENS)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    types += [TokenType.BYTE] * BYTE_TOKENS
    pieces = vocab_size - len(tokens)
    tokens += [f"\u2581t{i}" for i in range(pieces)]  # "▁" marks a word start in SentencePiece
    types += [TokenType.NORMAL] * pieces
    scores = [0.0] * (len(tokens) - pieces) + [-float(i) for i in range(pieces)]
    return tokens, scores, [int(t) for t in types]


def gguf_tensors(config: GrokConfig, params: dict[str, dict[str, np.ndarray]]) -> dict:
    """grok's float32 parameter tree as ``{GGUF name: array}`` in GGUF's (numpy) order: a
    matrix is ``[out, in]`` (llama.cpp's ``ne`` reversed), experts ``[E, out, in]``."""
    from gguf import MODEL_TENSOR, TENSOR_NAMES

    def name(tensor: MODEL_TENSOR, layer: int | None = None) -> str:
        return TENSOR_NAMES[tensor].format(bid=layer) + ".weight"

    c = config
    d = c.hidden_size
    layers = "grok/layers/layer"
    attn, experts = params[f"{layers}/attn"], params["grok/experts"]
    out = {
        name(MODEL_TENSOR.TOKEN_EMBD): params["grok"]["embed_tokens"],  # [V, D]
        name(MODEL_TENSOR.OUTPUT_NORM): params["grok/final_norm"]["weight"],  # [D]
    }
    if not c.tie_word_embeddings:
        out[name(MODEL_TENSOR.OUTPUT)] = params["grok"]["lm_head"]  # [V, D]
    for i in range(c.num_hidden_layers):
        out |= {
            name(MODEL_TENSOR.ATTN_NORM, i): params[f"{layers}/pre_attn_norm"]["weight"][i],
            name(MODEL_TENSOR.ATTN_Q, i): attn["q_proj"][i].reshape(-1, d),  # [N*H, D]
            name(MODEL_TENSOR.ATTN_K, i): attn["k_proj"][i].reshape(-1, d),  # [K*H, D]
            name(MODEL_TENSOR.ATTN_V, i): attn["v_proj"][i].reshape(-1, d),  # [K*H, D]
            name(MODEL_TENSOR.ATTN_OUT, i): attn["o_proj"][i].reshape(d, -1),  # [D, N*H]
            name(MODEL_TENSOR.FFN_NORM, i): params[f"{layers}/pre_moe_norm"]["weight"][i],
            name(MODEL_TENSOR.FFN_GATE_INP, i): params[f"{layers}/moe"]["router"][i],  # [E, D]
            name(MODEL_TENSOR.FFN_GATE_EXP, i): experts["w1"][i],  # [E, Fe, D]
            name(MODEL_TENSOR.FFN_UP_EXP, i): experts["w3"][i],  # [E, Fe, D]
            name(MODEL_TENSOR.FFN_DOWN_EXP, i): experts["w2"][i],  # [E, D, Fe]
        }
    return out


def keeps_float32(name: str, array: np.ndarray) -> bool:
    """Norms (1-D) and the router stay float32 in every format, as llama.cpp keeps them."""
    return array.ndim == 1 or ".ffn_gate_inp." in name


def write_gguf(path: str | Path, config: GrokConfig, fmt: str, seed: int = 0) -> Path:
    """Writes ``config``'s model with random weights (``grok.testing.random_params``, the
    same values grok's benchmark child runs, made on the host) as a GGUF file in ``fmt``."""
    import gguf

    from grok.testing import random_params

    check_config(config, fmt)
    qtype = {
        "float32": gguf.GGMLQuantizationType.F32,
        "bfloat16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[fmt]
    file_type = {
        "float32": gguf.LlamaFileType.ALL_F32,
        "bfloat16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[fmt]
    c = config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, "llama")
    _metadata(writer, c, file_type)
    params = random_params(c, seed, host=True)
    for name, array in gguf_tensors(c, params).items():
        array = np.ascontiguousarray(array, np.float32)
        kind = gguf.GGMLQuantizationType.F32 if keeps_float32(name, array) else qtype
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _metadata(writer: Any, c: GrokConfig, file_type: int) -> None:
    writer.add_name("grok-bench")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.moe_intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_expert_count(c.num_local_experts)
    writer.add_expert_used_count(c.num_experts_per_tok)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(file_type)
    tokens, scores, types = tokenizer(c.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
