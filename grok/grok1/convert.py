"""Grok-1 ``ckpt-0`` pickles -> safetensors in the released Grok-2 naming scheme.

The output is what ``grok.load_pretrained`` reads for Grok-2 (spec section 4): Hugging Face
tensor names, PyTorch ``[out, in]`` matrices, ``pytorch_model-000NN-TP-common.safetensors``
files, and a ``config.json`` that records the Grok-1 settings (``tie_word_embeddings`` true:
there is no ``lm_head.weight``; ``hidden_act`` ``gelu_tanh``; router and final caps and the
attention temperature written as 0, i.e. off). Expert tensors are stored whole in the common
files, which the loader accepts like TP-split ones.

Streaming: the pickles are read one leaf at a time, each int8 matrix dequantised exactly in
float32 and cast to the output dtype, and tensors are buffered only until a file reaches
``max_file_bytes``; host memory peaks near one output file plus one leaf.

Atomicity: everything is written into a hidden temporary folder beside the target
(``.{name}.partial-{random}``), ``config.json`` last, each file synced; only then is the folder
renamed to the target. A crash leaves at most that hidden partial folder (without a
``config.json``), never a target that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from grok.checkpoint.writer import save_file
from grok.config import GrokConfig
from grok.errors import CheckpointError, ConfigError
from grok.grok1.folder import CONFIG_FILE, config_beside, find_ckpt_dir, tensors_in
from grok.grok1.release import QuantizedWeight8bit, dequantize

OUTPUT_DTYPES: dict[str, Any] = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
DEFAULT_MAX_FILE_BYTES = 4 * 2**30  # 4 GiB: the host buffers at most one file
PARTIAL_MARK = ".partial-"


def shard_file_name(number: int) -> str:
    """Output file ``number`` (1-based): ``pytorch_model-{number:05d}-TP-common.safetensors``."""
    return f"pytorch_model-{number:05d}-TP-common.safetensors"


def converted_config_dict(config: GrokConfig, dtype_name: str) -> dict[str, Any]:
    """``config.json`` of a converted Grok-1: the config's fields plus the release's labels."""
    data = config.to_dict()
    data["torch_dtype"] = dtype_name
    data["model_type"] = "git"
    data["architectures"] = ["Grok1ForCausalLM"]
    data["converted_from"] = "grok-1 ckpt-0 (int8 pickles, dequantised)"
    return data


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def convert_grok1_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    config: GrokConfig | None = None,
    dtype: str = "bfloat16",
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    overwrite: bool = False,
    on_file: Callable[[Path, int], None] | None = None,
) -> Path:
    """Converts a Grok-1 ``ckpt-0`` to a safetensors checkpoint folder ``out_dir``, atomically.

    Args:
      ckpt_dir: the ``ckpt-0`` folder or its parent.
      out_dir: the folder to create; it must not exist unless ``overwrite``.
      config: the checkpoint's config; default ``grok1_config_for(ckpt_dir)`` (``GROK1``).
      dtype: ``"bfloat16"`` (the Grok-2 release's dtype) or ``"float32"``.
      max_file_bytes: start a new output file once a file holds this many bytes.
      overwrite: replace an existing ``out_dir`` (swapped in only after the new one is done);
        only a folder that is empty or holds a ``config.json``.
      on_file: called with (path, tensor count) after each output file is written.

    Returns the path of the finished folder. Raises CheckpointError, before anything is
    written, when ``out_dir`` is, lies inside or contains ``ckpt_dir``, is not a folder, or
    cannot be created.
    """
    if dtype not in OUTPUT_DTYPES:
        raise ConfigError(f"output dtype must be one of {sorted(OUTPUT_DTYPES)}, got {dtype!r}")
    if isinstance(max_file_bytes, bool) or not isinstance(max_file_bytes, int):
        raise ConfigError(f"max_file_bytes must be an int > 0, got {max_file_bytes!r}")
    if max_file_bytes <= 0:
        raise ConfigError(f"max_file_bytes must be > 0, got {max_file_bytes}")
    found = find_ckpt_dir(ckpt_dir)
    if found is None:
        raise CheckpointError(f"{os.fspath(ckpt_dir)}: not a Grok-1 ckpt-0 folder")
    target = Path(out_dir).absolute()
    _check_target(target, [Path(ckpt_dir), Path(found)], overwrite)
    config = config or config_beside(found)
    temp = target.with_name(f".{target.name}{PARTIAL_MARK}{uuid.uuid4().hex[:12]}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp.mkdir()
    except OSError as e:
        raise CheckpointError(f"{target}: cannot create the output folder ({e})") from None
    out_dtype = OUTPUT_DTYPES[dtype]
    try:
        pending: dict[str, np.ndarray] = {}
        pending_bytes, number = 0, 0

        def flush() -> None:
            nonlocal pending, pending_bytes, number
            if not pending:
                return
            number += 1
            path = temp / shard_file_name(number)
            save_file(path, pending, metadata={"format": "pt"})
            if on_file is not None:
                on_file(path, len(pending))
            pending, pending_bytes = {}, 0

        for name, value in tensors_in(found, config):
            if isinstance(value, QuantizedWeight8bit):
                array = dequantize(value, out_dtype)
            else:
                array = np.asarray(value, np.float32).astype(out_dtype)
            pending[name] = array
            pending_bytes += array.nbytes
            if pending_bytes >= max_file_bytes:
                flush()
        flush()
        with open(temp / CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(converted_config_dict(config, dtype), f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(temp)
        _swap_in(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return target


def _check_target(target: Path, sources: list[Path], overwrite: bool) -> None:
    """Refuses an output folder that would destroy the input or something that is not ours.

    ``target`` must not be, lie inside or contain any of ``sources`` (``overwrite`` would
    delete the checkpoint being read); an existing ``target`` must be a folder, replaced only
    with ``overwrite`` and only when it is empty or holds a ``config.json`` (a checkpoint).
    """
    real_target = Path(os.path.realpath(target))
    for source in sources:
        real_source = Path(os.path.realpath(source))
        if real_target.is_relative_to(real_source) or real_source.is_relative_to(real_target):
            raise CheckpointError(
                f"output folder {target} overlaps the checkpoint being converted "
                f"({real_source}): choose an output folder outside it"
            )
    if not os.path.lexists(target):
        return
    if not target.is_dir():
        raise CheckpointError(f"{target}: exists and is not a folder; choose another output")
    if not overwrite:
        raise CheckpointError(f"{target}: already exists (pass overwrite to replace it)")
    if any(target.iterdir()) and not (target / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{target}: exists and does not look like a checkpoint (no {CONFIG_FILE}); "
            "refusing to replace it"
        )


def _swap_in(temp: Path, target: Path) -> None:
    """Renames the finished ``temp`` to ``target``; an old ``target`` is moved aside first."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:12]}")
        os.rename(target, old)
    os.rename(temp, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old)
