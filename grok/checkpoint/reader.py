"""Reading the released Hugging Face layout into the Haiku parameter tree: the orchestration.

``ReleasedCheckpoint`` is a directory's files (``files``) checked against the weight table
(``validate``) before a byte of weight data is read. ``read`` then builds every parameter of
a ``LoadPlan`` (``plan``) in turn, each by one of three routes:

- plain: its shards read into host buffers as its dtype (FP8 codes dequantised on the way,
  unit by unit) and placed (``staging``, ``units``);
- FP8 on the device: the 1-byte codes read and placed as they are, then dequantised there,
  whole or a layer at a time (``fp8``);
- ``quantize`` of an FP8 weight whose scales the mode's layout holds (``ParamPlan.kept``):
  the codes read and placed as they are, their scales rearranged on the host;
- ``quantize`` otherwise: each layer built as float32 by one of the first two, then
  quantised to float8 on the device (per output channel, or per channel and 128 inputs).

On any error the arrays built so far are deleted and nothing is returned.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grok.checkpoint import fp8, staging, units
from grok.checkpoint.files import CheckpointFiles
from grok.checkpoint.finite import non_finite_error
from grok.checkpoint.plan import LoadPlan, ParamPlan, plan_load
from grok.checkpoint.validate import check_tensors
from grok.config import GrokConfig
from grok.errors import CheckpointError
from grok.params import WeightSpec, weight_specs
from grok.quant import QUANT_DTYPES, scale_shape

Params = dict[str, dict[str, jax.Array]]


class ReleasedCheckpoint:
    """A directory in the released layout (spec section 4), validated against a config.

    ``source``: the directory, or its files already opened (``CheckpointFiles``).
    ``specs``: the weight table when the caller has it (a ``LoadPlan``'s), else
    ``weight_specs(config)``.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | CheckpointFiles,
        config: GrokConfig,
        *,
        specs: Sequence[WeightSpec] | None = None,
    ):
        self.files = source if isinstance(source, CheckpointFiles) else CheckpointFiles(source)
        self.config = config
        self.specs = tuple(weight_specs(config) if specs is None else specs)
        self.scales = check_tensors(self.files, self.specs)  # FP8 weight -> its scale's name
        self._device_scales: dict[str, fp8.DeviceScales | None] = {}

    def device_scales(self, spec: WeightSpec) -> fp8.DeviceScales | None:
        """``fp8.device_scales`` of ``spec`` (its scale tensors read once)."""
        key = f"{spec.module}/{spec.name}"
        if key not in self._device_scales:
            self._device_scales[key] = fp8.device_scales(self.files, self.scales, spec)
        return self._device_scales[key]

    def kept_codes(self, quantize: str | None) -> tuple[str | None, frozenset[str]]:
        """(the mode, the parameters kept as codes) of a load asking for ``quantize``
        (``fp8.kept_codes``: a plan's ``quantize`` and ``kept``)."""
        return fp8.kept_codes(quantize, self.specs, self.device_scales)

    def close(self) -> None:
        self.files.close()

    def __enter__(self) -> ReleasedCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load_params(
        self,
        dtype: Any,
        *,
        mesh: jax.sharding.Mesh | None = None,
        quantize: str | None = None,
        check_finite: bool = True,
        on_bytes: Callable[[int], None] | None = None,
    ) -> Params:
        """The whole parameter tree as ``dtype`` on ``mesh`` (None: the first device).

        ``read`` of ``plan_load(config, mesh, ...)``; see there.
        """
        if quantize not in (None, "fp8", "fp8-block"):
            raise CheckpointError(f"quantize must be None, 'fp8' or 'fp8-block', got {quantize!r}")
        mode, kept = self.kept_codes(quantize)
        plan = plan_load(self.config, mesh, dtype=dtype, quantize=mode, specs=self.specs, kept=kept)
        return self.read(plan, on_bytes=on_bytes, check_finite=check_finite)

    def read(
        self,
        plan: LoadPlan,
        *,
        on_bytes: Callable[[int], None] | None = None,
        check_finite: bool = True,
        workers: int | None = None,
    ) -> Params:
        """The whole Haiku parameter tree that ``plan`` describes, each array built shard by shard.

        ``on_bytes(n)`` is called after each shard with the bytes it produced (progress; they
        add up to ``plan.read_bytes``). With ``plan.quantize`` every matrix but the router is
        float8_e4m3fn ``name`` plus float32 ``name_scale`` (``grok.quant.scale_shape`` of the
        mode): an FP8 weight's codes kept as they are where the plan says so, any other
        quantised on the device one layer at a time.
        ``check_finite`` checks every weight as it is read (CheckpointError naming the bad
        tensor); quantising always checks. ``workers``: copy threads (default: every core).
        """
        copier = units.Copier(self.files, check_finite or plan.quantize is not None)
        buffers = staging.host_buffers(plan, self.files.nbytes)
        params: Params = {}
        try:
            with ThreadPoolExecutor(
                workers or os.cpu_count() or 1, thread_name_prefix="grok-load"
            ) as pool:
                pipeline = staging.Pipeline(copier, buffers, pool)
                for param in plan.params:
                    spec = param.spec
                    module = params.setdefault(spec.module, {})
                    device = self.device_scales(spec)
                    if param.quantized:
                        load = self._load_kept if param.kept else self._load_quantized
                        q, s = load(param, device, plan.quantize, pipeline, on_bytes)
                        module[spec.name], module[spec.name + "_scale"] = q, s
                        continue
                    module[spec.name] = self.build(param, device, pipeline, on_bytes)
        except BaseException:
            for array in jax.tree_util.tree_leaves(params):
                array.delete()
            raise
        finally:
            buffers.drain()
        return params

    def build(
        self,
        param: ParamPlan,
        device: fp8.DeviceScales | None,
        pipeline: staging.Pipeline,
        on_bytes: Callable[[int], None] | None = None,
        layer: int | None = None,
    ) -> jax.Array:
        """``param`` as its build dtype on its sharding; ``layer``: only that layer, [1, ...].

        FP8 weights travel as their 1-byte codes and are dequantised on the device where
        their scales allow it (``device``, from ``fp8.device_scales``) and ``fp8.on_device``
        says so; otherwise on the host, unit by unit.
        """
        if device is not None and fp8.on_device(param, layer, device.codes_dtype):
            return self._build_fp8(param, device, pipeline, on_bytes, layer)
        return self._read(param, param.build_dtype, pipeline, on_bytes, layer)

    def _read(self, param, dtype, pipeline, on_bytes, layer) -> jax.Array:
        """``param`` (``layer``'s [1, ...] only, if given) read into ``dtype`` host buffers."""
        spec, itemsize = param.spec, np.dtype(dtype).itemsize
        shape, shards = param.region(layer)

        def units_for(shard) -> list[units.CopyUnit]:
            return units.shard_units(self.files, self.scales, spec, shard.index, itemsize)

        return pipeline.read(shape, param.sharding, shards, dtype, units_for, on_bytes)

    def _build_fp8(self, param, device, pipeline, on_bytes, layer) -> jax.Array:
        """FP8 ``param`` as its build dtype: the codes' bytes copied into shard buffers as
        they are, placed with its sharding, dequantised there (``grok.quant.dequantize``).

        The whole parameter at once where its codes (1 byte an element, all shards this
        process holds) take no more memory than its largest device shard of the result
        (``fp8.whole``): one compile per (shape, sharding, dtype). Else one layer at a time
        into a preallocated result (host memory: one layer of codes besides the result);
        one compile per (layer shape, sharding, dtype), shared by all layers.
        """
        spec, grid = param.spec, device.grid
        if pipeline.copier.check_finite:
            self._check_scales(spec, grid)
        out_dtype = jnp.dtype(param.build_dtype)
        counted = None if on_bytes is None else (lambda n: on_bytes(n * out_dtype.itemsize))
        codes_dtype = device.codes_dtype
        if layer is not None or not spec.per_layer or fp8.whole(param):
            codes = self._read(param, codes_dtype, pipeline, counted, layer)
            g = grid if layer is None else grid[layer : layer + 1]
            dequant = fp8.dequantize_fn(spec.lead, out_dtype, param.sharding)
            w = dequant(codes, g, device.rows, device.cols)
            w.block_until_ready()  # the codes freed before the next parameter's are read
            pipeline.buffers.delete(codes)
            return w
        out = fp8.zeros(spec.shape, out_dtype, param.sharding)
        update = fp8.dequantize_into_fn(spec.lead, out_dtype, param.sharding)
        try:
            for i in range(spec.shape[0]):
                codes = self._read(param, codes_dtype, pipeline, counted, i)
                out = update(out, codes, grid[i : i + 1], device.rows, device.cols, i)
                pipeline.buffers.delete(codes)
        except BaseException:
            out.delete()
            raise
        return out

    def _check_scales(self, spec: WeightSpec, grid: np.ndarray) -> None:
        """CheckpointError naming the first unit whose scales are not all finite."""
        if np.all(np.isfinite(grid)):
            return
        bad = np.nonzero(~np.isfinite(grid.reshape(math.prod(grid.shape[: spec.lead]), -1)))
        unit = np.unravel_index(bad[0][0], grid.shape[: spec.lead])
        raise non_finite_error(self.files.directory, [spec.unit_name(tuple(int(i) for i in unit))])

    def _load_kept(self, param, device, mode, pipeline, on_bytes):
        """(float8 weight, float32 scale) of an FP8 weight kept as it is: its codes' bytes
        copied into shard buffers (checked for NaN codes), its scales rearranged on the host
        into the mode's layout (``fp8.kept_scale``)."""
        self._check_scales(param.spec, device.grid)
        scale = fp8.kept_scale(device, param.spec, mode)
        q = self._read(param, device.codes_dtype, pipeline, on_bytes, None)
        try:
            s = jax.make_array_from_callback(scale.shape, param.scale_sharding, scale.__getitem__)
        except BaseException:
            q.delete()
            raise
        return q, s

    def _load_quantized(self, param, device, mode, pipeline, on_bytes):
        """(float8 weight, float32 scale in ``mode``'s layout), one layer at a time."""
        spec = param.spec
        qs = fp8.zeros(spec.shape, QUANT_DTYPES[mode], param.sharding)
        s_shape = scale_shape(spec.shape, spec.in_dims, mode)
        ss = fp8.zeros(s_shape, jnp.float32, param.scale_sharding)
        update = fp8.quantize_into_fn(spec.in_dims, mode, param.sharding, param.scale_sharding)
        for layer in range(spec.shape[0]):
            w = self.build(param, device, pipeline, on_bytes, layer=layer)
            qs, ss = update(qs, ss, w, layer)
            pipeline.buffers.delete(w)
        return qs, ss
