"""Checkpoints: the released Grok-2 safetensors layout (read and written) and Grok-1's ckpt-0.

- ``load(path, ...) -> (config, params)``: what ``grok.load_pretrained`` builds its model from.
- ``ReleasedCheckpoint``: a directory validated against the weight table, read in parallel
  shard by shard (``reader``); ``CheckpointFiles``: its files by tensor name and TP rank,
  headers checked by the ``safetensors`` library (``files``).
- ``write_checkpoint`` / ``save_file``: the released layout, each file written atomically
  (``writer``).
- Grok-1 ``ckpt-0`` pickles: ``load`` dispatches to ``grok.grok1.load_grok1_params``.
"""

from grok.checkpoint.files import CheckpointFiles, TensorInfo, read_header, tp_rank
from grok.checkpoint.load import load
from grok.checkpoint.reader import ReleasedCheckpoint, shard_read_bytes, stitched_shape
from grok.checkpoint.writer import hf_to_params, params_to_hf, save_file, write_checkpoint
from grok.params import WeightSpec


def is_quantized(spec: WeightSpec) -> bool:
    """Whether ``quantize="fp8"`` stores ``spec`` quantised (``WeightSpec.quantized``)."""
    return spec.quantized


def quant_in_dims(spec: WeightSpec) -> tuple[int, ...]:
    """The input (contracted) dims of a matrix parameter (``WeightSpec.in_dims``)."""
    return spec.in_dims


__all__ = [
    "CheckpointFiles",
    "ReleasedCheckpoint",
    "TensorInfo",
    "hf_to_params",
    "is_quantized",
    "load",
    "params_to_hf",
    "quant_in_dims",
    "read_header",
    "save_file",
    "shard_read_bytes",
    "stitched_shape",
    "tp_rank",
    "write_checkpoint",
]
