"""Float32 accumulators for the gradients of the model's ends: the loss's and the prologue's parameters."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jpipe.pipeline.arrays import accumulator_dtype, spec_of, zeros
from jpipe.pipeline.program import Program

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class EndSlots:
    """Where the end gradients accumulate, one buffer per leaf unless two leaves can share one.

    A device accumulates the loss's parameter gradients only where it runs a microbatch's last hop,
    and the prologue's only where it runs a first hop. When no device does both, a prologue
    parameter and a loss parameter of the same shape, dtype and sharding (an untied embedding table
    `[V, D]` and a head stored `[V, D]`) share one buffer: each device holds one of the two sums in
    it, and the end of the step separates them with a mask before the reduction over the pipeline.

    Attributes:
      buffers: one example array per accumulator (its shape, dtype and sharding).
      loss, prologue: per leaf of `loss_params` / `prologue_params` (flattened), its buffer index.
      shared: whether any buffer is shared.
      first_devices, last_devices: bool `[p]`, the devices running first / last hops.
    """

    buffers: tuple
    loss: tuple[int, ...]
    prologue: tuple[int, ...]
    shared: bool
    first_devices: jax.Array
    last_devices: jax.Array

    @classmethod
    def of(cls, program: Program, loss_params: PyTree, prologue_params: PyTree) -> EndSlots:
        loss_leaves = jax.tree.leaves(loss_params)
        first_devices, last_devices = program.first_hop_devices(), program.last_hop_devices()
        can_share = not (first_devices & last_devices).any()
        buffers = list(loss_leaves)
        prologue, taken = [], set()
        for leaf in jax.tree.leaves(prologue_params):
            candidates = (j for j, other in enumerate(loss_leaves) if j not in taken and _same_buffer(leaf, other))
            match = next(candidates, None) if can_share else None
            if match is None:
                prologue.append(len(buffers))
                buffers.append(leaf)
            else:
                taken.add(match)
                prologue.append(match)
        return cls(
            buffers=tuple(buffers),
            loss=tuple(range(len(loss_leaves))),
            prologue=tuple(prologue),
            shared=bool(taken),
            first_devices=jnp.asarray(first_devices),
            last_devices=jnp.asarray(last_devices),
        )

    def zeros(self) -> list[jax.Array]:
        """The accumulators, zero (float32, or float64 for float64 leaves)."""
        return [zeros((), like, accumulator_dtype(like.dtype)) for like in self.buffers]

    def add(self, buffers: list, indices: tuple[int, ...], grads: PyTree) -> list:
        """`buffers` with the flattened `grads` added into the buffers at `indices`."""
        buffers = list(buffers)
        for index, g in zip(indices, jax.tree.leaves(grads)):
            buffers[index] = buffers[index] + g.astype(buffers[index].dtype)
        return buffers

    def holders(self, device) -> tuple[jax.Array, jax.Array]:
        """Whether `device` runs first hops, and whether it runs last hops (traced booleans)."""
        return self.first_devices[device], self.last_devices[device]

    def reduce(self, buffers, indices, holds, like: PyTree, axis: str, data_mean: Callable) -> PyTree:
        """The sums at `indices`, psum'd over the pipeline, in `like`'s structure and dtypes."""
        leaves = []
        for index, example in zip(indices, jax.tree.leaves(like)):
            value = buffers[index]
            if self.shared:
                value = jnp.where(holds, value, jnp.zeros_like(value))
            leaves.append(data_mean(lax.psum(value, axis)).astype(example.dtype))
        return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _same_buffer(a: jax.Array, b: jax.Array) -> bool:
    """Whether one accumulator can hold the gradients of `a` and of `b` (same shape, dtype and sharding)."""
    return a.shape == b.shape and accumulator_dtype(a.dtype) == accumulator_dtype(b.dtype) and spec_of(a) == spec_of(b)
