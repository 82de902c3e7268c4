"""Grok-1's released ``ckpt-0`` checkpoint: read without running pickle code, loaded, converted.

- ``release``: facts of the release (file names, the leaf table in file order with each leaf's
  shape and Hugging Face name) and the ``QuantizedWeight8bit`` record with ``dequantize``.
- ``pickle_parser``: one release file parsed opcode by opcode, never unpickled
  (``load_release_pickle``); the security boundary.
- ``folder``: a ``ckpt-0`` folder found, its config, its file set checked, its tensors read
  one file at a time (``iter_grok1_tensors``).
- ``loader``: the stacked parameter tree on one device (``load_grok1_params``), what
  ``grok.checkpoint.load`` (and so ``grok.load_pretrained``) runs for a ``ckpt-0`` folder.
- ``convert``: ``convert_grok1_checkpoint``, the pickles to a safetensors checkpoint
  (``grok-convert``). Import it from ``grok.grok1.convert``: it writes through
  ``grok.checkpoint.writer``, and ``grok.checkpoint`` imports this package for its loader, so
  importing the converter here would close an import circle.

A ``grok.Model`` of a Grok-1 checkpoint is ``grok.load_pretrained(path)``.
"""

from grok.grok1.folder import (
    find_ckpt_dir,
    grok1_config_for,
    is_grok1_checkpoint,
    iter_grok1_tensors,
    read_grok1_checkpoint,
    resolve_ckpt_dir,
)
from grok.grok1.loader import (
    QUANTIZE_MODES,
    load_grok1_params,
    read_grok1_params,
    requantize_per_channel,
)
from grok.grok1.pickle_parser import (
    MAX_ARRAY_RANK,
    MAX_PICKLE_OPCODES,
    PICKLE_OVERHEAD_BYTES,
    load_release_pickle,
    max_leaf_file_bytes,
)
from grok.grok1.release import (
    INT8_MAX,
    RELEASE_MODEL_SHARDS,
    RELEASE_SUBDIR,
    Grok1Leaf,
    QuantizedWeight8bit,
    check_grok1_config,
    dequantize,
    grok1_hf_shapes,
    grok1_leaves,
    release_file_name,
)

__all__ = [
    "INT8_MAX",
    "MAX_ARRAY_RANK",
    "MAX_PICKLE_OPCODES",
    "PICKLE_OVERHEAD_BYTES",
    "QUANTIZE_MODES",
    "RELEASE_MODEL_SHARDS",
    "RELEASE_SUBDIR",
    "Grok1Leaf",
    "QuantizedWeight8bit",
    "check_grok1_config",
    "dequantize",
    "find_ckpt_dir",
    "grok1_config_for",
    "grok1_hf_shapes",
    "grok1_leaves",
    "is_grok1_checkpoint",
    "iter_grok1_tensors",
    "load_grok1_params",
    "load_release_pickle",
    "max_leaf_file_bytes",
    "read_grok1_checkpoint",
    "read_grok1_params",
    "release_file_name",
    "requantize_per_channel",
    "resolve_ckpt_dir",
]
