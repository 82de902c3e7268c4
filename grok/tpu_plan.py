"""The decode and prefill programs compiled for a slice of accelerator chips, with nothing
allocated: XLA's own memory analysis per chip beside the memory plan (``grok.memory_plan``).

Glossary: B batch, T prompt tokens, S cache slots, P max_position_embeddings, L layers.

The TPU compiler needs no TPU: with libtpu installed (the ``tpu`` extra), a topology name
(``v5p:2x2x2``, ``v5e:4x4``, ``v6e:2x2``, ``v4:2x2x1``, ...) gives the chips of a slice
(``topology_devices``), and the programs ``grok.generate`` runs (``PREFILL_PROGRAM``: prefill
into a fresh cache; ``DECODE_PROGRAM``: the donated decode loop) compile for a mesh of them
from abstract arguments that carry the library's own shardings (the load plan's). The
kernels are those ``grok.kernels.select`` picks for the mesh's devices, so the program is the
one a TPU VM would compile. ``compile_programs`` reports each program's argument, output,
aliased and temporary bytes per chip, compile seconds and XLA's cost analysis; a program that
does not fit the chip's memory is a ``MemoryPlanError`` naming it and the shortfall.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grok.checkpoint.plan import LoadPlan, plan_load
from grok.config import GrokConfig
from grok.decode import DenseCache, FixedSampler
from grok.errors import ConfigError, MemoryPlanError
from grok.generate import DECODE_PROGRAM, PREFILL_PROGRAM
from grok.kernels import select
from grok.memory_plan import GIB, kv_cache_bytes
from grok.model import forward_fns
from grok.rope import RopeTable
from grok.sampling import Sampler
from grok.sharding import activation_sharding, kv_cache_sharding, make_mesh, mesh_sizes

# Memory (HBM) and its bandwidth per chip, by ``device_kind``: Google's published figures;
# 95.74 GiB is what the compiler reports as available on a v5p chip. A chip of several
# devices (v4 as libtpu's topologies list it: two cores, no megacore) shares them.
CHIP_MEMORY = {
    "TPU v4": 32 * GIB,
    "TPU v5 lite": 16 * GIB,
    "TPU v5": int(95.74 * GIB),
    "TPU v6 lite": 32 * GIB,
}
CHIP_BANDWIDTH = {  # bytes per second
    "TPU v4": 1.2e12,
    "TPU v5 lite": 8.19e11,
    "TPU v5": 2.765e12,
    "TPU v6 lite": 1.64e12,
}

# libtpu, loaded to compile only, looks for the chips of this host and warns on stderr when
# there are none; these tell it not to look, and let several processes load it at once (its
# lock file guards chips, which a compile-only process never opens).
COMPILE_ONLY_ENV = {
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_ACCELERATOR_TYPE": "v5p-8",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


def compile_only_environment() -> None:
    """For a process that compiles for TPUs but never runs on one (``grok-plan``, the tests):
    ``COMPILE_ONLY_ENV`` where not set, and JAX on the CPU unless ``JAX_PLATFORMS`` says
    otherwise (on a TPU VM, the chips stay free for what runs there). Call it before libtpu
    is first loaded and before JAX picks its backends."""
    for name, value in COMPILE_ONLY_ENV.items():
        os.environ.setdefault(name, value)
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")


def topology_devices(name: str) -> list[jax.Device]:
    """The devices of TPU slice ``name`` (libtpu's topology names: ``v5p:2x2x2``, ``v5e:4x4``,
    ``v6e:2x2``, ...): compile-only devices, from any host. ConfigError when libtpu is not
    installed (the ``tpu`` extra) or does not know the name."""
    from jax.experimental import topologies  # loads libtpu

    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as e:  # JAX raises RuntimeError subclasses with libtpu's message
        if "not installed" in str(e):
            raise ConfigError(
                f"topology {name!r}: the TPU compiler is not installed; "
                "pip install 'grok[tpu]' (libtpu for this jax)"
            ) from None
        raise ConfigError(f"topology {name!r}: {' '.join(str(e).split())}") from None


def chip_memory_bytes(devices: Sequence[jax.Device]) -> int | None:
    """HBM per device of a slice (``CHIP_MEMORY`` over the devices of one chip), or None for a
    kind the table lacks."""
    chip = CHIP_MEMORY.get(devices[0].device_kind)
    return None if chip is None else chip // _devices_per_chip(devices)


def chip_bandwidth(devices: Sequence[jax.Device]) -> float | None:
    """HBM bytes per second per device of a slice, or None for a kind the table lacks."""
    bandwidth = CHIP_BANDWIDTH.get(devices[0].device_kind)
    return None if bandwidth is None else bandwidth / _devices_per_chip(devices)


def _devices_per_chip(devices: Sequence[jax.Device]) -> int:
    coords = [tuple(getattr(d, "coords", (d.id,))) for d in devices]
    return max(1, len(coords) // len(set(coords)))


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """One compiled program, per device (XLA's ``memory_analysis`` and ``cost_analysis``).

    Attributes:
      name: e.g. "decode B=8 S=8192" or "prefill B=1 T=8192 S=8192".
      argument_bytes, output_bytes, alias_bytes, temp_bytes: XLA's per-device figures
        (an aliased output, the donated cache, is counted in arguments and outputs alike).
      compile_s: seconds to trace, lower and compile.
      flops, bytes_accessed: XLA's cost analysis (it counts each loop body once: one layer
        of one step), or None where the backend gives none.
      hlo: the compiled program's text (what each buffer is, for checking copies).
    """

    name: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    compile_s: float
    flops: float | None
    bytes_accessed: float | None
    hlo: str = dataclasses.field(default="", repr=False)

    @property
    def peak_bytes(self) -> int:
        """Arguments, outputs not aliased to them, and temporaries: live at once at worst."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


@dataclasses.dataclass(frozen=True)
class SliceSetup:
    """What the programs are compiled for: a mesh of devices, a model, its load plan."""

    config: GrokConfig
    mesh: Mesh
    dtype: jnp.dtype
    quantize: str | None
    load: LoadPlan

    @property
    def devices(self) -> list[jax.Device]:
        return list(self.mesh.devices.flat)


def slice_setup(
    config: GrokConfig,
    devices: Sequence[jax.Device],
    *,
    data: int = 1,
    model: int | None = None,
    dtype: Any = jnp.bfloat16,
    quantize: str | None = None,
) -> SliceSetup:
    """A ("data", "model") mesh over ``devices`` (``model`` defaults to the rest) and the load
    plan of ``config`` on it; ShardingError or MemoryPlanError before anything compiles."""
    mesh = make_mesh(data, model, devices=devices)
    load = plan_load(config, mesh, dtype=dtype, quantize=quantize)
    return SliceSetup(config, mesh, jnp.dtype(dtype), quantize, load)


def _abstract_params(setup: SliceSetup) -> dict:
    """The parameters as ``jax.ShapeDtypeStruct``s with the load plan's shardings."""
    params: dict = {}
    for p in setup.load.params:
        module = params.setdefault(p.spec.module, {})
        if p.quantized:
            module[p.spec.name] = jax.ShapeDtypeStruct(
                p.spec.shape, jnp.float8_e4m3fn, sharding=p.sharding
            )
            scale = tuple(1 if d in p.spec.in_dims else n for d, n in enumerate(p.spec.shape))
            module[p.spec.name + "_scale"] = jax.ShapeDtypeStruct(
                scale, jnp.float32, sharding=p.scale_sharding
            )
        else:
            module[p.spec.name] = jax.ShapeDtypeStruct(p.spec.shape, p.dtype, sharding=p.sharding)
    return params


class _Programs:
    """The static arguments and abstract inputs of ``grok.generate``'s programs on a setup."""

    def __init__(self, setup: SliceSetup, batch: int):
        cfg, mesh = setup.config, setup.mesh
        self.replicated = NamedSharding(mesh, PartitionSpec())
        kernels = select(setup.dtype, mesh=mesh, quant=setup.quantize)
        apply = forward_fns(
            cfg, setup.dtype, "auto", setup.quantize, activation_sharding(mesh), kernels
        ).apply
        store = DenseCache(cfg, setup.dtype, kv_cache_sharding(mesh, cfg, batch), kernels)
        self.static = {
            "apply_fn": apply,
            "sampler": FixedSampler(Sampler()),
            "store": store,
            "host_sharding": self.replicated,
        }
        self.params = _abstract_params(setup)
        table = self.array((cfg.max_position_embeddings, cfg.head_dim // 2), jnp.float32)
        self.rope = RopeTable(table, table)
        self.batch = batch
        self.vocab = cfg.vocab_size

    def array(self, shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self.replicated)

    def prefill_inputs(self, tokens: int) -> tuple:
        b = self.batch
        return (
            self.params,
            self.rope,
            self.array((b, tokens), jnp.int32),  # prompts
            self.array((b,), jnp.int32),  # lengths
            self.array((b, 2), jnp.uint32),  # keys
            self.array((), jnp.int32),  # max_new
            self.array((self.vocab,), jnp.bool_),  # stop mask
        )


@dataclasses.dataclass(frozen=True)
class _Refused:
    """A program the compiler refused for want of memory: the bytes it counted, its message."""

    needed_bytes: int
    message: str


def _compile(name: str, lowered: Any, began: float) -> ProgramReport | _Refused:
    """Compiles ``lowered``: its report, or ``_Refused`` when the chip's memory is too small
    for it (any other compiler error is raised)."""
    cached = jax.config.jax_enable_compilation_cache
    try:  # a program compiled for devices that are not here never runs: nothing to cache
        jax.config.update("jax_enable_compilation_cache", False)
        compiled = lowered.compile()
    except Exception as e:  # XLA raises JaxRuntimeError; only an out-of-memory is ours
        text = " ".join(str(e).split())
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        found = re.search(r"\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", text)
        if not found:
            return _Refused(0, text[:300])
        need, have = float(found.group(1)), float(found.group(2))
        message = (
            f"{need - have:.2f} GiB short (the compiler's count: {need} GiB of the chip's "
            f"{have} GiB)"
        )
        return _Refused(int(need * GIB), message)
    finally:
        jax.config.update("jax_enable_compilation_cache", cached)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    return ProgramReport(
        name=name,
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        compile_s=time.perf_counter() - began,
        flops=cost.get("flops"),
        bytes_accessed=cost.get("bytes accessed"),
        hlo=compiled.as_text(),
    )


def _fits(report: ProgramReport | _Refused, device_bytes: int | None) -> ProgramReport | _Refused:
    """``report`` where it fits ``device_bytes`` (None: the compiler's verdict alone), else
    ``_Refused`` with the bytes it needs."""
    if isinstance(report, _Refused) or device_bytes is None or report.peak_bytes <= device_bytes:
        return report
    message = (
        f"needs {report.peak_bytes / GIB:.2f} GiB (arguments {report.argument_bytes / GIB:.2f}, "
        f"temporaries {report.temp_bytes / GIB:.2f}), the chip has {device_bytes / GIB:.2f} GiB:"
        f" {(report.peak_bytes - device_bytes) / GIB:.2f} GiB short"
    )
    return _Refused(report.peak_bytes, message)


def _checked(name: str, lowered: Any, began: float, device_bytes: int | None) -> ProgramReport:
    """The compiled program's report, or MemoryPlanError naming ``name`` and the shortfall."""
    report = _fits(_compile(name, lowered, began), device_bytes)
    if isinstance(report, _Refused):
        raise MemoryPlanError(f"{name} does not fit one chip: {report.message}")
    return report


def compile_prefill(
    setup: SliceSetup, *, batch: int, tokens: int, slots: int, device_bytes: int | None = None
) -> ProgramReport:
    """``PREFILL_PROGRAM``: prompts [batch, tokens] into a fresh cache of ``slots`` slots.
    MemoryPlanError when it does not fit a chip (the compiler's count, or ``device_bytes``)."""
    programs = _Programs(setup, batch)
    name = f"prefill B={batch} T={tokens} S={slots}"
    began = time.perf_counter()
    lowered = PREFILL_PROGRAM.lower(
        *programs.prefill_inputs(tokens), cache_len=slots, record_logits=False, **programs.static
    )
    return _checked(name, lowered, began, device_bytes)


def _lower_decode(setup: SliceSetup, batch: int, slots: int) -> tuple[str, Any, float]:
    """``DECODE_PROGRAM`` lowered for ``batch`` rows of a ``slots``-slot cache, its state laid
    out as the prefill program pins it (``grok.decode.pin``: k and v as the store's sharding,
    the rest replicated): (name, lowered, when the lowering began)."""
    programs = _Programs(setup, batch)
    inputs = programs.prefill_inputs(min(slots, 16))
    static = dict(cache_len=slots, record_logits=False, **programs.static)
    state = jax.eval_shape(lambda *a: PREFILL_PROGRAM(*a, **static), *inputs)
    cache = state.rows.cache
    kv = programs.static["store"].sharding

    def laid_out(a: jax.ShapeDtypeStruct, sharding) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

    state = jax.tree_util.tree_map(lambda a: laid_out(a, programs.replicated), state)
    cache = dataclasses.replace(state.rows.cache, k=laid_out(cache.k, kv), v=laid_out(cache.v, kv))
    state = dataclasses.replace(state, rows=dataclasses.replace(state.rows, cache=cache))
    began = time.perf_counter()
    limit = programs.array((), jnp.int32)
    lowered = DECODE_PROGRAM.lower(
        programs.params, programs.rope, state, limit, *inputs[5:], **programs.static
    )
    return f"decode B={batch} S={slots}", lowered, began


def compile_decode(
    setup: SliceSetup, *, batch: int, slots: int, device_bytes: int | None = None
) -> ProgramReport:
    """``DECODE_PROGRAM``: the decode loop over ``batch`` rows of a ``slots``-slot cache, its
    state donated. MemoryPlanError when it does not fit a chip."""
    return _checked(*_lower_decode(setup, batch, slots), device_bytes)


def decode_step_bytes(setup: SliceSetup, *, batch: int, slots: int) -> tuple[int, int]:
    """(weights, KV cache) bytes one decode step reads per device at most: every weight but
    the experts, the experts ``batch`` tokens are expected to choose (k of E each, uniformly:
    E (1 - (1 - k/E)^B) per layer), and a full cache of ``slots`` slots for ``batch`` rows."""
    cfg = setup.config
    e, k = cfg.num_local_experts, cfg.num_experts_per_tok
    chosen = e * (1 - (1 - k / e) ** batch)
    weights = 0.0
    for p in setup.load.params:
        size = math.prod(p.sharding.shard_shape(p.spec.shape))
        size *= 1 if p.quantized else p.dtype.itemsize  # FP8: one byte (scales aside)
        weights += size * chosen / e if p.spec.per_expert else size
    sizes = mesh_sizes(setup.mesh)
    kv = kv_cache_bytes(cfg, sizes, batch=batch, context=slots, dtype=setup.dtype)
    return int(weights), kv


def _need(setup: SliceSetup, decode: ProgramReport, batch: int, slots: int) -> int:
    """Bytes per device for ``batch`` x ``slots``: the plan's weights and cache, and the
    compiled decode's temporaries (they hardly grow with either: Grok-2 on a v5p slice of 8,
    0.13 GiB at batch 1 and 0.15 GiB at batch 64; ``confirm`` compiles to be sure)."""
    sizes = mesh_sizes(setup.mesh)
    kv = kv_cache_bytes(setup.config, sizes, batch=batch, context=slots, dtype=setup.dtype)
    return setup.load.memory.weights + kv + decode.temp_bytes


MAX_BATCH = 4096  # the largest batch ``largest_batch`` looks for


def largest_batch(
    setup: SliceSetup, decode: ProgramReport, *, slots: int, device_bytes: int
) -> int:
    """The largest batch (a multiple of the data axis, at most ``MAX_BATCH``) that fits
    ``device_bytes`` with a cache of ``slots`` slots, by ``_need``; 0 if none."""
    step = mesh_sizes(setup.mesh)["data"]
    low, high = 0, 1
    top = max(1, MAX_BATCH // step)
    while high <= top and _need(setup, decode, high * step, slots) <= device_bytes:
        low, high = high, high * 2
    high = min(high, top + 1)
    while high - low > 1:  # the largest j whose batch j * step fits lies in [low, high)
        mid = (low + high) // 2
        low, high = (
            (mid, high) if _need(setup, decode, mid * step, slots) <= device_bytes else (low, mid)
        )
    return low * step


def largest_context(
    setup: SliceSetup, decode: ProgramReport, *, batch: int, device_bytes: int
) -> int:
    """The largest cache (a power of two up to P, as ``grok.decode.bucket_length`` makes
    them) that fits ``device_bytes`` for ``batch`` rows, by ``_need``; 0 if none."""
    best, slots = 0, 16
    while slots <= setup.config.max_position_embeddings:
        if _need(setup, decode, batch, slots) > device_bytes:
            break
        best, slots = slots, slots * 2
    return best


def largest_compiled(
    setup: SliceSetup,
    decode: ProgramReport,
    *,
    batch: int,
    slots: int,
    device_bytes: int,
    vary: str,
    tries: int = 3,
) -> ProgramReport | None:
    """The decode program at the largest batch (``vary="batch"``, at ``slots``) or cache
    (``vary="context"``, at ``batch``) that fits, found by compiling: from the plan's estimate
    (``largest_batch``, ``largest_context``) down, a refused batch replaced by the one where
    the bytes the compiler counted, drawn as a line from the compiled ``decode`` (at
    ``batch`` x ``slots``), meet ``device_bytes``; a refused cache halved. None when ``tries``
    compiles find none."""
    step = mesh_sizes(setup.mesh)["data"]
    if vary == "batch":
        size = largest_batch(setup, decode, slots=slots, device_bytes=device_bytes)
    else:
        size = largest_context(setup, decode, batch=batch, device_bytes=device_bytes)
    for _ in range(tries):
        if size < 1:
            return None
        b, s = (size, slots) if vary == "batch" else (batch, size)
        found = _fits(_compile(*_lower_decode(setup, b, s)), device_bytes)
        if isinstance(found, ProgramReport):
            return found
        if vary == "context":
            size //= 2
            continue
        per_row = (found.needed_bytes - decode.peak_bytes) / max(1, size - batch)
        guess = batch + int((device_bytes - decode.peak_bytes) / per_row) if per_row > 0 else 0
        size = min(guess, size - step) // step * step
    return None


__all__ = [
    "CHIP_BANDWIDTH",
    "CHIP_MEMORY",
    "ProgramReport",
    "SliceSetup",
    "chip_bandwidth",
    "chip_memory_bytes",
    "compile_decode",
    "compile_only_environment",
    "compile_prefill",
    "largest_compiled",
    "decode_step_bytes",
    "largest_batch",
    "slice_setup",
    "largest_context",
    "topology_devices",
]
