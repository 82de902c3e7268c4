"""Test fixtures: small Grok-1 ``ckpt-0`` folders written as the release wrote them.

The release's files came from ``pickle.dump`` (protocol 4, numpy 1.x) of numpy arrays and of a
``QuantizedWeight8bit`` dataclass defined in the saving script, i.e. ``__main__``. These
helpers run the real pickler on a stand-in class registered as ``__main__.QuantizedWeight8bit``
for the duration of the dump, and by default respell numpy 2's ``numpy._core.multiarray`` as
numpy 1.x's ``numpy.core.multiarray``, so the bytes are what the release holds.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import sys
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

from grok.config import GrokConfig
from grok.errors import CheckpointError
from grok.grok1 import (
    INT8_MAX,
    RELEASE_MODEL_SHARDS,
    Grok1Leaf,
    QuantizedWeight8bit,
    grok1_hf_shapes,
    grok1_leaves,
)


class _ReleaseRecord:
    """What the release's ``model.QuantizedWeight8bit`` dataclass pickles as."""

    def __init__(self, weight: np.ndarray, scales: np.ndarray) -> None:
        self.weight = weight
        self.scales = scales


_ReleaseRecord.__module__ = "__main__"
_ReleaseRecord.__qualname__ = _ReleaseRecord.__name__ = "QuantizedWeight8bit"

_NUMPY2 = b"\x8c\x16numpy._core.multiarray"  # SHORT_BINUNICODE, 22 characters
_NUMPY1 = b"\x8c\x15numpy.core.multiarray"


@contextlib.contextmanager
def _release_class_in_main() -> Iterator[None]:
    main = sys.modules["__main__"]
    missing = object()
    old = getattr(main, "QuantizedWeight8bit", missing)
    main.QuantizedWeight8bit = _ReleaseRecord
    try:
        yield
    finally:
        if old is missing:
            del main.QuantizedWeight8bit
        else:
            main.QuantizedWeight8bit = old


def release_pickle_bytes(
    value: np.ndarray | QuantizedWeight8bit, *, protocol: int = 4, numpy1_names: bool = True
) -> bytes:
    """The bytes of one release file holding ``value`` (release layout ``[in, out]``)."""
    if isinstance(value, QuantizedWeight8bit):
        obj: object = _ReleaseRecord(value.weight, value.scales)
    else:
        obj = value
    with _release_class_in_main():
        data = pickle.dumps(obj, protocol=protocol)
    if numpy1_names and protocol == 4 and _NUMPY2 in data:
        # The name sits once (then memoised) in the first frame: shorten that frame by one.
        assert data[2:3] == b"\x95" and data.count(_NUMPY2) == 1
        (frame,) = struct.unpack("<Q", data[3:11])
        data = data[:3] + struct.pack("<Q", frame - 1) + data[11:].replace(_NUMPY2, _NUMPY1)
    return data


def quantize_release(value: np.ndarray, blocks: int) -> QuantizedWeight8bit:
    """int8 + bfloat16 scales of ``value`` [..., in, out], one scale per column and row block."""
    *lead, n_in, n_out = value.shape
    grouped = value.astype(np.float32).reshape(*lead, blocks, n_in // blocks, n_out)
    absmax = np.max(np.abs(grouped), axis=-2)  # [..., G, out]
    scales = (absmax / INT8_MAX).astype(ml_dtypes.bfloat16)
    divisor = scales.astype(np.float32)
    divisor[divisor == 0] = 1.0
    quantized = np.clip(np.rint(grouped / divisor[..., None, :]), -INT8_MAX, INT8_MAX)
    return QuantizedWeight8bit(quantized.astype(np.int8).reshape(value.shape), scales)


def _from_hf(leaf: Grok1Leaf, tensors_hf: Mapping[str, np.ndarray]) -> np.ndarray:
    """The release-layout float32 value of ``leaf``, built from Hugging Face tensors."""

    def layout(name: str) -> np.ndarray:
        x = np.asarray(tensors_hf[name], dtype=np.float32)
        return x.T if leaf.transpose else x

    if leaf.per_expert:
        return np.stack([layout(name) for name in leaf.hf_shapes()])
    return np.ascontiguousarray(layout(leaf.hf_name))


def write_grok1_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    config: GrokConfig,
    tensors_hf: Mapping[str, np.ndarray],
    *,
    quantize: bool = True,
) -> None:
    """Writes ``tensors_hf`` (Hugging Face names, ``[out, in]``) as a release ``ckpt-0`` folder.

    One protocol-4 pickle per leaf in the release's order: float32 numpy arrays, and (with
    ``quantize``) the matrices the release quantised as ``__main__.QuantizedWeight8bit`` with
    int8 weights and bfloat16 scales, one per output column and, for input-sharded matrices,
    per block of in/8 rows.
    """
    shapes = grok1_hf_shapes(config)
    missing = [name for name in shapes if name not in tensors_hf]
    if missing:
        raise CheckpointError(f"tensor {missing[0]} missing ({len(missing)} of {len(shapes)})")
    extra = sorted(set(tensors_hf).difference(shapes))
    if extra:
        raise CheckpointError(f"tensor {extra[0]} is not part of a Grok-1 checkpoint")
    for name, shape in shapes.items():
        found = tuple(np.shape(tensors_hf[name]))
        if found != shape:
            raise CheckpointError(f"tensor {name} has shape {found}, expected {shape}")
    directory = os.fspath(ckpt_dir)
    os.makedirs(directory, exist_ok=True)
    for leaf in grok1_leaves(config):
        value: np.ndarray | QuantizedWeight8bit = _from_hf(leaf, tensors_hf)
        if quantize and leaf.quantized:
            n_in = leaf.shape[-2]
            sharded = leaf.input_sharded and n_in % RELEASE_MODEL_SHARDS == 0
            value = quantize_release(value, RELEASE_MODEL_SHARDS if sharded else 1)
        with open(os.path.join(directory, leaf.file_name), "wb") as f:
            f.write(release_pickle_bytes(value))
