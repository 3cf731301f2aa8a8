"""One tick of the executor: every device runs its lanes' kernels, then messages move on the rings.

`TickMachine.tick(state, row)` is the body of the executor's `lax.scan` over ticks, a function of
one device's `Carry` and `TickRow` (inside `shard_map`, where the ring sends are `ppermute`s over
the stage axis). In a tick, each op a device runs alone is one `lax.cond` per op kind, on the
buffers its kernel declares (`jpipe.pipeline.kernels`); a braided tick's two ops run in one branch
per kind of pair, layer by layer in lockstep (`jpipe.pipeline.lockstep.run_in_lockstep`), neither reading
what the other writes. Then every device sends each lane's message on each of the lane's channels,
and receivers store what their rows mark in inbox slots (or, for a result of one of their own
microbatches, in the results buffer); delivered inputs follow on the input channels.

With overlapped sends (`Program.send_latency` 1) the message produced in tick t is sent at the
start of tick t + 1 from the carry's outbox, by a `ppermute` that nothing in that tick's compute
depends on, so the transfer runs while the tick computes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jpipe.pipeline.arrays import accumulator_dtype, put, slots, take, varying, zeros
from jpipe.pipeline.kernels import Kernel, TickContext, check_metrics
from jpipe.pipeline.lockstep import run_alone, run_in_lockstep
from jpipe.pipeline.offload import HostBuffer
from jpipe.pipeline.program import Program
from jpipe.pipeline.stage import StageOps
from jpipe.pipeline.state import Buffer, Carry, LaneRow, TickRow, View

PyTree = Any

BRAIDED_SCOPE = "braided_tick"
"""The `jax.named_scope` of a braided tick's ops: in the `op_name` metadata of everything they compile to."""


@dataclasses.dataclass(frozen=True, eq=False)
class TickMachine:
    """A program's tick, for one device.

    Attributes:
      program: the tables.
      context: the device's parameters, batch and model ends (`TickContext`).
      kernels: the mode's kernels (`jpipe.pipeline.kernels.TRAINING`, ...).
      ops: the stage's ops for ticks that run one op.
      braid_ops: the stage's ops for braided ticks (layers unrolled), default `ops`.
      axis: the stage (pipeline) mesh axis.
    """

    program: Program
    context: TickContext
    kernels: tuple[Kernel, ...]
    ops: StageOps
    braid_ops: StageOps | None = None
    axis: str = "stage"

    def initial_carry(self, rows: TickRow) -> Carry:
        """Zero buffers sized by the program (`rows` gives the shapes of the device's residuals)."""
        program, context = self.program, self.context
        x_like = context.x_like
        carry = Carry(inbox=slots(program.num_inbox_slots + 1, x_like))  # + a scratch slot
        if program.send_latency:
            carry = dataclasses.replace(carry, outboxes=tuple(x_like for _ in program.lanes))
        if program.deliver:
            carry = dataclasses.replace(carry, results=slots(program.microbatches_per_device + 1, x_like))
        if Buffer.STASH in self._written():
            carry = dataclasses.replace(carry, **self._training_buffers(rows))
        if Buffer.LOSS in self._written():
            dtype = accumulator_dtype(*(a.dtype for a in jax.tree.leaves(context.loss_params)))
            carry = dataclasses.replace(carry, loss=jnp.zeros((), dtype), metrics=self._zero_metrics())
        carry = varying(carry, context.manual_axes)
        offloaded = {
            buffer.value: HostBuffer.zeros_like(getattr(carry, buffer.value), context.manual_axes)
            for buffer in context.offload
            if _slot_count(getattr(carry, buffer.value))  # a buffer no op uses stays as it is
        }
        return dataclasses.replace(carry, **offloaded)

    def _zero_metrics(self) -> dict[str, jax.Array] | None:
        """Float32 zeros shaped like one microbatch's metrics of a `has_aux` loss (None without)."""
        context = self.context
        if not context.has_aux:
            return None
        target = take(context.targets, 0)
        shapes = jax.eval_shape(context.loss_and_metrics, context.loss_params, context.x_like, target)
        check_metrics(shapes)
        return jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), shapes[1])

    def _written(self) -> set[Buffer]:
        return {buffer for kernel in self.kernels for buffer in kernel.buffers(self.context)}

    def _training_buffers(self, rows: TickRow) -> dict:
        """Stash, weight stash and gradient accumulators (shapes traced from dead code, removed by XLA)."""
        context = self.context
        some_params = take(context.local_params, rows.lanes[0].chunk[0])
        residuals = self.ops.forward(some_params, context.x_like)[1]
        weight_residuals = self.ops.input_grad(some_params, residuals, context.x_like, context.x_like)[1]
        buffers = {}
        if self.program.recompute:  # F keeps its input; R rebuilds the residuals
            buffers["recomputed"] = slots(self.program.num_recompute_slots, residuals)
            residuals = context.x_like
        return buffers | {
            "stash": slots(self.program.num_stash_slots, residuals),
            "weight_stash": slots(self.program.num_weight_slots, weight_residuals),
            "grads": jax.tree.map(lambda a: zeros((), a, accumulator_dtype(a.dtype)), context.local_params),
            "end_grads": context.end_slots.zeros(),
        }

    def run(self, carry: Carry, rows: TickRow) -> Carry:
        """All ticks: the state after the last."""
        return lax.scan(self.tick, carry, rows)[0]

    def tick(self, state: Carry, row: TickRow) -> tuple[Carry, None]:
        """One tick: the lanes' ops, then the sends (`lax.scan` body)."""
        in_flight = self._send_outboxes(state) if self.program.send_latency else None
        state, messages = self._compute_staged(state, row) if self.context.offload else self._compute(state, row)
        inbox, results = state.inbox, state.results
        for index, lane in enumerate(self.program.lanes):
            lane_in_flight = in_flight[index] if in_flight is not None else None
            inbox, results = self._receive(
                lane.channels, row.lanes[index], inbox, results, messages[index], lane_in_flight
            )
        inbox = self._deliver_inputs(row, inbox)
        state = dataclasses.replace(state, inbox=inbox, results=results)
        if self.program.send_latency:
            state = dataclasses.replace(state, outboxes=tuple(messages))
        return state, None

    def _kernels_alone(self) -> list[Kernel]:
        """The kernels of the op kinds that some tick runs alone (each gets a branch)."""
        alone = self.program.ops_run_alone()
        return [kernel for kernel in self.kernels if (alone == kernel.code).any()]

    def _compute(self, state: Carry, row: TickRow) -> tuple[Carry, list[PyTree]]:
        """Every op kind and every braided kind under its own `lax.cond`: the state and each lane's message."""
        x_like = self.context.x_like
        messages = [x_like for _ in self.program.lanes]
        single = row.pair == 0 if self.program.braided else True
        for kernel in self._kernels_alone():
            buffers = kernel.buffers(self.context)
            runs_here = (row.lanes[0].op == kernel.code) & single
            part, produced = lax.cond(
                runs_here, self._alone(kernel), self._skip_alone, state.select(buffers), row, state.view()
            )
            state = state.update(part, buffers)
            messages[0] = _where(runs_here, produced, messages[0])
        kinds, _ = self.program.pair_kinds
        for index, kind in enumerate(kinds, start=1):
            run, buffers = self._braided(kind)
            runs_here = row.pair == index
            part, produced = lax.cond(runs_here, run, self._skip_pair, state.select(buffers), row, state.view())
            state = state.update(part, buffers)
            messages = [_where(runs_here, new, old) for new, old in zip(produced, messages)]
        return state, messages

    def _compute_staged(self, state: Carry, row: TickRow) -> tuple[Carry, list[PyTree]]:
        """`_compute` with the offloaded buffers staged through device memory, outside every `lax.cond`.

        Before the ops, each lane's slot of each offloaded buffer is copied from the host into a
        device buffer of one slot per lane, and the lanes' rows point at their own staging slot; the
        ops read and write only that. After them, each lane's staging slot is copied back to the
        host: to the lane's slot when its op writes the buffer, else to the scratch slot. (Inside a
        conditional branch the TPU compiler copies a whole host buffer to the device and back.)
        """
        host = {buffer: getattr(state, buffer.value) for buffer in self.context.offload}
        host = {buffer: stored for buffer, stored in host.items() if isinstance(stored, HostBuffer)}
        staged = {
            buffer.value: stored.load([_slot(lane, buffer) for lane in row.lanes]) for buffer, stored in host.items()
        }
        lanes = tuple(
            dataclasses.replace(lane, **{_SLOT_FIELD[buffer]: jnp.int32(index) for buffer in host})
            for index, lane in enumerate(row.lanes)
        )
        state, messages = self._compute(dataclasses.replace(state, **staged), dataclasses.replace(row, lanes=lanes))
        written = {}
        for buffer, stored in host.items():
            writers = jnp.asarray([kernel.code for kernel in self.kernels if buffer in kernel.buffers(self.context)])
            for index, lane in enumerate(row.lanes):
                slot = jnp.where(jnp.isin(lane.op, writers), _slot(lane, buffer), stored.scratch)
                stored = stored.store(slot, take(getattr(state, buffer.value), index))
            written[buffer.value] = stored
        return dataclasses.replace(state, **written), messages

    def _alone(self, kernel: Kernel):
        """A kernel as one branch `(state, row, view) -> (state, message)` of a tick with one op."""

        def run(state: Carry, row: TickRow, view: View):
            return run_alone(kernel.run(self.context, self.ops, state, row.lanes[0], view))(state)

        return run

    def _skip_alone(self, state: Carry, row: TickRow, view: View):
        return state, self.context.x_like

    def _skip_pair(self, state: Carry, row: TickRow, view: View):
        return state, (self.context.x_like, self.context.x_like)

    def _braided(self, kind: tuple[int, ...]):
        """Both ops of a braided kind in one branch, layer by layer in lockstep: `(branch, buffers)`.

        Neither reads what the other writes: both read the tick's view, and each writes its own
        slots. Two ops that both add into the gradient accumulator run one after the other.
        """
        first_code, first_is_first, first_is_last, second_code, second_is_first, second_is_last = kind
        by_code = {kernel.code: kernel for kernel in self.kernels}
        first, second = by_code[first_code], by_code[second_code]
        in_lockstep = not (first.accumulates and second.accumulates)
        ops = self.braid_ops or self.ops

        def run(state: Carry, row: TickRow, view: View):
            first_row = dataclasses.replace(row.lanes[0], is_first=first_is_first, is_last=first_is_last)
            second_row = dataclasses.replace(row.lanes[1], is_first=second_is_first, is_last=second_is_last)
            with jax.named_scope(BRAIDED_SCOPE):
                if in_lockstep:
                    finish_first, finish_second = run_in_lockstep(
                        first.run(self.context, ops, state, first_row, view),
                        second.run(self.context, ops, state, second_row, view),
                    )
                    state, first_message = finish_first(state)
                else:
                    state, first_message = run_alone(first.run(self.context, ops, state, first_row, view))(state)
                    finish_second = run_alone(second.run(self.context, ops, state, second_row, view))
                state, second_message = finish_second(state)
            return state, (first_message, second_message)

        return run, tuple(dict.fromkeys(first.buffers(self.context) + second.buffers(self.context)))

    def _send(self, message: PyTree, offset: int, used) -> PyTree:
        """`message` from every device to device `+offset`, skipped (on all devices) when unused.

        With overlapped sends the send is unconditional: a `ppermute` inside a `lax.cond` branch is
        a start immediately followed by its done, with nothing the compiler could run in between.
        """
        if offset == 0:
            return message
        p = self.program.schedule.num_devices
        perm = [(d, (d + offset) % p) for d in range(p)]

        def permute(msg):
            return jax.tree.map(lambda a: lax.ppermute(a, self.axis, perm), msg)

        if self.program.send_latency:
            return permute(message)
        # The predicate is the same on every device, so all take the same branch.
        return lax.cond(used, permute, lambda msg: msg, message)

    def _send_outboxes(self, state: Carry) -> list[list[PyTree]]:
        """Per lane and channel, the previous tick's message, sent first: it travels while the tick computes."""
        return [
            [self._send(outbox, offset, True) for offset in lane.channels]
            for outbox, lane in zip(state.outboxes, self.program.lanes)
        ]

    def _receive(self, channels: tuple[int, ...], row: LaneRow, inbox, results, message, in_flight):
        """Store what arrives on a lane's `channels`: in the inbox, or as a result of an own microbatch."""
        k = self.program.microbatches_per_device
        for c, offset in enumerate(channels):
            if in_flight is not None and offset != 0:
                arrived = in_flight[c]
            else:
                arrived = self._send(message, offset, row.channel_used[c])
            inbox = put(inbox, row.recv_slot[c], arrived)
            if self.program.deliver:
                index = row.result_index[c]
                results = lax.cond(index < k, lambda r, a=arrived, i=index: put(r, i, a), lambda r: r, results)
        return inbox, results

    def _deliver_inputs(self, row: TickRow, inbox):
        """Owners send one of their microbatches on each input channel; receivers store it in the inbox."""
        delivery = self.program.delivery
        if not delivery.channels:
            return inbox
        outgoing = take(self.context.inputs, row.delivery.send_index)
        for c, offset in enumerate(delivery.channels):
            arrived = self._send(outgoing, offset, row.delivery.channel_used[c])
            inbox = put(inbox, row.delivery.recv_slot[c], arrived)
        return inbox


def _where(flag, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)


_SLOT_FIELD = {Buffer.STASH: "stash_slot", Buffer.WEIGHT_STASH: "weight_slot"}
"""The `LaneRow` field that names an offloadable buffer's slot."""


def _slot(lane: LaneRow, buffer: Buffer) -> jax.Array:
    return getattr(lane, _SLOT_FIELD[buffer])


def _slot_count(tree: PyTree) -> int:
    """The slots of a buffer (its leaves' leading axis)."""
    return jax.tree.leaves(tree)[0].shape[0]
