"""A Grok-1 ``ckpt-0`` folder: finding it, its config, its files, its tensors one at a time.

``iter_grok1_tensors`` checks the folder holds exactly the config's files, then reads them in
file order (``grok.grok1.pickle_parser``, each checked against its leaf before an array is
built) and yields the Hugging Face tensors of ``docs/spec.md`` section 4, ``[out, in]``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from grok.config import GrokConfig, load_config
from grok.errors import CheckpointError
from grok.grok1.pickle_parser import load_release_pickle
from grok.grok1.release import (
    RELEASE_SUBDIR,
    Grok1Leaf,
    QuantizedWeight8bit,
    grok1_leaves,
    release_file_name,
)
from grok.presets import GROK1

CONFIG_FILE = "config.json"


def find_ckpt_dir(path: str | os.PathLike[str]) -> str | None:
    """The folder holding ``tensor00000_000`` (``path`` or ``path/ckpt-0``), or None."""
    path = os.fspath(path)
    for candidate in (path, os.path.join(path, RELEASE_SUBDIR)):
        if os.path.isfile(os.path.join(candidate, release_file_name(0))):
            return candidate
    return None


def is_grok1_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a Grok-1 ``ckpt-0`` folder or the folder that contains one."""
    return find_ckpt_dir(path) is not None


def found_ckpt_dir(path: str | os.PathLike[str]) -> str:
    """``find_ckpt_dir``'s folder; a CheckpointError naming ``path`` where there is none."""
    ckpt_dir = find_ckpt_dir(path)
    if ckpt_dir is None:
        raise CheckpointError(f"{os.fspath(path)}: no Grok-1 {release_file_name(0)} found")
    return ckpt_dir


def grok1_config_for(path: str | os.PathLike[str]) -> GrokConfig:
    """The config of a Grok-1 checkpoint: a ``config.json`` beside the pickles or in the folder
    above ``ckpt-0``, else the ``GROK1`` preset (the release ships no config file)."""
    return config_beside(found_ckpt_dir(path))


def config_beside(ckpt_dir: str) -> GrokConfig:
    """``grok1_config_for`` of the folder ``find_ckpt_dir`` found (no search again)."""
    for folder in (ckpt_dir, os.path.dirname(os.path.abspath(ckpt_dir))):
        candidate = os.path.join(folder, CONFIG_FILE)
        if os.path.isfile(candidate):
            return load_config(candidate)
    return GROK1


def resolve_ckpt_dir(ckpt_dir: str | os.PathLike[str]) -> str:
    """The folder holding the tensor files: ``ckpt_dir`` itself or its ``ckpt-0`` subfolder.

    Unlike ``find_ckpt_dir`` it does not look for ``tensor00000_000``: a folder missing files
    is returned, and the file-set check then names what is missing.
    """
    ckpt_dir = os.fspath(ckpt_dir)
    nested = os.path.join(ckpt_dir, RELEASE_SUBDIR)
    if os.path.isdir(nested):
        return nested
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: Grok-1 checkpoint directory not found")
    return ckpt_dir


def _check_file_set(directory: str, leaves: list[Grok1Leaf]) -> None:
    expected = [leaf.file_name for leaf in leaves]
    present = {name for name in os.listdir(directory) if not name.startswith(".")}
    missing = [name for name in expected if name not in present]
    if missing:
        raise CheckpointError(
            f"{os.path.join(directory, missing[0])}: file missing ({len(missing)} of "
            f"{len(expected)} missing; a {len(leaves)}-leaf Grok-1 checkpoint has "
            f"{expected[0]} ... {expected[-1]})"
        )
    extra = sorted(present.difference(expected))
    if extra:
        raise CheckpointError(
            f"{os.path.join(directory, extra[0])}: unexpected file ({len(extra)} unexpected; "
            f"a {len(leaves)}-leaf Grok-1 checkpoint has only {expected[0]} ... {expected[-1]})"
        )


def _to_hf(
    leaf: Grok1Leaf, value: np.ndarray | QuantizedWeight8bit
) -> Iterator[tuple[str, np.ndarray | QuantizedWeight8bit]]:
    def layout(x: np.ndarray | QuantizedWeight8bit) -> np.ndarray | QuantizedWeight8bit:
        if not leaf.transpose:
            return x
        if isinstance(x, QuantizedWeight8bit):
            return x.transpose()
        return np.ascontiguousarray(x.T)

    if leaf.per_expert:
        for e in range(leaf.shape[0]):
            yield leaf.hf_name.format(e=e), layout(value[e])
    else:
        yield leaf.hf_name, layout(value)


def iter_grok1_tensors(
    ckpt_dir: str | os.PathLike[str], config: GrokConfig
) -> Iterator[tuple[str, np.ndarray | QuantizedWeight8bit]]:
    """Yields ``(hf_name, value)`` for a Grok-1 release, reading one file at a time.

    Values are ``[out, in]`` (spec section 4): float arrays as stored (float32 in the release)
    or ``QuantizedWeight8bit`` with int8 ``[out, in]`` weight and ``[out, 1]``/``[out, G]``
    scales. Experts come one at a time (``...experts.{e}.w1.weight`` [Fe, D], w3 [Fe, D],
    w2 [D, Fe]). The file set is checked before anything is yielded; each file's shape is
    checked against ``config`` when it is read.
    """
    return tensors_in(resolve_ckpt_dir(ckpt_dir), config)


def tensors_in(
    directory: str, config: GrokConfig
) -> Iterator[tuple[str, np.ndarray | QuantizedWeight8bit]]:
    """``iter_grok1_tensors`` of the folder that holds the tensor files (no search again)."""
    leaves = grok1_leaves(config)
    _check_file_set(directory, leaves)
    for leaf in leaves:
        value = load_release_pickle(os.path.join(directory, leaf.file_name), leaf, leaves)
        yield from _to_hf(leaf, value)


def read_grok1_checkpoint(
    ckpt_dir: str | os.PathLike[str], config: GrokConfig
) -> dict[str, np.ndarray | QuantizedWeight8bit]:
    """All tensors of a Grok-1 release keyed by Hugging Face name (see ``iter_grok1_tensors``)."""
    return dict(iter_grok1_tensors(ckpt_dir, config))
