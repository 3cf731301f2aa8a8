"""Where each logical stage lives, and the one place that converts between the two row orders.

Stage parameters (and their gradients and optimizer state) are stacked with a leading stage axis.
That axis has two orders:

- **logical**: row `s` is stage `s` (the order a model's layers come in);
- **device-major**: row `d * v + k` is device d's k-th local stage (its stages in increasing
  order). Sharded `P(stage)` over the pipeline axis, each device then holds exactly the rows of
  its own stages, also for interleaved (loop) and V placements, and nothing moves between devices.

`StagePlacement` owns that mapping. The executor, the AD-GPipe baseline and the pipelined model
convert through it (`to_device_order`, `to_logical_order`, `split_devices`), so the permutation
is written once. Checkpoints are stored by layer (model layout); `PipelinedLM.to_pipeline` /
`to_model` go through it too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

if TYPE_CHECKING:
    from jpipe.schedules.ir import Schedule

PyTree = Any


@dataclasses.dataclass(frozen=True)
class StagePlacement:
    """Which device holds each logical pipeline stage.

    Attributes:
      device_of_stage: `device_of_stage[s]` is the device holding logical stage s (a schedule's
        `placement`); every device holds the same number `virtual` of stages.
      num_devices: pipeline devices `p`.
    """

    device_of_stage: tuple[int, ...]
    num_devices: int

    def __post_init__(self):
        object.__setattr__(self, "device_of_stage", tuple(int(d) for d in self.device_of_stage))
        counts = np.bincount(np.asarray(self.device_of_stage, np.int64), minlength=self.num_devices)
        if len(counts) != self.num_devices or len(set(counts.tolist())) != 1 or counts[0] == 0:
            raise ValueError(
                f"StagePlacement: every one of {self.num_devices} devices must hold the same number of stages, "
                f"got device_of_stage={self.device_of_stage}"
            )

    @classmethod
    def of(cls, schedule: Schedule) -> StagePlacement:
        """The placement of `schedule`'s stages."""
        return cls(schedule.placement, schedule.num_devices)

    @classmethod
    def loop(cls, num_devices: int, virtual: int = 1) -> StagePlacement:
        """Interleaved (circular) placement: stage `d + k * num_devices` on device d."""
        return cls(tuple(s % num_devices for s in range(num_devices * virtual)), num_devices)

    @property
    def num_stages(self) -> int:
        return len(self.device_of_stage)

    @property
    def virtual(self) -> int:
        """Stages per device."""
        return self.num_stages // self.num_devices

    def stages_of(self, device: int) -> tuple[int, ...]:
        """Logical stages on `device` in increasing order: its local chunks 0..v-1."""
        return tuple(s for s, d in enumerate(self.device_of_stage) if d == device)

    @functools.cached_property
    def device_major(self) -> np.ndarray:
        """`[S]` int32: `device_major[d * v + k]` is the logical stage of device d's chunk k."""
        return np.array([s for d in range(self.num_devices) for s in self.stages_of(d)], np.int32)

    def to_device_order(self, tree: PyTree, mesh: jax.sharding.Mesh | None = None) -> PyTree:
        """Leaves `[S, ...]`: logical rows -> device-major rows."""
        return _take_rows(tree, self.device_major, mesh)

    def to_logical_order(self, tree: PyTree, mesh: jax.sharding.Mesh | None = None) -> PyTree:
        """Leaves `[S, ...]`: device-major rows -> logical rows."""
        return _take_rows(tree, np.argsort(self.device_major), mesh)

    def split_devices(self, tree: PyTree) -> PyTree:
        """Leaves `[S, ...]` in device-major order -> `[p, v, ...]` (device d's stages at `[d]`)."""
        p, v = self.num_devices, self.virtual
        return jax.tree.map(lambda a: a.reshape((p, v) + a.shape[1:]), tree)

    def merge_devices(self, tree: PyTree) -> PyTree:
        """Inverse of `split_devices`: `[p, v, ...]` -> `[S, ...]` in device-major order."""
        return jax.tree.map(lambda a: a.reshape((self.num_stages,) + a.shape[2:]), tree)


def _take_rows(tree: PyTree, order: np.ndarray, mesh: jax.sharding.Mesh | None) -> PyTree:
    """`a[order]` on every leaf's leading axis; the identity costs nothing; NumPy stays NumPy.

    With a `mesh`, each leaf is first made replicated: permuting rows across a sharded axis is
    communication either way, and this makes it explicit (and valid under explicit sharding).
    """
    if np.array_equal(order, np.arange(len(order))):
        return tree

    def take(a):
        if isinstance(a, np.ndarray):
            return np.take(a, order, axis=0)
        if mesh is not None:
            a = jax.sharding.reshard(a, NamedSharding(mesh, P()))
        return jnp.take(a, order, axis=0)

    return jax.tree.map(take, tree)
