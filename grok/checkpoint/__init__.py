"""Checkpoints: the released Grok-2 safetensors layout (read and written) and Grok-1's ckpt-0.

- ``load(path, ...) -> (config, params)``: what ``grok.load_pretrained`` builds its model from.
- ``plan_load`` -> ``LoadPlan``: every parameter's sharding, dtype and shards, and the memory
  plan, decided once before a byte is read (``plan``).
- ``ReleasedCheckpoint``: a directory validated against the weight table (``validate``), read
  in parallel shard by shard (``reader``: the orchestration; ``units``: copy units planned and
  run; ``staging``: host buffers and the pipelined shard reads; ``fp8``: FP8 scales and where
  they are applied; ``finite``: the NaN/Inf check); ``CheckpointFiles``: its files by tensor
  name and TP rank, headers checked by the ``safetensors`` library (``files``).
- ``write_checkpoint`` / ``save_file``: the released layout, each file written atomically
  (``writer``).
- Grok-1 ``ckpt-0`` pickles: ``load`` dispatches to ``grok.grok1.load_grok1_params``.
"""

from grok.checkpoint.files import CheckpointFiles, TensorInfo, read_header, tp_rank
from grok.checkpoint.load import load
from grok.checkpoint.plan import LoadPlan, ParamPlan, plan_load, shard_read_bytes
from grok.checkpoint.reader import ReleasedCheckpoint
from grok.checkpoint.validate import stitched_shape
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
    "LoadPlan",
    "ParamPlan",
    "ReleasedCheckpoint",
    "TensorInfo",
    "hf_to_params",
    "is_quantized",
    "load",
    "params_to_hf",
    "plan_load",
    "quant_in_dims",
    "read_header",
    "save_file",
    "shard_read_bytes",
    "stitched_shape",
    "tp_rank",
    "write_checkpoint",
]
