"""Mesh axis names and mesh construction.

Axis names are ordered from the slowest link to the fastest: data-parallel replicas talk once per
step (a gradient reduction, or FSDP's gather and scatter), pipeline stages exchange one activation
per tick with their neighbours, and tensor-parallel shards reduce inside every layer. On hardware
whose devices are enumerated fast-link-first (TPU slices, GPU hosts), putting `tensor` last keeps
tensor-parallel groups on the fastest links.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

DATA = "data"
STAGE = "stage"
TENSOR = "tensor"
MESH_AXES = (DATA, STAGE, TENSOR)


def make_mesh(
    data: int = 1, stage: int = 1, tensor: int = 1, *, devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """A `(data, stage, tensor)` mesh over the first `data * stage * tensor` devices.

    Every axis is `AxisType.Auto`: the pipeline executor takes the stage and data axes manual inside
    its `shard_map`, and the compiler shards the rest (tensor) from the parameters' shardings, so
    model code needs no sharding annotation on every contraction (as explicit axes would ask).
    Size-1 axes are kept, so code can always name all three.

    Args:
      data, stage, tensor: the axis sizes, each >= 1.
      devices: the devices to use (default `jax.devices()`); the first `data * stage * tensor`
        are taken in order.
    """
    sizes = {DATA: data, STAGE: stage, TENSOR: tensor}
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"make_mesh: {name} must be an integer >= 1, got {size!r}")
    needed = data * stage * tensor
    available = list(jax.devices() if devices is None else devices)
    if len(available) < needed:
        raise ValueError(
            f"make_mesh: data={data} x stage={stage} x tensor={tensor} needs {needed} devices, "
            f"only {len(available)} available ({jax.default_backend()}); on CPU, fake devices come from "
            f"jax.config.update('jax_num_cpu_devices', N) before JAX starts"
        )
    return jax.make_mesh(
        (data, stage, tensor),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * 3,
        devices=available[:needed],
    )
