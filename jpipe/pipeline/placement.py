"""Where each logical stage lives, and the one place that converts between the row orders.

Stage parameters (and their gradients and optimizer state) are stacked with a leading stage axis.
That axis has these orders:

- **logical**: row `s` is stage `s` (the order a model's layers come in);
- **device-major**: row `d * v + k` is device d's k-th local stage (its stages in increasing
  order). Sharded `P(stage)` over the pipeline axis, each device then holds exactly the rows of
  its own stages, also for interleaved (loop) and V placements, and nothing moves between devices;
- **model**: row `k` is model stage `k` (`Schedule.model_stage`). Without replicas it is the
  logical order. With replicas (BitPipe, DualPipe: two logical stages on two devices compute the
  same block of layers with the same parameters) there are fewer model stages `K` than logical
  stages `S`; the device-major rows then hold one copy of a model stage's row per replica.

`StagePlacement` owns these mappings. The executor, the AD-GPipe baseline and the pipelined model
convert through it (`to_device_order`, `to_logical_order`, `model_to_device`, `device_to_model`,
`model_rows`, `sum_replicas`, `split_devices`), so each permutation is written once. Checkpoints are stored by
layer (model layout); `PipelinedLM.to_pipeline` / `to_model` go through it too.
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
      model_stage: `model_stage[s]` is the model stage logical stage s computes (a schedule's
        `model_stage`, numbered 0..K-1); None (the default) means stage s computes model stage s.
    """

    device_of_stage: tuple[int, ...]
    num_devices: int
    model_stage: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "device_of_stage", tuple(int(d) for d in self.device_of_stage))
        if self.model_stage is not None:
            model_stage = tuple(int(k) for k in self.model_stage)
            if len(model_stage) != len(self.device_of_stage) or set(model_stage) != set(range(len(set(model_stage)))):
                raise ValueError(
                    f"StagePlacement: model_stage must give each of the {len(self.device_of_stage)} logical stages "
                    f"a model stage, numbered 0..K-1 without gaps, got model_stage={self.model_stage}"
                )
            object.__setattr__(
                self, "model_stage", None if model_stage == tuple(range(len(model_stage))) else model_stage
            )
        counts = np.bincount(np.asarray(self.device_of_stage, np.int64), minlength=self.num_devices)
        if len(counts) != self.num_devices or len(set(counts.tolist())) != 1 or counts[0] == 0:
            raise ValueError(
                f"StagePlacement: every one of {self.num_devices} devices must hold the same number of stages, "
                f"got device_of_stage={self.device_of_stage}"
            )

    @classmethod
    def of(cls, schedule: Schedule) -> StagePlacement:
        """The placement of `schedule`'s stages, and the model stage each one computes."""
        return cls(schedule.placement, schedule.num_devices, schedule.model_stage)

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

    @property
    def num_model_stages(self) -> int:
        """Model stages `K` (distinct blocks of parameters); `num_stages` without replicas."""
        return self.num_stages if self.model_stage is None else len(set(self.model_stage))

    @property
    def has_replicas(self) -> bool:
        """Whether some model stage is computed by more than one logical stage."""
        return self.num_model_stages < self.num_stages

    @functools.cached_property
    def device_major_model(self) -> np.ndarray:
        """`[S]` int32: the model stage of each device-major row (`device_major` without replicas)."""
        if self.model_stage is None:
            return self.device_major
        return np.array([self.model_stage[s] for s in self.device_major], np.int32)

    def model_to_device(self, tree: PyTree, mesh: jax.sharding.Mesh | None = None) -> PyTree:
        """Leaves `[K, ...]` in model-stage order -> `[S, ...]` device-major rows.

        A replica's row is a copy of its model stage's row. Without replicas this is `to_device_order`.
        """
        return _take_rows(tree, self.device_major_model, mesh)

    def device_to_model(self, tree: PyTree, mesh: jax.sharding.Mesh | None = None) -> PyTree:
        """Leaves `[S, ...]` device-major rows -> `[K, ...]` in model-stage order, summing replicas' rows.

        The adjoint of `model_to_device`: applied to gradients of the device-major copies it gives
        the gradient of each model stage's shared parameters. Without replicas this is
        `to_logical_order`.
        """
        if not self.has_replicas:
            return self.to_logical_order(tree, mesh)
        return _sum_rows(tree, self.device_major_model, self.num_model_stages, mesh)

    def model_rows(self, tree: PyTree, mesh: jax.sharding.Mesh | None = None) -> PyTree:
        """Leaves `[S, ...]` device-major rows -> `[K, ...]` in model-stage order, one copy each.

        For parameters (and optimizer state) whose replica rows are equal copies: each model stage
        takes the row of its first replica (lowest logical stage). Without replicas this is
        `to_logical_order`; the inverse of `model_to_device` on such trees.
        """
        if not self.has_replicas:
            return self.to_logical_order(tree, mesh)
        row_of = {int(s): row for row, s in enumerate(self.device_major)}  # logical stage -> its row
        first = {}
        for stage in range(self.num_stages):  # increasing: the first replica of each model stage wins
            first.setdefault(self.model_stage[stage], row_of[stage])
        return _take_rows(tree, np.array([first[k] for k in range(self.num_model_stages)], np.int32), mesh)

    def sum_replicas(self, tree: PyTree, mesh: jax.sharding.Mesh | None = None) -> PyTree:
        """Leaves `[S, ...]` device-major -> `[S, ...]`, each row the sum of its model stage's replica rows.

        For gradients kept device-major: every copy of a model stage gets the same (total) gradient,
        so an optimizer applied row by row keeps the copies equal. The identity without replicas.
        """
        if not self.has_replicas:
            return tree
        return self.model_to_device(self.device_to_model(tree, mesh), mesh)

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


def _sum_rows(tree: PyTree, segments: np.ndarray, num_segments: int, mesh: jax.sharding.Mesh | None) -> PyTree:
    """`out[k] = sum of a[r] over rows r with segments[r] == k` on every leaf's leading axis.

    NumPy stays NumPy; with a `mesh` each leaf is first made replicated (as in `_take_rows`).
    """

    def total(a):
        if isinstance(a, np.ndarray):
            out = np.zeros((num_segments,) + a.shape[1:], a.dtype)
            np.add.at(out, segments, a)
            return out
        if mesh is not None:
            a = jax.sharding.reshard(a, NamedSharding(mesh, P()))
        return jax.ops.segment_sum(a, jnp.asarray(segments), num_segments=num_segments, indices_are_sorted=False)

    return jax.tree.map(total, tree)


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
