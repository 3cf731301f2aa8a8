"""Activation offload: which of the executor's long-lived buffers live in host memory.

A forward's stash lives from its F to its backward, a weight stash from its I to its W: in 1F1B the
first stage holds p stashes at once, and the zero-bubble schedules' deferred W's hold their weight
residuals for many ticks. With offload, such a buffer is allocated in the host's memory space
(`jax.memory.Space.Host`, XLA's `S(5)` on TPU) as a `HostBuffer`. Each tick stages it (the tick
machine's `_compute_staged`): every lane's slot is copied to a device buffer of one slot per lane
before the ops and back to the host after them, outside the tick's conditionals. The TPU compiler
makes these copies asynchronous (`dynamic-slice-start/done`, `dynamic-update-slice-start/done`);
the device keeps the staged slots and their copies in flight, not the buffer. What that saves, and
where it costs more than it saves, is measured in docs/memory.md (no transfer time is measured).

On CPU the host is the device: the copies are no-ops, the program runs as without offload, and the
results are identical (what the test suite checks); `memory_analysis()` then reports no host bytes.

Choices (`PipelineOptions.offload`):
  "none": every buffer on the device (default);
  "stash": the forwards' stashes (`Buffer.STASH`);
  "weights": the weight stashes an I leaves its W (`Buffer.WEIGHT_STASH`);
  "all": both.
The residuals an R op rebuilds (`Buffer.RECOMPUTED`) stay on the device: they live from R to the
op right after it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jpipe.pipeline.arrays import put, take, varying
from jpipe.pipeline.state import Buffer

PyTree = Any

CHOICES = {
    "none": frozenset(),
    "stash": frozenset({Buffer.STASH}),
    "weights": frozenset({Buffer.WEIGHT_STASH}),
    "all": frozenset({Buffer.STASH, Buffer.WEIGHT_STASH}),
}


def offloaded(choice: str) -> frozenset[Buffer]:
    """The buffers `choice` (a key of `CHOICES`) puts in host memory."""
    if choice not in CHOICES:
        raise ValueError(f"offload: expected one of {', '.join(map(repr, CHOICES))}, got {choice!r}")
    return CHOICES[choice]


def to_host(tree: PyTree) -> PyTree:
    """`tree`'s leaves copied to the host memory space (inside `jit`: an XLA copy to host)."""
    return jax.device_put(tree, jax.memory.Space.Host)


def to_device(tree: PyTree) -> PyTree:
    """`tree`'s leaves copied back to device memory."""
    return jax.device_put(tree, jax.memory.Space.Device)


LANES = 128
"""The minor dimension of a host buffer's leaves (a TPU tile's lane count)."""


@dataclasses.dataclass(frozen=True)
class HostBuffer:
    """A carry buffer kept in host memory: each leaf `[slots, ...]` stored as `[slots + 1, rows, 128]`.

    Each slot is one leaf's values, flat and zero-padded to `rows x 128`, with the slot axis major:
    a slot is whole tiles, so its copies need no re-layout of the whole buffer on the device (the
    compiler did that for leaves like `[slots, 1, 4, 64, 16]`) and slicing one slot works for packed
    types (bfloat16, bool) too. The extra last slot is scratch (`scratch`): a tick writes every
    lane's staged slot back, there when the lane's op wrote nothing.

    Attributes:
      flat: the leaves, `[slots + 1, rows, 128]`, in host memory.
      treedef, shapes: the tree's structure and its leaves' shapes without the slot axis (static).
    """

    flat: tuple
    treedef: Any = dataclasses.field(metadata={"static": True})
    shapes: tuple = dataclasses.field(metadata={"static": True})

    @classmethod
    def zeros_like(cls, tree: PyTree, manual_axes: tuple[str, ...]) -> HostBuffer:
        """A zero host buffer for `tree` (leaves `[slots, ...]`), varying over `manual_axes`."""
        leaves, treedef = jax.tree.flatten(tree)
        flat = tuple(
            to_host(varying(jnp.zeros((a.shape[0] + 1, _rows(a.shape[1:]), LANES), a.dtype), manual_axes))
            for a in leaves
        )
        return cls(flat, treedef, tuple(a.shape[1:] for a in leaves))

    @property
    def scratch(self) -> int:
        return self.flat[0].shape[0] - 1

    def load(self, slots: list) -> PyTree:
        """Slots `slots` copied to the device, stacked: leaves `[len(slots), ...]`."""
        leaves = [
            jnp.stack([_unpadded(to_device(take(a, slot)), shape) for slot in slots])
            for a, shape in zip(self.flat, self.shapes)
        ]
        return jax.tree.unflatten(self.treedef, leaves)

    def store(self, slot, value: PyTree) -> HostBuffer:
        """This buffer with `value` (leaves shaped like one slot) copied to the host into `slot`."""
        flat = tuple(put(a, slot, to_host(_padded(v))) for a, v in zip(self.flat, jax.tree.leaves(value)))
        return dataclasses.replace(self, flat=flat)


jax.tree_util.register_dataclass(HostBuffer)


def _rows(shape: tuple[int, ...]) -> int:
    return max(1, -(-math.prod(shape) // LANES))


def _padded(value: jax.Array) -> jax.Array:
    """One slot's value -> `[rows, 128]`, flat and zero-padded."""
    size = value.size
    flat = jnp.pad(value.reshape(size), (0, _rows(value.shape) * LANES - size))
    return flat.reshape(-1, LANES)


def _unpadded(tiles: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """`[rows, 128]` -> the slot's value of `shape`."""
    return lax.slice(tiles.reshape(-1), (0,), (math.prod(shape),)).reshape(shape)
