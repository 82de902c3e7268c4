"""Model configuration: one frozen dataclass with the Hugging Face field names.

The field names are those of the released Grok-2 ``config.json`` (see
``docs/spec.md`` section 1), plus the few knobs that only Grok-1 needs
(``attn_output_multiplier``, ``tie_word_embeddings``, ``hidden_act``). Caps and the
attention temperature length are ``None`` when off; in a JSON file a value that is
absent, 0 or negative also means off, as the reference engine reads it. The named configs
(``GROK2``, ``GROK1``, tiny test shapes) are in ``grok.presets``.

Shape letters: V vocab, D model width, N query heads, K kv heads, G = N/K, H head dim,
F dense MLP width, Fe expert width, E experts, k experts per token, L layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from typing import Any

from grok.errors import ConfigError
from grok.jsonfile import read_json_file

ROPE_TYPES = ("original", "yarn")
HIDDEN_ACTS = ("gelu", "gelu_tanh")

# Names that a JSON file may use for the activation, mapped to ours.
_HIDDEN_ACT_ALIASES = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}

# Upper bounds on the shape fields, far above Grok-1 and Grok-2 (their values in brackets), so
# that a config cannot make the library build millions of weight names or a rotary table of
# gigabytes before any file is read. Raise them here if a real model ever needs more.
MAX_FIELD_VALUES = {
    "vocab_size": 2**22,  # 4,194,304 [131,072]
    "hidden_size": 2**17,  # 131,072 [8,192; 6,144]
    "num_hidden_layers": 2**10,  # 1,024 [64]
    "num_attention_heads": 2**10,  # [64; 48]
    "num_key_value_heads": 2**10,  # [8]
    "head_dim": 2**10,  # [128]
    "intermediate_size": 2**20,  # 1,048,576 [32,768]
    "moe_intermediate_size": 2**20,  # [16,384; 32,768]
    "num_local_experts": 2**10,  # [8]
    "num_experts_per_tok": 2**10,  # [2]
    "max_position_embeddings": 2**21,  # 2,097,152 [131,072; 8,192]
    "original_max_position_embeddings": 2**21,  # [8,192]
    "attn_temperature_len": 2**21,  # [1,024]
}
# Weight names and expert slices are built per (layer, expert): L * E [512].
MAX_LAYER_EXPERTS = 2**16
# The rotary table holds P * H/2 angles (computed in float64 on the host) [2**23].
MAX_ROPE_ENTRIES = 2**26
# config.json is a few hundred bytes; refuse to read anything near this before parsing.
MAX_CONFIG_BYTES = 2**24

# Fields whose JSON value <= 0 (or absence) means "off"; stored as None.
_OPTIONAL_POSITIVE = (
    "attn_logit_softcapping",
    "router_logit_softcapping",
    "final_logit_softcapping",
    "attn_temperature_len",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GrokConfig:
    """Every number the model needs. Fields without a default are required in a file."""

    # Shapes.
    vocab_size: int  # V
    hidden_size: int  # D
    num_hidden_layers: int  # L
    num_attention_heads: int  # N
    num_key_value_heads: int  # K; N must be a multiple of K (GQA)
    head_dim: int  # H
    intermediate_size: int  # F, the dense (residual) MLP; unused when residual_moe is off
    moe_intermediate_size: int  # Fe, each expert
    num_local_experts: int  # E
    num_experts_per_tok: int  # k
    residual_moe: bool = False  # dense MLP beside the MoE, sum divided by sqrt 2 (Grok-2)

    # Numerics.
    rms_norm_eps: float
    embedding_multiplier_scale: float  # embeddings are multiplied by this
    output_multiplier_scale: float  # the head's weight is multiplied by this
    attn_logit_softcapping: float | None = None  # cap * tanh(s / cap) on attention logits
    router_logit_softcapping: float | None = None  # the same on router logits
    final_logit_softcapping: float | None = None  # the same on the output logits
    attn_temperature_len: int | None = None  # tau(p) = log2 p / log2 len for p > len

    # Rotary embedding.
    rope_theta: float
    rope_type: str = "original"  # "original" (plain RoPE, what SGLang runs) or "yarn"
    max_position_embeddings: int  # the context, and the length of the rotary table
    original_max_position_embeddings: int | None = None  # YaRN: the pre-training context
    scaling_factor: float = 1.0  # YaRN: context extension factor
    extrapolation_factor: float = 1.0  # YaRN: weight of the ramp (1 = full ramp)
    attn_factor: float = 1.0  # YaRN: extra factor on the mscale
    beta_fast: float = 32.0  # YaRN: fast correction bound (rotations)
    beta_slow: float = 1.0  # YaRN: slow correction bound (rotations)

    # Knobs that only Grok-1 (or experiments) change.
    attn_output_multiplier: float | None = None  # attention logit scale; None means H**-0.5
    tie_word_embeddings: bool = False  # Grok-1: the head is the embedding matrix
    hidden_act: str = "gelu"  # "gelu" (exact, erf) for Grok-2, "gelu_tanh" for Grok-1
    moe_router_renormalize: bool = False  # llama.cpp's renormalised top-k; not Grok-2

    def __post_init__(self) -> None:
        _check_types(self)
        _check_bounds(self)
        positive = [
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "moe_intermediate_size",
            "num_local_experts",
            "num_experts_per_tok",
            "max_position_embeddings",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"config field {name!r} must be > 0, got {_shown(getattr(self, name))}"
                )
        if self.residual_moe and self.intermediate_size <= 0:
            raise ConfigError(
                "config field 'intermediate_size' must be > 0 when 'residual_moe' is true, "
                f"got {self.intermediate_size}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field 'num_attention_heads' ({self.num_attention_heads}) must be a "
                f"multiple of 'num_key_value_heads' ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config field 'head_dim' must be even for RoPE, got {self.head_dim}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                f"config field 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds "
                f"'num_local_experts' ({self.num_local_experts})"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"config field 'rope_type' must be one of {ROPE_TYPES}, got {self.rope_type!r}"
            )
        if self.hidden_act not in HIDDEN_ACTS:
            raise ConfigError(
                f"config field 'hidden_act' must be one of {HIDDEN_ACTS}, got {self.hidden_act!r}"
            )
        for name in _OPTIONAL_POSITIVE:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(
                    f"config field {name!r} must be None (off) or > 0, got {value}; "
                    "use GrokConfig.from_dict to read 0/negative as off"
                )
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("config fields 'rms_norm_eps' and 'rope_theta' must be > 0")
        if self.rope_type == "yarn" and self.original_max_position_embeddings is None:
            raise ConfigError(
                "config field 'original_max_position_embeddings' is required for rope_type 'yarn'"
            )
        if self.rope_type == "yarn":  # YaRN divides by these (and by log rope_theta)
            for name in ("scaling_factor", "beta_fast", "beta_slow", "attn_factor"):
                if getattr(self, name) <= 0:
                    raise ConfigError(
                        f"config field {name!r} must be > 0 for rope_type 'yarn', "
                        f"got {getattr(self, name)}"
                    )
            if self.rope_theta <= 1:
                raise ConfigError(
                    f"config field 'rope_theta' must be > 1 for rope_type 'yarn', "
                    f"got {self.rope_theta}"
                )

    # Derived values.
    @property
    def q_per_kv(self) -> int:
        """G: query heads that read each kv head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def attn_scale(self) -> float:
        """The factor applied to q.k before the soft cap."""
        if self.attn_output_multiplier is not None:
            return self.attn_output_multiplier
        return self.head_dim**-0.5

    @property
    def has_dense_mlp(self) -> bool:
        return self.residual_moe

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """L * 2 (k and v) * K * H * bytes: the KV cache cost of one token."""
        return (
            self.num_hidden_layers
            * 2
            * self.num_key_value_heads
            * self.head_dim
            * bytes_per_element
        )

    def replace(self, **changes: Any) -> GrokConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # Serialisation.
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> GrokConfig:
        """Builds a config from a ``config.json`` dict; unknown keys are ignored.

        Caps and ``attn_temperature_len`` that are absent, null, 0 or negative are off.
        ``hidden_act`` accepts Hugging Face spellings (``gelu_pytorch_tanh`` ...).
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        window = data.get("sliding_window_size", -1)
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
            raise ConfigError(
                f"{source}: field 'sliding_window_size' must be an int, got {window!r:.80}"
            )
        if window is not None and window > 0 or data.get("global_attn_every_n", 1) not in (1, None):
            raise ConfigError(
                f"{source}: sliding-window attention (sliding_window_size={window}, "
                f"global_attn_every_n={data.get('global_attn_every_n')}) is not supported; "
                "Grok-2 uses -1 and 1 (every layer global)"
            )
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name not in data:
                continue
            value = data[field.name]
            if field.name in _OPTIONAL_POSITIVE:
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ConfigError(
                        f"{source}: field {field.name!r} must be a number, "
                        f"got {type(value).__name__} {value!r}"
                    )
                if value <= 0:
                    continue
                if field.name == "attn_temperature_len":
                    if float(value) != int(value):
                        raise ConfigError(
                            f"{source}: field 'attn_temperature_len' must be an integer, "
                            f"got {value!r}"
                        )
                    value = int(value)
                else:
                    try:
                        value = float(value)
                    except OverflowError:  # an int too large for a float
                        raise ConfigError(
                            f"{source}: field {field.name!r} must be a finite number, "
                            f"got {_shown(value)}"
                        ) from None
            elif field.name == "hidden_act":
                # A string is checked first: a list or dict here would not hash.
                if not isinstance(value, str) or value not in _HIDDEN_ACT_ALIASES:
                    raise ConfigError(
                        f"{source}: field 'hidden_act' must be one of "
                        f"{sorted(_HIDDEN_ACT_ALIASES)}, got {value!r}"
                    )
                value = _HIDDEN_ACT_ALIASES[value]
            kwargs[field.name] = value
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.name not in _OPTIONAL_POSITIVE
        ]
        if missing:
            raise ConfigError(
                f"{source}: missing required field(s) {', '.join(map(repr, missing))}"
            )
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The config as ``config.json`` would hold it (caps that are off become 0)."""
        out = dataclasses.asdict(self)
        for name in _OPTIONAL_POSITIVE:
            if out[name] is None:
                out[name] = 0
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> GrokConfig:
        """Reads ``config.json``; every failure (unreadable, not JSON, ...) is a ConfigError."""
        path = os.fspath(path)
        data = read_json_file(
            path, error=ConfigError, what="config file", max_bytes=MAX_CONFIG_BYTES
        )
        return cls.from_dict(data, source=path)

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")


CONFIG_FILENAMES = ("config.json", "config_grok2_like.json")


def load_config(path: str | os.PathLike[str]) -> GrokConfig:
    """Reads a config from a file, or from a directory's ``config.json``.

    A directory without ``config.json`` falls back to ``config_grok2_like.json``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in CONFIG_FILENAMES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return GrokConfig.from_json_file(candidate)
        raise ConfigError(f"{path}: no {' or '.join(CONFIG_FILENAMES)} in this directory")
    return GrokConfig.from_json_file(path)


def _check_types(config: GrokConfig) -> None:
    hints = typing.get_type_hints(GrokConfig)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not _is_instance(value, hints[field.name]):
            raise ConfigError(
                f"config field {field.name!r} must be {_type_name(hints[field.name])}, "
                f"got {type(value).__name__} {value!r}"
            )


def _check_bounds(config: GrokConfig) -> None:
    """Every number finite; shape fields within MAX_FIELD_VALUES and the product bounds."""
    hints = typing.get_type_hints(GrokConfig)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is not None and _allows_float(hints[field.name]):
            try:
                finite = math.isfinite(value)
            except OverflowError:  # an int too large for a float
                finite = False
            if not finite:
                raise ConfigError(
                    f"config field {field.name!r} must be a finite number, got {_shown(value)}"
                )
    for name, limit in MAX_FIELD_VALUES.items():
        value = getattr(config, name)
        if value is not None and value > limit:
            raise ConfigError(
                f"config field {name!r} must be <= {limit} (this library's bound, far above "
                f"Grok-1 and Grok-2), got {_shown(value)}"
            )
    experts = config.num_hidden_layers * config.num_local_experts
    if experts > MAX_LAYER_EXPERTS:
        raise ConfigError(
            f"config fields 'num_hidden_layers' x 'num_local_experts' = {experts} must be <= "
            f"{MAX_LAYER_EXPERTS} (this library's bound; Grok-2 has 512)"
        )
    rope = config.max_position_embeddings * (config.head_dim // 2)
    if rope > MAX_ROPE_ENTRIES:
        raise ConfigError(
            f"config fields 'max_position_embeddings' x 'head_dim' / 2 = {rope} rotary angles "
            f"must be <= {MAX_ROPE_ENTRIES} (this library's bound; Grok-2 has 2**23)"
        )


def _shown(value: Any) -> str:
    """``value`` for a message; an integer too long to print usefully is described instead."""
    if isinstance(value, int) and abs(value) >= 10**30:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)


def _allows_float(hint: Any) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_allows_float(arg) for arg in typing.get_args(hint))
    return hint is float


def _is_instance(value: Any, hint: Any) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_is_instance(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))
