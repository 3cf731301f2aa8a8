"""Regrouping stacked layers `[L, ...]` into pipeline stages `[num_stages, layers_per_stage, ...]`.

Uneven layer counts (e.g. 6 layers on 4 stages) are padded: every stage gets `max(layer_counts)`
layer slots, stage s holds its `layer_counts[s]` consecutive layers in its first slots and zeros
after them, and a per-slot flag (`StageLayout.mask`) turns the padding slots into identity layers
(`masked_layer`). The executor needs one shape for all stages, so padding is what makes uneven
stages fit it.

What padding costs:
- time: a padding slot computes a full layer whose result is discarded (`jnp.where`), but only on
  stages with fewer layers than the largest; a lockstep pipeline tick already waits for the slowest
  (fullest) stage, so the step time does not grow, only the FLOPs of the lighter devices;
- memory: the padding slots' parameters (zeros), their gradients and optimizer state, and their
  stashed residuals, i.e. what `num_stages * max(layer_counts) - num_layers` extra layers take;
- the padding slots' gradients are exactly zero, so they stay zero under SGD or Adam without weight
  decay, and `from_stages` drops them.
With even counts there is no padding, no flag and no cost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


@dataclasses.dataclass(frozen=True)
class StageLayout:
    """Which consecutive layers each logical pipeline stage runs: stage s runs `layer_counts[s]`."""

    layer_counts: tuple[int, ...]

    def __post_init__(self):
        counts = tuple(int(c) for c in self.layer_counts)
        object.__setattr__(self, "layer_counts", counts)
        if not counts:
            raise ValueError("StageLayout: layer_counts must name at least one stage")
        if any(c < 0 for c in counts) or sum(counts) < 1:
            raise ValueError(f"StageLayout: layer counts must be >= 0 with at least one layer, got {counts}")

    @classmethod
    def balanced(cls, num_layers: int, num_stages: int) -> StageLayout:
        """`num_layers` over `num_stages` as evenly as possible; the first stages take the remainder."""
        if num_layers < 1 or num_stages < 1:
            raise ValueError(f"StageLayout.balanced: need num_layers, num_stages >= 1, got {num_layers}, {num_stages}")
        base, extra = divmod(num_layers, num_stages)
        return cls(tuple(base + (s < extra) for s in range(num_stages)))

    @property
    def num_stages(self) -> int:
        return len(self.layer_counts)

    @property
    def num_layers(self) -> int:
        return sum(self.layer_counts)

    @property
    def layers_per_stage(self) -> int:
        """Layer slots per stage (the largest count)."""
        return max(self.layer_counts)

    @property
    def padded(self) -> bool:
        return any(c != self.layers_per_stage for c in self.layer_counts)

    @property
    def slot_layer(self) -> np.ndarray:
        """`[S, layers_per_stage]` int: the model layer in each slot, -1 for padding."""
        starts = np.cumsum((0,) + self.layer_counts[:-1])
        slots = np.arange(self.layers_per_stage)[None, :]
        return np.where(slots < np.array(self.layer_counts)[:, None], starts[:, None] + slots, -1)

    @property
    def mask(self) -> np.ndarray:
        """`[S, layers_per_stage]` float32: 1 for a real layer, 0 for a padding slot."""
        return (self.slot_layer >= 0).astype(np.float32)

    def to_stages(self, blocks: PyTree) -> PyTree:
        """Leaves `[L, ...]` -> `[S, layers_per_stage, ...]`, padding slots zero."""
        slot_layer = self.slot_layer
        index = np.maximum(slot_layer, 0).reshape(-1)
        real = slot_layer >= 0

        def regroup(a):
            self._check_layers(a)
            grouped = jnp.take(a, index, axis=0).reshape(slot_layer.shape + a.shape[1:])
            if not self.padded:
                return grouped
            keep = real.reshape(real.shape + (1,) * (a.ndim - 1))
            return jnp.where(keep, grouped, jnp.zeros((), a.dtype))

        return jax.tree.map(regroup, blocks)

    def from_stages(self, stages: PyTree) -> PyTree:
        """Leaves `[S, layers_per_stage, ...]` -> `[L, ...]`, padding slots dropped."""
        flat = self.slot_layer.reshape(-1)
        real = np.flatnonzero(flat >= 0)  # slots in layer order: layers are consecutive per stage

        def ungroup(a):
            if a.shape[:2] != self.slot_layer.shape:
                raise ValueError(f"from_stages: expected leading axes {self.slot_layer.shape}, got {a.shape}")
            return jnp.take(a.reshape((-1,) + a.shape[2:]), real, axis=0)

        return jax.tree.map(ungroup, stages)

    def _check_layers(self, a: jax.Array) -> None:
        if a.ndim < 1 or a.shape[0] != self.num_layers:
            raise ValueError(f"to_stages: expected a leading layer axis of {self.num_layers}, got shape {a.shape}")


def masked_layer(layer_fn: Callable[[PyTree, PyTree], PyTree]) -> Callable[[PyTree, PyTree], PyTree]:
    """`layer_fn` on `{"layer": params, "active": scalar}`: the identity where `active` is 0.

    The flag is compared, not multiplied, so its gradient is zero and a padding slot's parameter
    gradients are exactly zero.
    """

    def layer(params: PyTree, x: PyTree) -> PyTree:
        y = layer_fn(params["layer"], x)
        active = params["active"] > 0.5
        return jax.tree.map(lambda new, old: jnp.where(active, new, old), y, x)

    return layer


def check_layout(layout: StageLayout, num_layers: int, num_stages: int) -> None:
    """`layout` must cover `num_layers` layers over `num_stages` stages."""
    if layout.num_stages != num_stages:
        raise ValueError(f"layout: {layout.num_stages} stages {layout.layer_counts}, the schedule has {num_stages}")
    if layout.num_layers != num_layers:
        raise ValueError(f"layout: {layout.num_layers} layers {layout.layer_counts}, the model has {num_layers}")


def as_layout(layout: StageLayout | Sequence[int] | None, num_layers: int, num_stages: int) -> StageLayout:
    """A `StageLayout` from a layout, explicit per-stage counts, or None (balanced)."""
    if layout is None:
        layout = StageLayout.balanced(num_layers, num_stages)
    elif not isinstance(layout, StageLayout):
        layout = StageLayout(tuple(layout))
    check_layout(layout, num_layers, num_stages)
    return layout
