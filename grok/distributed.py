"""Several processes, one mesh: joining JAX's multi-controller runtime, and moving data
between the host and global arrays.

On several hosts (or several processes on one host) every process runs the same program:
it calls ``initialize`` first, builds the same global mesh (``grok.sharding.make_mesh`` over
``jax.devices()``, which lists every process's devices), loads the same checkpoint (each
process reads only its own devices' slices) and calls ``Model.generate`` / ``Model.logits``
with the same arguments. Host data enters as global arrays (``to_global``: each process
builds only its own devices' slices of the full value it holds) and leaves through
``to_host``, which gathers across processes only what no process holds whole.

Arrays keep their shapes (in the caller's glossary letters); only where they live changes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from grok.errors import ConfigError

# The environment variables ``initialize`` falls back to (the first is JAX's own).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

# Cross-process collectives between CPU devices (tests, CPU-only hosts) go through gloo.
CPU_COLLECTIVES = "gloo"

_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def _env_int(name: str, environ: Mapping[str, str]) -> int | None:
    text = environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not an integer") from None


def check_coordinator(address: str) -> str:
    """``address`` if it reads ``HOST:PORT`` (port 1-65535), else ConfigError."""
    match = _HOST_PORT.match(address)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(
            f"coordinator {address!r} is not HOST:PORT (e.g. 10.0.0.1:1234): the address of "
            "process 0, which every process connects to"
        )
    return address


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Joins this process to a multi-process JAX runtime (``jax.distributed.initialize``).

    Call it in every process, before anything else touches JAX's devices. Each argument left
    None comes from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``;
    when none of the three is given anywhere, the process runs alone (on a cluster whose
    scheduler JAX detects, such as SLURM or a Cloud TPU pod, call
    ``jax.distributed.initialize()`` with no arguments instead). With a coordinator alone,
    JAX asks the cluster for the count and the id. Cross-process collectives between CPU
    devices use gloo.

    Args:
      coordinator: ``HOST:PORT`` of process 0 (the same on every process).
      num_processes: how many processes take part.
      process_id: this process's index in ``[0, num_processes)``.
      environ: where to read the fallbacks (default ``os.environ``).
    Returns:
      True when this process joined a multi-process runtime, False when it runs alone. A
      process that has joined already stays as it is.
    Raises:
      ConfigError: a malformed address, a count below 1, or an id outside the range.
    """
    environ = os.environ if environ is None else environ
    coordinator = coordinator or environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES, environ)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID, environ)
    if coordinator is None and num_processes is None and process_id is None:
        return False
    if coordinator is not None:
        check_coordinator(coordinator)
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ConfigError(
            f"process_id {process_id} is outside [0, {num_processes}): ids run from 0 "
            "(the coordinator's process) to num_processes - 1"
        )
    if num_processes == 1 and coordinator is None:
        return False
    if jax.distributed.is_initialized():  # joined already (a second call in one process)
        return jax.process_count() > 1
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", CPU_COLLECTIVES)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
    except (ValueError, RuntimeError) as e:  # arguments JAX cannot use; devices already in use
        raise ConfigError(f"cannot join the multi-process runtime: {e}") from None
    return jax.process_count() > 1


def is_main_process() -> bool:
    """Whether this is process 0 (the one that prints, in the command-line tools)."""
    return jax.process_index() == 0


def to_global(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array with ``sharding`` from ``value``, which every process holds whole.

    Each process builds only its own devices' slices (``jax.make_array_from_callback``);
    no data crosses processes. The processes must pass the same value.
    """
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_host(array: jax.Array) -> np.ndarray:
    """The whole value of ``array`` on this process's host.

    Arrays this process holds whole (one process, or replicated over the mesh) are copied
    from a local device; any other is gathered from every process
    (``multihost_utils.process_allgather``), which every process must then call too.
    """
    if array.is_fully_addressable or array.is_fully_replicated:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


__all__ = [
    "CPU_COLLECTIVES",
    "ENV_COORDINATOR",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "check_coordinator",
    "initialize",
    "is_main_process",
    "to_global",
    "to_host",
]
