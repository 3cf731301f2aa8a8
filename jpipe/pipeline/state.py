"""The executor's typed state: the tick loop's carry, what an op reads, and one device's table rows.

All are registered pytree dataclasses (`jax.tree_util.register_dataclass`): a buffer that the
program's mode does not use is None, an empty subtree.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jpipe.pipeline.program import Delivery, Lane, Program

PyTree = Any


class Buffer(enum.Enum):
    """The carry's buffers an op may write (`Carry` fields); an op kernel declares the ones it writes."""

    STASH = "stash"
    WEIGHT_STASH = "weight_stash"
    RECOMPUTED = "recomputed"
    GRADS = "grads"
    LOSS = "loss"
    METRICS = "metrics"
    END_GRADS = "end_grads"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Carry:
    """What one device carries from tick to tick (leaves are per device).

    Attributes:
      end_grads: float32 accumulators of the loss's and the prologue's parameter gradients
        (`jpipe.pipeline.end_slots.EndSlots`).
      grads: float32 accumulators of the device's stage gradients, leaves `[v, ...]`.
      inbox: arrived messages and inputs, leaves `[num_inbox_slots + 1, ...]` (+ a scratch slot).
      loss: the summed (mean over microbatches) loss, a float32 scalar.
      metrics: the summed (mean over microbatches) auxiliary outputs of a `has_aux` loss, a dict of
        float32 arrays (None without `has_aux`).
      outboxes: per lane, the message of the previous tick, sent during this one (overlapped sends).
      results: input gradients (or outputs, forward only) of the device's own microbatches,
        leaves `[k + 1, ...]` (+ a scratch slot); with `deliver`.
      stash: the forwards' residuals, leaves `[num_stash_slots, ...]`.
      weight_stash: what an I leaves its W, leaves `[num_weight_slots, ...]`.
      recomputed: the residuals R ops rebuilt, leaves `[num_recompute_slots, ...]` (None without R).
    """

    end_grads: list | None = None
    grads: PyTree = None
    inbox: PyTree = None
    loss: jax.Array | None = None
    metrics: dict[str, jax.Array] | None = None
    outboxes: tuple | None = None
    results: PyTree = None
    stash: PyTree = None
    weight_stash: PyTree = None
    recomputed: PyTree = None

    def select(self, buffers: tuple[Buffer, ...]) -> Carry:
        """Only `buffers` (the others None): what a `lax.cond` branch that writes them takes and returns."""
        return Carry(**{buffer.value: getattr(self, buffer.value) for buffer in buffers})

    def update(self, part: Carry, buffers: tuple[Buffer, ...]) -> Carry:
        """This carry with `buffers` taken from `part`."""
        return dataclasses.replace(self, **{buffer.value: getattr(part, buffer.value) for buffer in buffers})

    def view(self) -> View:
        """The buffers ops read (never write) in a tick."""
        return View(inbox=self.inbox, stash=self.stash, weight_stash=self.weight_stash, recomputed=self.recomputed)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class View:
    """What the ops of a tick read as it was when the tick started: inbox, stash, weight stash and the
    recomputed residuals."""

    inbox: PyTree
    stash: PyTree = None
    weight_stash: PyTree = None
    recomputed: PyTree = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LaneRow:
    """One device's row of a `Lane` (scalars unless said; `[T, ...]` before the scan slices a tick).

    `recv_slot`, `result_index` and `channel_used` are `[C]`, one per lane channel; `channel_used`
    is the same on every device (all devices take the same branch of a conditional send).
    `is_first`/`is_last` are Python ints inside a braided tick's branch, built for one combination.
    """

    op: jax.Array
    chunk: jax.Array
    microbatch: jax.Array
    is_first: jax.Array | int
    is_last: jax.Array | int
    inbox_slot: jax.Array
    stash_slot: jax.Array
    weight_slot: jax.Array
    recompute_slot: jax.Array
    recv_slot: jax.Array
    result_index: jax.Array
    channel_used: jax.Array

    @classmethod
    def of(cls, lane: Lane, device, num_inbox: int, k: int) -> LaneRow:
        """Device `device`'s rows of `lane`, `[T, ...]`."""
        tables = {
            field.name: getattr(lane, field.name) for field in dataclasses.fields(cls) if field.name != "channel_used"
        }
        rows = {name: _device_row(table, device) for name, table in tables.items()}
        return cls(**rows, channel_used=jnp.asarray(lane.channel_used(num_inbox, k)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeliveryRow:
    """One device's row of the `Delivery` table: `send_index` scalar, the others `[Ci]`."""

    send_index: jax.Array
    recv_slot: jax.Array
    channel_used: jax.Array

    @classmethod
    def of(cls, delivery: Delivery, device, num_inbox: int) -> DeliveryRow:
        return cls(
            send_index=_device_row(delivery.send_index, device),
            recv_slot=_device_row(delivery.recv_slot, device),
            channel_used=jnp.asarray(delivery.channel_used(num_inbox)),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TickRow:
    """One device's row of every table in a tick (`[T, ...]` before the scan slices it).

    Attributes:
      lanes: one `LaneRow` per program lane.
      delivery: the input deliveries.
      pair: 0 where the tick runs at most one op, else 1 + its braided kind (`Program.pair_kinds`);
        None when nothing is braided.
    """

    lanes: tuple[LaneRow, ...]
    delivery: DeliveryRow
    pair: jax.Array | None = None

    @classmethod
    def of(cls, program: Program, device) -> TickRow:
        """Device `device`'s rows of `program`'s tables, `[T, ...]` (the scan's `xs`)."""
        num_inbox, k = program.num_inbox_slots, program.microbatches_per_device
        lanes = tuple(LaneRow.of(lane, device, num_inbox, k) for lane in program.lanes)
        pair = _device_row(program.pair_kinds[1], device) if program.braided else None
        return cls(lanes=lanes, delivery=DeliveryRow.of(program.delivery, device, num_inbox), pair=pair)


def _device_row(table, device) -> jax.Array:
    """`table[:, device]` of a `[T, p, ...]` table (dynamic device index)."""
    return lax.dynamic_index_in_dim(jnp.asarray(table), device, axis=1, keepdims=False)
